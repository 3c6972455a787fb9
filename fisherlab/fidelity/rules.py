"""Update rules compared against exact NGD, all computed from one shared state (METHOD.md §3, §5).

An **update rule** maps a :class:`RuleContext` (one model state, one batch, one likelihood), a damping λ and a
learning rate η to an update Δθ of shape (P,) in the *original* coordinates (the
:class:`~fisherlab.params.ParamSpec` ordering), so that θ + Δθ is the parameter after one step.

The context computes each expensive object once and shares it between rules: the loss and gradient ∇L, one
:class:`~fisherlab.engine.FisherEngine` per Fisher kind, each structured Fisher (block, KFAC, ...) built from
the true-Fisher engine, and the exact solves (F_kind + λI)⁻¹ ∇L. Exact NGD (METHOD.md §3) uses the dense true
Fisher and Cholesky when the dense solve fits the memory budget, else conjugate gradients on the implicit
operator to the relative residual ``cg_tol``; :attr:`RuleContext.solves` records which (``"cholesky"`` /
``"cg"``), the iterations and the relative residual ‖(F + λI)x − ∇L‖/‖∇L‖.

Built-in rules (:data:`RULES`):

=================  ==================================================================================
``gd``             −η ∇L
``adam``           the first Adam step from zero moments with bias correction, −η ∇L / (|∇L| + ε), ε = 1e-8
                   (m̂₁ = ∇L, v̂₁ = ∇L², elementwise; λ is not used)
``ngd``            exact NGD, −η (F + λI)⁻¹ ∇L with the true Fisher
``block-ngd``      −η (F_block + λI)⁻¹ ∇L, one dense block per layer
``kfac``           KFAC, ``fisher(..., structure="kfac").solve``
``ekfac``          EKFAC, ``structure="ekfac"``
``unit``           unit-wise blocks, ``structure="unit"``
``lowrank``        low-rank (Nyström) plus damping, ``structure="lowrank"``
``diag``           −η (diag F + λI)⁻¹ ∇L
``empirical-ngd``  exact solve with the empirical Fisher (dense, or CG beyond the budget)
``mc-ngd``         exact solve with the Monte-Carlo Fisher (``mc_samples`` labels per input)
``sngd-<s>``       one plain GD step on the network reconstructed with structure ``s``
                   (:func:`fisherlab.reconstruct.reconstruct`), mapped back to the original coordinates; roots
                   by Cholesky (``sqrt="cholesky"``: the mapped-back step is −η G⁻¹∇L whatever root R with
                   RᵀR = G the network uses, and Cholesky is the cheapest)
``sngd-kfac-       ``sngd-kfac`` with ``sqrt="lowrank"``: every Kronecker factor wider than 128 replaced by its
lowrank``          top-64 eigen-part plus mean remainder (``reconstructed_rule("kfac", sqrt="lowrank",
                   root_rank=k)`` registers another rank)
=================  ==================================================================================

:func:`register_rule` adds a rule; :func:`get_rule` resolves a name (an unknown one lists the valid ones).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab import structures
from fisherlab.engine import FisherEngine, FisherType, parse_enum
from fisherlab.errors import InputError
from fisherlab.likelihoods import Likelihood, get_likelihood
from fisherlab.linalg import damped_solve
from fisherlab.memory import dense_bytes, resolve_budget
from fisherlab.params import ParamSpec
from fisherlab.structures.base import FisherMatrix

#: A rule: (context, damping λ, learning rate η) → update Δθ of shape (P,), original coordinates.
UpdateRule = Callable[["RuleContext", float, float], Tensor]

#: Dense P×P copies a Cholesky solve holds at its peak (F, F + λI, L, L⁻¹ in the singularity check).
DENSE_SOLVE_COPIES = 4

#: Reconstruction structures with an ``sngd-<structure>`` rule (those of :func:`fisherlab.reconstruct.reconstruct`).
RECONSTRUCT_STRUCTURES = ("full", "block", "kfac", "input", "ekfac", "unit", "diag")


@dataclass(frozen=True)
class SolveInfo:
    """How an exact solve (F + λI) x = ∇L was done.

    Attributes:
        solver: ``"cholesky"`` (dense F) or ``"cg"`` (implicit F).
        iterations: CG iterations (0 for Cholesky).
        residual: Relative residual ‖(F + λI) x − ∇L‖ / ‖∇L‖.
        converged: Whether CG reached the tolerance (always True for Cholesky).
        tol: The CG tolerance (NaN for Cholesky).
        seconds: Wall time of the solve (assembling F is timed apart, as ``exact <kind> Fisher``).
    """

    solver: str
    iterations: int
    residual: float
    converged: bool
    tol: float
    seconds: float


@dataclass
class RuleContext:
    """One model state and batch, with the shared objects every update rule needs (computed lazily, once).

    Args:
        model: The network at the state to evaluate (not modified).
        data: ``(X, y)``, a SplitData (training split) or a DataLoader: the batch of the step.
        likelihood: Likelihood name or object.
        dtype: Compute dtype (default: the model's).
        device: Compute device (default: the model's).
        seed: Seed of Monte-Carlo label draws.
        mc_samples: Labels per input of the Monte-Carlo Fisher.
        memory_budget: Bytes a dense object may take (default: half the available memory).
        chunk_size: Samples per chunk of the engines.
        cg_tol: Relative residual of the CG solves used when the dense Fisher does not fit.
        cg_max_iter: CG iteration cap (default: CG's own, 10·P).
        progress: Progress bars (``None``: only on a terminal).
    """

    model: nn.Module
    data: Any
    likelihood: str | Likelihood = "categorical"
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    seed: int = 0
    mc_samples: int = 1
    memory_budget: int | None = None
    chunk_size: int | None = None
    cg_tol: float = 1e-6
    cg_max_iter: int | None = None
    progress: bool | None = None
    solves: dict[tuple[str, float], SolveInfo] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _engines: dict[str, FisherEngine] = field(default_factory=dict, repr=False)
    _structures: dict[str, FisherMatrix] = field(default_factory=dict, repr=False)
    _exact: dict[str, FisherMatrix] = field(default_factory=dict, repr=False)
    _solutions: dict[tuple[str, float], Tensor] = field(default_factory=dict, repr=False)
    _loss_grad: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _batch: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.likelihood = get_likelihood(self.likelihood)
        self.memory_budget = resolve_budget(self.memory_budget, self.device)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[what]`` (seconds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - start

    # --------------------------------------------------------------------------------------- shared objects
    def engine(self, kind: str = "true") -> FisherEngine:
        """The Fisher engine of ``kind`` (``"true"``, ``"mc"``, ``"empirical"``, ``"ggn"``) at this state."""
        kind = parse_enum(FisherType, kind, "Fisher kind").value
        if kind not in self._engines:
            self._engines[kind] = FisherEngine(
                self.model, self.data, self.likelihood, kind=kind, mc_samples=self.mc_samples, seed=self.seed,
                dtype=self.dtype, device=self.device, chunk_size=self.chunk_size,
                memory_budget=self.memory_budget, progress=self.progress)
        return self._engines[kind]

    @property
    def spec(self) -> ParamSpec:
        """The parameter ordering of every update."""
        return self.engine().spec

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """L(θ) (0-dim) and ∇L(θ) (P,) on the batch."""
        if self._loss_grad is None:
            with self.timed("gradient"):
                self._loss_grad = self.engine().loss_and_gradient()
        return self._loss_grad

    @property
    def gradient(self) -> Tensor:
        """∇L(θ), shape (P,)."""
        return self.loss_and_gradient()[1]

    def structure(self, name: str, **options: Any) -> FisherMatrix:
        """The true Fisher in structure ``name`` (``"block"``, ``"kfac"``, ...), built once per options.

        ``"dense"`` is the exact Fisher of :meth:`exact_fisher`; EKFAC reuses the KFAC eigenbasis when KFAC was
        built first.
        """
        if name == "dense" and not options:
            return self.exact_fisher("true")
        key = f"{name}:{json.dumps(options, sort_keys=True)}"
        if key not in self._structures:
            kfac = self._structures.get("kfac:{}")
            extra = {"basis": kfac} if name == "ekfac" and kfac is not None and "basis" not in options else {}
            with self.timed(f"structure {name}"):
                self._structures[key] = structures.build(name, self.engine(), **options, **extra)
        return self._structures[key]

    def dense_fits(self) -> bool:
        """Whether a dense Cholesky solve with P×P matrices fits the memory budget."""
        P = self.spec.dim
        return DENSE_SOLVE_COPIES * dense_bytes(P, P, self.engine().dtype) <= self.memory_budget

    def exact_fisher(self, kind: str = "true") -> FisherMatrix:
        """The Fisher of ``kind``: dense when :meth:`dense_fits`, else implicit (products only)."""
        if kind not in self._exact:
            structure = "dense" if self.dense_fits() else "implicit"
            with self.timed(f"exact {kind} Fisher"):
                self._exact[kind] = structures.build(structure, self.engine(kind))
        return self._exact[kind]

    def exact_solve(self, kind: str, damping: float) -> Tensor:
        """(F_kind + λI)⁻¹ ∇L, shape (P,), by Cholesky or CG (see the module docstring); cached per λ."""
        key = (kind, float(damping))
        if key not in self._solutions:
            g = self.gradient
            F = self.exact_fisher(kind)
            start = time.perf_counter()
            if F.structure == "implicit":
                x = F.solve(g, damping, tol=self.cg_tol, max_iter=self.cg_max_iter)
                report = F.last_cg
                info = (report.iterations, float(report.residual), bool(report.converged), self.cg_tol)
            else:  # Cholesky; its quality is the residual recorded below (the estimate-based singularity
                # check of damped_solve can refuse a well-damped float32 matrix)
                x = damped_solve(F.to_dense(), g, damping, check_singular=False)
                residual = torch.linalg.vector_norm(F @ x + damping * x - g) / torch.linalg.vector_norm(g)
                info = (0, float(residual), True, float("nan"))
            seconds = time.perf_counter() - start
            self.timings[f"exact {kind} solve"] = self.timings.get(f"exact {kind} solve", 0.0) + seconds
            self.solves[key] = SolveInfo("cg" if F.structure == "implicit" else "cholesky", *info, seconds)
            self._solutions[key] = x
        return self._solutions[key]

    def natural_gradient(self, damping: float) -> Tensor:
        """(F + λI)⁻¹ ∇L with the true Fisher (the direction of exact NGD), shape (P,)."""
        return self.exact_solve("true", damping)

    def fisher(self) -> FisherMatrix:
        """The undamped true Fisher used by the metrics (dense or implicit, as for exact NGD)."""
        return self.exact_fisher("true")

    # ----------------------------------------------------------------------------------- step evaluation
    def _forward_chunks(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) chunks sized by activations (not by P-wide factor rows), for forward-only passes."""
        engine = self.engine()
        for _, x, y in engine.data.chunks(engine.matmat_chunk_size()):
            yield x, y

    def outputs_and_targets(self) -> tuple[Tensor, Tensor]:
        """Outputs z = f_θ(x) (N, C) at this state and the targets in canonical form (N, ...), data order."""
        if self._batch is None:
            engine = self.engine()
            zs, ys = [], []
            with torch.no_grad():
                for x, y in self._forward_chunks():
                    zs.append(engine.forward(engine.params, x))
                    ys.append(engine.likelihood.check_targets(zs[-1], y))
            self._batch = (torch.cat(zs), torch.cat(ys))
        return self._batch

    def outputs_after(self, update: Tensor) -> Tensor:
        """Outputs at θ + update on the batch, shape (N, C)."""
        engine = self.engine()
        step = engine.spec.unflatten(update.to(engine.device, engine.dtype))
        params = {n: p + step[n] for n, p in engine.params.items()}
        with torch.no_grad():
            return torch.cat([engine.forward(params, x) for x, _ in self._forward_chunks()])


# --------------------------------------------------------------------------------------------- registry
RULES: dict[str, UpdateRule] = {}


def register_rule(name: str, fn: UpdateRule) -> UpdateRule:
    """Register ``fn(context, damping, lr) -> update (P,)`` under ``name`` (replacing any previous rule).

    Returns:
        ``fn`` (so the function can be used as a decorator factory's target).
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"a rule name must be a non-empty string; got {name!r}")
    if not callable(fn):
        raise InputError(f"rule {name!r} must be callable (context, damping, lr) -> update; got {type(fn)}")
    RULES[name] = fn
    return fn


def get_rule(name: str) -> UpdateRule:
    """The rule registered as ``name``.

    Raises:
        InputError: For an unknown name; the message lists the valid ones.
    """
    if name not in RULES:
        raise InputError(f"unknown update rule {name!r}; valid: {sorted(RULES)}")
    return RULES[name]


def check_rules(names: Any) -> list[str]:
    """Validate a list of rule names (non-empty, no duplicates, all registered) and return it as a list."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise InputError(f"no update rules given; valid: {sorted(RULES)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"update rule(s) {duplicates} given more than once")
    for n in names:
        get_rule(n)
    return names


# ------------------------------------------------------------------------------------------ built-ins
def gd(ctx: RuleContext, damping: float, lr: float) -> Tensor:
    """−η ∇L."""
    return -lr * ctx.gradient


def adam(ctx: RuleContext, damping: float, lr: float, eps: float = 1e-8) -> Tensor:
    """First Adam step from zero moments with bias correction: −η ∇L / (|∇L| + ε) (λ unused)."""
    g = ctx.gradient
    return -lr * g / (g.abs() + eps)


def exact_rule(kind: str) -> UpdateRule:
    """−η (F_kind + λI)⁻¹ ∇L with the exact (dense or CG) Fisher of ``kind``."""

    def rule(ctx: RuleContext, damping: float, lr: float) -> Tensor:
        return -lr * ctx.exact_solve(kind, damping)

    rule.__doc__ = f"Exact NGD with the {kind} Fisher."
    return rule


def structure_rule(structure: str, **options: Any) -> UpdateRule:
    """−η (G + λI)⁻¹ ∇L with G the true Fisher in ``structure`` (``G.solve``)."""

    def rule(ctx: RuleContext, damping: float, lr: float) -> Tensor:
        return -lr * ctx.structure(structure, **options).solve(ctx.gradient, damping)

    rule.__doc__ = f"NGD preconditioned by the {structure} true Fisher {options or ''}."
    return rule


def reconstruct_network(ctx: RuleContext, structure: str, damping: float, **options: Any) -> Any:
    """The context's model reconstructed with ``structure`` at λ (:func:`fisherlab.reconstruct.reconstruct`).

    The true Fisher on the context's data, with its likelihood, dtype, device, seed, chunking and budget.
    """
    from fisherlab.reconstruct import reconstruct

    engine = ctx.engine()
    with ctx.timed(f"reconstruct {structure}"):
        return reconstruct(ctx.model, ctx.data, structure=structure, fisher="true", damping=damping,
                           likelihood=ctx.likelihood, mc_samples=ctx.mc_samples, seed=ctx.seed, dtype=engine.dtype,
                           device=engine.device, chunk_size=ctx.chunk_size, memory_budget=ctx.memory_budget,
                           **options)


def reconstructed_rule(structure: str, **options: Any) -> UpdateRule:
    """One plain GD step on the network reconstructed with ``structure`` at λ, mapped back (``gd_update``)."""

    def rule(ctx: RuleContext, damping: float, lr: float) -> Tensor:
        net = reconstruct_network(ctx, structure, damping, **options)
        return net.gd_update(ctx.data, lr)

    rule.__doc__ = f"GD on the network reconstructed with the {structure} structure."
    return rule


register_rule("gd", gd)
register_rule("adam", adam)
register_rule("ngd", exact_rule("true"))
register_rule("block-ngd", structure_rule("block", by="layer"))
for _name in ("kfac", "ekfac", "unit", "lowrank", "diag"):
    register_rule(_name, structure_rule(_name))
register_rule("empirical-ngd", exact_rule("empirical"))
register_rule("mc-ngd", exact_rule("mc"))
for _name in RECONSTRUCT_STRUCTURES:
    register_rule(f"sngd-{_name}", reconstructed_rule(_name, sqrt="cholesky"))
register_rule("sngd-kfac-lowrank", reconstructed_rule("kfac", sqrt="lowrank"))

__all__ = ["DENSE_SOLVE_COPIES", "RULES", "RuleContext", "SolveInfo", "UpdateRule", "adam", "check_rules",
           "exact_rule", "get_rule", "gd", "reconstruct_network", "reconstructed_rule", "register_rule",
           "structure_rule"]
