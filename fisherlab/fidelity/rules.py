"""Update rules compared against exact NGD, all computed from one shared state (METHOD.md §3, §5).

An **update rule** maps a :class:`RuleContext` (one model state, one batch, one likelihood), a damping λ and a
learning rate η to an update Δθ of shape (P,) in the *original* coordinates (the
:class:`~fisherlab.params.ParamSpec` ordering), so that θ + Δθ is the parameter after one step.

The context computes each expensive object once and shares it between rules: the loss and gradient ∇L, one
:class:`~fisherlab.engine.FisherEngine` per Fisher kind, each structured Fisher (block, KFAC, ...) built from the
true-Fisher engine (the Monte-Carlo one on long sequences: ``structure_kind``), and the exact solves (F_kind + λI)⁻¹
∇L. Exact NGD (METHOD.md §3) uses the dense true Fisher and Cholesky when the dense solve fits the memory budget,
else an iterative solve on the implicit operator to the relative residual ``cg_tol`` (``ngd_solver``,
:class:`fisherlab.ngd.NGDSolver`; by default one multi-shift CG for all the context's ``dampings``);
:attr:`RuleContext.solves` records which, the preconditioner, the iterations, F·v products and the relative residual
‖(F + λI)x − ∇L‖/‖∇L‖. The empirical and Monte-Carlo Fishers (whose dense matrices no metric needs) are solved in
sample space by default (:meth:`RuleContext.sample_gram`: the ``gram`` solver, one m×m Cholesky per damping, m = N·R
< P) whenever that applies, and their eigenvalues come from the same m×m Gram matrix.

Built-in rules (:data:`RULES`):

=================  ==================================================================================
``gd``             −η ∇L
``adam``           the first Adam step from zero moments with bias correction, −η ∇L / (|∇L| + ε), ε = 1e-8
                   (m̂₁ = ∇L, v̂₁ = ∇L², elementwise; λ is not used)
``ngd``            exact NGD, −η (F + λI)⁻¹ ∇L with the true Fisher
``block-ngd``      −η (F_block + λI)⁻¹ ∇L, one dense block per layer
``kfac``           KFAC, ``fisher(..., structure="kfac").solve`` (the *expand* approximation for layers
                   shared over positions; ``kfac-expand`` is the same rule by name); this and the other
                   structures built from layer rows are of the Monte-Carlo Fisher where the true Fisher has
                   more than :data:`TRUE_ROWS_MAX` rows a sample (``structure_kind``, :class:`RuleContext`)
``kfac-reduce``    KFAC with ``approx="reduce"`` (Eschenhagen et al. 2023; = ``kfac`` without weight sharing)
``ekfac``          EKFAC, ``structure="ekfac"`` (expand); ``ekfac-reduce`` in the reduce KFAC's eigenbasis
``unit``           unit-wise blocks, ``structure="unit"``
``lowrank``        low-rank (Nyström) plus damping, ``structure="lowrank"``
``diag``           −η (diag F + λI)⁻¹ ∇L
``empirical-ngd``  exact solve with the empirical Fisher (sample space when m < P, else dense or CG)
``mc-ngd``         exact solve with the Monte-Carlo Fisher (``mc_samples`` labels per input)
``sngd-<s>``       one plain GD step on the network reconstructed with structure ``s``
                   (:func:`fisherlab.reconstruction.reconstruct`), mapped back to the original coordinates; roots
                   by Cholesky (``sqrt="cholesky"``: the mapped-back step is −η G⁻¹∇L whatever root R with
                   RᵀR = G the network uses, and Cholesky is the cheapest)
``sngd-kfac-       ``sngd-kfac`` with ``sqrt="lowrank"``: every Kronecker factor wider than 128 replaced by its
lowrank``          top-64 eigen-part plus mean remainder (``register_rule(ReconstructedGD(name, "kfac",
                   "lowrank", {"root_rank": k}))`` registers another rank)
=================  ==================================================================================

:func:`register_rule` adds a rule; :func:`get_rule` resolves a name (an unknown one lists the valid ones).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fisherlab import structures
from fisherlab.checks import parse_enum
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, MemoryBudgetError, UnsupportedLayerError
from fisherlab.gram import SampleGram, build_gram
from fisherlab.likelihoods import Likelihood, get_likelihood
from fisherlab.memory import dense_bytes, resolve_budget
from fisherlab.ngd import PRECONDITIONED_SOLVERS, NGDSolver, SolveInfo, gram_applies, solve_ngd_all
from fisherlab.params import ParamSpec
from fisherlab.structures.base import FisherMatrix, eigvalsh
from fisherlab.structures.block import BlockDiagonalFisher
from fisherlab.vocabulary import (
    RECONSTRUCTIBLE,
    STRUCTURE_ALIASES,
    BlockBy,
    FisherKind,
    KFACApprox,
    RootMethod,
    Structure,
    StructureKind,
)

#: A rule: (context, damping λ, learning rate η) → update Δθ of shape (P,), original coordinates.
UpdateRule = Callable[["RuleContext", float, float], Tensor]

#: Dense P×P copies a Cholesky solve holds at its peak (F, F + λI, L, L⁻¹ in the singularity check).
DENSE_SOLVE_COPIES = 4

#: Structures built from per-sample layer rows (one reverse pass per output factor row of a sample): the ones whose
#: Fisher kind :meth:`RuleContext.structure_kind_for` chooses. ``lowrank`` (products), ``dense`` and ``implicit``
#: (exact NGD's own Fisher) are always the true Fisher's.
ROW_STRUCTURES = (Structure.KFAC.value, Structure.EKFAC.value, Structure.UNIT.value, Structure.DIAG.value,
                  Structure.BLOCK.value)

#: ``structure_kind="auto"`` takes the Monte-Carlo Fisher for :data:`ROW_STRUCTURES` when the true Fisher has more
#: output factor rows per sample than this and its dense matrix does not fit the budget (so nothing else pays for
#: those rows). Building them costs ≈ R reverse passes per sample (R = T·(C − 1) = 4096 on a 64-token sequence over
#: 65 classes: 368 s for the true KFAC of the 1M GPT on 8 sequences) against ``mc_samples`` for the Monte-Carlo
#: Fisher; above 256 rows the true factor pass costs more than the ~100 F·v products (≈ 2 reverse passes each) of a
#: typical exact NGD solve. Classifiers up to 257 classes keep the true Fisher.
TRUE_ROWS_MAX = 256


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
        ngd_solver: How exact NGD is solved (:class:`fisherlab.ngd.NGDSolver`); ``"auto"``: Cholesky when the dense
            Fisher fits, else CG preconditioned per damping by the Nyström preconditioner of the ``lowrank`` rule's
            sketch when the context already holds that sketch (:meth:`share_sketch`: its products are paid anyway),
            else multi-shift CG for all ``dampings`` at once (CG for a single one) — the one of the two that takes
            fewer F·v products (:meth:`exact_solve`). ``"pcg-kfac"`` preconditions with the ``kfac`` rule's KFAC (of
            ``structure_kind``'s Fisher, for every kind solved; diag when KFAC cannot be built), ``"pcg-diag"``
            with the ``diag`` rule's diagonal, ``"pcg-nystrom"`` with the ``lowrank`` structure of the kind solved
            (the ``lowrank`` rule's, for the true Fisher).
        dampings: Every λ the context will be asked for (lets one multi-shift solve serve them all).
        structure_kind: The Fisher kind (:class:`~fisherlab.vocabulary.StructureKind`) of the structures built from
            layer rows (:data:`ROW_STRUCTURES`: the ``kfac``, ``ekfac``, ``unit``, ``diag`` and ``block`` rules, their
            ``sngd-*`` networks, the ``pcg-kfac`` preconditioner): ``"auto"`` (default) the true Fisher's unless it has
            more than :data:`TRUE_ROWS_MAX` output rows per sample and its dense matrix does not fit (a sequence model:
            T·(C − 1) rows a sequence), then the Monte-Carlo Fisher's (``mc_samples`` labels per token, ``seed``; the
            ``mc-ngd`` rule's Fisher); or ``"true"``, ``"mc"``, ``"empirical"`` for all of them. Exact NGD, the metrics
            and ``lowrank`` always use the true Fisher. :meth:`structure_kind_for` says which applies.
        progress: Progress bars (``None``: only on a terminal).

    Attributes:
        timings: Wall seconds per phase (:meth:`timed`). Work shared between rules is counted once, in the phase
            that does it first: a structure under ``structure <name>`` (or ``exact true Fisher``) whichever rule
            or reconstruction asks for it; the dense Cholesky factor of F + λI under ``exact true solve`` (exact
            NGD at λ, before the rules) and reused by ``sngd-dense`` and the geometry; the block factors under the
            first of ``rule block-ngd`` / ``reconstruct sngd-block`` / ``geometry block`` at that λ. A ``rule <name>``
            phase includes the phases it triggers.
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
    ngd_solver: str = "auto"
    dampings: tuple[float, ...] = ()
    structure_kind: str = "auto"
    progress: bool | None = None
    solves: dict[tuple[str, float], SolveInfo] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _engines: dict[str, FisherEngine] = field(default_factory=dict, repr=False)
    _structures: dict[str, FisherMatrix] = field(default_factory=dict, repr=False)
    _exact: dict[str, FisherMatrix] = field(default_factory=dict, repr=False)
    _solutions: dict[tuple[str, float], Tensor] = field(default_factory=dict, repr=False)
    _networks: dict[str, Any] = field(default_factory=dict, repr=False)
    _eigenvalues: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _layer_eigenvalues: dict[str, dict[str, Tensor]] = field(default_factory=dict, repr=False)
    _grams: dict[str, SampleGram | None] = field(default_factory=dict, repr=False)
    _loss_grad: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _batch: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.likelihood = get_likelihood(self.likelihood)
        self.memory_budget = resolve_budget(self.memory_budget, self.device)
        self.structure_kind = parse_enum(StructureKind, self.structure_kind, "structure kind").value

    def check_shares(self, model: nn.Module, data: Any, **settings: Any) -> None:
        """Refuse to stand in for ``RuleContext(model, data, **settings)`` unless it is that context's state.

        The same ``data`` object, parameters equal to ``model``'s (in the compute dtype) and every setting
        given equal to the context's (``dampings`` and ``progress`` are not compared: any λ can be solved; a
        ``dtype``, ``device`` or ``memory_budget`` of None is the default, the context's).

        Raises:
            InputError: Naming the first thing that differs.
        """
        engine = self.engine()
        if data is not self.data:
            raise InputError("a shared RuleContext must be of the same data object")
        for name, value in settings.items():
            if name in ("dampings", "progress"):
                continue
            mine = getattr(self, name)
            if name == "likelihood":
                value, mine = repr(get_likelihood(value)), repr(mine)
            elif name in ("dtype", "device", "memory_budget"):
                if value is None:  # the default: the context's
                    continue
                mine = getattr(engine, name) if name != "memory_budget" else mine
                value = torch.device(value) if name == "device" else value
            if value != mine:
                raise InputError(f"a shared RuleContext has {name}={mine!r}, not {value!r}")
        named = dict(model.named_parameters())
        if set(named) != set(engine.params) or not all(
                torch.equal(named[n].detach().to(p.device, p.dtype), p) for n, p in engine.params.items()):
            raise InputError("a shared RuleContext must be at the model's current parameters")

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
        kind = parse_enum(FisherKind, kind, "Fisher kind").value
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

    def structure_kind_for(self, name: str) -> str:
        """The Fisher kind :meth:`structure` builds structure ``name`` of by default.

        ``structure_kind`` (its ``"auto"`` rule: class docstring) for :data:`ROW_STRUCTURES`; "true" for the others.
        """
        if name not in ROW_STRUCTURES:
            return FisherKind.TRUE.value
        if self.structure_kind != StructureKind.AUTO.value:
            return self.structure_kind
        if self.engine().rows_per_sample > TRUE_ROWS_MAX and not self.dense_fits():
            return FisherKind.MC.value
        return FisherKind.TRUE.value

    def structure(self, name: str, kind: str | None = None, **options: Any) -> FisherMatrix:
        """The Fisher of ``kind`` in structure ``name`` (``"block"``, ``"kfac"``, ...), built once per options.

        ``kind`` defaults to :meth:`structure_kind_for` (the true Fisher unless ``structure_kind`` says otherwise).
        ``"dense"`` is the exact Fisher of :meth:`exact_fisher`; ``"block"`` of the true Fisher is read off the
        dense true Fisher when that is already built (its diagonal blocks: no pass over the data); EKFAC reuses
        the KFAC eigenbasis of its kind when KFAC was built first. Timed under ``structure <name>`` (true Fisher)
        or ``structure <name> <kind>``.
        """
        kind = self.structure_kind_for(name) if kind is None else parse_enum(FisherKind, kind, "Fisher kind").value
        if name == "dense" and not options:
            return self.exact_fisher(kind)
        if name == Structure.BLOCK.value:
            options = {"by": BlockBy.LAYER.value, **options}  # one entry for block-ngd, sngd-block and geometry
        tag = "" if kind == FisherKind.TRUE.value else f" {kind}"
        key = self._structure_key(name, kind, options)
        if key not in self._structures:
            kfac = self._structures.get(self._structure_key("kfac", kind, options))  # EKFAC's approx=
            extra = {"basis": kfac} if name == "ekfac" and kfac is not None and "basis" not in options else {}
            dense = self._exact.get(kind)
            with self.timed(f"structure {name}{tag}"):
                if name == Structure.BLOCK.value and dense is not None and dense.structure == "dense":
                    self._structures[key] = BlockDiagonalFisher.from_dense(dense, **options)
                else:
                    self._structures[key] = structures.build(name, self.engine(kind), **options, **extra)
        return self._structures[key]

    @staticmethod
    def _structure_key(name: str, kind: str, options: Mapping[str, Any]) -> str:
        """The key of :meth:`structure` ``(name, kind, **options)`` among the built structures."""
        tag = "" if kind == FisherKind.TRUE.value else f" {kind}"
        return f"{name}{tag}:{json.dumps(dict(options), sort_keys=True)}"

    def share_sketch(self, rules: Mapping[str, Rule]) -> None:
        """Build the ``lowrank`` rule's sketch before exact NGD when ``auto`` would reuse it (:meth:`exact_solve`).

        Only when ``rules`` hold a :class:`StructuredNGD` of structure ``lowrank`` with default options, the
        solver is ``auto`` and the true Fisher is implicit (no dense Cholesky); a sketch that does not fit (one of
        the errors that make a rule unavailable) is left to the rule to report.
        """
        wants = any(isinstance(rule, StructuredNGD) and rule.structure is Structure.LOWRANK and not rule.options
                    for rule in rules.values())
        if not wants or parse_enum(NGDSolver, self.ngd_solver, "NGD solver") is not NGDSolver.AUTO:
            return
        if self.exact_fisher().structure != "implicit":
            return
        try:
            self.structure(Structure.LOWRANK.value)
        except (MemoryBudgetError, UnsupportedLayerError):
            pass

    def reconstructed(self, rule: ReconstructedGD, damping: float) -> Any:
        """The context's model reconstructed with ``rule``'s G at λ (a network of its own, to read a step from).

        The first λ asked for reconstructs (:meth:`ReconstructedGD.network`); every other λ re-roots a copy of
        that network (:func:`_copy_sharing_roots`) with the context's own structure (:meth:`structure`, the one the
        structured rules use) at the new λ, so that G is computed once per state, not once per damping. Both run
        under the rule's :class:`~fisherlab.reconstruction.roots.SpectrumCache` (at most ``memory_budget`` bytes),
        so that ``"eigh"`` roots decompose each block of G once; a Cholesky root factorises G + λI at each λ.
        """
        from fisherlab.reconstruction.roots import SpectrumCache, reuse_spectra

        kept = self._networks.get(rule.name)
        if kept is None:
            spectra = SpectrumCache(self.memory_budget)
            with reuse_spectra(spectra):
                kept = self._networks[rule.name] = rule.network(self, damping), spectra
        base, spectra = kept
        if base.damping == float(damping):
            return base
        with self.timed(f"reconstruct {rule.name}"):
            net = _copy_sharing_roots(base)
            net.config = dataclasses.replace(base.config, damping=float(damping))
            theta = self.spec.flatten(dict(self.engine().params))
            with reuse_spectra(spectra):
                net.set_metric(self.structure(base.config.fisher_structure, **base.config.options), theta=theta)
        return net

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

    def sample_gram(self, kind: str) -> SampleGram | None:
        """K = UUᵀ (m × m, :func:`fisherlab.gram.build_gram`) of the Fisher of ``kind``, built once, or None.

        Only for the empirical and Monte-Carlo Fishers under ``ngd_solver="auto"`` (or ``"gram"``), and only where
        the sample-space solve applies (:func:`fisherlab.ngd.gram_applies`: m = N·R < P, every damping of
        ``dampings`` > 0, one process, within the memory budget); None otherwise (the true Fisher's dense matrix,
        which the metrics use, serves its own solves and eigenvalues).
        """
        kind = parse_enum(FisherKind, kind, "Fisher kind").value
        if kind not in self._grams:
            solver = parse_enum(NGDSolver, self.ngd_solver, "NGD solver")
            engine = self.engine(kind)
            use = (kind in (FisherKind.EMPIRICAL.value, FisherKind.MC.value)
                   and solver in (NGDSolver.AUTO, NGDSolver.GRAM)
                   and gram_applies(engine, list(self.dampings) or [1.0], None))
            if use:
                with self.timed(f"gram {kind} Fisher"):
                    self._grams[kind] = build_gram(engine)
            else:
                self._grams[kind] = None
        return self._grams[kind]

    def eigenvalues(self, kind: str = "true") -> Tensor:
        """All eigenvalues (P,), ascending, of the dense Fisher of ``kind`` (:meth:`exact_fisher`), computed once.

        With a :meth:`sample_gram` (m < P), the P − m eigenvalues of F = UᵀU beyond rank m are exactly 0 and the
        others are those of K = UUᵀ: eigvalsh of the m×m K, with P − m zeros, instead of the P×P matrix.

        Raises:
            MemoryBudgetError: If the dense Fisher does not fit the memory budget.
        """
        if kind not in self._eigenvalues:
            gram = self.sample_gram(kind)
            if gram is not None:
                with self.timed(f"eigenvalues {kind} Fisher"):
                    ev = eigvalsh(gram.K).to(self.engine(kind).dtype)
                    zeros = ev.new_zeros(self.spec.dim - ev.shape[0])
                    self._eigenvalues[kind] = torch.sort(torch.cat([zeros, ev])).values
                return self._eigenvalues[kind]
            F = self.exact_fisher(kind)
            if F.structure != "dense":
                F.check_dense_budget()
            with self.timed(f"eigenvalues {kind} Fisher"):
                self._eigenvalues[kind] = F.eigvalsh()
        return self._eigenvalues[kind]

    def layer_eigenvalues(self, kind: str = "true") -> dict[str, Tensor]:
        """Eigenvalues (ascending) of each layer block F_ll of the dense Fisher of ``kind``, by layer, computed once.

        The blocks of :meth:`structure` ``("block")`` for the true Fisher, else read off the kind's dense matrix
        (:meth:`~fisherlab.structures.BlockDiagonalFisher.from_dense`). With a :meth:`sample_gram` (m rows), a
        layer of P_l > m parameters has rank ≤ m: its eigenvalues are those of its m × m sample Gram
        K_l = U_l U_lᵀ (:meth:`~fisherlab.gram.SampleGram.block_gram`) with P_l − m exact zeros, instead of
        the P_l × P_l block's (as :meth:`eigenvalues` does for the whole Fisher).

        Raises:
            MemoryBudgetError: If the dense Fisher does not fit the memory budget.
        """
        if kind not in self._layer_eigenvalues:
            F = self.exact_fisher(kind)
            if F.structure != "dense":
                F.check_dense_budget()
            blocks = (self.structure("block", kind) if kind == FisherKind.TRUE.value
                      else BlockDiagonalFisher.from_dense(F))
            gram = self.sample_gram(kind)
            with self.timed(f"eigenvalues {kind} Fisher blocks"):
                out = {}
                for name, B in blocks.blocks.items():
                    K = None if gram is None or gram.rows_count >= B.shape[0] else gram.block_gram(blocks.index[name])
                    if K is None:
                        out[name] = eigvalsh(B)
                    else:
                        ev = eigvalsh(K).to(B.dtype)
                        out[name] = torch.sort(torch.cat([ev.new_zeros(B.shape[0] - ev.shape[0]), ev])).values
                self._layer_eigenvalues[kind] = out
        return self._layer_eigenvalues[kind]

    def exact_solve(self, kind: str, damping: float) -> Tensor:
        """(F_kind + λI)⁻¹ ∇L, shape (P,), by :func:`fisherlab.ngd.solve_ngd_all` with ``ngd_solver``; cached per λ.

        A multi-shift solve (``auto`` on an implicit Fisher, or ``multishift``) solves every damping of
        ``dampings`` not yet solved together with λ; its seconds are counted once in ``timings``. Where the kind
        has a :meth:`sample_gram` (empirical and MC Fishers, m < P) every such damping is solved with it
        (``gram``: one m×m Cholesky each; the dense matrix, when built, checks the residuals).

        ``auto`` on an implicit Fisher whose ``lowrank`` structure (default options) the context already holds,
        where it would take CG (not ``gram``: :func:`~fisherlab.ngd.gram_applies`), takes ``pcg-nystrom`` with
        that sketch, one solve per damping: the sketch's k products are the ``lowrank``
        rule's, and the preconditioned solves take fewer products than one multi-shift solve for all dampings
        (GPT "10k", 32 × 64 tokens, 4 dampings 1e-4..1e-1 to 1e-4: 144 against 231; GPT 1M: benchmarks/README.md),
        while paying the k products for the sketch alone would not (256 + 144 > 231).
        """
        key = (kind, float(damping))
        if key not in self._solutions:
            gram = self.sample_gram(kind) if float(damping) > 0 else None
            solver = parse_enum(NGDSolver, self.ngd_solver, "NGD solver")
            if gram is not None:  # every damping at once, the dense matrix (if built) for the residual checks
                fisher, solver = self._exact.get(kind), NGDSolver.GRAM
            else:
                fisher = self.exact_fisher(kind)
                if (solver is NGDSolver.AUTO and fisher.structure == "implicit"
                        and self._structure_key(Structure.LOWRANK.value, kind, {}) in self._structures
                        and not gram_applies(self.engine(kind), [*self.dampings, float(damping)], fisher)):
                    solver = NGDSolver.PCG_NYSTROM
            shared = (solver in (NGDSolver.MULTISHIFT, NGDSolver.GRAM)
                      or (solver is NGDSolver.AUTO and fisher.structure == "implicit"))
            lams = [float(damping)]
            if shared:
                lams = [lam for lam in dict.fromkeys([float(lam) for lam in self.dampings] + lams)
                        if (kind, lam) not in self._solutions]
            preconditioner = None
            if solver in PRECONDITIONED_SOLVERS:
                preconditioner = self._ngd_preconditioner(solver, kind)
            solved = solve_ngd_all(self.engine(kind), self.gradient, lams, solver=solver.value, fisher=fisher,
                                   preconditioner=preconditioner, cg_tol=self.cg_tol, cg_max_iter=self.cg_max_iter,
                                   gram=gram)
            infos = [info for _, info in solved.values()]
            seconds = infos[0].seconds if infos[0].solver == NGDSolver.MULTISHIFT else sum(i.seconds for i in infos)
            self.timings[f"exact {kind} solve"] = self.timings.get(f"exact {kind} solve", 0.0) + seconds
            for lam, (x, info) in solved.items():
                self.solves[(kind, lam)] = info
                self._solutions[(kind, lam)] = x
        return self._solutions[key]

    def _ngd_preconditioner(self, solver: NGDSolver, kind: str) -> FisherMatrix:
        """The ``kfac`` rule's KFAC (``pcg-kfac``; the diagonal when KFAC cannot be built) or the ``diag`` rule's.

        Of the kind :meth:`structure_kind_for` chooses (the rules' own structures); for ``pcg-nystrom`` the
        ``lowrank`` structure of ``kind``, the Fisher solved (the ``lowrank`` rule's for the true Fisher).
        """
        if solver is NGDSolver.PCG_NYSTROM:
            return self.structure(Structure.LOWRANK.value, kind)
        if solver is NGDSolver.PCG_KFAC:
            try:
                return self.structure("kfac")
            except (UnsupportedLayerError, MemoryBudgetError):
                pass
        return self.structure("diag")

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


# ------------------------------------------------------------------------------------------------ rules
class Rule:
    """An update rule: ``rule(context, damping λ, learning rate η)`` → Δθ of shape (P,), original coordinates.

    Subclasses say what they are (:class:`ExactNGD` knows its Fisher kind, :class:`StructuredNGD` its structure,
    :class:`ReconstructedGD` its structure and root method), so no code parses a rule's name.
    """

    name: str

    def __call__(self, ctx: RuleContext, damping: float, lr: float) -> Tensor:
        raise NotImplementedError

    def fisher_kind(self, ctx: RuleContext) -> str:
        """The Fisher kind the rule's update is built from in ``ctx`` ("" for a rule without one: gd, adam, ...)."""
        return ""


@dataclass(frozen=True, eq=False)
class FunctionRule(Rule):
    """A rule given as a function ``fn(context, damping, lr) -> update (P,)`` (``gd``, ``adam``, users' own)."""

    name: str
    fn: UpdateRule

    def __call__(self, ctx: RuleContext, damping: float, lr: float) -> Tensor:
        return self.fn(ctx, damping, lr)


@dataclass(frozen=True, eq=False)
class ExactNGD(Rule):
    """−η (F_kind + λI)⁻¹ ∇L with the exact (dense or CG) Fisher of ``kind`` (:meth:`RuleContext.exact_solve`)."""

    name: str
    kind: FisherKind = FisherKind.TRUE

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", parse_enum(FisherKind, self.kind, "Fisher kind"))

    def __call__(self, ctx: RuleContext, damping: float, lr: float) -> Tensor:
        return -lr * ctx.exact_solve(self.kind.value, damping)

    def fisher_kind(self, ctx: RuleContext) -> str:
        return self.kind.value


@dataclass(frozen=True, eq=False)
class StructuredNGD(Rule):
    """−η (G + λI)⁻¹ ∇L with G the Fisher in ``structure`` (``G.solve``), built with ``options``.

    G is of the kind :meth:`RuleContext.structure_kind_for` chooses: the true Fisher, or for a row structure on a
    model with more than :data:`TRUE_ROWS_MAX` true output rows per sample (a language model) the Monte-Carlo one.
    """

    name: str
    structure: Structure
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "structure", parse_enum(Structure, self.structure, "structure"))

    def __call__(self, ctx: RuleContext, damping: float, lr: float) -> Tensor:
        return -lr * ctx.structure(self.structure.value, **self.options).solve(ctx.gradient, damping)

    def fisher_kind(self, ctx: RuleContext) -> str:
        return ctx.structure_kind_for(self.structure.value)


@dataclass(frozen=True, eq=False)
class ReconstructedGD(Rule):
    """One plain GD step on the network reconstructed with ``structure`` and root ``sqrt`` at λ, mapped back.

    The step is read in the original coordinates (:meth:`~fisherlab.reconstruction.ReconstructedNetwork.gd_update`);
    ``options`` go to :func:`fisherlab.reconstruct` (e.g. ``root_rank`` of ``sqrt="lowrank"``).
    """

    name: str
    structure: Structure
    sqrt: RootMethod = RootMethod.CHOLESKY
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        structure = parse_enum(Structure, self.structure, "structure")
        if structure.value not in RECONSTRUCTIBLE:
            raise InputError(f"rule {self.name!r}: structure {structure.value!r} has no reconstructed network; "
                             f"valid: {list(RECONSTRUCTIBLE)}")
        object.__setattr__(self, "structure", structure)
        object.__setattr__(self, "sqrt", parse_enum(RootMethod, self.sqrt, "sqrt method"))

    def metric(self, ctx: RuleContext) -> FisherMatrix | None:
        """The context's structure that :func:`~fisherlab.reconstruction.reconstruct` would compute G from, or None.

        :meth:`RuleContext.structure` of ``STRUCTURES[structure]`` with its options (and this rule's options that
        are structure options, not arguments of ``reconstruct``): the one the structured rules and the geometry
        use. None for ``dense`` when the context's exact Fisher is implicit (reconstruct then builds its own).
        """
        from fisherlab.reconstruction import STRUCTURES

        fisher_structure, defaults = STRUCTURES[self.structure.value]
        if fisher_structure == Structure.DENSE.value and ctx.exact_fisher("true").structure != "dense":
            return None
        options = {k: v for k, v in self.options.items() if k not in _RECONSTRUCT_ARGUMENTS}
        return ctx.structure(fisher_structure, **{**defaults, **options})

    def fisher_kind(self, ctx: RuleContext) -> str:
        from fisherlab.reconstruction import STRUCTURES

        return ctx.structure_kind_for(STRUCTURES[self.structure.value][0])

    def network(self, ctx: RuleContext, damping: float) -> Any:
        """The context's model reconstructed with this rule's G at λ (Fisher of :meth:`fisher_kind`, context's data).

        G is read from :meth:`metric` (built once by the context, its time counted under ``structure <name>``
        or ``exact true Fisher``), and a Cholesky root from the kept factor of G + λI of a dense or block
        structure (exact NGD's and ``block-ngd``'s, counted where it was first factorised).
        """
        from fisherlab.reconstruction import reconstruct

        engine = ctx.engine()
        metric = self.metric(ctx)
        with ctx.timed(f"reconstruct {self.name}"):
            return reconstruct(ctx.model, ctx.data, ctx.likelihood, structure=self.structure.value,
                               kind=self.fisher_kind(ctx),
                               damping=damping, sqrt=self.sqrt.value, mc_samples=ctx.mc_samples, seed=ctx.seed,
                               dtype=engine.dtype, device=engine.device, chunk_size=ctx.chunk_size,
                               memory_budget=ctx.memory_budget, metric=metric, **self.options)

    def __call__(self, ctx: RuleContext, damping: float, lr: float) -> Tensor:
        return ctx.reconstructed(self, damping).gd_update(ctx.data, lr)


def _copy_sharing_roots(net: Any) -> Any:
    """A deep copy of a reconstructed network whose local Fisher units hold ``net``'s root buffers, not copies.

    For :meth:`~fisherlab.reconstruction.ReconstructedNetwork.set_metric` at another λ, which replaces every unit's
    root buffers and never writes into them (θ' is written in place: the copy has its own), so ``net`` is unchanged
    and the roots it would replace are not copied first (for the 1M GPT's unit-wise roots, 2 GB of float32).
    """
    shared = {id(b): b for _, unit in net.units() for b in unit.buffers()}
    return copy.deepcopy(net, shared)


def _reconstruct_arguments() -> frozenset[str]:
    """The named arguments of :func:`~fisherlab.reconstruction.reconstruct` (its other options go to the structure)."""
    from fisherlab.reconstruction import reconstruct

    return frozenset(inspect.signature(reconstruct).parameters) - {"options"}


_RECONSTRUCT_ARGUMENTS = _reconstruct_arguments()

# --------------------------------------------------------------------------------------------- registry
RULES: dict[str, Rule] = {}

#: Deprecated rule names → the names that replaced them.
RULE_ALIASES = {f"sngd-{old}": f"sngd-{new}" for old, new in STRUCTURE_ALIASES.items()}


def register_rule(rule: str | Rule, fn: UpdateRule | None = None) -> Rule:
    """Register a rule (replacing any previous rule of its name) and return it.

    Args:
        rule: A :class:`Rule`, or a name together with ``fn``.
        fn: ``fn(context, damping, lr) -> update (P,)`` when ``rule`` is a name (wrapped in :class:`FunctionRule`).
    """
    if isinstance(rule, str):
        if not rule:
            raise InputError("a rule name must be a non-empty string")
        if not callable(fn):
            raise InputError(f"rule {rule!r} must be callable (context, damping, lr) -> update; got {type(fn)}")
        rule = FunctionRule(rule, fn)
    elif not isinstance(rule, Rule) or fn is not None:
        raise InputError(f"register_rule takes a Rule, or a name and a function; got {rule!r}")
    if not isinstance(rule.name, str) or not rule.name:
        raise InputError(f"a rule name must be a non-empty string; got {rule.name!r}")
    RULES[rule.name] = rule
    return rule


def get_rule(rule: str | Rule) -> Rule:
    """The rule registered as ``rule`` (a :class:`Rule` object is returned as it is).

    Raises:
        InputError: For an unknown name; the message lists the valid ones.
    """
    if isinstance(rule, Rule):
        return rule
    if rule in RULE_ALIASES:
        warnings.warn(f"rule {rule!r} is deprecated; use {RULE_ALIASES[rule]!r}", DeprecationWarning, stacklevel=3)
        rule = RULE_ALIASES[rule]
    if not isinstance(rule, str) or rule not in RULES:
        raise InputError(f"unknown update rule {rule!r}; valid: {sorted(RULES)}")
    return RULES[rule]


def check_rules(rules: Any) -> dict[str, Rule]:
    """Rule names or :class:`Rule` objects (non-empty, distinct names) as ``{name: rule}`` in the given order."""
    if isinstance(rules, (str, Rule)):
        rules = [rules]
    resolved = [get_rule(r) for r in rules]
    if not resolved:
        raise InputError(f"no update rules given; valid: {sorted(RULES)}")
    names = [r.name for r in resolved]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"update rule(s) {duplicates} given more than once")
    return dict(zip(names, resolved, strict=True))


