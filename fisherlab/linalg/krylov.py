"""Matrix-free Krylov methods: conjugate gradients, Lanczos eigenpairs, stochastic Lanczos quadrature.

Everything here needs only products with a symmetric matrix A (a Fisher, a GGN, a damped block):
``matvec: Callable[[Tensor], Tensor]`` maps v (n,) to A v (n,). :func:`cg` with a 2-D right-hand side
(n, k) calls ``matvec`` with blocks (n, k) and expects A V (n, k) back.

* :func:`cg` solves (A + λI) x = b to a relative residual ‖b − (A + λI) x‖/‖b‖ ≤ tol (the exact-NGD solve of
  METHOD.md §3 when the Fisher is too large to form).
* :func:`cg_multishift` solves (A + λ_i I) x_i = b for several dampings λ_i from one Krylov space: one matvec
  per iteration serves every shift (Frommer 2003; Jegerlehner 1996). It is unpreconditioned: a preconditioner
  M ≠ cI breaks the shift invariance K_k(M⁻¹(A + λI), M⁻¹b) = K_k(M⁻¹A, M⁻¹b) the method rests on (see its
  docstring); for a preconditioned solve use :func:`cg` with ``preconditioner`` once per damping.
* :func:`lanczos` gives the top-k eigenpairs by Lanczos with full reorthogonalisation.
* :func:`slq_density` runs stochastic Lanczos quadrature (SLQ; Golub & Meurant 2009, Ubaru, Chen & Saad 2017,
  Ghorbani, Krishnan & Xiao 2019): for each random unit probe v, m Lanczos steps give a tridiagonal T with
  eigenpairs (θ_i, s_i); the nodes θ_i and weights τ_i = (s_i)_1² define a quadrature
  vᵀ f(A) v ≈ Σ_i τ_i f(θ_i). :func:`density_on_grid` turns them into a Gaussian-smoothed spectral density
  and :func:`slq_trace_fn` into tr f(A) ≈ n · mean_probes Σ_i τ_i f(θ_i).
  :func:`slq_point_mass` bounds the mass of one point (e.g. the null space of a PSD A at 0) per probe.

Random vectors come from a local ``torch.Generator`` on ``device`` seeded with ``seed`` (streams differ
between device types). The only host syncs are one per iteration (convergence / breakdown checks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fisherlab.errors import InputError, NonFiniteError, SingularMatrixError
from fisherlab.linalg.estimators import _apply, _apply_columns, _check_pos_int, _generator, _probes, _resolve
from fisherlab.linalg.solve import _check_damping, _check_finite, _check_float

__all__ = ["CGResult", "MultiShiftCGResult", "cg", "cg_multishift", "density_on_grid", "lanczos", "slq_density",
           "slq_point_mass", "slq_trace_fn"]

Matvec = Callable[[Tensor], Tensor]

_MAX_RESTARTS = 3


@dataclass
class CGResult:
    """Report of a conjugate-gradient solve of (A + λI) x = b.

    Attributes:
        x: The solution estimate, shape of b ((n,) or (n, k)).
        converged: Whether the *true* relative residual ‖b − (A + λI) x‖/‖b‖ is ≤ tol (every column).
        iterations: CG iterations run (each one matvec; the residual checks are not counted).
        residual: True relative residual ‖b − (A + λI) x‖/‖b‖ of the returned x (max over columns); a zero
            column of b counts its absolute residual ‖r‖.
        tol: The tolerance.
        max_iter: The iteration cap.
        restarts: Restarts from the true residual after the recursive residual drifted below tol while the
            true one had not.
        history: Recursive relative residual (max over columns) before each iteration and at the end.
    """

    x: Tensor
    converged: bool
    iterations: int
    residual: float
    tol: float
    max_iter: int
    restarts: int = 0
    history: list[float] = field(default_factory=list)


def cg(
    matvec: Matvec,
    b: Tensor,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iter: int | None = None,
    x0: Tensor | None = None,
    preconditioner: Matvec | None = None,
) -> CGResult:
    """Solve (A + λI) x = b by (preconditioned) conjugate gradients, A symmetric positive (semi-)definite.

    Standard PCG (Hestenes & Stiefel 1952; Saad 2003, Alg. 9.1) with r = b − (A + λI) x, z = M⁻¹ r:
    α = rᵀz / pᵀ(A+λI)p, x ← x + αp, r ← r − α(A+λI)p, β = r₊ᵀz₊ / rᵀz, p ← z₊ + βp. For b of shape (n, k) the
    k systems are solved together (per-column α, β; converged columns are frozen). When the recursive
    residual reaches tol the true residual is recomputed; if it is still above tol (drift in ill-conditioned
    problems) CG restarts from it, at most 3 times.

    Negative curvature: if pᵀ(A + λI)p ≤ 0 for a search direction, A + λI is not positive definite on the
    Krylov space and CG is invalid; a SingularMatrixError is raised whatever the damping (with λ > 0 this
    means A has an eigenvalue ≤ −λ; for a PSD A with λ = 0 it only happens at an exact breakdown of a
    singular system). A preconditioner with rᵀM⁻¹r ≤ 0 raises the same error.

    Args:
        matvec: v ↦ A v for v of shape (n,) — or (n, k) when b is (n, k).
        b: Right-hand side (n,) or (n, k).
        damping: λ ≥ 0.
        tol: Relative residual tolerance ‖b − (A + λI) x‖ ≤ tol ‖b‖.
        max_iter: Iteration cap; default 10·n (as scipy.sparse.linalg.cg). In exact arithmetic CG needs at
            most n; in practice ≈ √κ · log(2/tol)/2.
        x0: Initial guess (shape of b); default zeros.
        preconditioner: r ↦ M⁻¹ r for an SPD M ≈ A + λI (same shapes as matvec).

    Returns:
        A :class:`CGResult`. ``converged=False`` (with the residual reached) when max_iter is exhausted.

    Raises:
        InputError: Bad shapes/options, or a matvec returning the wrong shape.
        NonFiniteError: NaN/inf in b, x0, or produced by matvec/preconditioner.
        SingularMatrixError: Non-positive curvature pᵀ(A + λI)p ≤ 0, or a preconditioner that is not
            positive definite.
    """
    _check_float(b, "b")
    if b.ndim not in (1, 2) or b.shape[0] == 0:
        raise InputError(f"b must have shape (n,) or (n, k) with n >= 1, got {tuple(b.shape)}")
    n = int(b.shape[0])
    lam = _check_damping(damping)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise InputError(f"tol must be a positive finite number, got {tol!r}")
    if max_iter is None:
        max_iter = 10 * n
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise InputError(f"max_iter must be a non-negative int, got {max_iter!r}")
    _check_finite(b, "b")
    if x0 is not None:
        _check_float(x0, "x0")
        if x0.shape != b.shape:
            raise InputError(f"x0 must have the shape of b {tuple(b.shape)}, got {tuple(x0.shape)}")
        _check_finite(x0, "x0")

    def op(v: Tensor) -> Tensor:
        out = _apply(matvec, v)
        return out + lam * v if lam != 0.0 else out

    def prec(r: Tensor) -> Tensor:
        return r if preconditioner is None else _apply(preconditioner, r, "preconditioner")

    bnorm = torch.linalg.vector_norm(b, dim=0)
    bsafe = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))

    def rel(r: Tensor) -> Tensor:
        return torch.linalg.vector_norm(r, dim=0) / bsafe

    x = torch.zeros_like(b) if x0 is None else x0.clone().to(b.dtype)
    r = b.clone() if x0 is None else b - op(x)

    it = 0
    restarts = 0
    history: list[float] = []
    converged = False
    true_rel: float | None = None

    def start(r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = prec(r)
        rz = (r * z).sum(0)
        if preconditioner is not None and bool(((rel(r) > tol) & (rz <= 0)).any()):
            raise SingularMatrixError("the preconditioner is not positive definite (rᵀM⁻¹r ≤ 0 for the residual)")
        return z, rz, z.clone()

    z, rz, p = start(r)
    rel_r = rel(r)
    relmax = float(rel_r.max().item())
    if not math.isfinite(relmax):
        raise NonFiniteError("the initial residual b − (A + damping·I) x0 is not finite")
    while True:
        history.append(relmax)
        if relmax <= tol:
            r_true = b - op(x)
            rel_true = rel(r_true)
            true_rel = float(rel_true.max().item())
            if true_rel <= tol:
                converged = True
                break
            if restarts >= _MAX_RESTARTS or it >= max_iter:
                break
            restarts += 1
            r = r_true
            rel_r = rel_true
            relmax = true_rel
            z, rz, p = start(r)
            true_rel = None
            continue
        if it >= max_iter:
            break
        active = rel_r > tol
        Ap = op(p)
        pAp = (p * Ap).sum(0)
        bad_curv = active & (pAp <= 0)
        zero = torch.zeros_like(pAp)
        alpha = torch.where(active, rz / torch.where(pAp > 0, pAp, torch.ones_like(pAp)), zero)
        x = x + alpha * p
        r = r - alpha * Ap
        z = prec(r)
        rz_new = (r * z).sum(0)
        rel_r = rel(r)
        bad_prec = (rel_r > tol) & (rz_new <= 0)
        beta = torch.where(active, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), zero)
        p = z + beta * p
        rz = rz_new
        it += 1
        masked_pAp = torch.where(active, pAp, torch.full_like(pAp, math.inf))
        stats = torch.stack([
            rel_r.max(),
            bad_curv.any().to(b.dtype),
            bad_prec.any().to(b.dtype),
            (~torch.isfinite(Ap)).any().to(b.dtype),
            masked_pAp.min(),
        ]).tolist()
        relmax = stats[0]
        if stats[3]:
            raise NonFiniteError(f"matvec returned NaN/inf at CG iteration {it}")
        if stats[1]:
            raise SingularMatrixError(
                f"A + damping·I (damping={lam:g}) has non-positive curvature pᵀ(A + λI)p = {stats[4]:.3e} "
                f"at CG iteration {it}: it is not positive definite; "
                + ("pass damping > 0" if lam == 0.0 else f"increase the damping (now {lam:g})")
            )
        if stats[2]:
            raise SingularMatrixError(
                f"the preconditioner is not positive definite (rᵀM⁻¹r ≤ 0 at CG iteration {it})"
            )
        if not math.isfinite(relmax):
            raise NonFiniteError(f"CG produced NaN/inf at iteration {it} (check the preconditioner)")
    if true_rel is None:
        true_rel = float(rel(b - op(x)).max().item())
        converged = true_rel <= tol
    return CGResult(x=x, converged=converged, iterations=it, residual=true_rel, tol=float(tol),
                    max_iter=max_iter, restarts=restarts, history=history)


@dataclass
class MultiShiftCGResult:
    """Report of a multi-shift CG solve of (A + λ_i I) x_i = b for every damping λ_i.

    Attributes:
        shifts: One :class:`CGResult` per damping, in the order given. Its ``iterations`` are the iterations
            (matvecs of the shared Krylov space) until that shift's recurrence residual reached tol, plus the
            iterations of its CG refinement if any; ``residual`` and ``converged`` are the *true* relative
            residual ‖b − (A + λ_i I) x_i‖/‖b‖, recomputed with matvecs at the end; ``restarts`` is 1 when the
            shift was refined by :func:`cg` from its multi-shift solution (its recurrence residual reached tol
            and the true one did not); ``history`` its recurrence relative residual |ζ_i|‖r‖/‖b‖ per iteration.
        products: Matvecs (products A v, one per column) the whole solve used: the shared iterations, the final
            residual checks (one per shift) and any refinements.
        iterations: Iterations of the shared (seed) recurrence.
    """

    shifts: list[CGResult]
    products: int
    iterations: int


def cg_multishift(
    matvec: Matvec,
    b: Tensor,
    dampings: list[float] | tuple[float, ...],
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
    batched: bool = False,
) -> MultiShiftCGResult:
    """Solve (A + λ_i I) x_i = b for every damping λ_i from one Krylov space (multi-shift CG).

    The Krylov space K_k(A + σI, b) does not depend on σ, and the CG residuals of all shifted systems are
    collinear: r_k^{(i)} = ζ_k^{(i)} r_k. So CG is run on the seed system (A + λ_min I) x = b (the smallest, hardest
    damping) and every other system with δ_i = λ_i − λ_min ≥ 0 follows by scalar recurrences (Jegerlehner 1996,
    hep-lat/9612014; Frommer 2003), with α_k, β_k the seed's coefficients (p_{k+1} = r_{k+1} + β_k p_k):

        ζ_{k+1} = ζ_k ζ_{k−1} α_{k−1} / (α_k β_{k−1} (ζ_{k−1} − ζ_k) + ζ_{k−1} α_{k−1} (1 + δ_i α_k)),
        α_k^{(i)} = α_k ζ_{k+1}/ζ_k,  β_k^{(i)} = β_k (ζ_{k+1}/ζ_k)²,
        x^{(i)} += α_k^{(i)} p^{(i)},  p^{(i)} ← ζ_{k+1} r_{k+1} + β_k^{(i)} p^{(i)}

    (ζ_0 = ζ_{−1} = 1, α_{−1} = 1, β_{−1} = 0). One matvec per iteration serves all shifts; the memory is
    2 + 2·len(dampings) vectors. Each shift has its own stopping rule: once its recurrence residual
    |ζ^{(i)}| ‖r‖/‖b‖ is ≤ tol it stops updating; the seed recurrence runs until every shift has stopped (or
    max_iter). At the end the true residuals are recomputed with one matvec per shift; a shift whose true
    residual is still above tol (recurrence drift) is refined by :func:`cg` from its solution, within the
    remaining iteration budget.

    Preconditioning: a fixed preconditioner M breaks the shift invariance (M⁻¹(A + λI) = M⁻¹A + λM⁻¹ is not a
    shift of M⁻¹A unless M ∝ I), and a damping-dependent M (KFAC at the same λ) gives each damping its own
    Krylov space. So this solver is unpreconditioned; it wins when several dampings share one solve, while
    preconditioned :func:`cg` (one solve per damping) wins when a good preconditioner cuts the iterations of
    each solve by more than the number of dampings.

    Args:
        matvec: v (n,) ↦ A v (n,), A symmetric positive semi-definite; with ``batched`` also (n, k) ↦ A V.
        b: Right-hand side (n,).
        dampings: λ_i ≥ 0, at least one (repeats allowed).
        tol: Relative residual tolerance of every shift.
        max_iter: Cap on the seed iterations (default 10·n); refinements use what is left of it.
        batched: Compute the final residual checks with one block matvec (n, k) instead of k calls.

    Returns:
        A :class:`MultiShiftCGResult`.

    Raises:
        InputError: Bad shapes/options, or a matvec returning the wrong shape.
        NonFiniteError: NaN/inf in b or produced by matvec.
        SingularMatrixError: Non-positive curvature pᵀ(A + λ_min I)p ≤ 0 of the seed system.
    """
    _check_float(b, "b")
    if b.ndim != 1 or b.shape[0] == 0:
        raise InputError(f"b must have shape (n,) with n >= 1, got {tuple(b.shape)}")
    if isinstance(dampings, (int, float)) or len(dampings) == 0:
        raise InputError(f"dampings must be a non-empty sequence of numbers >= 0, got {dampings!r}")
    lams = [_check_damping(lam) for lam in dampings]
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise InputError(f"tol must be a positive finite number, got {tol!r}")
    n = int(b.shape[0])
    if max_iter is None:
        max_iter = 10 * n
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise InputError(f"max_iter must be a non-negative int, got {max_iter!r}")
    _check_finite(b, "b")
    products = 0

    def counted(v: Tensor) -> Tensor:
        nonlocal products
        products += 1 if v.ndim == 1 else int(v.shape[1])
        return matvec(v)

    k = len(lams)
    seed = min(lams)
    delta = [lam - seed for lam in lams]
    dtype, device = b.dtype, b.device
    bnorm = float(torch.linalg.vector_norm(b).item())
    X = torch.zeros(n, k, dtype=dtype, device=device)
    if bnorm == 0.0:
        shifts = [CGResult(X[:, i].clone(), True, 0, 0.0, tol, max_iter) for i in range(k)]
        return MultiShiftCGResult(shifts, 0, 0)
    r = b.clone()
    p = b.clone()
    Pm = b[:, None].repeat(1, k)
    rr = bnorm ** 2
    zeta, zeta_prev = [1.0] * k, [1.0] * k
    active = [True] * k
    stopped_at = [0] * k
    histories: list[list[float]] = [[1.0] for _ in range(k)]
    alpha_prev, beta_prev = 1.0, 0.0
    it = 0
    while any(active) and it < max_iter:
        Ap = _apply(counted, p)
        if seed != 0.0:
            Ap = Ap + seed * p
        pAp, finite = torch.stack([p @ Ap, torch.isfinite(Ap).all().to(dtype)]).tolist()
        if not finite:
            raise NonFiniteError(f"matvec returned NaN/inf at multi-shift CG iteration {it + 1}")
        if pAp <= 0:
            raise SingularMatrixError(
                f"A + damping·I (damping={seed:g}) has non-positive curvature pᵀ(A + λI)p = {pAp:.3e} at "
                f"multi-shift CG iteration {it + 1}: it is not positive definite; "
                + ("pass dampings > 0" if seed == 0.0 else f"increase the smallest damping (now {seed:g})"))
        alpha = rr / pAp
        zeta_new = list(zeta)
        for i in range(k):
            if active[i]:
                den = alpha * beta_prev * (zeta_prev[i] - zeta[i]) + zeta_prev[i] * alpha_prev * (1 + delta[i] * alpha)
                zeta_new[i] = zeta[i] * zeta_prev[i] * alpha_prev / den
        ratio = [zn / z for zn, z in zip(zeta_new, zeta, strict=True)]
        a_i = torch.tensor([alpha * q if act else 0.0 for q, act in zip(ratio, active, strict=True)], dtype=dtype,
                           device=device)
        X.add_(Pm * a_i)
        r.sub_(alpha * Ap)
        rr_new = float((r @ r).item())
        beta = rr_new / rr
        z_i = torch.tensor([zn if act else 0.0 for zn, act in zip(zeta_new, active, strict=True)], dtype=dtype,
                           device=device)
        b_i = torch.tensor([beta * q * q if act else 1.0 for q, act in zip(ratio, active, strict=True)], dtype=dtype,
                           device=device)
        Pm.mul_(b_i).add_(r[:, None] * z_i)
        p = r + beta * p
        it += 1
        rnorm = math.sqrt(rr_new) / bnorm
        for i in range(k):
            if active[i]:
                zeta_prev[i], zeta[i] = zeta[i], zeta_new[i]
                rel_i = abs(zeta[i]) * rnorm
                histories[i].append(rel_i)
                if rel_i <= tol:
                    active[i] = False
                    stopped_at[i] = it
        alpha_prev, beta_prev, rr = alpha, beta, rr_new
    for i in range(k):
        if active[i]:
            stopped_at[i] = it
    lam_t = torch.tensor(lams, dtype=dtype, device=device)
    R = b[:, None] - (_apply_columns(counted, X, batched) + X * lam_t)
    true_rel = (torch.linalg.vector_norm(R, dim=0) / bnorm).tolist()
    shifts = []
    for i in range(k):
        x_i, its, rel_i, restarts = X[:, i].clone(), stopped_at[i], true_rel[i], 0
        if rel_i > tol and not active[i] and it < max_iter:  # recurrence drift: finish with CG from x_i
            refined = cg(counted, b, damping=lams[i], tol=tol, max_iter=max_iter - it, x0=x_i)
            x_i, its, rel_i, restarts = refined.x, its + refined.iterations, refined.residual, 1
        shifts.append(CGResult(x_i, rel_i <= tol, its, rel_i, tol, max_iter, restarts, histories[i]))
    return MultiShiftCGResult(shifts, products, it)


# --------------------------------------------------------------------------------------------------------
# Lanczos
# --------------------------------------------------------------------------------------------------------


def _lanczos_core(
    matvec: Matvec,
    v0: Tensor,
    m: int,
    reorthogonalize: bool,
    restart_gen: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run m steps of Lanczos from v0: (alphas (m',), betas (m'-1,), Q (n, m')), m' ≤ m.

    A Q_{m'} = Q_{m'} T + β e_{m'}ᵀ with T = tridiag(betas, alphas, betas). With ``reorthogonalize`` each new
    vector is orthogonalised twice against all previous ones (classical Gram–Schmidt, "twice is enough").
    On breakdown (β ≤ 100·eps·‖T‖ estimate: an invariant subspace was found) the run stops when
    ``restart_gen`` is None (quadrature is then exact), else it continues from a fresh random vector
    orthogonal to Q (β = 0) so that m' = m whenever m ≤ n.
    """
    n = v0.shape[0]
    dtype, device = v0.dtype, v0.device
    eps = float(torch.finfo(dtype).eps)
    Q = torch.empty(n, m, dtype=dtype, device=device)
    q = v0 / torch.linalg.vector_norm(v0)
    Q[:, 0] = q
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    anorm = 0.0
    prev_beta = 0.0
    for j in range(m):
        qj = Q[:, j]
        w = _apply(matvec, qj)
        a = qj @ w
        alphas.append(a)
        if j == m - 1:
            if not math.isfinite(float(a.item())):
                raise NonFiniteError(f"matvec returned NaN/inf at Lanczos step {j + 1}")
            break
        w = w - a * qj
        if j > 0:
            w = w - betas[-1] * Q[:, j - 1]
        if reorthogonalize:
            Qj = Q[:, : j + 1]
            for _ in range(2):
                w = w - Qj @ (Qj.mT @ w)
        bnorm = torch.linalg.vector_norm(w)
        a_v, b_v = torch.stack([a, bnorm]).tolist()
        if not (math.isfinite(a_v) and math.isfinite(b_v)):
            raise NonFiniteError(f"matvec returned NaN/inf at Lanczos step {j + 1}")
        anorm = max(anorm, abs(a_v) + b_v + prev_beta)
        if b_v <= 100.0 * eps * anorm:
            if restart_gen is None or j + 1 >= n:
                break
            Qj = Q[:, : j + 1]
            r = torch.randn(n, generator=restart_gen, dtype=dtype, device=device)
            for _ in range(2):
                r = r - Qj @ (Qj.mT @ r)
            Q[:, j + 1] = r / torch.linalg.vector_norm(r)
            betas.append(torch.zeros((), dtype=dtype, device=device))
            prev_beta = 0.0
        else:
            Q[:, j + 1] = w / bnorm
            betas.append(bnorm)
            prev_beta = b_v
    mm = len(alphas)
    alpha_t = torch.stack(alphas)
    beta_t = torch.stack(betas) if betas else torch.zeros(0, dtype=dtype, device=device)
    return alpha_t, beta_t[: mm - 1], Q[:, :mm]


