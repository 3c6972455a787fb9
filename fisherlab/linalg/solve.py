"""Damped symmetric positive definite solves and condition numbers.

The project's NGD step solves (G + λI) x = b for a symmetric positive (semi-)definite G (a Fisher or an
approximation of it) and a damping λ ≥ 0 (docs/method.md). :func:`damped_solve` does this by Cholesky;
:func:`condition_number` reports κ(G + λI) = (λ_max + λ)/(λ_min + λ).

This module also holds the small validation helpers shared by the rest of :mod:`fisherlab.linalg`
(square-matrix and finiteness checks, the damping check, and the Cholesky-based positive-definiteness
test :func:`_spd_cholesky`).

**Numerical singularity.** A matrix is treated as numerically singular when its smallest eigenvalue is at
most ``n · eps · scale`` (``eps`` the machine epsilon of the working dtype, ``scale`` the largest
eigenvalue magnitude, or ‖G‖_F where no eigenvalues are computed) — the rank tolerance of
``numpy.linalg.matrix_rank``. Below that level round-off alone can flip the sign of an eigenvalue, so no
solve or square root is trustworthy without damping.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fisherlab.errors import InputError, NonFiniteError, SingularMatrixError

__all__ = ["cholesky_factor_solve", "condition_number", "damped_cholesky", "damped_solve"]

# --------------------------------------------------------------------------------------------------------
# shared helpers (private; used by sqrtm, krylov, estimators and kron)
# --------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Return the dtype computations run in: float16/bfloat16 are promoted to float32, others kept."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _check_float(x: Tensor, name: str) -> None:
    """Raise InputError unless ``x`` is a real floating-point tensor."""
    if not isinstance(x, Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"{name} must have a real floating-point dtype, got {x.dtype}")


def _check_finite(x: Tensor, name: str) -> None:
    """Raise NonFiniteError if ``x`` holds a NaN or an infinity (one device sync).

    From ``amax`` and ``amin`` (they propagate NaN and keep ±inf): two read-only passes, where
    ``isfinite(x).all()`` makes an n-sized mask first (≈ 5× the time on a P×P matrix).
    """
    if x.numel() and not bool(torch.isfinite(torch.stack([x.amax(), x.amin()])).all()):
        raise NonFiniteError(f"{name} contains NaN or inf values")


def _check_square(G: Tensor, name: str) -> int:
    """Validate a non-empty real floating square matrix (n, n); return n."""
    _check_float(G, name)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise InputError(f"{name} must be a square matrix of shape (n, n), got shape {tuple(G.shape)}")
    if G.shape[0] == 0:
        raise InputError(f"{name} is empty (shape {tuple(G.shape)})")
    return int(G.shape[0])


def _check_damping(damping: float | Tensor, name: str = "damping") -> float:
    """Validate a damping (a non-negative finite number; a 0-d tensor is read once) and return it as float."""
    if isinstance(damping, Tensor):
        if damping.numel() != 1:
            raise InputError(f"{name} must be a scalar, got a tensor of shape {tuple(damping.shape)}")
        damping = float(damping.detach().reshape(()).item())
    try:
        value = float(damping)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a real number, got {damping!r}") from exc
    if not math.isfinite(value):
        raise NonFiniteError(f"{name} must be finite, got {value}")
    if value < 0:
        raise InputError(f"{name} must be >= 0, got {value}")
    return value


def _check_option(value: str, valid: tuple[str, ...], name: str) -> str:
    """Raise InputError listing the valid values unless ``value`` is one of them."""
    if value not in valid:
        raise InputError(f"unknown {name} {value!r}; valid values: {', '.join(repr(v) for v in valid)}")
    return value


def _symmetrize(G: Tensor) -> Tensor:
    """(G + Gᵀ)/2."""
    return 0.5 * (G + G.mT)


def _add_damping(G: Tensor, damping: float) -> Tensor:
    """G + damping·I as a new tensor (G itself is never modified)."""
    out = G.clone()
    if damping != 0.0:
        out.diagonal().add_(damping)
    return out


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _spd_cholesky(Gd: Tensor, *, damping: float, name: str) -> Tensor:
    """Lower Cholesky factor L of the (already damped, symmetric) matrix Gd, or SingularMatrixError.

    Two checks: the factorisation must succeed (``cholesky_ex`` info == 0), and, when no damping was added,
    Gd must not be numerically singular. For the latter λ_min is estimated from tr(Gd⁻¹) = ‖L⁻¹‖_F² = Σ 1/λ_i,
    which gives λ_min ∈ [1/tr(Gd⁻¹), n/tr(Gd⁻¹)]; the geometric middle λ̂ = √n / tr(Gd⁻¹) is within a factor √n of λ_min,
    and Gd is rejected when λ̂ ≤ n · eps · ‖Gd‖_F. The triangular inverse costs about as much as the
    factorisation (n³/3 flops). Two device syncs.

    Args:
        Gd: Symmetric matrix (n, n), damping already added.
        damping: The damping that was added (for the message only).
        name: Name of the matrix in messages.

    Returns:
        L (n, n) lower triangular with L Lᵀ = Gd.

    Raises:
        SingularMatrixError: If Gd is not (numerically) positive definite.
    """
    n = Gd.shape[-1]
    L, info = torch.linalg.cholesky_ex(Gd)
    advice = (
        "pass damping > 0 (e.g. 1e-4 to 1e-2 times the mean eigenvalue)"
        if damping == 0.0
        else f"increase the damping (now {damping:g})"
    )
    info_v = int(info.item())
    if info_v != 0:
        raise SingularMatrixError(
            f"{name} + damping·I (damping={damping:g}) is not positive definite: the Cholesky factorisation "
            f"failed at pivot {info_v} of {n}; {advice}"
        )
    if damping > 0.0:
        # Gd = G + λI with λ > 0 and a successful factorisation: its eigenvalues are ≥ λ up to round-off of G,
        # so the (costly, and in float32 over-pessimistic) singularity estimate below is not needed.
        return L
    eye = torch.eye(n, dtype=Gd.dtype, device=Gd.device)
    Linv = torch.linalg.solve_triangular(L, eye, upper=False)
    tr_inv = torch.linalg.matrix_norm(Linv) ** 2
    lam_est = math.sqrt(n) / tr_inv
    thresh = n * _eps(Gd.dtype) * torch.linalg.matrix_norm(Gd)
    vals = torch.stack([lam_est, thresh, tr_inv]).tolist()
    if not math.isfinite(vals[2]) or not vals[0] > vals[1]:
        raise SingularMatrixError(
            f"{name} + damping·I (damping={damping:g}) is numerically singular: its smallest eigenvalue is "
            f"about {vals[0]:.3e}, below n·eps·‖G‖_F = {vals[1]:.3e}; {advice}"
        )
    return L


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------


def damped_cholesky(G: Tensor, damping: float = 0.0, *, check_singular: bool = True, checked: bool = False) -> Tensor:
    """The lower Cholesky factor L (n, n) of sym(G) + λI, in the compute dtype (float16/bfloat16: float32).

    The factorisation of :func:`damped_solve`, for a caller that solves several right-hand sides at one damping
    (options and errors as there).

    Raises:
        InputError: G not square and floating, or a negative damping.
        NonFiniteError: NaN/inf in G (unless ``checked``).
        SingularMatrixError: G + λI is not (numerically) positive definite.
    """
    n = _check_square(G, "G")
    lam = _check_damping(damping)
    Gc = G.to(_compute_dtype(G.dtype))
    if not checked:
        _check_finite(Gc, "G")
    Gd = _add_damping(Gc if checked else _symmetrize(Gc), lam)
    if check_singular:
        return _spd_cholesky(Gd, damping=lam, name="G")
    L, info = torch.linalg.cholesky_ex(Gd)
    info_v = int(info.item())
    if info_v != 0:
        raise SingularMatrixError(
            f"G + damping·I (damping={lam:g}) is not positive definite: the Cholesky factorisation "
            f"failed at pivot {info_v} of {n}; "
            + ("pass damping > 0" if lam == 0.0 else f"increase the damping (now {lam:g})")
        )
    return L


def cholesky_factor_solve(L: Tensor, b: Tensor) -> Tensor:
    """The solution L⁻ᵀ L⁻¹ b for a lower Cholesky factor L (n, n) and b (n,) or (n, k), in L's dtype.

    Two triangular solves (``torch.cholesky_solve`` does the same, but on the CPU copies L first: 7× the time of
    the solves for one right-hand side at n = 3,466).
    """
    rhs = b.to(L.dtype)
    y = torch.linalg.solve_triangular(L, rhs.unsqueeze(-1) if rhs.ndim == 1 else rhs, upper=False)
    x = torch.linalg.solve_triangular(L.mT, y, upper=True)
    return x.squeeze(-1) if rhs.ndim == 1 else x


def damped_solve(G: Tensor, b: Tensor, damping: float = 0.0, *, check_singular: bool = True,
                 checked: bool = False) -> Tensor:
    """Solve (G + λI) x = b for symmetric positive (semi-)definite G by Cholesky.

    G is symmetrised first, G ← (G + Gᵀ)/2, then factorised as G + λI = L Lᵀ
    (``torch.linalg.cholesky_ex``) and x = L⁻ᵀ L⁻¹ b. float16/bfloat16 inputs are solved in float32 and
    the result is cast back.

    Args:
        G: Symmetric matrix (n, n).
        b: Right-hand side (n,) or (n, k).
        damping: λ ≥ 0 added to the diagonal.
        check_singular: Also reject a numerically singular G + λI whose Cholesky factorisation happens
            to succeed (smallest eigenvalue, estimated from tr((G + λI)⁻¹), at most n·eps·‖G + λI‖_F).
            Costs one extra triangular inverse (≈ the factorisation). Without it a singular PSD G with
            λ = 0 can return a huge, meaningless x.
        checked: G is known to be finite and exactly symmetric (e.g. the matrix of a
            :class:`~fisherlab.structures.DenseFisher`, checked when it was built): skip the finiteness check and
            the symmetrisation of G, two passes over it that would not change a bit of the result.

    Returns:
        x with the shape of ``b`` and the promoted dtype of G and b.

    Raises:
        InputError: Bad shapes, dtypes or a negative damping.
        NonFiniteError: NaN/inf in G, b or the solution.
        SingularMatrixError: G + λI is not (numerically) positive definite; the message names the damping
            and suggests a positive one.
    """
    n = _check_square(G, "G")
    _check_float(b, "b")
    if b.ndim not in (1, 2) or b.shape[0] != n:
        raise InputError(f"b must have shape ({n},) or ({n}, k) to match G of shape {tuple(G.shape)}, "
                         f"got {tuple(b.shape)}")
    out_dtype = torch.promote_types(G.dtype, b.dtype)
    L = damped_cholesky(G.to(out_dtype), damping, check_singular=check_singular, checked=checked)
    bc = b.to(L.dtype)
    _check_finite(bc, "b")
    x = cholesky_factor_solve(L, bc)
    _check_finite(x, "the solution x of (G + damping·I) x = b")
    return x.to(out_dtype)


def condition_number(eigvals_or_matrix: Tensor, damping: float = 0.0) -> float:
    """Spectral condition number κ = (λ_max + δ)/(λ_min + δ) of a symmetric PSD matrix plus δI.

    A 2-D input is symmetrised and its eigenvalues are computed with ``torch.linalg.eigvalsh``; a 1-D input
    is taken to be the eigenvalues already. For SPD matrices this equals the 2-norm condition number
    σ_max/σ_min (``numpy.linalg.cond``).

    Returns ``math.inf`` (not an error) when G + δI is singular or not positive definite, i.e. when
    λ_min + δ ≤ n · eps · |λ_max + δ| (n the number of eigenvalues, eps that of the dtype); this is the
    expected answer for an undamped, rank-deficient Fisher.

    Args:
        eigvals_or_matrix: Eigenvalues (n,) or a symmetric matrix (n, n).
        damping: δ ≥ 0 added to every eigenvalue.

    Returns:
        κ as a Python float (one device sync).

    Raises:
        InputError: Bad shape/dtype or negative damping.
        NonFiniteError: NaN/inf input.
    """
    x = eigvals_or_matrix
    _check_float(x, "eigvals_or_matrix")
    delta = _check_damping(damping)
    if x.ndim == 2:
        _check_square(x, "eigvals_or_matrix")
        xc = x.to(_compute_dtype(x.dtype))
        _check_finite(xc, "eigvals_or_matrix")
        ev = torch.linalg.eigvalsh(_symmetrize(xc))
    elif x.ndim == 1:
        if x.numel() == 0:
            raise InputError("eigvals_or_matrix is empty")
        ev = x.to(_compute_dtype(x.dtype))
        _check_finite(ev, "eigvals_or_matrix")
    else:
        raise InputError(
            f"eigvals_or_matrix must be 1-D eigenvalues or a square matrix, got shape {tuple(x.shape)}"
        )
    n = ev.numel()
    lo, hi = (torch.stack([ev.min(), ev.max()]) + delta).tolist()
    if not lo > n * _eps(ev.dtype) * abs(hi):
        return math.inf
    return hi / lo
