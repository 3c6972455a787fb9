"""Kronecker helpers against dense torch.kron references in fisherlab's row-major ordering."""

from __future__ import annotations

import math

import pytest
import torch

from fisherlab.errors import InputError, MemoryBudgetError, NonFiniteError, SingularMatrixError
from fisherlab.linalg import (
    SQRT_METHODS,
    kron_damped_solve,
    kron_damping_split,
    kron_eig,
    kron_inv_sqrt,
    kron_matmul,
    kron_to_dense,
)
from fisherlab.linalg.kron import KronFactorization, kron_damped_factor, kron_eigs, kron_factor_solve

DIN, DOUT = 6, 4


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def factor(d: int, seed: int, scale: float = 1.0, rank: int | None = None) -> torch.Tensor:
    X = torch.randn(d, rank or 2 * d, generator=gen(seed), dtype=torch.float64)
    return scale * (X @ X.T) / X.shape[1]


@pytest.fixture
def AS() -> tuple[torch.Tensor, torch.Tensor]:
    return factor(DIN, 1, 2.0), factor(DOUT, 2, 0.01)


def test_kron_to_dense_matches_torch_kron_and_row_major_action(AS):
    A, S = AS
    D = kron_to_dense(A, S)
    assert D.shape == (DOUT * DIN, DOUT * DIN)
    assert torch.equal(D, torch.kron(S, A))
    W = torch.randn(DOUT, DIN, generator=gen(3), dtype=torch.float64)
    torch.testing.assert_close(D @ W.reshape(-1), (S @ W @ A).reshape(-1))
    # column-major: (A ⊗ S) vec_c(W) = vec_c(S W A), vec_c(W) = W.T.reshape(-1)
    Dc = kron_to_dense(A, S, order="column_major")
    assert torch.equal(Dc, torch.kron(A, S))
    torch.testing.assert_close(Dc @ W.T.reshape(-1), (S @ W @ A).T.reshape(-1))
    with pytest.raises(MemoryBudgetError):
        kron_to_dense(A, S, max_elements=100)
    with pytest.raises(InputError, match="'row_major'.*'column_major'"):
        kron_to_dense(A, S, order="fortran")


def test_kron_matmul_equals_dense(AS):
    A, S = AS
    W = torch.randn(DOUT, DIN, generator=gen(4), dtype=torch.float64)
    D = kron_to_dense(A, S)
    torch.testing.assert_close(kron_matmul(A, S, W).reshape(-1), D @ W.reshape(-1))
    Wb = torch.randn(3, 2, DOUT, DIN, generator=gen(5), dtype=torch.float64)
    out = kron_matmul(A, S, Wb)
    assert out.shape == Wb.shape
    torch.testing.assert_close(out.reshape(6, -1), Wb.reshape(6, -1) @ D.T)
    # non-symmetric A: still equal to the dense Kronecker product (S W Aᵀ)
    An = torch.randn(DIN, DIN, generator=gen(6), dtype=torch.float64)
    torch.testing.assert_close(kron_matmul(An, S, W).reshape(-1), kron_to_dense(An, S) @ W.reshape(-1))
    with pytest.raises(InputError):
        kron_matmul(A, S, W.T)


def test_damping_split(AS):
    A, S = AS
    lam = 1e-2
    a, s = kron_damping_split(A, S, lam, "pi")
    pi = math.sqrt((float(A.trace()) / DIN) / (float(S.trace()) / DOUT))
    assert a == pytest.approx(pi * math.sqrt(lam)) and s == pytest.approx(math.sqrt(lam) / pi)
    assert a * s == pytest.approx(lam)
    assert kron_damping_split(A, S, lam, "sqrt") == (pytest.approx(0.1), pytest.approx(0.1))
    assert kron_damping_split(A, S, 0.0, "pi") == (0.0, 0.0)
    with pytest.raises(SingularMatrixError, match="sqrt"):
        kron_damping_split(A, torch.zeros_like(S), lam, "pi")
    with pytest.raises(InputError, match="'pi'.*'sqrt'"):
        kron_damping_split(A, S, lam, "half")


@pytest.mark.parametrize("split", ["pi", "sqrt"])
@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_kron_damped_solve_equals_dense_solve(AS, split, method):
    A, S = AS
    lam = 1e-3
    a, s = kron_damping_split(A, S, lam, split)
    W = torch.randn(2, DOUT, DIN, generator=gen(7), dtype=torch.float64)
    X = kron_damped_solve(A, S, W, lam, split, method=method)
    Dd = torch.kron(S + s * torch.eye(DOUT, dtype=S.dtype), A + a * torch.eye(DIN, dtype=A.dtype))
    ref = torch.linalg.solve(Dd, W.reshape(2, -1).T).T.reshape(W.shape)
    torch.testing.assert_close(X, ref, rtol=1e-9, atol=1e-9)
    # the factor-damped matrix is not the damped Kronecker product: the cross terms a S⊗I + s I⊗A remain
    D = kron_to_dense(A, S)
    eye = torch.eye(DIN * DOUT, dtype=A.dtype)
    cross = a * torch.kron(S, torch.eye(DIN, dtype=A.dtype)) + s * torch.kron(torch.eye(DOUT, dtype=A.dtype), A)
    torch.testing.assert_close(Dd, D + cross + lam * eye)
    assert float(torch.linalg.matrix_norm(Dd - (D + lam * eye))) > 1e-3


