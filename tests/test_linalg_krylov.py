"""CG, Lanczos, SLQ and the Hutchinson-type estimators against dense references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fisherlab.errors import InputError, NonFiniteError, SingularMatrixError
from fisherlab.linalg import (
    cg,
    cg_multishift,
    density_on_grid,
    hutchinson_diag,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    slq_density,
    slq_trace_fn,
)


def spd(n: int, eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * eigs.to(torch.float64)) @ Q.T


def vec(n: int, seed: int, k: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n if k is None else (n, k), generator=g, dtype=torch.float64)


N = 200


@pytest.fixture(scope="module")
def A200() -> torch.Tensor:
    return spd(N, torch.logspace(0, -3, N), seed=1)  # κ = 1e3


# ---------------------------------------------------------------- CG


def test_cg_matches_direct_solve(A200):
    b = vec(N, 2)
    res = cg(lambda v: A200 @ v, b, tol=1e-10)
    x_ref = torch.linalg.solve(A200, b)
    assert res.converged and res.x.shape == (N,)
    # classical bound: ‖e_k‖_A ≤ 2 ((√κ − 1)/(√κ + 1))^k ‖e_0‖_A  ⇒  k ≲ √κ/2 · ln(2/tol) (≈ 375 here)
    assert 0 < res.iterations <= math.ceil(math.sqrt(1e3) / 2 * math.log(2 / 1e-10))
    assert res.residual <= 1e-10 and res.tol == 1e-10 and res.max_iter == 10 * N
    true_res = float(torch.linalg.vector_norm(b - A200 @ res.x) / torch.linalg.vector_norm(b))
    assert res.residual == pytest.approx(true_res, rel=1e-6)
    torch.testing.assert_close(res.x, x_ref, rtol=1e-6, atol=1e-6)
    assert res.history[0] == pytest.approx(1.0) and res.history[-1] <= 1e-10


def test_cg_max_iter_reports_unconverged(A200):
    b = vec(N, 3)
    res = cg(lambda v: A200 @ v, b, tol=1e-12, max_iter=5)
    assert not res.converged and res.iterations == 5 and res.max_iter == 5
    true_res = float(torch.linalg.vector_norm(b - A200 @ res.x) / torch.linalg.vector_norm(b))
    assert res.residual == pytest.approx(true_res, rel=1e-9)
    assert res.residual > 1e-12  # (CG minimises the A-norm error; the residual need not decrease)


def test_cg_damping_on_singular_psd():
    n = 60
    B = vec(n, 4, 10)
    A = B @ B.T  # rank 10
    b = vec(n, 5)
    res = cg(lambda v: A @ v, b, damping=0.1, tol=1e-10)
    assert res.converged
    x_ref = torch.linalg.solve(A + 0.1 * torch.eye(n, dtype=A.dtype), b)
    torch.testing.assert_close(res.x, x_ref, rtol=1e-7, atol=1e-7)
    assert res.iterations <= 15  # 11 distinct eigenvalues: CG terminates in ~11 steps


def test_cg_block_rhs_and_x0(A200):
    B = vec(N, 6, 3)
    res = cg(lambda V: A200 @ V, B, tol=1e-9)
    assert res.converged and res.x.shape == (N, 3)
    torch.testing.assert_close(res.x, torch.linalg.solve(A200, B), rtol=1e-5, atol=1e-5)
    exact = torch.linalg.solve(A200, B[:, 0])
    res0 = cg(lambda v: A200 @ v, B[:, 0], tol=1e-8, x0=exact)
    assert res0.converged and res0.iterations == 0
    zero = cg(lambda v: A200 @ v, torch.zeros(N, dtype=torch.float64))
    assert zero.converged and zero.iterations == 0 and torch.count_nonzero(zero.x) == 0


def test_cg_jacobi_preconditioner_helps():
    n = 150
    d = torch.logspace(0, 5, n, dtype=torch.float64)
    A = torch.diag(d) + 0.1 * spd(n, torch.linspace(0.1, 1.0, n), seed=7)
    b = vec(n, 8)
    plain = cg(lambda v: A @ v, b, tol=1e-8)
    dinv = 1.0 / torch.diagonal(A)
    pre = cg(lambda v: A @ v, b, tol=1e-8, preconditioner=lambda r: dinv * r)
    assert pre.converged
    assert pre.iterations < plain.iterations / 3
    torch.testing.assert_close(pre.x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-9)


def test_cg_errors():
    eigs = torch.linspace(0.5, 1.0, 30)
    eigs[:5] = -1.0
    A = spd(30, eigs, seed=9)
    b = vec(30, 10)
    with pytest.raises(SingularMatrixError, match="curvature"):
        cg(lambda v: A @ v, b, tol=1e-10)
    with pytest.raises(NonFiniteError):
        cg(lambda v: v * float("nan"), b)
    with pytest.raises(NonFiniteError):
        cg(lambda v: v, torch.full((3,), float("inf"), dtype=torch.float64))
    with pytest.raises(InputError):
        cg(lambda v: v[:-1], b)
    with pytest.raises(InputError):
        cg(lambda v: v, b, damping=-1.0)
    with pytest.raises(InputError):
        cg(lambda v: v, b, x0=torch.zeros(3, dtype=torch.float64))
    A_pd = spd(30, torch.linspace(0.5, 1.0, 30), seed=9)
    with pytest.raises(SingularMatrixError, match="preconditioner"):
        cg(lambda v: A_pd @ v, b, preconditioner=lambda r: -r)


# ---------------------------------------------------------------- Lanczos


# ---------------------------------------------------------------- multi-shift CG

SHIFTS = [1e-1, 1e-3, 1.0, 1e-2]  # unsorted: results come back in the given order


def test_cg_multishift_matches_cholesky_and_separate_cg():
    n = 150
    A = spd(n, torch.logspace(0, -6, n), seed=3)  # PSD up to 1e-6: the shifts set the conditioning (κ ≤ 1e3)
    b = vec(n, 4)
    out = cg_multishift(lambda v: A @ v, b, SHIFTS, tol=1e-13)
    separate = [cg(lambda v: A @ v, b, damping=lam, tol=1e-13) for lam in SHIFTS]
    assert len(out.shifts) == len(SHIFTS)
    for lam, res, sep in zip(SHIFTS, out.shifts, separate, strict=True):
        M = A + lam * torch.eye(n, dtype=torch.float64)
        L = torch.linalg.cholesky(M)
        x_ref = torch.cholesky_solve(b[:, None], L)[:, 0]
        assert res.converged and res.residual <= 1e-13
        true_res = float(torch.linalg.vector_norm(b - M @ res.x) / torch.linalg.vector_norm(b))
        assert res.residual == pytest.approx(true_res, rel=1e-9)  # the recorded residual is the true one
        assert float((res.x - x_ref).norm() / x_ref.norm()) < 1e-10
        assert float((res.x - sep.x).norm() / sep.x.norm()) < 1e-10
        # a shift stops when its own residual reaches tol: about as many iterations as its own CG
        assert abs(res.iterations - sep.iterations) <= max(3, sep.iterations // 10)
    # one Krylov space: the iterations of the hardest shift, one residual check per shift (and any refinement)
    assert out.iterations <= max(r.iterations for r in out.shifts)
    refined = sum(r.iterations + 2 for r in out.shifts if r.restarts)  # x0 residual, iterations, final check
    assert out.iterations + len(SHIFTS) <= out.products <= out.iterations + len(SHIFTS) + refined
    assert out.products < sum(r.iterations for r in separate)


def test_cg_multishift_counts_and_batches_products():
    n = 60
    A = spd(n, torch.logspace(0, -2, n), seed=5)
    b = vec(n, 6)
    calls = []

    def matvec(v: torch.Tensor) -> torch.Tensor:
        calls.append(1 if v.ndim == 1 else v.shape[1])
        return A @ v

    out = cg_multishift(matvec, b, [0.0, 1e-2], tol=1e-10, batched=True)
    assert out.products == sum(calls) and calls[-1] == 2  # the final checks as one block product
    assert all(r.converged for r in out.shifts) and out.shifts[0].history[0] == 1.0


def test_cg_multishift_edge_cases():
    A = spd(20, torch.logspace(0, -2, 20), seed=7)
    zero = cg_multishift(lambda v: A @ v, torch.zeros(20, dtype=torch.float64), [1e-2, 1e-1])
    assert zero.products == 0 and all(r.converged and r.residual == 0 and not r.x.any() for r in zero.shifts)
    capped = cg_multishift(lambda v: A @ v, vec(20, 8), [1e-4, 1.0], tol=1e-12, max_iter=3)
    assert capped.iterations == 3 and not capped.shifts[0].converged and capped.shifts[0].residual > 1e-12
    with pytest.raises(InputError, match="dampings must be a non-empty sequence"):
        cg_multishift(lambda v: A @ v, vec(20, 8), [])
    with pytest.raises(InputError, match="b must have shape"):
        cg_multishift(lambda v: A @ v, vec(20, 8, 2), [1.0])
    with pytest.raises(SingularMatrixError, match="non-positive curvature"):
        cg_multishift(lambda v: -(A @ v), vec(20, 8), [1e-3, 1e-2])
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        cg_multishift(lambda v: v * float("nan"), vec(20, 8), [1e-3])


def test_cg_multishift_float32_records_true_residuals():
    """float32: the recurrence residuals drift from the true ones; the recorded residual and flag are the true ones."""
    n = 200
    A = spd(n, torch.logspace(1, -5, n), seed=1).float()
    b = vec(n, 2).float()
    lams = [1e-3, 1e-2, 1e-1]
    out = cg_multishift(lambda v: A @ v, b, lams, tol=1e-4)
    for lam, res in zip(lams, out.shifts, strict=True):
        M = (A + lam * torch.eye(n)).double()
        true_res = float(torch.linalg.vector_norm(b.double() - M @ res.x.double()) / b.double().norm())
        # the residual is formed in float32, which at κ(M) ≈ 1e4 is itself ~10% off the float64 one (measured 9%)
        assert res.residual == pytest.approx(true_res, rel=0.15)
        assert res.converged == (res.residual <= 1e-4)
    assert out.shifts[2].converged and out.shifts[1].converged  # the better conditioned shifts reach 1e-4


def test_lanczos_top5_matches_eigvalsh():
    n = 300
    bulk = torch.rand(n - 5, generator=torch.Generator().manual_seed(0))
    eigs = torch.cat([torch.tensor([10.0, 9.0, 8.0, 7.0, 6.0]), bulk])
    A = spd(n, eigs, seed=11)
    vals, vecs = lanczos(lambda v: A @ v, n, 5, num_iter=40, dtype=torch.float64)
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    torch.testing.assert_close(vals, ref, rtol=1e-10, atol=1e-10)
    assert vecs.shape == (n, 5)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(5, dtype=torch.float64), atol=1e-10, rtol=0)
    resid = torch.linalg.vector_norm(A @ vecs - vecs * vals, dim=0)
    assert float(resid.max()) < 1e-6
    # reproducible with the same seed; the global RNG is untouched
    state = torch.random.get_rng_state()
    vals2, _ = lanczos(lambda v: A @ v, n, 5, num_iter=40, dtype=torch.float64)
    assert torch.equal(vals, vals2) and torch.equal(state, torch.random.get_rng_state())


def test_lanczos_low_rank_restarts():
    n = 50
    B = vec(n, 12, 3)
    A = B @ B.T  # rank 3: Lanczos hits an invariant subspace after 3-4 steps
    vals, vecs = lanczos(lambda v: A @ v, n, 5, num_iter=10, dtype=torch.float64)
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    torch.testing.assert_close(vals, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(5, dtype=torch.float64), atol=1e-9, rtol=0)


def test_lanczos_input_errors():
    with pytest.raises(InputError):
        lanczos(lambda v: v, 5, 6)
    with pytest.raises(InputError):
        lanczos(lambda v: v, 10, 3, num_iter=2)
    with pytest.raises(InputError):
        lanczos(lambda v: v, 10, 3, dtype=torch.int32)


# ---------------------------------------------------------------- SLQ


def test_slq_traces_and_density():
    n = 400
    eigs = torch.cat([torch.linspace(0.0, 1.0, n - 10), torch.linspace(5.0, 10.0, 10)])
    A = spd(n, eigs, seed=13)
    nodes, weights = slq_density(lambda v: A @ v, n, num_probes=20, num_steps=30, dtype=torch.float64)
    assert nodes.shape == weights.shape == (20, 30)
    torch.testing.assert_close(weights.sum(1), torch.ones(20, dtype=torch.float64))
    tr1 = float(slq_trace_fn(nodes, weights, lambda t: t, n))
    tr2 = float(slq_trace_fn(nodes, weights, lambda t: t**2, n))
    assert tr1 == pytest.approx(float(eigs.sum()), rel=0.05)
    assert tr2 == pytest.approx(float((eigs**2).sum()), rel=0.05)
    grid = torch.linspace(-2.0, 12.0, 2001, dtype=torch.float64)
    dens = density_on_grid(nodes, weights, grid, sigma=0.1)
    assert dens.shape == grid.shape and float(dens.min()) >= 0
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-3)
    # most mass sits in [0, 1], ~10/400 in [5, 10]
    mass_bulk = float(torch.trapezoid(dens[(grid > -0.5) & (grid < 1.5)], grid[(grid > -0.5) & (grid < 1.5)]))
    assert mass_bulk == pytest.approx((n - 10) / n, abs=0.03)


def test_slq_early_breakdown_pads_with_zero_weight():
    n = 40
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0] * 13 + [3.0], dtype=torch.float64))  # 3 distinct eigenvalues
    nodes, weights = slq_density(lambda v: A @ v, n, num_probes=3, num_steps=10, dtype=torch.float64)
    assert nodes.shape == (3, 10)
    assert int((weights > 1e-12).sum(1).max()) <= 3
    assert float(slq_trace_fn(nodes, weights, lambda t: t, n)) == pytest.approx(float(A.trace()), rel=0.1)
    assert float(slq_trace_fn(nodes, weights, torch.log, n)) == pytest.approx(float(torch.log(A.diagonal()).sum()),
                                                                          rel=0.15)


# ---------------------------------------------------------------- Hutchinson, Hutch++, diagonal


def test_hutchinson_trace_and_stderr():
    n = 100
    A = spd(n, torch.logspace(0, -2, n), seed=14) + 0.1 * torch.ones(n, n, dtype=torch.float64)
    mv = lambda v: A @ v  # noqa: E731
    exact = float(A.trace())
    est, se = hutchinson_trace(mv, n, num_probes=400, seed=1, dtype=torch.float64)
    assert est.ndim == 0 and se.ndim == 0
    # theoretical Rademacher std of one sample: sqrt(2 (‖A‖_F² − Σ A_jj²))
    sd = math.sqrt(2 * (float((A**2).sum()) - float((A.diagonal() ** 2).sum())))
    assert float(se) == pytest.approx(sd / math.sqrt(400), rel=0.25)
    assert abs(float(est) - exact) < 4 * float(se)
    est_g, se_g = hutchinson_trace(mv, n, num_probes=400, seed=1, dtype=torch.float64, distribution="gaussian")
    assert abs(float(est_g) - exact) < 4 * float(se_g)
    # batched block call = same probes
    est_b, _ = hutchinson_trace(lambda V: A @ V, n, num_probes=400, seed=1, dtype=torch.float64, batched=True)
    torch.testing.assert_close(est_b, est)
    with pytest.raises(InputError, match="'rademacher'.*'gaussian'"):
        hutchinson_trace(mv, n, 10, distribution="uniform")
    _, se1 = hutchinson_trace(mv, n, num_probes=1, dtype=torch.float64)
    assert math.isinf(float(se1))


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    n = 200
    A = spd(n, 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 2, seed=15)
    mv = lambda v: A @ v  # noqa: E731
    exact = float(A.trace())
    errs_h, errs_pp = [], []
    for s in range(5):
        h, _ = hutchinson_trace(mv, n, num_probes=60, seed=s, dtype=torch.float64)
        pp, se = hutchpp_trace(mv, n, num_matvecs=60, seed=s, dtype=torch.float64)
        errs_h.append(abs(float(h) - exact))
        errs_pp.append(abs(float(pp) - exact))
        assert math.isfinite(float(se)) and float(se) >= 0
    assert np.mean(errs_pp) < 0.3 * np.mean(errs_h)
    assert max(errs_pp) / exact < 0.01
    with pytest.raises(InputError):
        hutchpp_trace(mv, n, num_matvecs=2)


def test_hutchinson_diag_converges():
    n = 50
    A = spd(n, torch.linspace(0.5, 2.0, n), seed=16)
    mv = lambda V: A @ V  # noqa: E731
    errs = [float(torch.linalg.vector_norm(hutchinson_diag(mv, n, m, seed=3, dtype=torch.float64, batched=True)
                                           - A.diagonal())) for m in (10, 100, 2000)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] / float(torch.linalg.vector_norm(A.diagonal())) < 0.05
    # a diagonal matrix is recovered exactly with Rademacher probes
    D = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    torch.testing.assert_close(hutchinson_diag(lambda v: D @ v, 5, 3, dtype=torch.float64), D.diagonal())


@pytest.mark.gpu
def test_cuda_krylov_and_estimators():
    n = 100
    A = spd(n, torch.logspace(0, -2, n), seed=20).cuda()
    b = vec(n, 21).cuda()
    res = cg(lambda v: A @ v, b, tol=1e-10)
    assert res.converged and res.x.device.type == "cuda"
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-6)
    vals, vecs = lanczos(lambda v: A @ v, n, 3, dtype=torch.float64, device="cuda")
    assert vecs.device.type == "cuda"
    torch.testing.assert_close(vals, torch.linalg.eigvalsh(A).flip(0)[:3], rtol=1e-8, atol=1e-8)
    nodes, weights = slq_density(lambda v: A @ v, n, num_probes=4, num_steps=20, dtype=torch.float64, device="cuda")
    assert float(slq_trace_fn(nodes, weights, lambda t: t, n)) == pytest.approx(float(A.trace()), rel=0.1)
    est, se = hutchinson_trace(lambda v: A @ v, n, 200, dtype=torch.float64, device="cuda")
    assert est.device.type == "cuda" and abs(float(est) - float(A.trace())) < 5 * float(se)
    pp, _ = hutchpp_trace(lambda v: A @ v, n, 60, dtype=torch.float64, device="cuda")
    assert float(pp) == pytest.approx(float(A.trace()), rel=0.05)
    d = hutchinson_diag(lambda V: A @ V, n, 50, dtype=torch.float64, device="cuda", batched=True)
    assert d.device.type == "cuda" and d.shape == (n,)
