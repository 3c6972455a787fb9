"""Likelihoods p(y | z): the loss, its gradient in output space, the output-space Fisher Λ(z), sampling, and KL.

docs/method.md. Each likelihood maps a batch of network outputs ``z`` of shape (N, C) to per-sample quantities.
Targets: categorical — int64 labels of shape (N,) in [0, C), C ≥ 2; Gaussian — floats of shape (N, C); Bernoulli —
floats in {0, 1} of shape (N, C). Losses are the per-sample negative log-likelihoods without constants
(the Gaussian loss is ‖z − y‖² / (2σ²)), so L(θ) is their mean.

The Fisher engines only need :meth:`Likelihood.fisher_factor` (a square root B of Λ = B Bᵀ) and
:meth:`Likelihood.fisher_apply` (Λ w); the GGN uses the Hessian of the loss in ``z`` computed by autograd,
independently of the closed forms, which is how the identity GGN = true Fisher is checked rather than assumed.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torch.func import grad, hessian, vmap

from fisherlab.errors import InputError


class Likelihood:
    """Base class. Subclasses implement the closed forms; users may register their own with :func:`register`.

    Attributes:
        name: Registry name.
        ggn_equals_fisher: Whether ∇²_z ℓ = Λ(z) for every target (true for exponential families in their
            natural parameters); a likelihood without that property must set it to False.
    """

    name: ClassVar[str] = ""
    ggn_equals_fisher: ClassVar[bool] = True

    def check_targets(self, z: Tensor, y: Tensor) -> Tensor:
        """Validate targets ``y`` for outputs ``z`` (N, C) and return them in canonical shape and dtype."""
        raise NotImplementedError

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        """Per-sample negative log-likelihood, shape (N,)."""
        raise NotImplementedError

    def grad_z(self, z: Tensor, y: Tensor) -> Tensor:
        """∇_z ℓ(z_n, y_n), shape (N, C)."""
        raise NotImplementedError

    def fisher_factor(self, z: Tensor) -> Tensor:
        """A factor B_n of the output-space Fisher, Λ(z_n) = B_n B_nᵀ; shape (N, C, R) with R ≤ C."""
        raise NotImplementedError

    def fisher_apply(self, z: Tensor, w: Tensor) -> Tensor:
        """Λ(z_n) w_n for w of shape (N, C); returns (N, C)."""
        raise NotImplementedError

    def sample(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """Targets drawn from p(· | z_n): shape (N, S) for labels, (N, S, C) otherwise."""
        raise NotImplementedError

    def kl(self, z_p: Tensor, z_q: Tensor) -> Tensor:
        """KL(p(· | z_p) ‖ p(· | z_q)) per sample, shape (N,), in nats."""
        raise NotImplementedError

    def hessian_factor(self, z: Tensor, y: Tensor) -> Tensor:
        """A factor H_n = K_n K_nᵀ of ∇²_z ℓ(z_n, y_n), by autograd and eigh; shape (N, C, C).

        Raises:
            InputError: If the Hessian has a clearly negative eigenvalue (the GGN of a non-convex loss).
        """

        def single(zi: Tensor, yi: Tensor) -> Tensor:
            return self.nll(zi.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)

        hess = vmap(hessian(single))(z, y)
        evals, evecs = torch.linalg.eigh((hess + hess.transpose(-1, -2)) / 2)
        floor = -100 * torch.finfo(z.dtype).eps * evals.abs().amax().clamp_min(1.0)
        if bool((evals < floor).any()):
            raise InputError(f"the loss Hessian of likelihood {self.name!r} is not PSD; its GGN is not a metric")
        return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)

    def grad_z_autograd(self, z: Tensor, y: Tensor) -> Tensor:
        """∇_z ℓ by autograd (an independent check of :meth:`grad_z`), shape (N, C)."""

        def single(zi: Tensor, yi: Tensor) -> Tensor:
            return self.nll(zi.unsqueeze(0), yi.unsqueeze(0)).squeeze(0)

        return vmap(grad(single))(z, y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _check_outputs(z: Tensor) -> None:
    if z.dim() != 2:
        raise InputError(f"model outputs must have shape (N, C); got {tuple(z.shape)}")


def _check_same_shape(z: Tensor, y: Tensor, what: str) -> Tensor:
    if not y.is_floating_point():
        y = y.to(z.dtype)
    if y.dim() == 1 and z.shape[1] == 1:
        y = y.unsqueeze(1)
    if y.shape != z.shape:
        raise InputError(f"{what} targets must have the outputs' shape {tuple(z.shape)}; got {tuple(y.shape)}")
    return y.to(z.dtype)


class Categorical(Likelihood):
    """Categorical likelihood p = softmax(z); loss = cross-entropy; Λ(z) = diag(p) − p pᵀ."""

    name = "categorical"

    def check_targets(self, z: Tensor, y: Tensor) -> Tensor:
        _check_outputs(z)
        if z.shape[1] < 2:
            raise InputError(
                f"the categorical likelihood needs C ≥ 2 outputs (one logit per class); the model has C = "
                f"{z.shape[1]}: the softmax of one logit is always 1, so its Fisher is zero. For two classes with one "
                "output use likelihood='bernoulli' (targets 0/1 of shape (N, 1)), or give the model 2 outputs"
            )
        if y.is_floating_point() or y.dtype == torch.bool:
            raise InputError(f"categorical targets must be integer class labels; got dtype {y.dtype}")
        if y.shape != z.shape[:1]:
            raise InputError(f"categorical targets must have shape (N,) = ({z.shape[0]},); got {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= z.shape[1]):
            raise InputError(f"labels must lie in [0, {z.shape[1]}); got range [{int(y.min())}, {int(y.max())}]")
        return y.long()

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.logsumexp(z, dim=-1) - z.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)

    def grad_z(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.softmax(z, dim=-1) - nnf.one_hot(y.long(), z.shape[-1]).to(z.dtype)

    def fisher_factor(self, z: Tensor) -> Tensor:
        """B = diag(√p) H[:, :C−1], H the Householder reflection sending u = √p to −e_C (rank C − 1, exact).

        Λ = diag(√p)(I − u uᵀ)diag(√p) and the first C − 1 columns of H are an orthonormal basis of u⊥.
        w = u + e_C has ‖w‖² = 2(1 + u_C) ≥ 2, so the construction is stable for every p.
        """
        p = torch.softmax(z, dim=-1)
        u = p.sqrt()
        c = z.shape[-1]
        if c == 1:  # Λ = 0 (the engines refuse C = 1 in check_targets)
            return z.new_zeros(z.shape[0], 1, 1)
        w = u.clone()
        w[:, -1] += 1
        eye = torch.eye(c, dtype=z.dtype, device=z.device)
        house = eye - 2 * w.unsqueeze(-1) * w.unsqueeze(-2) / (w * w).sum(-1)[:, None, None]
        return u.unsqueeze(-1) * house[:, :, : c - 1]

    def fisher_apply(self, z: Tensor, w: Tensor) -> Tensor:
        p = torch.softmax(z, dim=-1)
        return p * w - p * (p * w).sum(-1, keepdim=True)

    def sample(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        p = torch.softmax(z, dim=-1)
        return torch.multinomial(p, num_samples, replacement=True, generator=generator)

    def kl(self, z_p: Tensor, z_q: Tensor) -> Tensor:
        logp, logq = torch.log_softmax(z_p, -1), torch.log_softmax(z_q, -1)
        return (logp.exp() * (logp - logq)).sum(-1)


class Gaussian(Likelihood):
    """Gaussian likelihood N(z, σ² I) with fixed σ; loss = ‖z − y‖² / (2σ²); Λ = I / σ²."""

    name = "gaussian"

    def __init__(self, sigma: float = 1.0):
        if not (sigma > 0 and math.isfinite(sigma)):
            raise InputError(f"Gaussian sigma must be positive and finite; got {sigma}")
        self.sigma = float(sigma)

    def check_targets(self, z: Tensor, y: Tensor) -> Tensor:
        _check_outputs(z)
        return _check_same_shape(z, y, "Gaussian")

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        return ((z - y) ** 2).sum(-1) / (2 * self.sigma**2)

    def grad_z(self, z: Tensor, y: Tensor) -> Tensor:
        return (z - y) / self.sigma**2

    def fisher_factor(self, z: Tensor) -> Tensor:
        eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device) / self.sigma
        return eye.expand(z.shape[0], -1, -1)

    def fisher_apply(self, z: Tensor, w: Tensor) -> Tensor:
        return w / self.sigma**2

    def sample(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """Draw targets by Box–Muller on uniforms laid out sample by sample.

        Drawing a dataset in chunks then gives the same draws as drawing it at once (``torch.randn`` pairs its
        uniforms across samples in blocks of 16, so its draws depend on the chunking).
        """
        u = torch.rand((z.shape[0], num_samples, z.shape[1], 2), generator=generator, dtype=z.dtype,
                       device=z.device)
        noise = torch.sqrt(-2 * torch.log1p(-u[..., 0])) * torch.cos(2 * math.pi * u[..., 1])
        return z.unsqueeze(1) + self.sigma * noise

    def kl(self, z_p: Tensor, z_q: Tensor) -> Tensor:
        return ((z_p - z_q) ** 2).sum(-1) / (2 * self.sigma**2)

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma})"


class Bernoulli(Likelihood):
    """Independent Bernoulli outputs p = sigmoid(z); loss = binary cross-entropy; Λ = diag(p (1 − p))."""

    name = "bernoulli"

    def check_targets(self, z: Tensor, y: Tensor) -> Tensor:
        _check_outputs(z)
        y = _check_same_shape(z, y, "Bernoulli")
        if y.numel() and not bool(((y == 0) | (y == 1)).all()):
            raise InputError("Bernoulli targets must be 0 or 1")
        return y

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        return nnf.binary_cross_entropy_with_logits(z, y, reduction="none").sum(-1)

    def grad_z(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.sigmoid(z) - y

    def fisher_factor(self, z: Tensor) -> Tensor:
        p = torch.sigmoid(z)
        return torch.diag_embed((p * (1 - p)).sqrt())

    def fisher_apply(self, z: Tensor, w: Tensor) -> Tensor:
        p = torch.sigmoid(z)
        return p * (1 - p) * w

    def sample(self, z: Tensor, num_samples: int, generator: torch.Generator | None) -> Tensor:
        p = torch.sigmoid(z).unsqueeze(1).expand(-1, num_samples, -1)
        return torch.bernoulli(p, generator=generator)

    def kl(self, z_p: Tensor, z_q: Tensor) -> Tensor:
        p = torch.sigmoid(z_p)
        lp, lq = nnf.logsigmoid(z_p), nnf.logsigmoid(z_q)
        l1p, l1q = nnf.logsigmoid(-z_p), nnf.logsigmoid(-z_q)
        return (p * (lp - lq) + (1 - p) * (l1p - l1q)).sum(-1)


LIKELIHOODS: dict[str, type[Likelihood]] = {c.name: c for c in (Categorical, Gaussian, Bernoulli)}


def register(cls: type[Likelihood]) -> type[Likelihood]:
    """Register a user-defined :class:`Likelihood` subclass under ``cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise InputError("a likelihood class needs a non-empty `name`")
    LIKELIHOODS[cls.name] = cls
    return cls


def get_likelihood(spec: str | Likelihood, **kwargs: float) -> Likelihood:
    """Resolve a likelihood from its name (``"categorical"``, ``"gaussian"``, ``"bernoulli"``) or pass one through.

    Raises:
        InputError: For an unknown name (the message lists the valid ones).
    """
    if isinstance(spec, Likelihood):
        return spec
    if spec not in LIKELIHOODS:
        raise InputError(f"unsupported likelihood {spec!r}; valid: {sorted(LIKELIHOODS)}")
    return LIKELIHOODS[spec](**kwargs)