# ------------------------------------------------------------------------------------------ built-ins
def gd(ctx: RuleContext, damping: float, lr: float) -> Tensor:
    """−η ∇L."""
    return -lr * ctx.gradient


def adam(ctx: RuleContext, damping: float, lr: float, eps: float = 1e-8) -> Tensor:
    """First Adam step from zero moments with bias correction: −η ∇L / (|∇L| + ε) (λ unused)."""
    g = ctx.gradient
    return -lr * g / (g.abs() + eps)


register_rule("gd", gd)
register_rule("adam", adam)
register_rule(ExactNGD("ngd", FisherKind.TRUE))
register_rule(StructuredNGD("block-ngd", Structure.BLOCK, {"by": BlockBy.LAYER.value}))
for _s in (Structure.KFAC, Structure.EKFAC, Structure.UNIT, Structure.LOWRANK, Structure.DIAG):
    register_rule(StructuredNGD(_s.value, _s))
register_rule(StructuredNGD("kfac-expand", Structure.KFAC))  # the structure of "kfac" (one build serves both)
for _s in (Structure.KFAC, Structure.EKFAC):
    register_rule(StructuredNGD(f"{_s.value}-reduce", _s, {"approx": KFACApprox.REDUCE.value}))
register_rule(ExactNGD("empirical-ngd", FisherKind.EMPIRICAL))
register_rule(ExactNGD("mc-ngd", FisherKind.MC))
for _s in map(Structure, RECONSTRUCTIBLE):
    register_rule(ReconstructedGD(f"sngd-{_s.value}", _s))
register_rule(ReconstructedGD("sngd-kfac-lowrank", Structure.KFAC, RootMethod.LOWRANK))

__all__ = ["DENSE_SOLVE_COPIES", "ROW_STRUCTURES", "RULES", "TRUE_ROWS_MAX", "ExactNGD",
           "FunctionRule", "ReconstructedGD", "Rule", "RuleContext", "SolveInfo", "StructuredNGD", "UpdateRule", "adam",
           "check_rules", "get_rule", "gd", "register_rule"]
