"""The reconstructed network: the same function in coordinates θ' = G^{1/2} θ, where plain GD is NGD (docs/method.md).

A :class:`ReconstructedNetwork` wraps a rebuilt copy of a model (``.net``) whose parameters are the reconstructed
coordinates θ' and whose local Fisher units (layer forms and parametrizations) hold the roots of a block of G as
buffers. It keeps a private copy of the original architecture (the *template*) to evaluate the Fisher at the
current original parameters θ = G^{-1/2} θ' when it refreshes. (With ``sqrt="cholesky"`` the coordinates are
θ' = R θ for the triangular R with RᵀR = G, and every G^{±1/2} below reads R^{±1}: the NGD steps are the same.)

**Coordinates.** Every flat vector this class takes or returns — θ, θ', updates in either system — is in
fisherlab's parameter order of the *original* model (:class:`~fisherlab.params.ParamSpec`: the order of its
``named_parameters()``, each tensor row-major). θ' entries sit where the θ entries they replace sit: a layer
form's W̄' = [W', b'] (out, n) occupies the slots of the original weight and bias.

Build one with :func:`fisherlab.reconstruction.reconstruct`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab.datasource import DataSource
from fisherlab.distributed import active_group, all_reduce_sum, sample_offset
from fisherlab.errors import InputError, NonFiniteError
from fisherlab.fisher_matrix import fisher as build_fisher
from fisherlab.likelihoods import Likelihood, TokenLikelihood
from fisherlab.params import ParamSpec
from fisherlab.reconstruction.roots import LocalFisherUnit
from fisherlab.structures.base import FisherMatrix
from fisherlab.structures.block import BlockDiagonalFisher
from fisherlab.structures.dense import DenseFisher

__all__ = ["FACTOR_SOURCES", "STRUCTURE_SOURCES", "ReconstructConfig", "ReconstructedNetwork", "UnitPlan",
           "compute_structure", "shared_factor", "unit_statistics"]


@dataclass(frozen=True)
class ReconstructConfig:
    """Everything that defines G and how it is recomputed (see :func:`fisherlab.reconstruction.reconstruct`).

    Attributes:
        structure: Reconstruction structure (``dense``, ``block``, ``kfac``, ``ekfac``, ``input``, ``unit``, ``diag``).
        fisher_structure: The :func:`fisherlab.fisher` structure it is computed from.
        kind: Fisher kind (``true``, ``mc``, ``empirical``, ``ggn``).
        damping: λ.
        sqrt: Root method (``eigh``, ``denman_beavers``, ``newton_schulz``, ``cholesky``, ``lowrank``).
        likelihood: The likelihood object.
        mc_samples: Labels per input for the MC Fisher.
        seed: Seed of the MC labels at construction; refresh k uses ``seed + k``.
        ema_decay: Moving-average decay of the statistics at refreshes (None: no averaging).
        split: KFAC damping split (``pi`` or ``sqrt``).
        fold: Layer-form fold mode (``auto``, ``never``, ``always``).
        layer_form: Whether Linear/Conv layers get the layer form (kfac, input).
        chunk_size: Samples per chunk for Fisher computations and :meth:`ReconstructedNetwork.gd_update`.
        memory_budget: Bytes any dense object may take.
        options: Extra options of the Fisher structure builder.
        root_rank: k of ``sqrt="lowrank"``.
    """

    structure: str
    fisher_structure: str
    kind: str
    damping: float
    sqrt: str
    likelihood: Likelihood
    mc_samples: int
    seed: int
    ema_decay: float | None
    split: str
    fold: str
    layer_form: bool
    chunk_size: int | None = None
    memory_budget: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    root_rank: int = 64


@dataclass(frozen=True)
class UnitPlan:
    """One local Fisher unit of a reconstructed network.

    Attributes:
        path: Module path of the unit (a layer form, or the :class:`FisherRoot` of a parametrized group) in ``.net``.
        names: The original parameter names it covers, in ParamSpec order.
        source: Where its statistics sit in the Fisher structure: (field, key), see :data:`STRUCTURE_SOURCES`.
        form: ``"layer"`` or ``"parametrization"``.
    """

    path: str
    names: tuple[str, ...]
    source: tuple[str, str]
    form: str


def _factors(struct: FisherMatrix, key: str) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    f = struct.factors[key]  # type: ignore[attr-defined]
    return {k: v for k, v in vars(f).items() if isinstance(v, Tensor)}, type(f).averaged


def _whole(name: str, read: Any) -> Any:
    return lambda s, k: ({name: read(s, k)}, (name,))


#: How a unit reads its statistics from a Fisher structure: source field → (structure, key) → (statistics,
#: the names of those that a moving average may average).
STRUCTURE_SOURCES: dict[str, Any] = {
    "matrix": _whole("G", lambda s, k: s.matrix),
    "blocks": _whole("G", lambda s, k: s.blocks[k]),
    "diagonal": _whole("diagonal", lambda s, k: s.diagonal[s.spec.slice(k)]),
    "factors": _factors,
    "exact_blocks": _whole("G", lambda s, k: s.exact_blocks[k]),
}


#: Where a structure keeps its lower Cholesky factors of sym(G) + λI (one factorisation per λ, shared with its own
#: solves): source field → (structure, key, λ) → the factor of that unit's G, for ``sqrt="cholesky"``.
FACTOR_SOURCES: dict[str, Any] = {
    "matrix": lambda s, k, lam: s.damped_factor(lam) if isinstance(s, DenseFisher) else None,
    "blocks": lambda s, k, lam: s.damped_factors(lam)[k] if isinstance(s, BlockDiagonalFisher) else None,
}


def shared_factor(struct: FisherMatrix, plan: UnitPlan, damping: float) -> Tensor | None:
    """The structure's kept float64 Cholesky factor of ``plan``'s sym(G) + λI (:data:`FACTOR_SOURCES`), or None.

    None unless λ > 0 and the structure is float64 (the roots' compute dtype) with factors of its own.
    """
    read = FACTOR_SOURCES.get(plan.source[0])
    if read is None or not damping > 0 or struct.dtype != torch.float64:
        return None
    return read(struct, plan.source[1], damping)


def unit_statistics(struct: FisherMatrix, plan: UnitPlan) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """The statistics of ``plan``'s unit in ``struct``, and the names of those a moving average may average.

    The statistics are a superset of the unit's ``statistics``; EKFAC's eigenbases are not averaged.
    """
    field_name, key = plan.source
    return STRUCTURE_SOURCES[field_name](struct, key)


def compute_structure(model: nn.Module, data: Any, config: ReconstructConfig, seed: int,
                      **options: Any) -> FisherMatrix:
    """The Fisher structure of ``config`` for ``model`` (original architecture) on ``data``.

    ``options`` are added to the structure builder's options of the config.
    """
    first = next(iter(model.parameters()))
    return build_fisher(model, data, config.likelihood, kind=config.kind, structure=config.fisher_structure,
                        mc_samples=config.mc_samples, seed=seed, dtype=first.dtype, device=first.device,
                        chunk_size=config.chunk_size, memory_budget=config.memory_budget,
                        **{**config.options, **options})


def _describe(spec: ParamSpec) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(s)) for n, s in zip(spec.names, spec.shapes, strict=True)]


class ReconstructedNetwork(nn.Module):
    """A model rebuilt in coordinates θ' = G^{1/2} θ: same function, and plain GD on θ' is G-preconditioned NGD.

    ``parameters()`` are θ' only (P scalars, as many as the original); the roots of G are buffers, so autograd
    never differentiates them. Build with :func:`fisherlab.reconstruction.reconstruct`.

    Args:
        net: The rebuilt module tree (layer forms substituted, other tensors parametrized).
        template: A copy of the original model (used to evaluate the Fisher at θ on refresh).
        spec: The original model's parameter spec.
        plans: The local Fisher units.
        config: How G is defined and recomputed.
        data: The data G was computed on (the default of :meth:`refresh`).

    Attributes:
        net: The rebuilt module tree; ``forward`` calls it.
        spec: ParamSpec of the original model (the order of every flat vector).
        config: The :class:`ReconstructConfig`.
        steps_since_refresh: Optimizer steps counted (:meth:`count_step`, :meth:`attach`) since the last refresh.
        refreshes: Number of refreshes so far.
    """

    def __init__(self, net: nn.Module, template: nn.Module, spec: ParamSpec, plans: list[UnitPlan],
                 config: ReconstructConfig, data: Any):
        super().__init__()
        self.net = net
        self._template = (template,)  # a tuple: not a submodule, so its parameters are not θ'
        self._data = data
        self.spec = spec
        self.plans = list(plans)
        self.config = config
        self.steps_since_refresh = 0
        self.refreshes = 0
        self._stats: dict[str, dict[str, Tensor]] = {}
        self._basis: FisherMatrix | None = None  # EKFAC with a moving average: the structure of the fixed basis
        self._index = {p.path: spec.indices(p.names) for p in self.plans}
        covered = torch.cat(list(self._index.values())).sort().values
        if not torch.equal(covered, torch.arange(spec.dim)):
            raise InputError("the local Fisher units do not cover every parameter exactly once")

    # ------------------------------------------------------------------------------------------- basics
    @property
    def structure(self) -> str:
        """The reconstruction structure."""
        return self.config.structure

    @property
    def damping(self) -> float:
        """λ."""
        return self.config.damping

    def forward(self, x: Tensor) -> Tensor:
        """The original model's function, evaluated through the reconstructed coordinates."""
        return self.net(x)

    def units(self) -> Iterator[tuple[UnitPlan, LocalFisherUnit]]:
        """(plan, unit module) for every local Fisher unit."""
        for plan in self.plans:
            yield plan, self.net.get_submodule(plan.path)

    def _like(self) -> dict[str, Any]:
        p = next(iter(self.parameters()))
        return {"dtype": p.dtype, "device": p.device}

    def _assemble(self, pieces: Iterator[tuple[UnitPlan, Tensor]], cols: int | None = None) -> Tensor:
        """Flat vector (P,) or (P, k) from each unit's group vector."""
        out = torch.zeros(self.spec.dim, *(() if cols is None else (cols,)), **self._like())
        for plan, v in pieces:
            out[self._index[plan.path].to(out.device)] = v.to(out)
        return out

    def _map(self, v: Tensor, power: float) -> Tensor:
        if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[0] != self.spec.dim:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v)
            raise InputError(f"expected a vector (P,) or matrix (P, k) with P = {self.spec.dim}; got {shape}")
        v = v.to(**self._like())
        return self._assemble(((plan, unit.apply(v[self._index[plan.path].to(v.device)], power))
                               for plan, unit in self.units()), None if v.dim() == 1 else v.shape[1])

    # -------------------------------------------------------------------------------------- coordinates
    def reconstructed_vector(self) -> Tensor:
        """θ' (P,), in the original parameter order (detached)."""
        return self._assemble((plan, unit.prime_vector()) for plan, unit in self.units())

    def original_vector(self) -> Tensor:
        """θ = G^{-1/2} θ' (R⁻¹ θ') (P,), in the original parameter order (detached)."""
        return self._assemble((plan, unit.theta_vector()) for plan, unit in self.units())

    def original_parameters(self) -> dict[str, Tensor]:
        """θ as named tensors of the original model (fresh tensors, detached)."""
        return {k: v.clone() for k, v in self.spec.unflatten(self.original_vector()).items()}

    def to_original_update(self, du_prime: Tensor) -> Tensor:
        """An update of θ' (P,) or (P, k) as the update of θ it causes: G^{-1/2} du' (R⁻¹ du')."""
        return self._map(du_prime, -0.5)

    def from_original_update(self, du: Tensor) -> Tensor:
        """An update of θ (P,) or (P, k) in reconstructed coordinates: G^{1/2} du (R du)."""
        return self._map(du, 0.5)

    @torch.no_grad()
    def load_original(self, theta: Tensor | Mapping[str, Tensor]) -> None:
        """Set the network to original parameters θ (flat (P,) or named tensors): θ' = G^{1/2} θ with the current G."""
        vec = self.spec.flatten(theta) if isinstance(theta, Mapping) else theta
        if vec.shape != (self.spec.dim,):
            raise InputError(f"expected θ of shape ({self.spec.dim},); got {tuple(vec.shape)}")
        vec = vec.to(**self._like())
        for plan, unit in self.units():
            unit.load_theta(vec[self._index[plan.path].to(vec.device)])

    @torch.no_grad()
    def load_into(self, model: nn.Module) -> nn.Module:
        """Write θ into ``model`` (same architecture as the original; converted to its dtype/device); returns it."""
        spec = ParamSpec.from_model(model)
        if spec.names != self.spec.names or spec.shapes != self.spec.shapes:
            raise InputError(f"model has parameters {_describe(spec)}; the reconstructed network was built from "
                             f"{_describe(self.spec)}")
        params = dict(model.named_parameters())
        for name, value in self.spec.unflatten(self.original_vector()).items():
            params[name].copy_(value)
        return model

    # ------------------------------------------------------------------------------------------ training
    def prime_gradient(self, data: Any) -> tuple[Tensor, Tensor]:
        """Mean loss L over ``data`` and ∇θ' L (P,), by autograd through the reconstructed network.

        For a sequence model (outputs (N, T, C)) L is the mean over the counted tokens of all of ``data`` (labels
        equal to the likelihood's ``ignore_index`` left out), the loss whose Fisher the engine computes
        (:class:`~fisherlab.likelihoods.TokenLikelihood`). Under ``torch.distributed`` (docs/distributed.md)
        ``data`` is this rank's shard and the sums and counts are all-reduced: every rank gets the global mean.

        Args:
            data: ``(X, y)``, a SplitData (training split) or an iterable of batches; targets are checked as
                :func:`fisherlab.fisher` checks them (``likelihood.check_targets``: shape, dtype, label range).

        Raises:
            InputError: Targets that do not fit the likelihood and the outputs (e.g. Gaussian targets (N, 1) for
                outputs (N, 3), or float class labels), or data :class:`~fisherlab.datasource.DataSource` refuses.
            NonFiniteError: NaN or infinite inputs, targets or outputs.
        """
        source = DataSource(data, **self._like())
        group = active_group()  # under torch.distributed: data is this rank's shard; sums and counts all-reduced
        offset, _ = sample_offset(len(source), group, self._like()["device"])
        plans, units = zip(*self.units(), strict=True)
        params = [unit.primes() for unit in units]
        flat = [p for ps in params for p in ps]
        grads = [torch.zeros_like(p) for p in flat]
        loss = torch.zeros((), **self._like())
        count = torch.zeros((), **self._like())  # samples, or counted tokens of a sequence model: the divisor
        for start, x, y in source.chunks(self.config.chunk_size):
            z = self(x)
            if not bool(torch.isfinite(z).all()):
                first = offset + start
                raise NonFiniteError(f"the reconstructed network's outputs for samples {first}–{first + len(x) - 1} "
                                     "contain NaN or infinite values")
            lik, z = self._chunk_likelihood(z)
            y = lik.check_targets(z.detach(), y)
            count += int(lik.token_mask(y).sum()) if isinstance(lik, TokenLikelihood) else len(x)
            chunk_loss = lik.nll(z, y).sum()  # Σ_n ℓ_n, or Σ_nt m_nt ℓ_nt (c = 1)
            for acc, g in zip(grads, torch.autograd.grad(chunk_loss, flat), strict=True):
                acc += g
            loss += chunk_loss.detach()
        all_reduce_sum([loss, count, *grads], group)
        if float(count) == 0:
            raise InputError("the data has no counted token (every label equals ignore_index)")
        grads = [g / count for g in grads]
        loss = loss / count
        pieces, start = [], 0
        for plan, unit, ps in zip(plans, units, params, strict=True):
            pieces.append((plan, unit.primes_to_flat(grads[start: start + len(ps)])))
            start += len(ps)
        return loss, self._assemble(iter(pieces))

    def _chunk_likelihood(self, z: Tensor) -> tuple[Likelihood, Tensor]:
        """The likelihood of a chunk's outputs and the outputs it takes.

        The configured one on (n, C); for sequence outputs (n, T, C) a TokenLikelihood with c = N / N_tok = 1
        (per-sequence sums over the counted tokens) on the flattened (n, T·C).
        """
        if z.dim() != 3:
            return self.config.likelihood, z
        n, T, C = z.shape
        return TokenLikelihood(self.config.likelihood, T, C, num_sequences=n, num_tokens=n), z.reshape(n, -1)

    def gd_update(self, data: Any, lr: float) -> Tensor:
        """The update of θ (P,) caused by one plain GD step on θ' with the mean loss over ``data``.

        Equals −η G^{-1/2} ∇θ' L = −η G⁻¹ ∇θ L (−η R⁻¹R^{-T} ∇θ L = −η G⁻¹ ∇θ L for any root). The network is
        not modified.
        """
        _, g = self.prime_gradient(data)
        return self.to_original_update(-lr * g)

    def count_step(self) -> None:
        """Record one optimizer step on θ' (``steps_since_refresh`` += 1)."""
        self.steps_since_refresh += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Count every step of ``optimizer`` (a post-step hook); returns the hook's removable handle."""
        return optimizer.register_step_post_hook(lambda *_: self.count_step())

    # ------------------------------------------------------------------------------------------- refresh
    def refresh(self, data: Any = None) -> None:
        """Recompute G at the current θ on ``data`` (default: the construction data) and re-express θ' = G^{1/2} θ.

        The function is unchanged (to round-off). With ``ema_decay`` = β the statistics become
        β · (previous statistics) + (1 − β) · (new statistics) before damping and roots. Monte-Carlo labels of
        refresh k are drawn with seed ``seed + k``. An optimizer's state (momentum, Adam moments) refers to the
        old coordinates and is not converted.

        A refresh that fails (bad data, a singular G at the damping, ...) raises and leaves the network as it was:
        the same θ', roots, moving averages, ``refreshes`` and ``steps_since_refresh``.
        """
        template = self._template[0].to(**self._like())
        theta = self.original_vector()
        with torch.no_grad():
            for name, value in self.spec.unflatten(theta).items():
                template.get_parameter(name).copy_(value)
        struct = compute_structure(template, self._data if data is None else data, self.config,
                                   self.config.seed + self.refreshes + 1)
        saved = self._save_state()
        try:
            self.set_metric(struct, average=True, theta=theta)
        except BaseException:
            self._restore_state(saved)
            raise
        self.refreshes += 1
        self.steps_since_refresh = 0

    def _save_state(self) -> tuple[list[tuple[nn.Module, dict[str, Any], dict[str, Tensor]]],
                                   dict[str, dict[str, Tensor]], FisherMatrix | None]:
        """What :meth:`set_metric` changes: per module its attributes, buffers and θ' values; averages and basis.

        Units replace their root buffers (never write into them), so the buffers are kept by reference; θ' is
        written in place and is copied.
        """
        modules = []
        for m in self.net.modules():
            attrs = {k: dict(v) if k in ("_buffers", "_parameters", "_modules") else v for k, v in vars(m).items()}
            params = {k: p.detach().clone() for k, p in m._parameters.items() if p is not None}
            modules.append((m, attrs, params))
        return modules, dict(self._stats), self._basis

    @torch.no_grad()
    def _restore_state(self, saved: tuple) -> None:
        """Undo a partial :meth:`set_metric` (the state of :meth:`_save_state`; θ' tensors keep their identity)."""
        modules, stats, basis = saved
        for m, attrs, params in modules:
            vars(m).clear()
            vars(m).update(attrs)
            for k, value in params.items():
                m._parameters[k].copy_(value)
        self._stats, self._basis = stats, basis

    @torch.no_grad()
    def set_metric(self, struct: FisherMatrix, *, average: bool = False, theta: Tensor | None = None) -> None:
        """Set every unit's G from ``struct`` (+ damping) and re-express θ' so that θ is unchanged.

        Args:
            struct: A Fisher structure of the kind the network was built with, over the original parameters.
            average: Mix with the previous statistics when ``ema_decay`` is set.
            theta: The current θ (P,) if already at hand (:meth:`original_vector`), to save recomputing it.
        """
        beta = self.config.ema_decay
        if self._basis is None and self.config.structure == "ekfac" and beta is not None:
            self._basis = struct
        for plan, unit in self.units():
            stats, averaged = unit_statistics(struct, plan)
            old = self._stats.get(plan.path)
            mixed = average and beta is not None and old is not None
            if mixed:
                stats = {k: beta * old[k].to(v) + (1 - beta) * v if k in averaged else v for k, v in stats.items()}
            if beta is not None:
                self._stats[plan.path] = {k: v.detach().clone() for k, v in stats.items()}
            if not mixed and self.config.sqrt == "cholesky":  # G is the structure's: its kept factor, if any
                factor = shared_factor(struct, plan, self.config.damping)
                stats = stats if factor is None else {**stats, "cholesky": factor}
            theta_g = unit.theta_vector() if theta is None else theta[self._index[plan.path].to(theta.device)]
            unit.update(stats, self.config.damping, self.config.sqrt, self.config.root_rank)
            unit.load_theta(theta_g)

    def extra_repr(self) -> str:
        c = self.config
        return (f"structure={c.structure!r}, kind={c.kind!r}, damping={c.damping:g}, sqrt={c.sqrt!r}, "
                f"P={self.spec.dim}, units={len(self.plans)}, refreshes={self.refreshes}")

    def __deepcopy__(self, memo: dict) -> ReconstructedNetwork:
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = v if k == "_data" else copy.deepcopy(v, memo)
        return new