def test_kron_damped_solve_exact_split(AS):
    A, S = AS
    lam = 1e-3
    W = torch.randn(DOUT, DIN, generator=gen(8), dtype=torch.float64)
    X = kron_damped_solve(A, S, W, lam, "exact")
    D = kron_to_dense(A, S) + lam * torch.eye(DIN * DOUT, dtype=A.dtype)
    torch.testing.assert_close(X.reshape(-1), torch.linalg.solve(D, W.reshape(-1)), rtol=1e-9, atol=1e-9)


def test_kron_damped_solve_singular_factors():
    A = factor(DIN, 9, rank=2)  # singular
    S = factor(DOUT, 10)
    W = torch.randn(DOUT, DIN, generator=gen(11), dtype=torch.float64)
    for split in ("pi", "sqrt", "exact"):
        with pytest.raises(SingularMatrixError):
            kron_damped_solve(A, S, W, 0.0, split)
        assert torch.isfinite(kron_damped_solve(A, S, W, 1e-2, split)).all()


@pytest.mark.parametrize("method", SQRT_METHODS)
@pytest.mark.parametrize("split", ["pi", "sqrt"])
def test_kron_inv_sqrt_whitens_damped_factors(AS, method, split):
    A, S = AS
    lam = 1e-3
    a, s = kron_damping_split(A, S, lam, split)
    Za, Zs = kron_inv_sqrt(A, S, damping=lam, method=method, split=split)
    Ad = A + a * torch.eye(DIN, dtype=A.dtype)
    Sd = S + s * torch.eye(DOUT, dtype=S.dtype)
    torch.testing.assert_close(Za @ Ad @ Za, torch.eye(DIN, dtype=A.dtype), rtol=0, atol=1e-9)
    torch.testing.assert_close(Zs @ Sd @ Zs, torch.eye(DOUT, dtype=S.dtype), rtol=0, atol=1e-9)
    # Zs ⊗ Za is the inverse square root of (S + sI) ⊗ (A + aI) in the row-major ordering
    Z = kron_to_dense(Za, Zs)
    Dd = kron_to_dense(Ad, Sd)
    torch.testing.assert_close(Z @ Dd @ Z, torch.eye(DIN * DOUT, dtype=A.dtype), rtol=0, atol=1e-8)


def test_kron_inv_sqrt_singular_undamped_raises():
    A = factor(DIN, 12, rank=3)
    S = factor(DOUT, 13)
    with pytest.raises(SingularMatrixError):
        kron_inv_sqrt(A, S, damping=0.0)
    with pytest.raises(InputError):
        kron_inv_sqrt(A, S, damping=1e-3, method="qr")


def test_kron_eig_reconstructs(AS):
    A, S = AS
    e = kron_eig(A, S)
    torch.testing.assert_close((e.a_eigvecs * e.a_eigvals) @ e.a_eigvecs.T, A)
    torch.testing.assert_close((e.s_eigvecs * e.s_eigvals) @ e.s_eigvecs.T, S)
    assert torch.all(e.a_eigvals[1:] >= e.a_eigvals[:-1])
    # eigenvalues of S ⊗ A are the outer products
    outer = (e.s_eigvals[:, None] * e.a_eigvals[None, :]).reshape(-1).sort().values
    torch.testing.assert_close(outer, torch.linalg.eigvalsh(kron_to_dense(A, S)), rtol=1e-9, atol=1e-12)


def test_kron_eigs_of_float32_factors_in_float64():
    """dtype=float64 (EKFAC's): float32 eigenpairs of rank-deficient float32 factors (a null space of 224 and 130
    zero eigenvalues) whose backward error ‖QΛQᵀ − M‖/‖M‖ and loss of orthogonality are the float32 rounding of a
    float64 decomposition (float32 LAPACK: ~1e-6 and ~1.6e-5 at this size), in float64 arithmetic."""
    pairs = [tuple(factor(d, seed, rank=rank).float() for d, seed, rank in ((320, 5, 96), (200, 6, 70)))]
    e = kron_eigs(pairs, dtype=torch.float64)[0]
    for M, w, Q in ((pairs[0][0], e.a_eigvals, e.a_eigvecs), (pairs[0][1], e.s_eigvals, e.s_eigvecs)):
        assert w.dtype == Q.dtype == torch.float32
        M64, w64, Q64 = M.double(), w.double(), Q.double()
        backward = torch.linalg.norm((Q64 * w64) @ Q64.T - M64) / torch.linalg.norm(M64)
        orthogonality = torch.linalg.norm(Q64.T @ Q64 - torch.eye(len(M), dtype=torch.float64))
        assert backward < 2e-7 and orthogonality < 3e-6, (backward, orthogonality)


