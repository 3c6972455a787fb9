"""Matrix square roots G_λ^{1/2} and inverse square roots G_λ^{-1/2} of a damped SPD matrix.

A local Fisher layer (docs/method.md) carries G^{-1/2} for G = F + λI (or a block / Kronecker factor of it),
and the reconstructed parameters are θ' = G^{1/2} θ. This module computes both roots of

    G_λ = sym(G) + λ I,        sym(G) = (G + Gᵀ)/2,

by three methods:

* ``"eigh"`` — the reference: G_λ = Q diag(w) Qᵀ, G_λ^{±1/2} = Q diag(w^{±1/2}) Qᵀ.
* ``"denman_beavers"`` — the Denman–Beavers iteration Y_{k+1} = (Y_k + Z_k⁻¹)/2, Z_{k+1} = (Z_k + Y_k⁻¹)/2,
  Y_0 = G̃, Z_0 = I, run in the scaled *product form* (Higham, Functions of Matrices, 2008, eq. 6.17 / 6.28)
  on G̃ = G_λ/‖G_λ‖_F: with M_0 = G̃ and the determinant scaling μ_k = det(M_k)^{-1/(2n)},

      F_k = (μ_k I + μ_k⁻¹ M_k⁻¹)/2,  Y_{k+1} = Y_k F_k,  Z_{k+1} = Z_k F_k,
      M_{k+1} = I/2 + (μ_k² M_k + μ_k⁻² M_k⁻¹)/4,

  so that M_k = Y_k Z_k → I, Y_k → G̃^{1/2}, Z_k → G̃^{-1/2}. One Cholesky factorisation and inverse of
  the SPD matrix M_k per step (which also gives det M_k), plus one matmul per requested root.
* ``"newton_schulz"`` — the coupled, inverse-free Newton–Schulz iteration (matmuls only) on
  G̃ = G_λ/‖G_λ‖_F (eigenvalues in (0, 1]):

      T_k = (3I − Z_k Y_k)/2,  Y_{k+1} = Y_k T_k,  Z_{k+1} = T_k Z_k,   Y_0 = G̃, Z_0 = I.

  Each eigen-component t = z·y of Z_k Y_k follows t ← t (3 − t)²/4: it grows by 9/4 per step while small,
  then converges quadratically. The number of steps is therefore about log(κ_F)/log(9/4) + 5, with
  κ_F = ‖G_λ‖_F / λ_min(G_λ) ≤ √n κ(G_λ). Measured (n = 30, float64, log-spaced spectrum, tol 1e-12):

      κ(G_λ)             1e2  1e4  1e6  1e8  1e10  1e12
      Newton–Schulz       12   18   23   29    36    42
      Denman–Beavers       6    7    8    8     8     9

  (float32, tol 1e-6: NS 12/17/19/20 and DB 5/6/6/7 steps at κ = 1e2/1e3/1e4/1e5.) The default
  ``max_iter=100`` therefore covers any κ representable in float64; a run that does not converge is
  reported (``converged=False``), never hidden.

Both iterative results are rescaled: G_λ^{1/2} = ‖G_λ‖_F^{1/2} Y, G_λ^{-1/2} = ‖G_λ‖_F^{-1/2} Z, and
symmetrised.

**Stopping rule (iterative methods).** The relative change of an update is measured by ‖F_k − I‖_F
(Denman–Beavers) or ‖T_k − I‖_F (Newton–Schulz): the iterates are multiplied by F_k (T_k), so this bounds
the relative change of every eigen-component of both Y and Z. The iteration stops as *converged* when it is
≤ ``tol`` (default 1e-12 in float64, 1e-6 otherwise), or when it has reached round-off level — it was
already ≤ √tol and stopped decreasing — since further steps cannot improve the result. Otherwise it stops
at ``max_iter`` with ``converged=False``; the returned residual says how good the result is.

**Residuals.** ``SqrtResult.residual`` is ‖Y Y − G_λ‖_F / ‖G_λ‖_F when the square root Y is returned, and
‖Z G_λ Z − I‖_F / √n when only the inverse square root Z is (``inv_sqrtm``). ``inv_residual`` is always
‖Z G_λ Z − I‖_F / √n when Z is returned. Both are computed from the returned roots, in the working dtype,
after the iteration. Note that ‖Z G_λ Z − I‖ grows like eps·κ(G_λ) even for the exact eigh answer
(≈ 2e-10 at κ = 1e8 in float64).

**Errors.** NaN/inf input raises NonFiniteError. If G_λ is not numerically SPD — smallest eigenvalue
≤ n·eps·(largest eigenvalue magnitude) for eigh; failed Cholesky or λ_min estimated from tr(G_λ⁻¹) below
n·eps·‖G_λ‖_F for the iterative methods (see ``solve._spd_cholesky``) — a SingularMatrixError names the
smallest eigenvalue (estimate) and advises a positive damping. An iteration that produces NaN/inf or
loses positive definiteness also raises SingularMatrixError rather than returning NaN.

float16/bfloat16 inputs are computed in float32 and the roots cast back. All work stays on G's device;
the only host syncs are the positive-definiteness checks, one per iteration for the stopping rule, and
the final residuals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.errors import ConvergenceError, InputError, SingularMatrixError
from fisherlab.linalg.solve import (
    _add_damping,
    _check_damping,
    _check_finite,
    _check_option,
    _check_square,
    _compute_dtype,
    _eps,
    _spd_cholesky,
    _symmetrize,
)

__all__ = [
    "SQRT_METHODS",
    "ConvergenceError",
    "SqrtResult",
    "default_sqrt_tol",
    "inv_sqrtm",
    "sqrtm",
]

SQRT_METHODS: tuple[str, ...] = ("eigh", "denman_beavers", "newton_schulz")


@dataclass
class SqrtResult:
    """Square root and inverse square root of G_λ = sym(G) + λI, with a report.

    Attributes:
        sqrt: G_λ^{1/2} (n, n), symmetric, or None if not requested.
        inv_sqrt: G_λ^{-1/2} (n, n), symmetric, or None if not requested.
        method: ``"eigh"``, ``"denman_beavers"`` or ``"newton_schulz"``.
        iterations: Iterations run (0 for eigh).
        residual: ‖Y Y − G_λ‖_F/‖G_λ‖_F if ``sqrt`` is returned, else ‖Z G_λ Z − I‖_F/√n.
        converged: Whether the stopping rule was met (always True for eigh).
        inv_residual: ‖Z G_λ Z − I‖_F/√n if ``inv_sqrt`` is returned, else None.
        damping: The damping λ that was added.
        tol: The tolerance used by an iterative method (None for eigh).
    """

    sqrt: Tensor | None
    inv_sqrt: Tensor | None
    method: str
    iterations: int
    residual: float
    converged: bool = True
    inv_residual: float | None = None
    damping: float = 0.0
    tol: float | None = None


def default_sqrt_tol(dtype: torch.dtype) -> float:
    """Default relative-change tolerance of the iterative square roots: 1e-12 in float64, else 1e-6."""
    return 1e-12 if _compute_dtype(dtype) == torch.float64 else 1e-6


# --------------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------------


def _eigh_roots(
    Gd: Tensor, lam: float, want_sqrt: bool, want_inv: bool
) -> tuple[Tensor | None, Tensor | None]:
    n = Gd.shape[-1]
    w, Q = torch.linalg.eigh(Gd)
    scale = w.abs().max()
    lo, hi, thr = torch.stack([w[0], w[-1], n * _eps(Gd.dtype) * scale]).tolist()
    if not lo > thr:
        advice = (
            "pass damping > 0 (e.g. 1e-4 to 1e-2 times the mean eigenvalue)" if lam == 0.0
            else f"increase the damping (now {lam:g})"
        )
        kind = "not positive definite" if lo < -thr else "numerically singular"
        raise SingularMatrixError(
            f"G + damping·I (damping={lam:g}) is {kind}: its smallest eigenvalue is {lo:.3e} "
            f"(largest {hi:.3e}, round-off level n·eps·max|λ| = {thr:.3e}), so G has smallest eigenvalue "
            f"{lo - lam:.3e}; {advice}"
        )
    Y = _symmetrize((Q * w.sqrt()) @ Q.mT) if want_sqrt else None
    Z = _symmetrize((Q * w.rsqrt()) @ Q.mT) if want_inv else None
    return Y, Z


def _stop_rule(change: float, prev: float | None, tol: float, method: str, k: int) -> tuple[bool, bool]:
    """(stop, converged) for a relative change; raise on non-finite iterates."""
    if not math.isfinite(change):
        raise SingularMatrixError(
            f"the {method} iteration produced NaN/inf at step {k}: G + damping·I is numerically singular or "
            "not positive definite; pass (or increase) a positive damping, or use method='eigh'"
        )
    if change <= tol:
        return True, True
    if prev is not None and prev <= math.sqrt(tol) and change >= prev:
        return True, True  # round-off floor reached: no further progress possible
    return False, False


def _denman_beavers(
    Gd: Tensor, tol: float, max_iter: int, want_sqrt: bool, want_inv: bool
) -> tuple[Tensor | None, Tensor | None, int, bool]:
    n = Gd.shape[-1]
    eye = torch.eye(n, dtype=Gd.dtype, device=Gd.device)
    c = torch.linalg.matrix_norm(Gd)
    M = Gd / c
    Y = M.clone() if want_sqrt else None
    Z = eye.clone() if want_inv else None
    prev: float | None = None
    converged = False
    k = 0
    for k in range(1, max_iter + 1):
        L, info = torch.linalg.cholesky_ex(M)
        Minv = torch.cholesky_inverse(L)
        logdet = 2.0 * torch.log(torch.diagonal(L)).sum()
        mu = torch.exp(-logdet / (2 * n))
        F = 0.5 * (mu * eye + Minv / mu)
        if Y is not None:
            Y = Y @ F
        if Z is not None:
            Z = Z @ F
        M = _symmetrize(0.5 * eye + 0.25 * (mu * mu * M + Minv / (mu * mu)))
        change_t = torch.linalg.matrix_norm(F - eye)
        change, info_v = torch.stack([change_t, info.to(change_t.dtype)]).tolist()
        if info_v != 0:
            raise SingularMatrixError(
                f"the denman_beavers iterate M_{k - 1} lost positive definiteness (Cholesky failed): "
                "G + damping·I is numerically singular; pass (or increase) a positive damping"
            )
        stop, converged = _stop_rule(change, prev, tol, "denman_beavers", k)
        prev = change
        if stop:
            break
    s = c.sqrt()
    Y = _symmetrize(Y * s) if Y is not None else None
    Z = _symmetrize(Z / s) if Z is not None else None
    return Y, Z, k, converged


def _newton_schulz(Gd: Tensor, tol: float, max_iter: int) -> tuple[Tensor, Tensor, int, bool]:
    n = Gd.shape[-1]
    eye = torch.eye(n, dtype=Gd.dtype, device=Gd.device)
    c = torch.linalg.matrix_norm(Gd)
    Y = Gd / c
    Z = eye.clone()
    prev: float | None = None
    converged = False
    k = 0
    for k in range(1, max_iter + 1):
        T = 1.5 * eye - 0.5 * (Z @ Y)
        change = float(torch.linalg.matrix_norm(T - eye).item())
        Y = Y @ T
        Z = T @ Z
        stop, converged = _stop_rule(change, prev, tol, "newton_schulz", k)
        prev = change
        if stop:
            break
    s = c.sqrt()
    return _symmetrize(Y * s), _symmetrize(Z / s), k, converged


def _sqrtm_impl(
    G: Tensor,
    method: str,
    damping: float,
    tol: float | None,
    max_iter: int,
    want_sqrt: bool,
    want_inv: bool,
) -> SqrtResult:
    n = _check_square(G, "G")
    _check_option(method, SQRT_METHODS, "method")
    lam = _check_damping(damping)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise InputError(f"max_iter must be a positive int, got {max_iter!r}")
    out_dtype = G.dtype
    dtype = _compute_dtype(G.dtype)
    if tol is None:
        tol = default_sqrt_tol(dtype)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise InputError(f"tol must be a positive finite number, got {tol!r}")
    Gc = G.to(dtype)
    _check_finite(Gc, "G")
    Gd = _add_damping(_symmetrize(Gc), lam)

    if method == "eigh":
        Y, Z = _eigh_roots(Gd, lam, want_sqrt, want_inv)
        iterations, converged, used_tol = 0, True, None
    else:
        _spd_cholesky(Gd, damping=lam, name="G")
        if method == "denman_beavers":
            Y, Z, iterations, converged = _denman_beavers(Gd, tol, max_iter, want_sqrt, want_inv)
        else:
            Y, Z, iterations, converged = _newton_schulz(Gd, tol, max_iter)
            Y = Y if want_sqrt else None
            Z = Z if want_inv else None
        used_tol = float(tol)

    eye = torch.eye(n, dtype=dtype, device=Gd.device)
    norms = []
    if Y is not None:
        norms.append(torch.linalg.matrix_norm(Y @ Y - Gd) / torch.linalg.matrix_norm(Gd))
    if Z is not None:
        norms.append(torch.linalg.matrix_norm(Z @ Gd @ Z - eye) / math.sqrt(n))
    vals = torch.stack(norms).tolist()
    if not all(math.isfinite(v) for v in vals):
        raise SingularMatrixError(
            f"the {method} square root of G + damping·I (damping={lam:g}) is not finite: the matrix is "
            "numerically singular; pass (or increase) a positive damping"
        )
    res_sqrt = vals[0] if Y is not None else None
    res_inv = vals[-1] if Z is not None else None
    return SqrtResult(
        sqrt=Y.to(out_dtype) if Y is not None else None,
        inv_sqrt=Z.to(out_dtype) if Z is not None else None,
        method=method,
        iterations=iterations,
        residual=res_sqrt if res_sqrt is not None else res_inv,  # type: ignore[arg-type]
        converged=converged,
        inv_residual=res_inv,
        damping=lam,
        tol=used_tol,
    )


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------


def sqrtm(
    G: Tensor,
    *,
    method: str = "eigh",
    damping: float = 0.0,
    tol: float | None = None,
    max_iter: int = 100,
    inverse: bool = True,
) -> SqrtResult:
    """Square root and inverse square root of G_λ = (G + Gᵀ)/2 + λI.

    See the module docstring for the three methods, the stopping rule and the residual definitions.

    Args:
        G: Symmetric positive (semi-)definite matrix (n, n), any real float dtype and device.
        method: ``"eigh"`` (reference), ``"denman_beavers"`` or ``"newton_schulz"`` (matmuls only).
        damping: λ ≥ 0 added to the diagonal before taking roots.
        tol: Relative-change tolerance of the iterative methods (default 1e-12 in float64, 1e-6 otherwise);
            ignored by eigh.
        max_iter: Iteration cap of the iterative methods. Newton–Schulz needs ≈ log(κ_F)/log(9/4) + 5 steps
            (29 at κ = 1e8, n = 30), Denman–Beavers ≤ 10; 100 suffices for any float64 κ.
        inverse: Also return G_λ^{-1/2} (``inv_sqrt``); otherwise ``inv_sqrt`` is None.

    Returns:
        A :class:`SqrtResult` with ``sqrt`` = G_λ^{1/2} (n, n) and ``inv_sqrt`` = G_λ^{-1/2} (n, n) in G's
        dtype and device, the iteration count, ``converged`` and the residuals. An iterative run that did not
        converge is returned with ``converged=False`` — check it.

    Raises:
        InputError: G not a square float matrix, unknown method, negative damping, bad tol/max_iter.
        NonFiniteError: NaN/inf in G.
        SingularMatrixError: G_λ not numerically SPD (undamped singular or indefinite G), or an iteration
            broke down; the message gives the smallest eigenvalue (estimate) and advises damping > 0.
    """
    return _sqrtm_impl(G, method, damping, tol, max_iter, want_sqrt=True, want_inv=bool(inverse))


def inv_sqrtm(
    G: Tensor,
    *,
    method: str = "eigh",
    damping: float = 0.0,
    tol: float | None = None,
    max_iter: int = 100,
) -> Tensor:
    """G_λ^{-1/2} for G_λ = (G + Gᵀ)/2 + λI (the local Fisher layer of docs/method.md).

    Same methods and checks as :func:`sqrtm`; only the inverse root is formed (Denman–Beavers then skips the
    Y iterate).

    Args:
        G: Symmetric positive (semi-)definite matrix (n, n).
        method: ``"eigh"``, ``"denman_beavers"`` or ``"newton_schulz"``.
        damping: λ ≥ 0 added to the diagonal.
        tol: Relative-change tolerance of the iterative methods (default by dtype).
        max_iter: Iteration cap of the iterative methods.

    Returns:
        G_λ^{-1/2} (n, n), symmetric, in G's dtype and device.

    Raises:
        InputError: As :func:`sqrtm`.
        NonFiniteError: NaN/inf in G.
        SingularMatrixError: As :func:`sqrtm`.
        ConvergenceError: An iterative method did not converge within ``max_iter`` (use :func:`sqrtm` to get
            the unconverged result and its residual).
    """
    res = _sqrtm_impl(G, method, damping, tol, max_iter, want_sqrt=False, want_inv=True)
    if not res.converged:
        raise ConvergenceError(
            f"{method} did not converge in {res.iterations} iterations (tol={res.tol:g}); "
            f"‖Z G_λ Z − I‖_F/√n = {res.residual:.3e}. Increase max_iter or damping, or use method='eigh'"
        )
    assert res.inv_sqrt is not None
    return res.inv_sqrt
