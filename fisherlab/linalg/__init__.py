"""Linear algebra for Fisher geometry: damped solves, square roots, Krylov methods, estimators, Kronecker.

* :mod:`~fisherlab.linalg.solve` — :func:`damped_solve` (Cholesky) and :func:`condition_number`.
* :mod:`~fisherlab.linalg.sqrtm` — G_λ^{±1/2} by eigh, Denman–Beavers or Newton–Schulz (:func:`sqrtm`,
  :func:`inv_sqrtm`).
* :mod:`~fisherlab.linalg.krylov` — matrix-free :func:`cg`, :func:`cg_multishift` (all dampings from one Krylov
  space), :func:`lanczos`, stochastic Lanczos quadrature (:func:`slq_density`, :func:`density_on_grid`,
  :func:`slq_trace_fn`).
* :mod:`~fisherlab.linalg.estimators` — Hutchinson / Hutch++ trace and diagonal estimators.
* :mod:`~fisherlab.linalg.randomized` — :func:`top_eigh`, the largest eigenpairs by randomized subspace iteration.
* :mod:`~fisherlab.linalg.kron` — Kronecker-factored (KFAC) products, damped solves and factor roots in
  fisherlab's row-major parameter ordering.
* :mod:`~fisherlab.linalg.threads` — eigenvalue problems on one thread each (:func:`~fisherlab.linalg.threads.serial`,
  :func:`~fisherlab.linalg.threads.concurrently`): the symmetric eigensolver's barriers stall shared cores.
"""

from fisherlab.linalg.estimators import PROBE_DISTRIBUTIONS, hutchinson_diag, hutchinson_trace, hutchpp_trace
from fisherlab.linalg.kron import (
    KRON_DENSE_ORDERS,
    KRON_SOLVE_METHODS,
    KRON_SPLITS,
    KronEig,
    kron_damped_solve,
    kron_damping_split,
    kron_eig,
    kron_inv_sqrt,
    kron_matmul,
    kron_to_dense,
)
from fisherlab.linalg.krylov import (
    CGResult,
    MultiShiftCGResult,
    cg,
    cg_multishift,
    density_on_grid,
    lanczos,
    slq_density,
    slq_trace_fn,
)
from fisherlab.linalg.randomized import top_eigh
from fisherlab.linalg.solve import condition_number, damped_solve
from fisherlab.linalg.sqrtm import (
    SQRT_METHODS,
    ConvergenceError,
    SqrtResult,
    default_sqrt_tol,
    inv_sqrtm,
    sqrtm,
)

__all__ = [
    "KRON_DENSE_ORDERS",
    "KRON_SOLVE_METHODS",
    "KRON_SPLITS",
    "PROBE_DISTRIBUTIONS",
    "SQRT_METHODS",
    "CGResult",
    "ConvergenceError",
    "KronEig",
    "MultiShiftCGResult",
    "SqrtResult",
    "cg",
    "cg_multishift",
    "condition_number",
    "damped_solve",
    "default_sqrt_tol",
    "density_on_grid",
    "hutchinson_diag",
    "hutchinson_trace",
    "hutchpp_trace",
    "inv_sqrtm",
    "kron_damped_solve",
    "kron_damping_split",
    "kron_eig",
    "kron_inv_sqrt",
    "kron_matmul",
    "kron_to_dense",
    "lanczos",
    "slq_density",
    "slq_trace_fn",
    "sqrtm",
    "top_eigh",
]