def test_damping_split_takes_a_diagonal_input_factor_as_its_diagonal():
    """A diagonal A (an Embedding's token counts) passed as (in,): π = sqrt(mean(a) / (tr S / dim S)), closed form."""
    g = torch.Generator().manual_seed(3)
    a = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    B = torch.randn(4, 4, generator=g, dtype=torch.float64)
    S = B @ B.T + 0.1 * torch.eye(4, dtype=torch.float64)
    lam = 0.3
    pi = math.sqrt(float(a.mean()) / float(torch.trace(S) / 4))
    got = kron_damping_split(a, S, lam, "pi")
    assert got == pytest.approx((pi * math.sqrt(lam), math.sqrt(lam) / pi), rel=1e-14)
    assert kron_damping_split(a, S, lam, "sqrt") == (math.sqrt(lam), math.sqrt(lam))


def _dense_damped_block(A: torch.Tensor, S: torch.Tensor, lam: float, split: str) -> torch.Tensor:
    """(S + sI) ⊗ (A + aI) (a·s = λ from the closed-form split) or, for "exact", S ⊗ A + λI, by torch.kron."""
    if split == "exact":
        return torch.kron(S, A) + lam * torch.eye(len(S) * len(A), dtype=A.dtype)
    pi = math.sqrt((float(A.trace()) / len(A)) / (float(S.trace()) / len(S))) if split == "pi" else 1.0
    a, s = pi * math.sqrt(lam), math.sqrt(lam) / pi
    return torch.kron(S + s * torch.eye(len(S), dtype=S.dtype), A + a * torch.eye(len(A), dtype=A.dtype))


@pytest.mark.parametrize("split, method", [("pi", "cholesky"), ("sqrt", "cholesky"), ("pi", "eigh"),
                                           ("exact", "cholesky")])
def test_kron_factorisation_solves_the_dense_damped_block(AS, split, method):
    """One factorisation per λ, applied to several right-hand sides, against torch.linalg.solve of the dense block."""
    A, S = AS
    for k, lam in enumerate((1e-1, 1e-4, 1e-2, 0.3)):
        F = kron_damped_factor(A, S, lam, split, method=method)
        assert isinstance(F, KronFactorization) and F.out_dtype == torch.float64
        D = _dense_damped_block(A, S, lam, split)
        for shape in ((DOUT, DIN), (3, DOUT, DIN)):
            W = torch.randn(*shape, generator=gen(20 + k), dtype=torch.float64)
            X = kron_factor_solve(F, W)
            ref = torch.linalg.solve(D, W.reshape(-1, DOUT * DIN).T).T.reshape(shape)
            torch.testing.assert_close(X, ref, rtol=1e-9, atol=1e-9)
            # kron_damped_solve is this factorisation and this solve
            assert torch.equal(X, kron_damped_solve(A, S, W, lam, split, method=method))


def test_kron_factorisation_dtype_and_bad_input(AS):
    A, S = AS
    A32, S32 = A.float(), S.float()
    W = torch.randn(DOUT, DIN, generator=gen(30), dtype=torch.float64)
    # factorised in the right-hand sides' dtype when it is wider than the factors'
    F = kron_damped_factor(A32, S32, 1e-2, "pi", dtype=torch.float64)
    assert F.s_factor.dtype == torch.float64 and F.out_dtype == torch.float32
    ref = torch.linalg.solve(_dense_damped_block(A32.double(), S32.double(), 1e-2, "pi"), W.reshape(-1))
    torch.testing.assert_close(kron_factor_solve(F, W).reshape(-1), ref, rtol=1e-9, atol=1e-9)
    assert kron_factor_solve(F, W).dtype == torch.float64
    with pytest.raises(InputError, match="damping"):
        kron_damped_factor(A, S, -1e-3)
    with pytest.raises(NonFiniteError, match="damping"):
        kron_damped_factor(A, S, float("nan"))
    with pytest.raises(InputError, match="split"):
        kron_damped_factor(A, S, 1e-3, "half")
    with pytest.raises(InputError, match="method"):
        kron_damped_factor(A, S, 1e-3, method="qr")
    with pytest.raises(InputError, match="shape"):
        kron_factor_solve(kron_damped_factor(A, S, 1e-3), W.T)
    with pytest.raises(SingularMatrixError):
        kron_damped_factor(factor(DIN, 9, rank=2), S, 0.0)


def test_kron_factor_solve_with_an_identity_input_basis():
    """``a_factor`` None: Q_A = I, the input side's entries in ``denom`` (a diagonal A), against the dense block."""
    g = torch.Generator().manual_seed(31)
    a = torch.rand(DIN, generator=g, dtype=torch.float64) + 0.1
    S = factor(DOUT, 32)
    sigma, Q = torch.linalg.eigh(S)
    lam = 1e-2
    F = KronFactorization(None, Q, sigma[:, None] * a[None, :] + lam, torch.float64)
    W = torch.randn(2, DOUT, DIN, generator=g, dtype=torch.float64)
    D = torch.kron(S, torch.diag(a)) + lam * torch.eye(DOUT * DIN, dtype=torch.float64)
    ref = torch.linalg.solve(D, W.reshape(2, -1).T).T.reshape(W.shape)
    torch.testing.assert_close(kron_factor_solve(F, W), ref, rtol=1e-9, atol=1e-9)