def _tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    T = torch.diag(alpha)
    if beta.numel():
        T = T + torch.diag(beta, 1) + torch.diag(beta, -1)
    return T


def lanczos(
    matvec: Matvec,
    n: int,
    k: int,
    *,
    num_iter: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Top-k eigenpairs of a symmetric A by Lanczos with full reorthogonalisation (Rayleigh–Ritz).

    m = ``num_iter`` Lanczos steps from a Gaussian start vector build an orthonormal Q (n, m) and the
    tridiagonal T = Qᵀ A Q; the k largest eigenpairs (θ_i, s_i) of T give Ritz pairs (θ_i, Q s_i). Extreme
    eigenvalues converge first, at a rate set by the gap to the rest of the spectrum. Without
    reorthogonalisation, loss of orthogonality produces spurious copies ("ghosts") of converged eigenvalues —
    use it only to study that.
    On breakdown (an invariant subspace, e.g. a low-rank A) Lanczos continues from a new random vector
    orthogonal to Q.

    Args:
        matvec: v (n,) ↦ A v (n,).
        n: Dimension of A.
        k: Number of eigenpairs, 1 ≤ k ≤ n.
        num_iter: Lanczos steps m, k ≤ m ≤ n; default min(n, 2k + 40).
        seed: Seed of the local generator for the start (and restart) vectors.
        dtype: Working dtype (default: torch's default dtype).
        device: Working device (default: cpu).
        reorthogonalize: Full reorthogonalisation (cost O(n m²) extra; recommended).

    Returns:
        (eigvals (k,) in descending order, eigvecs (n, k) with orthonormal columns).

    Raises:
        InputError: Bad n, k, num_iter, dtype, or a matvec returning the wrong shape.
        NonFiniteError: The matvec returned NaN/inf.
    """
    _check_pos_int(n, "n")
    _check_pos_int(k, "k")
    if k > n:
        raise InputError(f"k must be <= n, got k={k}, n={n}")
    m = min(n, 2 * k + 40) if num_iter is None else num_iter
    _check_pos_int(m, "num_iter")
    if not k <= m <= n:
        raise InputError(f"num_iter must satisfy k <= num_iter <= n, got num_iter={m}, k={k}, n={n}")
    dt, dev = _resolve(dtype, device)
    gen = _generator(seed, dev)
    v0 = torch.randn(n, generator=gen, dtype=dt, device=dev)
    alpha, beta, Q = _lanczos_core(matvec, v0, m, reorthogonalize, gen)
    theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
    idx = torch.arange(theta.numel() - 1, theta.numel() - 1 - k, -1, device=theta.device)
    return theta[idx], Q @ S[:, idx]


# --------------------------------------------------------------------------------------------------------
# stochastic Lanczos quadrature
# --------------------------------------------------------------------------------------------------------


def slq_density(
    matvec: Matvec,
    n: int,
    *,
    num_probes: int = 10,
    num_steps: int = 40,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Stochastic Lanczos quadrature nodes and weights of the spectral density of a symmetric A.

    For each probe v = z/√n (z Rademacher, so ‖v‖ = 1 and E[v vᵀ] = I/n) m = min(num_steps, n) Lanczos
    steps with full reorthogonalisation give T = S diag(θ) Sᵀ; the nodes are θ_i and the weights
    τ_i = S_{1i}², which sum to 1 per probe. Then vᵀ f(A) v ≈ Σ_i τ_i f(θ_i) (exact for polynomials of
    degree ≤ 2m − 1), and the spectral density φ(t) = (1/n) Σ_j δ(t − λ_j) ≈ mean_probes Σ_i τ_i δ(t − θ_i).
    If Lanczos breaks down early (A has fewer than m distinct eigenvalues seen by v) the row is padded with
    zero-weight copies of its last node.

    Args:
        matvec: v (n,) ↦ A v (n,).
        n: Dimension of A.
        num_probes: Number of random probes.
        num_steps: Lanczos steps per probe.
        seed: Seed of the local generator.
        dtype: Working dtype (default: torch's default dtype).
        device: Working device (default: cpu).

    Returns:
        (nodes (num_probes, m), weights (num_probes, m)).

    Raises:
        InputError: Bad arguments or a matvec returning the wrong shape.
        NonFiniteError: The matvec returned NaN/inf.
    """
    _check_pos_int(n, "n")
    _check_pos_int(num_probes, "num_probes")
    _check_pos_int(num_steps, "num_steps")
    dt, dev = _resolve(dtype, device)
    gen = _generator(seed, dev)
    m = min(num_steps, n)
    V = _probes(n, num_probes, gen, dt, dev, "rademacher") / math.sqrt(n)
    nodes = torch.zeros(num_probes, m, dtype=dt, device=dev)
    weights = torch.zeros(num_probes, m, dtype=dt, device=dev)
    for i in range(num_probes):
        alpha, beta, _ = _lanczos_core(matvec, V[:, i], m, True, None)
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        mm = theta.numel()
        nodes[i, :mm] = theta
        nodes[i, mm:] = theta[-1]
        weights[i, :mm] = S[0] ** 2
    return nodes, weights


def slq_point_mass(nodes: Tensor, weights: Tensor, point: float = 0.0) -> Tensor:
    """Per probe, the largest mass at ``point`` of any measure with the moments the Lanczos run measured.

    A probe's spectral measure μ_v = Σ_j (u_jᵀv)² δ_{λ_j} has mass μ_v({ξ}) = ‖Π_ξ v‖² at ξ = ``point``
    (Π_ξ the projector on the eigenspace of ξ; at ξ = 0 for a PSD A, the probe's component in the null space).
    m Lanczos steps fix the moments vᵀAᵏv, k ≤ 2m − 1, and the largest mass at ξ among all measures with the
    moments k ≤ 2m − 2 is the Christoffel function (Chebyshev–Markov–Stieltjes; Golub & Meurant 2009 §6)

        λ_m(ξ) = min_{q: deg q < m, q(ξ) = 1} ∫ q² dμ_v = 1 / Σ_i ℓ_i(ξ)² / τ_i,

    the second form from the m-node Gauss rule (θ_i, τ_i), which integrates q² exactly; ℓ_i are its Lagrange
    basis polynomials. So μ_v({ξ}) ≤ λ_m(ξ), non-increasing in m (and ≤ the lowest node's weight when ξ lies
    at or below every node, as ξ = 0 for a PSD A). It counts, besides the mass at ξ, mass that m steps cannot
    separate from it: for a PSD A, q a Chebyshev polynomial on [ε, λ_max] gives λ_m(0) ≤ μ_v([0, ε)) +
    4 / (γ + √(γ² − 1))^{2(m−1)}, γ = (λ_max + ε)/(λ_max − ε), for every ε. After a breakdown (an invariant
    subspace) the Gauss rule is μ_v itself: μ_v({ξ}) is then the weight of a node at ξ, and λ_m(ξ) stays a bound
    (> 0 even with no node at ξ). Zero-weight nodes (the padding of :func:`slq_density` after a breakdown) are
    not part of the rule.

    Args:
        nodes: SLQ nodes (num_probes, m), in the units of A.
        weights: SLQ weights (num_probes, m), ≥ 0, summing to 1 per probe.
        point: ξ, in the units of A.

    Returns:
        λ_m(ξ) per probe, shape (num_probes,), in [0, 1] up to round-off (a fraction of the probe's norm²).

    Raises:
        InputError: Bad shapes or a non-finite ``point``.
    """
    _check_nodes_weights(nodes, weights)
    if not (isinstance(point, (int, float)) and math.isfinite(point)):
        raise InputError(f"point must be a finite number, got {point!r}")
    tiny = torch.finfo(nodes.dtype).tiny
    out = torch.zeros(nodes.shape[0], dtype=nodes.dtype, device=nodes.device)
    for p in range(nodes.shape[0]):  # one probe at a time: O(m²) memory
        keep = weights[p] > 0
        theta, tau = nodes[p, keep], weights[p, keep]
        # log|ℓ_i(ξ)| = Σ_{j≠i} log|ξ − θ_j| − log|θ_i − θ_j|; |·| ≥ tiny keeps a node at ξ (ℓ_i = δ_ij) finite
        log_gap = torch.log((point - theta).abs().clamp_min(tiny))
        log_diff = torch.log((theta[:, None] - theta[None, :]).abs().clamp_min(tiny))
        log_diff.fill_diagonal_(0.0)
        log_l = log_gap.sum() - log_gap - log_diff.sum(1)
        out[p] = torch.exp(-torch.logsumexp(2 * log_l - torch.log(tau), 0))
    return out


def _check_nodes_weights(nodes: Tensor, weights: Tensor) -> None:
    _check_float(nodes, "nodes")
    _check_float(weights, "weights")
    if nodes.ndim != 2 or nodes.shape != weights.shape:
        raise InputError(f"nodes and weights must both have shape (num_probes, m), got {tuple(nodes.shape)} "
                         f"and {tuple(weights.shape)}")


def density_on_grid(nodes: Tensor, weights: Tensor, grid: Tensor, sigma: float) -> Tensor:
    """Gaussian-smoothed SLQ spectral density on a grid.

    φ_σ(t) = mean_p Σ_i τ_{p,i} N(t; θ_{p,i}, σ²), N(t; μ, σ²) = exp(−(t − μ)²/(2σ²)) / (σ√(2π)). It
    integrates to mean_p Σ_i τ_{p,i} = 1 over the real line, so to ≈ 1 over a grid that covers the
    spectrum ± a few σ.

    Args:
        nodes: SLQ nodes (num_probes, m).
        weights: SLQ weights (num_probes, m).
        grid: Points t (g,).
        sigma: Kernel width σ > 0.

    Returns:
        φ_σ on the grid, shape (g,).

    Raises:
        InputError: Bad shapes or σ ≤ 0.
    """
    _check_nodes_weights(nodes, weights)
    _check_float(grid, "grid")
    if grid.ndim != 1:
        raise InputError(f"grid must be 1-D, got shape {tuple(grid.shape)}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma must be a positive finite number, got {sigma!r}")
    diff = grid.to(nodes.dtype)[None, None, :] - nodes[:, :, None]
    kern = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2.0 * math.pi))
    return (weights[:, :, None] * kern).sum(1).mean(0)


def slq_trace_fn(nodes: Tensor, weights: Tensor, fn: Callable[[Tensor], Tensor], n: int) -> Tensor:
    """SLQ estimate of tr f(A) = Σ_j f(λ_j) ≈ n · mean_p Σ_i τ_{p,i} f(θ_{p,i}).

    Examples: ``fn=lambda t: t`` gives tr A, ``lambda t: t**2`` gives ‖A‖_F², ``torch.log`` gives log det A
    (for SPD A).

    Args:
        nodes: SLQ nodes (num_probes, m).
        weights: SLQ weights (num_probes, m).
        fn: Elementwise function applied to the nodes.
        n: Dimension of A.

    Returns:
        The estimate as a 0-d tensor.

    Raises:
        InputError: Bad shapes, n, or fn returning the wrong shape.
    """
    _check_nodes_weights(nodes, weights)
    _check_pos_int(n, "n")
    f = fn(nodes)
    if not isinstance(f, Tensor) or f.shape != nodes.shape:
        raise InputError("fn must map the nodes tensor elementwise to a tensor of the same shape")
    terms = torch.where(weights > 0, weights * f, torch.zeros_like(weights))
    return n * terms.sum(1).mean(0)
