"""Matrix square roots: accuracy per method against scipy and each other, errors, residual reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from fisherlab.errors import InputError, NonFiniteError, SingularMatrixError
from fisherlab.linalg import SQRT_METHODS, ConvergenceError, inv_sqrtm, sqrtm

METHODS = list(SQRT_METHODS)
EPS64 = float(torch.finfo(torch.float64).eps)


def spd(n: int, eigs: torch.Tensor, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Q diag(eigs) Qᵀ with a random orthogonal Q (float64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return ((Q * eigs.to(torch.float64)) @ Q.T).to(dtype)


def logspaced(n: int, kappa: float) -> torch.Tensor:
    return torch.logspace(0, -math.log10(kappa), n, dtype=torch.float64)


def fro(x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x))


def scipy_sqrt(G: torch.Tensor) -> torch.Tensor:
    Y = scipy.linalg.sqrtm(G.double().numpy())
    return torch.from_numpy(np.ascontiguousarray(np.real(Y)))


# ---------------------------------------------------------------- accuracy, float64


@pytest.mark.parametrize("kappa", [1e2, 1e6, 1e8])
@pytest.mark.parametrize("method", METHODS)
def test_roots_float64_prescribed_spectrum(method, kappa):
    n = 30
    G = spd(n, logspaced(n, kappa), seed=1)
    r = sqrtm(G, method=method)
    assert r.converged and r.method == method
    Y, Z = r.sqrt, r.inv_sqrt
    assert Y.dtype == torch.float64 and Y.shape == (n, n)
    # Y·Y ≈ G; Z·G·Z ≈ I (the latter is limited by κ·eps even for the exact answer)
    assert fro(Y @ Y - G) / fro(G) <= 1e-13 * max(1.0, math.sqrt(kappa))
    assert fro(Z @ G @ Z - torch.eye(n, dtype=G.dtype)) / math.sqrt(n) <= kappa * EPS64 + 1e-13
    assert torch.equal(Y, Y.T) and torch.equal(Z, Z.T)
    # independent reference: scipy's Schur-based sqrtm
    ref = scipy_sqrt(G)
    assert fro(Y - ref) / fro(ref) <= 1e-13 * math.sqrt(kappa)
    # agreement with the eigh reference for the inverse root
    ref_inv = sqrtm(G, method="eigh").inv_sqrt
    assert fro(Z - ref_inv) / fro(ref_inv) <= kappa * EPS64 + 1e-13


def test_damped_kappa_1e8_all_methods_agree():
    """Spectrum down to 1e-10 (κ = 1e10) with damping 1e-8: κ(G_λ) ≈ 1e8."""
    n = 30
    G = spd(n, logspaced(n, 1e10), seed=2)
    lam = 1e-8
    Gl = G + lam * torch.eye(n, dtype=G.dtype)
    results = {m: sqrtm(G, method=m, damping=lam) for m in METHODS}
    ref = scipy_sqrt(Gl)
    for m, r in results.items():
        assert r.converged, m
        assert r.damping == lam
        assert fro(r.sqrt @ r.sqrt - Gl) / fro(Gl) <= 1e-10, m
        assert fro(r.inv_sqrt @ Gl @ r.inv_sqrt - torch.eye(n, dtype=G.dtype)) / math.sqrt(n) <= 1e-7, m
        assert fro(r.sqrt - ref) / fro(ref) <= 1e-9, m
        assert fro(r.inv_sqrt - results["eigh"].inv_sqrt) / fro(results["eigh"].inv_sqrt) <= 1e-7, m
    # Newton–Schulz needs O(log κ) steps; it must fit in the default max_iter
    assert results["newton_schulz"].iterations < 60
    assert results["denman_beavers"].iterations < 20


def test_newton_schulz_iterations_grow_with_log_kappa():
    n = 30
    its = [sqrtm(spd(n, logspaced(n, k)), method="newton_schulz").iterations for k in (1e2, 1e6, 1e10)]
    assert its[0] < its[1] < its[2] <= 45


# ---------------------------------------------------------------- float32


@pytest.mark.parametrize("kappa", [1e2, 1e4])
@pytest.mark.parametrize("method", METHODS)
def test_roots_float32(method, kappa):
    n = 30
    G64 = spd(n, logspaced(n, kappa), seed=3)
    G = G64.float()
    r = sqrtm(G, method=method)
    assert r.converged
    assert r.sqrt.dtype == torch.float32 and r.inv_sqrt.dtype == torch.float32
    assert r.residual <= 1e-5
    ref = sqrtm(G64, method="eigh")
    assert fro(r.sqrt.double() - ref.sqrt) / fro(ref.sqrt) <= 1e-5
    assert fro(r.inv_sqrt.double() - ref.inv_sqrt) / fro(ref.inv_sqrt) <= 2e-7 * kappa


def test_half_precision_input_returns_half():
    G = spd(8, torch.linspace(1, 2, 8)).to(torch.float16)
    r = sqrtm(G, method="newton_schulz")
    assert r.sqrt.dtype == torch.float16 and r.inv_sqrt.dtype == torch.float16
    assert fro((r.sqrt.float() @ r.sqrt.float()) - G.float()) / fro(G.float()) < 1e-2


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("method", METHODS)
def test_indefinite_raises(method):
    n = 20
    eigs = torch.linspace(1e-2, 1.0, n)
    eigs[0] = -0.1
    G = spd(n, eigs, seed=4)
    with pytest.raises(SingularMatrixError, match="damping"):
        sqrtm(G, method=method)
    with pytest.raises(SingularMatrixError):
        sqrtm(G, method=method, damping=0.05)  # not enough to make it SPD
    r = sqrtm(G, method=method, damping=0.2)  # G + 0.2 I is SPD
    Gl = G + 0.2 * torch.eye(n, dtype=G.dtype)
    assert fro(r.sqrt @ r.sqrt - Gl) / fro(Gl) < 1e-12


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", METHODS)
def test_singular_psd_needs_damping(method, seed):
    n = 20
    rank = [19, 15, 3, 1][seed]
    g = torch.Generator().manual_seed(100 + seed)
    B = torch.randn(n, rank, generator=g, dtype=torch.float64)
    G = B @ B.T
    with pytest.raises(SingularMatrixError, match="damping > 0"):
        sqrtm(G, method=method)
    r = sqrtm(G, method=method, damping=1e-3)
    Gl = G + 1e-3 * torch.eye(n, dtype=G.dtype)
    assert r.converged
    assert fro(r.sqrt @ r.sqrt - Gl) / fro(Gl) < 1e-11
    assert fro(r.inv_sqrt @ Gl @ r.inv_sqrt - torch.eye(n, dtype=G.dtype)) / math.sqrt(n) < 1e-9


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(method, bad):
    G = spd(5, torch.linspace(1, 2, 5))
    G[1, 2] = bad
    with pytest.raises(NonFiniteError):
        sqrtm(G, method=method)


def test_bad_options_and_shapes():
    G = spd(4, torch.linspace(1, 2, 4))
    with pytest.raises(InputError, match="'eigh'.*'denman_beavers'.*'newton_schulz'"):
        sqrtm(G, method="cholesky")
    with pytest.raises(InputError):
        sqrtm(torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(InputError):
        sqrtm(torch.ones(2, 3, 3, dtype=torch.float64))
    with pytest.raises(InputError):
        sqrtm(torch.eye(3, dtype=torch.int64))
    with pytest.raises(InputError):
        sqrtm(G, damping=-1.0)
    with pytest.raises(InputError):
        sqrtm(G, method="newton_schulz", max_iter=0)
    with pytest.raises(InputError):
        sqrtm(G, method="newton_schulz", tol=-1.0)


# ---------------------------------------------------------------- reports and conventions


@pytest.mark.parametrize("method", METHODS)
def test_reported_residuals_match_recomputation(method):
    n = 25
    G = spd(n, logspaced(n, 1e4), seed=5)
    lam = 1e-3
    r = sqrtm(G, method=method, damping=lam)
    Gl = G + lam * torch.eye(n, dtype=G.dtype)
    res = fro(r.sqrt @ r.sqrt - Gl) / fro(Gl)
    inv_res = fro(r.inv_sqrt @ Gl @ r.inv_sqrt - torch.eye(n, dtype=G.dtype)) / math.sqrt(n)
    # both are at round-off level here, where the order of operations matters: compare loosely
    assert r.residual == pytest.approx(res, rel=0.05, abs=5e-15)
    assert r.inv_residual == pytest.approx(inv_res, rel=0.05, abs=5e-15)
    # inverse-only: the residual is ‖Z G Z − I‖/√n
    z = inv_sqrtm(G, method=method, damping=lam)
    torch.testing.assert_close(z, r.inv_sqrt, rtol=1e-12, atol=1e-12)
    r_no_inv = sqrtm(G, method=method, damping=lam, inverse=False)
    assert r_no_inv.inv_sqrt is None and r_no_inv.inv_residual is None
    torch.testing.assert_close(r_no_inv.sqrt, r.sqrt, rtol=1e-12, atol=1e-12)


def test_unconverged_is_reported_not_hidden():
    n = 30
    G = spd(n, logspaced(n, 1e8), seed=6)
    r = sqrtm(G, method="newton_schulz", max_iter=5)
    assert not r.converged and r.iterations == 5
    assert r.residual > 1e-3  # far from a square root, and it says so
    Y = r.sqrt
    assert r.residual == pytest.approx(fro(Y @ Y - G) / fro(G), rel=1e-6)
    with pytest.raises(ConvergenceError, match="max_iter"):
        inv_sqrtm(G, method="newton_schulz", max_iter=5)


@pytest.mark.parametrize("method", METHODS)
def test_input_is_symmetrised(method):
    n = 10
    G = spd(n, torch.linspace(0.5, 2.0, n), seed=7)
    K = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    r1 = sqrtm(G, method=method)
    r2 = sqrtm(G + 1e-3 * (K - K.T), method=method)
    torch.testing.assert_close(r1.sqrt, r2.sqrt, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r1.inv_sqrt, r2.inv_sqrt, rtol=1e-12, atol=1e-12)


def test_one_by_one_and_identity():
    r = sqrtm(torch.tensor([[4.0]], dtype=torch.float64), method="denman_beavers")
    assert float(r.sqrt) == pytest.approx(2.0) and float(r.inv_sqrt) == pytest.approx(0.5)
    eye = torch.eye(6, dtype=torch.float64)
    for m in METHODS:
        torch.testing.assert_close(inv_sqrtm(eye, method=m, damping=3.0), eye / 2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    from fisherlab.linalg import damped_solve, kron_damped_solve

    n = 30
    G = spd(n, logspaced(n, 1e6), seed=9)
    r_cpu = sqrtm(G, method=method, damping=1e-4)
    r_gpu = sqrtm(G.cuda(), method=method, damping=1e-4)
    assert r_gpu.sqrt.device.type == "cuda" and r_gpu.inv_sqrt.device.type == "cuda"
    torch.testing.assert_close(r_gpu.sqrt.cpu(), r_cpu.sqrt, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r_gpu.inv_sqrt.cpu(), r_cpu.inv_sqrt, rtol=1e-7, atol=1e-9)
    with pytest.raises(SingularMatrixError):
        sqrtm(torch.zeros(n, n, dtype=torch.float64, device="cuda"), method=method)
    b = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(damped_solve(G.cuda(), b.cuda(), 1e-3).cpu(), damped_solve(G, b, 1e-3))
    A, S, W = G[:6, :6] + torch.eye(6, dtype=G.dtype), G[:4, :4] + torch.eye(4, dtype=G.dtype), torch.ones(4, 6)
    torch.testing.assert_close(kron_damped_solve(A.cuda(), S.cuda(), W.double().cuda(), 1e-3).cpu(),
                               kron_damped_solve(A, S, W.double(), 1e-3))
