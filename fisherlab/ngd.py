"""Exact natural gradient: one solve (F + λI) x = g, shared by the fidelity rules and by ``train``.

:func:`solve_ngd` solves with the Fisher of an engine's kind on the engine's data, by one of
:class:`NGDSolver`:

* ``cholesky`` — the dense F + λI (given as ``fisher``, or assembled as UᵀU from the factor rows U); a given
  :class:`~fisherlab.structures.DenseFisher` is solved with its kept factor
  (:meth:`~fisherlab.structures.DenseFisher.damped_factor`: one factorisation per λ for every solve and
  Cholesky root of that matrix);
* ``woodbury`` — F = UᵀU with factor rows U (m, P): (UᵀU + λI)⁻¹ g = (g − Uᵀ (UUᵀ + λI)⁻¹ U g) / λ, a Cholesky
  factorisation of the m×m Gram matrix (needs λ > 0; cheaper than Cholesky when m < P);
* ``gram`` — the same identity in sample space without U (:mod:`fisherlab.gram`): K = UUᵀ, U g and Uᵀ y from
  the per-layer rows (inputs ā and output gradients δ of every layer with a rule, K_layer = (δδᵀ) ∘ (āāᵀ) at one
  location), explicit rows only for the parameters outside the rules; one Cholesky factorisation of K + λI per
  damping (float64; from :data:`fisherlab.gram.MIXED_MIN_ROWS` rows float32, refined to float64 accuracy by CG in
  sample space, :meth:`fisherlab.gram.SampleGram.sample_solve`) and no F·v product but one per damping for the
  residual check (needs λ > 0, one process, K and the rows of all samples within the memory budget);
* ``cg`` — conjugate gradients on the implicit F to the relative residual ``cg_tol``;
* ``multishift`` — multi-shift CG (:func:`fisherlab.linalg.cg_multishift`): with :func:`solve_ngd_all`, every
  damping of a study from one Krylov space, one F·v product per iteration for all of them;
* ``pcg-kfac`` — CG preconditioned by KFAC at the same damping, M⁻¹ = (K + λI)⁻¹ (``KFACFisher.solve``, the
  factored ``split="pi"`` damping of the KFAC step; its damped factors are factorised once per damping and kept,
  :meth:`~fisherlab.structures.KFACFisher.damped_factors`, so an application is two triangular solves per factor),
  falling back to the diagonal when KFAC cannot be built (a layer without a KFAC rule, or over the memory
  budget); a given ``preconditioner`` (e.g. the ``kfac`` rule's own KFAC, or an EKFAC) is used as it is;
* ``pcg-diag`` — CG preconditioned by (diag F + λI)⁻¹;
* ``pcg-nystrom`` — CG preconditioned by the randomized Nyström preconditioner (Frangella, Tropp & Udell 2023)
  of a rank-k sketch of the same Fisher, U diag(Λ) Uᵀ (:class:`~fisherlab.structures.LowRankFisher`, the
  ``lowrank`` structure: k = min(P, N·R, 256) products F Ω): P_λ⁻¹ = (λ_k + λ) U (Λ + λI)⁻¹ Uᵀ + (I − UUᵀ)
  (:meth:`~fisherlab.structures.LowRankFisher.precondition`), one solve per damping; a given ``preconditioner``
  (e.g. the ``lowrank`` rule's own sketch, whose products are then shared) is used as it is, and any given
  LowRankFisher is applied in this form;
* ``auto`` — a given dense ``fisher``: Cholesky on it; otherwise (no ``fisher``, or an implicit one) ``gram``
  when m < P, every λ > 0, one process and :func:`fisherlab.gram.gram_bytes` ≤ the memory budget; else, for a
  given implicit ``fisher``, CG; else CG when the factor rows (in float64) would take more than a quarter of the
  memory budget, else Woodbury when m < P and λ > 0, else Cholesky. :func:`solve_ngd_all` with several dampings
  takes ``multishift`` wherever ``auto`` would take CG.

A ``gram`` solve is exact up to rounding; its residual is measured with one true F·v product per damping (one
block product for all), and should it exceed ``cg_tol`` (float32 products, extreme λ) CG preconditioned by the
sample-space inverse itself refines it from there (a step or two, counted in ``iterations`` and ``products``).

Every iterative solve stops on the relative residual of the *unpreconditioned* system ‖(F + λI)x − g‖/‖g‖ ≤
``cg_tol`` (never on a preconditioned norm), checked with true products at the end.

Preconditioning and multi-shift are not combined: a shifted Krylov space K_k(F + λI, g) is the same for every
λ only without a preconditioner (M⁻¹(F + λI) is not a shift of M⁻¹F unless M ∝ I), and the natural
preconditioner here, KFAC at the same λ, differs per damping anyway. So ``multishift`` is unpreconditioned and
pays one Krylov space for all dampings (the iterations of the smallest λ), while ``pcg-*`` pay one solve per
damping with fewer iterations each; which is cheaper depends on how well KFAC fits F (``bench_exact_ngd.py``).
The Nyström preconditioner needs no layer structure and no sampled labels (its sketch is of the exact F), and its
iterations fall with λ_k / λ; its k sketch products are paid once for every damping, and nothing when the sketch
is already built (the fidelity evaluation's ``lowrank`` rule: :meth:`fisherlab.fidelity.RuleContext.exact_solve`).

Assembled matrices are factorised in float64 (the result has g's dtype): in float32 the Cholesky factorisation
of a matrix with condition number ‖F‖/λ ≈ 1e4–1e6 loses most digits. Every solve returns a :class:`SolveInfo`
with the relative residual ‖(F + λI)x − g‖/‖g‖ (for the direct solvers measured on the dense matrix they used),
the preconditioner and the F·v products used.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from fisherlab import structures
from fisherlab.checks import check_damping, check_dampings, parse_enum
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, MemoryBudgetError, UnsupportedLayerError
from fisherlab.gram import SampleGram, build_gram, gram_bytes
from fisherlab.linalg import cg, cg_multishift, damped_solve
from fisherlab.linalg.solve import _check_finite, cholesky_factor_solve
from fisherlab.memory import dense_bytes
from fisherlab.structures.base import FisherMatrix
from fisherlab.structures.dense import DenseFisher
from fisherlab.structures.lowrank import LowRankFisher

__all__ = ["ITERATIVE_SOLVERS", "PRECONDITIONED_SOLVERS", "NGDSolver", "SolveInfo", "gram_applies", "solve_ngd",
           "solve_ngd_all"]


class NGDSolver(str, Enum):
    """How :func:`solve_ngd` solves (module docstring)."""

    AUTO = "auto"
    CHOLESKY = "cholesky"
    WOODBURY = "woodbury"
    GRAM = "gram"
    CG = "cg"
    MULTISHIFT = "multishift"
    PCG_KFAC = "pcg-kfac"
    PCG_DIAG = "pcg-diag"
    PCG_NYSTROM = "pcg-nystrom"


#: Solvers preconditioned by a structure of the Fisher (:func:`solve_ngd`'s ``preconditioner``).
PRECONDITIONED_SOLVERS = (NGDSolver.PCG_KFAC, NGDSolver.PCG_DIAG, NGDSolver.PCG_NYSTROM)

#: Solvers that iterate with F·v products to ``cg_tol`` (the others are direct).
ITERATIVE_SOLVERS = (NGDSolver.CG, NGDSolver.MULTISHIFT, *PRECONDITIONED_SOLVERS)


@dataclass(frozen=True)
class SolveInfo:
    """How an exact solve (F + λI) x = g was done.

    Attributes:
        solver: An :class:`NGDSolver` value other than ``"auto"``.
        iterations: CG iterations (0 for the direct solvers; for ``gram`` the sample-space refinement's K products
            after a float32 factorisation, plus any F·v refinement's; 0 after a float64 one); for
            ``multishift`` the shared iterations until this
            damping's residual reached the tolerance (plus a CG refinement's, if one was needed).
        residual: Relative residual ‖(F + λI) x − g‖ / ‖g‖ of the unpreconditioned system, from true products
            (NaN for Woodbury, which never forms F).
        converged: Whether the iterative solve reached the tolerance (always True for ``cholesky`` and
            ``woodbury``; for ``gram`` whether the measured residual is ≤ ``tol``).
        tol: The CG tolerance (NaN for ``cholesky`` and ``woodbury``).
        seconds: Wall time of the solve (assembling a given ``fisher`` or ``preconditioner`` is not included);
            for ``multishift`` the whole shared solve, the same for every damping it served; for ``gram`` this
            damping's share of building K (an equal share per damping) plus its own factorisation and check, so
            the dampings' seconds add up to the whole.
        preconditioner: ``"kfac"``, ``"ekfac"``, ``"diag"``, ``"lowrank"``, ... (the structure used as M), or
            ``"none"``; for ``gram`` ``"cholesky-float32"`` when the float32 factor of K + λI preconditioned its
            sample-space refinement, else ``"none"``.
        products: F·v products (one per column of a block product) used, residual checks included; 0 for
            ``cholesky`` and ``woodbury``, 1 per damping for ``gram`` (its residual check, plus any refinement's).
            A ``multishift`` solve's products serve all its dampings: each records the shared total. Building a
            preconditioner is not counted here (``preconditioner_products``).
        preconditioner_products: F·v products of building the preconditioner, shared by every damping it served
            (k for a Nyström sketch built by the solve; 0 for none, for KFAC or the diagonal, which take no
            products, and for a given ``preconditioner`` built elsewhere).
    """

    solver: str
    iterations: int
    residual: float
    converged: bool
    tol: float
    seconds: float
    preconditioner: str = "none"
    products: int = 0
    preconditioner_products: int = 0


def _relative_residual(F: Tensor, x: Tensor, g: Tensor, damping: float) -> float:
    return float(torch.linalg.vector_norm(F @ x + damping * x - g) / torch.linalg.vector_norm(g))


def gram_applies(engine: FisherEngine, dampings: Sequence[float], fisher: FisherMatrix | None) -> bool:
    """Whether ``auto`` takes ``gram`` for these dampings (module docstring).

    No dense ``fisher`` given, m < P, every λ > 0, one process, :func:`~fisherlab.gram.gram_bytes` within the
    engine's memory budget.
    """
    if fisher is not None and fisher.structure != "implicit":
        return False
    if engine.group is not None or min(dampings) <= 0:
        return False
    if engine.num_samples * engine.rows_per_sample >= engine.spec.dim:
        return False
    try:
        return gram_bytes(engine) <= engine.memory_budget
    except UnsupportedLayerError:
        return False


def _auto(engine: FisherEngine, damping: float, fisher: FisherMatrix | None) -> NGDSolver:
    """The solver ``auto`` takes for one damping, ``gram`` aside (module docstring)."""
    if fisher is not None:
        return NGDSolver.CG if fisher.structure == "implicit" else NGDSolver.CHOLESKY
    P = engine.spec.dim
    m = engine.num_samples * engine.rows_per_sample
    if dense_bytes(m, P, torch.float64) > engine.memory_budget // 4:
        return NGDSolver.CG
    if engine.group is not None:  # Woodbury needs every rank's rows; Cholesky all-reduces UᵀU (P×P per rank)
        return NGDSolver.CHOLESKY if 2 * dense_bytes(P, P, torch.float64) <= engine.memory_budget else NGDSolver.CG
    return NGDSolver.WOODBURY if m < P and damping > 0 else NGDSolver.CHOLESKY


class _Counted:
    """v ↦ F v (v of shape (P,) or (P, k)) with the given Fisher or the engine, counting products (columns)."""

    def __init__(self, engine: FisherEngine, fisher: FisherMatrix | None) -> None:
        self.engine, self.fisher, self.products = engine, fisher, 0

    def __call__(self, v: Tensor) -> Tensor:
        self.products += 1 if v.ndim == 1 else int(v.shape[1])
        if self.fisher is None:
            return self.engine.matmat(v)
        return self.fisher.matvec(v) if v.ndim == 1 else self.fisher.matmat(v)


def _build_preconditioner(engine: FisherEngine, solver: NGDSolver) -> FisherMatrix:
    """The preconditioner of ``solver``, built from the engine.

    KFAC (diag when KFAC cannot be built) for ``pcg-kfac``, the diagonal for ``pcg-diag``, the Nyström sketch
    (``lowrank``, default rank) for ``pcg-nystrom``.
    """
    if solver is NGDSolver.PCG_NYSTROM:
        return structures.build("lowrank", engine)
    if solver is NGDSolver.PCG_KFAC:
        try:
            return structures.build("kfac", engine)
        except (UnsupportedLayerError, MemoryBudgetError):
            pass
    return structures.build("diag", engine)


def _apply_preconditioner(M: FisherMatrix, damping: float) -> Callable[[Tensor], Tensor]:
    """The preconditioner r ↦ (M + λI)⁻¹ r, in r's dtype; for a Nyström M, r ↦ P_λ⁻¹ r (module docstring)."""
    if isinstance(M, LowRankFisher):
        return lambda r: M.precondition(r, damping).to(r.dtype)
    return lambda r: M.solve(r, damping).to(r.dtype)


def _sketch_products(M: FisherMatrix) -> int:
    """F·v products that building the preconditioner M took: a Nyström sketch's rank, else 0."""
    return int(M.meta["rank"]) if isinstance(M, LowRankFisher) else 0


def _iterative(engine: FisherEngine, g: Tensor, damping: float, solver: NGDSolver, fisher: FisherMatrix | None,
               preconditioner: FisherMatrix | None, cg_tol: float,
               cg_max_iter: int | None) -> tuple[Tensor, SolveInfo]:
    """CG, multi-shift CG (one shift) or preconditioned CG; the timing includes building a preconditioner."""
    start = time.perf_counter()
    product = _Counted(engine, fisher)
    built = 0
    if solver is NGDSolver.MULTISHIFT:
        out = cg_multishift(product, g, [damping], tol=cg_tol, max_iter=cg_max_iter, batched=True)
        result, name = out.shifts[0], "none"
    else:
        M = None
        if solver in PRECONDITIONED_SOLVERS:
            M = preconditioner
            if M is None:
                M = _build_preconditioner(engine, solver)
                built = _sketch_products(M)
        name = "none" if M is None else M.structure
        result = cg(product, g, damping=damping, tol=cg_tol, max_iter=cg_max_iter,
                    preconditioner=None if M is None else _apply_preconditioner(M, damping))
    info = SolveInfo(solver.value, result.iterations, float(result.residual), bool(result.converged), cg_tol,
                     time.perf_counter() - start, name, product.products, built)
    return result.x, info


def _gram(engine: FisherEngine, g: Tensor, dampings: Sequence[float], fisher: FisherMatrix | None, cg_tol: float,
          cg_max_iter: int | None, gram: SampleGram | None = None) -> dict[float, tuple[Tensor, SolveInfo]]:
    """The sample-space solve for every damping, its residual checked with one block of true F·v products.

    ``gram``: the engine's :class:`~fisherlab.gram.SampleGram` already built (its seconds are then not counted).
    """
    if min(dampings) <= 0:
        raise InputError("the sample-space ('gram') NGD solve needs damping > 0; use solver 'cholesky' or 'cg'")
    start = time.perf_counter()
    gram = build_gram(engine) if gram is None else gram
    share = (time.perf_counter() - start) / len(dampings)
    xs, seconds, refined = [], [], []
    for lam in dampings:
        start = time.perf_counter()
        xs.append(gram.solve(g, lam).to(g.dtype))
        refined.append(gram.refined.get(lam))
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    product = _Counted(engine, fisher)
    X = torch.stack(xs, dim=1)
    R = product(X) + X * torch.tensor(dampings, dtype=X.dtype, device=X.device) - g[:, None]
    residuals = (torch.linalg.vector_norm(R, dim=0) / torch.linalg.vector_norm(g)).tolist()
    check = (time.perf_counter() - start) / len(dampings)
    out = {}
    for j, lam in enumerate(dampings):
        x, residual, iterations, products = xs[j], residuals[j], refined[j] or 0, 1
        start = time.perf_counter()
        if not residual <= cg_tol:  # refine: CG preconditioned by the sample-space inverse, from x
            before = product.products
            result = cg(product, g, damping=lam, tol=cg_tol, max_iter=cg_max_iter, x0=x,
                        preconditioner=lambda r, lam=lam: gram.solve(r, lam).to(r.dtype))
            x, residual = result.x, float(result.residual)
            iterations += result.iterations
            products += product.products - before
        seconds[j] += share + check + time.perf_counter() - start
        out[lam] = (x, SolveInfo(NGDSolver.GRAM.value, iterations, residual, residual <= cg_tol, cg_tol,
                                 seconds[j], "none" if refined[j] is None else "cholesky-float32", products))
    return out


def solve_ngd(engine: FisherEngine, g: Tensor, damping: float, *, solver: str = "auto",
              fisher: FisherMatrix | None = None, preconditioner: FisherMatrix | None = None, cg_tol: float = 1e-6,
              cg_max_iter: int | None = None) -> tuple[Tensor, SolveInfo]:
    """(F + λI)⁻¹ g with the engine's Fisher on its data, solved exactly (module docstring).

    Args:
        engine: The Fisher engine (kind, data, budget).
        g: Right-hand side, shape (P,), usually the loss gradient ∇L.
        damping: λ ≥ 0.
        solver: One of :class:`NGDSolver`.
        fisher: The engine's Fisher already built (dense or implicit), to solve with instead of assembling it.
        preconditioner: For ``pcg-kfac`` / ``pcg-diag`` / ``pcg-nystrom``: a structure of the same Fisher already
            built (KFAC, EKFAC, diag, a lowrank sketch, ...), used as M in M⁻¹ = (M + λI)⁻¹ (a LowRankFisher in
            the Nyström form, module docstring) instead of building one.
        cg_tol: Relative residual ‖(F + λI)x − g‖/‖g‖ of the iterative solvers.
        cg_max_iter: CG iteration cap (default: CG's own).

    Returns:
        x of shape (P,) in g's dtype, and its :class:`SolveInfo`.
    """
    damping = check_damping(damping)
    solver = parse_enum(NGDSolver, solver, "NGD solver")
    if solver is NGDSolver.AUTO:
        solver = NGDSolver.GRAM if gram_applies(engine, [damping], fisher) else _auto(engine, damping, fisher)
    if solver is NGDSolver.GRAM:
        return _gram(engine, g, [damping], fisher, cg_tol, cg_max_iter)[damping]
    if solver in ITERATIVE_SOLVERS:
        return _iterative(engine, g, damping, solver, fisher, preconditioner, cg_tol, cg_max_iter)
    start = time.perf_counter()
    P = engine.spec.dim
    if fisher is not None and fisher.structure != "implicit" and solver is NGDSolver.CHOLESKY:
        # its quality is the residual recorded here (the estimate-based singularity check of damped_solve can
        # refuse a well-damped float32 matrix)
        F = fisher.to_dense()
        if isinstance(fisher, DenseFisher):  # its kept factor of F + λI (shared with the Cholesky roots at λ)
            _check_finite(g, "g")
            x = cholesky_factor_solve(fisher.damped_factor(damping), g)
            _check_finite(x, "the solution x of (G + damping·I) x = b")
            x = x.to(torch.promote_types(F.dtype, g.dtype))
        else:
            x = damped_solve(F, g, damping, check_singular=False)
        return x, SolveInfo(solver.value, 0, _relative_residual(F, x, g, damping), True, float("nan"),
                            time.perf_counter() - start)
    U = torch.cat(list(engine.iter_factor_rows()))
    U64, g64 = U.double(), g.double()
    if solver is NGDSolver.WOODBURY:
        if damping <= 0:
            raise InputError("the Woodbury NGD solve needs damping > 0; use solver 'cholesky' or 'cg'")
        if engine.group is not None:
            raise InputError("the Woodbury NGD solve needs every sample's factor rows on one process; under "
                             "torch.distributed use solver 'cholesky' or 'cg'")
        x = (g64 - U64.T @ damped_solve((U @ U.T).double(), U64 @ g64, damping)) / damping
        residual = float("nan")
    else:
        engine.check_dense(P, P, f"the dense {P}×{P} Fisher (use the 'cg' solver)")
        F64 = (U.T @ U).double()
        engine.reduce_sum([F64])  # this rank's UᵀU → the sum over every rank's samples (no-op in one process)
        x = damped_solve(F64, g64, damping)
        residual = _relative_residual(F64, x, g64, damping)
    return x.to(g.dtype), SolveInfo(solver.value, 0, residual, True, float("nan"), time.perf_counter() - start)


def solve_ngd_all(engine: FisherEngine, g: Tensor, dampings: float | Sequence[float], *, solver: str = "auto",
                  fisher: FisherMatrix | None = None, preconditioner: FisherMatrix | None = None,
                  cg_tol: float = 1e-6, cg_max_iter: int | None = None,
                  gram: SampleGram | None = None) -> dict[float, tuple[Tensor, SolveInfo]]:
    """(F + λI)⁻¹ g for every damping of a study, sharing what the solver can share (module docstring).

    ``gram`` (and ``auto`` where it applies) builds K once for all dampings; ``multishift`` (and ``auto`` wherever
    it would take CG, when there are several dampings) runs one multi-shift CG for all dampings; ``pcg-kfac`` /
    ``pcg-diag`` / ``pcg-nystrom`` build their preconditioner once (unless given; a sketch's products are then in
    every damping's ``preconditioner_products``) and solve per damping; the direct solvers solve per damping.

    Args:
        engine: The Fisher engine (kind, data, budget).
        g: Right-hand side, shape (P,).
        dampings: λ values, one or several (distinct, ≥ 0).
        solver: One of :class:`NGDSolver`.
        fisher: The engine's Fisher already built (dense or implicit).
        preconditioner: For ``pcg-kfac`` / ``pcg-diag`` / ``pcg-nystrom``: a structure already built, used for
            every damping.
        cg_tol: Relative residual of the iterative solvers, per damping.
        cg_max_iter: Iteration cap (of the shared iterations for ``multishift``).
        gram: For ``gram``: the engine's :func:`~fisherlab.gram.build_gram` already built (e.g. kept for its
            eigenvalues), used instead of building it; with ``gram``, a dense ``fisher`` only serves the residual
            checks.

    Returns:
        ``{λ: (x (P,) in g's dtype, SolveInfo)}`` in the order of ``dampings``.
    """
    dampings = check_dampings(dampings)
    solver = parse_enum(NGDSolver, solver, "NGD solver")
    if solver is NGDSolver.AUTO and gram_applies(engine, dampings, fisher):
        solver = NGDSolver.GRAM
    if solver is NGDSolver.AUTO:
        chosen = {_auto(engine, lam, fisher) for lam in dampings}
        solver = NGDSolver.MULTISHIFT if NGDSolver.CG in chosen and len(dampings) > 1 else NGDSolver.AUTO
    if solver is NGDSolver.GRAM:
        return _gram(engine, g, dampings, fisher, cg_tol, cg_max_iter, gram)
    if solver is NGDSolver.MULTISHIFT:
        start = time.perf_counter()
        product = _Counted(engine, fisher)
        out = cg_multishift(product, g, dampings, tol=cg_tol, max_iter=cg_max_iter, batched=True)
        seconds = time.perf_counter() - start
        return {lam: (r.x, SolveInfo(solver.value, r.iterations, float(r.residual), bool(r.converged), cg_tol,
                                     seconds, "none", product.products))
                for lam, r in zip(dampings, out.shifts, strict=True)}
    built = 0
    if solver in PRECONDITIONED_SOLVERS and preconditioner is None:
        preconditioner = _build_preconditioner(engine, solver)
        built = _sketch_products(preconditioner)
    out = {lam: solve_ngd(engine, g, lam, solver=solver.value, fisher=fisher, preconditioner=preconditioner,
                          cg_tol=cg_tol, cg_max_iter=cg_max_iter) for lam in dampings}
    return {lam: (x, dataclasses.replace(info, preconditioner_products=built)) for lam, (x, info) in out.items()}
