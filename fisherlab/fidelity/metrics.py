"""Fidelity metrics: how closely a candidate update u tracks the exact NGD update v (docs/fidelity.md).

Pure functions on tensors. Updates are flat vectors in the original coordinates (the
:class:`~fisherlab.params.ParamSpec` ordering). Every function accepts a single candidate u of shape (P,) or
several candidates as the columns of U (P, k), compared with one reference v of shape (P,); it returns a 0-dim
tensor or a (k,) tensor accordingly. A ratio whose denominator is zero (a zero reference, a zero layer) is NaN.

The Fisher F in :func:`fisher_relative_error` and :func:`predicted_kl` is the *undamped* true Fisher; it is
given as anything with products ``F @ W`` for W (P, k): a dense (P, P) tensor, a
:class:`~fisherlab.structures.FisherMatrix` (dense or implicit), or a callable ``W -> F W``. Each function
makes exactly one product with F, so the implicit operator costs one pass over the data per call.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fisherlab.errors import InputError
from fisherlab.likelihoods import TokenLikelihood
from fisherlab.params import ParamSpec

#: Anything that multiplies (P, k) matrices by the Fisher: a tensor, a FisherMatrix, or a callable W -> F W.
FisherOperator = Any


def _columns(u: Tensor, v: Tensor) -> tuple[Tensor, Tensor, bool]:
    """U as (P, k), v as (P, 1), and whether u was a single vector."""
    if v.dim() != 1:
        raise InputError(f"the reference update must have shape (P,); got {tuple(v.shape)}")
    if u.dim() not in (1, 2) or u.shape[0] != v.shape[0]:
        raise InputError(f"candidate updates must have shape (P,) or (P, k) with P = {v.shape[0]}; "
                         f"got {tuple(u.shape)}")
    single = u.dim() == 1
    return (u.unsqueeze(1) if single else u), v.unsqueeze(1), single


def _out(x: Tensor, single: bool) -> Tensor:
    return x[0] if single else x


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """The ratio num / den, NaN where den == 0."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.nan)


def cosine(u: Tensor, v: Tensor) -> Tensor:
    """Cosine similarity uᵀv / (‖u‖ ‖v‖) (dimensionless, in [−1, 1]).

    Args:
        u: Candidate update (P,) or candidates (P, k).
        v: Reference update (P,).

    Returns:
        0-dim tensor, or (k,).
    """
    U, V, single = _columns(u, v)
    return _out(_ratio((U * V).sum(0), U.norm(dim=0) * V.norm(dim=0)), single)


def layer_cosines(u: Tensor, v: Tensor, spec: ParamSpec) -> Tensor:
    """Cosine similarity restricted to the parameters of each layer (``spec.layers()`` order).

    Args:
        u: Candidate update (P,) or candidates (P, k).
        v: Reference update (P,).
        spec: The parameter ordering of u and v.

    Returns:
        (L,) for a single candidate, (L, k) otherwise; L = ``len(spec.layers())``.
    """
    U, _, single = _columns(u, v)
    blocks = spec.blocks("layer")
    out = torch.stack([cosine(U[ix.to(U.device)], v[ix.to(v.device)]) for ix in blocks.values()])
    return out[:, 0] if single else out


def relative_error(u: Tensor, v: Tensor) -> Tensor:
    """‖u − v‖ / ‖v‖ (dimensionless).

    Args:
        u: Candidate update (P,) or candidates (P, k).
        v: Reference update (P,).
    """
    U, V, single = _columns(u, v)
    return _out(_ratio((U - V).norm(dim=0), V.norm(dim=0).expand(U.shape[1])), single)


def fisher_product(F: FisherOperator, W: Tensor) -> Tensor:
    """F W for W (P, k): ``F @ W`` for tensors and Fisher matrices, ``F(W)`` for callables."""
    if isinstance(F, Tensor) or hasattr(F, "__matmul__"):
        return F @ W  # type: ignore[operator]
    if callable(F):
        return F(W)
    raise InputError(f"F must be a (P, P) tensor, a FisherMatrix or a callable W -> F W; got {type(F)}")


def quadratic_forms(F: FisherOperator, W: Tensor) -> Tensor:
    """wᵢᵀ F wᵢ for each column of W (P, k), with one product; returns (k,)."""
    if W.dim() != 2:
        raise InputError(f"W must have shape (P, k); got {tuple(W.shape)}")
    return (W * fisher_product(F, W)).sum(0)


def fisher_relative_error(u: Tensor, v: Tensor, F: FisherOperator) -> Tensor:
    """√((u−v)ᵀ F (u−v)) / √(vᵀ F v), the error in the Fisher (KL) metric (dimensionless).

    Args:
        u: Candidate update (P,) or candidates (P, k).
        v: Reference update (P,).
        F: The undamped true Fisher (see the module docstring); one product with k + 1 columns.
    """
    U, V, single = _columns(u, v)
    q = quadratic_forms(F, torch.cat([U - V, V], dim=1)).clamp_min(0)
    return _out(_ratio(q[:-1].sqrt(), q[-1].sqrt().expand(U.shape[1])), single)


