"""Low-rank (Nyström) Fisher against the dense float64 Fisher: exact recovery at k ≥ rank(F) (N·R < P), error
shrinking with k, and the closed-form damped powers (Woodbury solve, inverse square root) against dense algebra.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

from fisherlab.errors import InputError, SingularMatrixError
from fisherlab.structures.lowrank import LowRankFisher, nystrom

F64 = torch.float64


@pytest.fixture(scope="module")
def mlp_case(problems):
    problem = problems("mlp")  # N = 8, R = C − 1 = 2: rank F ≤ 16 < P = 99
    return problem, problem.reference("true")


@pytest.mark.parametrize("method", ["columns", "sketch"])
def test_recovers_f_at_its_rank(mlp_case, method):
    problem, F = mlp_case
    r = int(torch.linalg.matrix_rank(F))
    assert r < F.shape[0]
    L = problem.fisher("true", "lowrank", rank=r, method=method)
    ref.assert_close(L.to_dense(), F, 1e-10, f"{method}, k = rank = {r}")
    assert L.U.shape[1] <= r and torch.allclose(L.U.T @ L.U, torch.eye(L.U.shape[1], dtype=F64), atol=1e-12)


def test_error_decreases_with_k(mlp_case):
    problem, F = mlp_case
    errors = {}
    for method in ("columns", "sketch"):
        errs = []
        for k in (2, 4, 8, 12, 16, 24):
            L = problem.fisher("true", "lowrank", rank=k, method=method, seed=7)
            errs.append(float(torch.linalg.matrix_norm(L.to_dense() - F) / torch.linalg.matrix_norm(F)))
        errors[method] = errs
        print(method, [f"{e:.2e}" for e in errs])
        assert errs[-1] < 1e-10 and errs[0] > 0.05
    # nested column sets (prefixes of one permutation): the Nyström error F − F_k is a shrinking Schur complement
    cols = errors["columns"]
    assert all(b <= a + 1e-12 for a, b in zip(cols, cols[1:], strict=False))
    sk = errors["sketch"]
    assert sk[0] > sk[2] > sk[4]


def test_damped_powers_and_spectrum_against_dense(mlp_case):
    problem, _ = mlp_case
    L = problem.fisher("true", "lowrank", rank=10, method="sketch")
    D = L.to_dense()
    P = D.shape[0]
    lam = 1e-2
    g = torch.randn(P, 2, dtype=F64)
    Dd = D + lam * torch.eye(P, dtype=F64)
    ref.assert_close(L.solve(g, lam), torch.linalg.solve(Dd, g), 1e-10, "Woodbury solve")
    ref.assert_close(L.solve(g[:, 0], lam), torch.linalg.solve(Dd, g[:, 0]), 1e-10, "Woodbury solve (vector)")
    Z = L.damped_power(torch.eye(P, dtype=F64), lam, -0.5)
    ref.assert_close(Z @ Dd @ Z, torch.eye(P, dtype=F64), 1e-10, "inverse square root")
    Y = L.damped_power(torch.eye(P, dtype=F64), lam, 0.5)
    ref.assert_close(Y @ Y, Dd, 1e-10, "square root")
    ref.assert_close(L.eigvalsh(), torch.linalg.eigvalsh(D), 1e-10, "eigvalsh")
    ref.assert_close(L.diag(), D.diagonal(), 1e-12, "diag")
    ref.assert_close(L @ g, D @ g, 1e-12, "matmat")
    assert float(L.trace()) == pytest.approx(float(D.trace()), rel=1e-12)
    with pytest.raises(SingularMatrixError, match="damping > 0"):
        L.solve(g, 0.0)


def test_nystrom_preconditioner_against_its_dense_definition(mlp_case):
    """P_λ⁻¹ V against numpy's inverse of P_λ = U(Λ + λI)Uᵀ/(λ_m + λ) + (I − UUᵀ), U and Λ from numpy's eigh of the
    dense UΛUᵀ; P_λ⁻¹(UΛUᵀ + λI) has the eigenvalue λ_m + λ on span U and λ on its complement (Frangella et al.)."""
    problem, _ = mlp_case
    L = problem.fisher("true", "lowrank", rank=10, method="sketch")
    D = L.to_dense().numpy()
    P, m = D.shape[0], L.U.shape[1]
    w, Q = np.linalg.eigh(D)
    w, Q = w[::-1][:m], Q[:, ::-1][:, :m]  # the m nonzero eigenpairs, descending
    V = torch.randn(P, 3, dtype=F64)
    for lam in (1e-4, 1e-2, 1.0):
        dense = Q @ np.diag(w + lam) @ Q.T / (w[-1] + lam) + np.eye(P) - Q @ Q.T
        expected = np.linalg.solve(dense, V.numpy())
        atol = 1e-10 * np.abs(expected).max()
        np.testing.assert_allclose(L.precondition(V, lam).numpy(), expected, rtol=0, atol=atol)
        np.testing.assert_allclose(L.precondition(V[:, 0], lam).numpy(), expected[:, 0], rtol=0, atol=atol)
        spectrum = np.sort(np.linalg.eigvals(np.linalg.solve(dense, D + lam * np.eye(P))).real)
        target = np.sort(np.r_[np.full(P - m, lam), np.full(m, w[-1] + lam)])
        np.testing.assert_allclose(spectrum, target, rtol=1e-8)
    assert L.eigenvalues[-1] > 0
    zero = LowRankFisher(L.spec, L.kind, L.dtype, L.device, L.memory_budget, L.meta, L.U,
                         torch.cat([L.eigenvalues[:-1], L.eigenvalues.new_zeros(1)]))
    with pytest.raises(SingularMatrixError, match="damping > 0"):
        zero.precondition(V, 0.0)


def test_nystrom_of_an_explicit_matrix_and_bad_input():
    torch.manual_seed(0)
    B = torch.randn(30, 5, dtype=F64)
    G = B @ B.T
    U, lam = nystrom(lambda V: G @ V, 30, 7, method="sketch", seed=1, block_size=3)
    ref.assert_close((U * lam) @ U.T, G, 1e-12, "explicit PSD matrix")
    assert torch.all(lam[:-1] >= lam[1:])
    for bad in (0, 31, 2.5, True):
        with pytest.raises(InputError, match="rank"):
            nystrom(lambda V: G @ V, 30, bad)
    with pytest.raises(InputError, match="method"):
        nystrom(lambda V: G @ V, 30, 3, method="random")


def test_front_door_defaults(problems):
    problem = problems("softmax")
    L = problem.fisher("empirical", "lowrank")
    assert isinstance(L, LowRankFisher) and L.meta["rank"] == min(L.spec.dim, 10 * 1)
    ref.assert_close(L.to_dense(), problem.reference("empirical"), 1e-10, "default rank = N·R")
