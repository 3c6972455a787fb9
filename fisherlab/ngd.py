"""Exact natural gradient: one solve (F + λI) x = g, shared by the fidelity rules and by ``train``.

:func:`solve_ngd` solves with the Fisher of an engine's kind on the engine's data, by one of
:class:`NGDSolver`:

* ``cholesky`` — the dense F + λI (given as ``fisher``, or assembled as UᵀU from the factor rows U);
* ``woodbury`` — F = UᵀU with factor rows U (m, P): (UᵀU + λI)⁻¹ g = (g − Uᵀ (UUᵀ + λI)⁻¹ U g) / λ, a Cholesky
  factorisation of the m×m Gram matrix (needs λ > 0; cheaper than Cholesky when m < P);
* ``cg`` — conjugate gradients on the implicit F to the relative residual ``cg_tol``;
* ``auto`` — a given dense ``fisher``: Cholesky on it; a given implicit one: CG; otherwise CG when the factor rows
  (in float64) would take more than a quarter of the memory budget, else Woodbury when m < P and λ > 0, else
  Cholesky.

Assembled matrices are factorised in float64 (the result has g's dtype): in float32 the Cholesky factorisation
of a matrix with condition number ‖F‖/λ ≈ 1e4–1e6 loses most digits. Every solve returns a :class:`SolveInfo`
with the relative residual ‖(F + λI)x − g‖/‖g‖ (for the direct solvers measured on the dense matrix they used).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from fisherlab.checks import check_damping, parse_enum
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError
from fisherlab.linalg import cg, damped_solve
from fisherlab.memory import dense_bytes
from fisherlab.structures.base import FisherMatrix

__all__ = ["NGDSolver", "SolveInfo", "solve_ngd"]


class NGDSolver(str, Enum):
    """How :func:`solve_ngd` solves (module docstring)."""

    AUTO = "auto"
    CHOLESKY = "cholesky"
    WOODBURY = "woodbury"
    CG = "cg"


@dataclass(frozen=True)
class SolveInfo:
    """How an exact solve (F + λI) x = g was done.

    Attributes:
        solver: ``"cholesky"``, ``"woodbury"`` or ``"cg"``.
        iterations: CG iterations (0 for the direct solvers).
        residual: Relative residual ‖(F + λI) x − g‖ / ‖g‖ (NaN for Woodbury, which never forms F).
        converged: Whether CG reached the tolerance (always True for the direct solvers).
        tol: The CG tolerance (NaN for the direct solvers).
        seconds: Wall time of the solve (assembling a given ``fisher`` is not included).
    """

    solver: str
    iterations: int
    residual: float
    converged: bool
    tol: float
    seconds: float


def _relative_residual(F: Tensor, x: Tensor, g: Tensor, damping: float) -> float:
    return float(torch.linalg.vector_norm(F @ x + damping * x - g) / torch.linalg.vector_norm(g))


def solve_ngd(engine: FisherEngine, g: Tensor, damping: float, *, solver: str = "auto",
              fisher: FisherMatrix | None = None, cg_tol: float = 1e-6,
              cg_max_iter: int | None = None) -> tuple[Tensor, SolveInfo]:
    """(F + λI)⁻¹ g with the engine's Fisher on its data, solved exactly (module docstring).

    Args:
        engine: The Fisher engine (kind, data, budget).
        g: Right-hand side, shape (P,), usually the loss gradient ∇L.
        damping: λ ≥ 0.
        solver: One of :class:`NGDSolver`.
        fisher: The engine's Fisher already built (dense or implicit), to solve with instead of assembling it.
        cg_tol: Relative residual of CG.
        cg_max_iter: CG iteration cap (default: CG's own).

    Returns:
        x of shape (P,) in g's dtype, and its :class:`SolveInfo`.
    """
    damping = check_damping(damping)
    solver = parse_enum(NGDSolver, solver, "NGD solver")
    P = engine.spec.dim
    m = engine.num_samples * engine.rows_per_sample
    if solver is NGDSolver.AUTO:
        if fisher is not None:
            solver = NGDSolver.CG if fisher.structure == "implicit" else NGDSolver.CHOLESKY
        elif dense_bytes(m, P, torch.float64) > engine.memory_budget // 4:
            solver = NGDSolver.CG
        else:
            solver = NGDSolver.WOODBURY if m < P and damping > 0 else NGDSolver.CHOLESKY
    start = time.perf_counter()
    if solver is NGDSolver.CG:
        product = fisher.matvec if fisher is not None else engine.matmat
        result = cg(product, g, damping=damping, tol=cg_tol, max_iter=cg_max_iter)
        info = (result.iterations, float(result.residual), bool(result.converged), cg_tol)
        return result.x, SolveInfo(solver.value, *info, time.perf_counter() - start)
    if fisher is not None and fisher.structure != "implicit" and solver is NGDSolver.CHOLESKY:
        # its quality is the residual recorded here (the estimate-based singularity check of damped_solve can
        # refuse a well-damped float32 matrix)
        F = fisher.to_dense()
        x = damped_solve(F, g, damping, check_singular=False)
        return x, SolveInfo(solver.value, 0, _relative_residual(F, x, g, damping), True, float("nan"),
                            time.perf_counter() - start)
    U = torch.cat(list(engine.iter_factor_rows()))
    U64, g64 = U.double(), g.double()
    if solver is NGDSolver.WOODBURY:
        if damping <= 0:
            raise InputError("the Woodbury NGD solve needs damping > 0; use solver 'cholesky' or 'cg'")
        x = (g64 - U64.T @ damped_solve((U @ U.T).double(), U64 @ g64, damping)) / damping
        residual = float("nan")
    else:
        engine.check_dense(P, P, f"the dense {P}×{P} Fisher (use the 'cg' solver)")
        F64 = (U.T @ U).double()
        x = damped_solve(F64, g64, damping)
        residual = _relative_residual(F64, x, g64, damping)
    return x.to(g.dtype), SolveInfo(solver.value, 0, residual, True, float("nan"), time.perf_counter() - start)