def predicted_kl(u: Tensor, F: FisherOperator) -> Tensor:
    """½ uᵀ F u, the second-order prediction of the KL divergence caused by the step u (nats).

    Args:
        u: Update (P,) or updates (P, k).
        F: The undamped true Fisher (see the module docstring).
    """
    U = u.unsqueeze(1) if u.dim() == 1 else u
    q = 0.5 * quadratic_forms(F, U)
    return q[0] if u.dim() == 1 else q


def fisher_metrics(u: Tensor, v: Tensor, F: FisherOperator) -> tuple[Tensor, Tensor]:
    """:func:`fisher_relative_error` and :func:`predicted_kl` of the candidates u, from one product F [U v].

    F(u − v) = Fu − Fv, so the two metrics' 2k + 1 columns of products are k + 1: on an implicit Fisher every
    column is a matrix-free product, as costly as an iteration of the exact solve.

    Args:
        u: Candidate update (P,) or candidates (P, k).
        v: Reference update (P,).
        F: The undamped true Fisher (see the module docstring).

    Returns:
        The Fisher relative errors and the predicted KLs (nats), each () for a single candidate, else (k,).
    """
    U, V, single = _columns(u, v)
    FW = fisher_product(F, torch.cat([U, V], dim=1))
    FU, FV = FW[:, :-1], FW[:, -1:]
    err = ((U - V) * (FU - FV)).sum(0).clamp_min(0)
    vFv = (V * FV).sum(0).clamp_min(0)
    return _out(_ratio(err.sqrt(), vFv.sqrt().expand(U.shape[1])), single), _out(0.5 * (U * FU).sum(0), single)


def _mean(per_sample: Tensor, count: int | None) -> Tensor:
    """The mean of ``per_sample`` (N,), or its sum divided by ``count`` (a rank's share of a global mean)."""
    return per_sample.mean() if count is None else per_sample.sum() / count


def measured_kl(likelihood: object, z_before: Tensor, z_after: Tensor, count: int | None = None,
                y: Tensor | None = None) -> Tensor:
    """Mean over the batch of KL(p(· | z_before) ‖ p(· | z_after)) (nats); 0-dim tensor.

    For a sequence model (``likelihood`` a :class:`~fisherlab.likelihoods.TokenLikelihood`, outputs flattened to
    (N, T·C)) each sample's KL is c Σ_t m_nt KL_nt with c = N / N_tok, so the mean is the mean KL per counted token
    (docs/sequences.md); ``y`` gives the token mask m.

    Args:
        likelihood: A :class:`~fisherlab.likelihoods.Likelihood` (its ``kl``).
        z_before: Outputs before the step, (N, C) (a sequence model: (N, T·C)).
        z_after: Outputs after the step, same shape.
        count: Divide the sum over these N samples by ``count`` instead of N: in a data-parallel run, the global
            number of samples, so that the ranks' results sum (all-reduced) to the global mean.
        y: Canonical targets (``likelihood.check_targets``), passed on to a likelihood whose ``kl`` takes them
            (a TokenLikelihood: for its mask of ignored tokens); ignored by the others.
    """
    if z_before.shape != z_after.shape:
        raise InputError(f"outputs before {tuple(z_before.shape)} and after {tuple(z_after.shape)} the step differ")
    if isinstance(likelihood, TokenLikelihood):
        return _mean(likelihood.kl(z_before, z_after, y), count)
    return _mean(likelihood.kl(z_before, z_after), count)  # type: ignore[attr-defined]


def loss_change(likelihood: object, z_before: Tensor, z_after: Tensor, y: Tensor, count: int | None = None) -> Tensor:
    """L(θ + u) − L(θ) with L the mean negative log-likelihood (nats per sample); negative is a decrease.

    For a sequence model (a :class:`~fisherlab.likelihoods.TokenLikelihood` on outputs (N, T·C)) L is the mean
    over the counted tokens, as the training loss.

    Args:
        likelihood: A :class:`~fisherlab.likelihoods.Likelihood` (its ``nll``).
        z_before: Outputs before the step, (N, C) (a sequence model: (N, T·C)).
        z_after: Outputs after the step, same shape.
        y: Canonical targets (N, ...) (``likelihood.check_targets``; a sequence model: labels (N, T)).
        count: As for :func:`measured_kl`.
    """
    nll = likelihood.nll  # type: ignore[attr-defined]
    return _mean(nll(z_after, y) - nll(z_before, y), count)


__all__ = ["cosine", "fisher_metrics", "fisher_product", "fisher_relative_error", "layer_cosines", "loss_change",
           "measured_kl", "predicted_kl", "quadratic_forms", "relative_error"]
