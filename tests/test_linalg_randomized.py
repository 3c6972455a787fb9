"""top_eigh (randomized subspace iteration) against torch.linalg.eigh."""

from __future__ import annotations

import pytest
import torch

from fisherlab.errors import InputError
from fisherlab.linalg import top_eigh

DT = torch.float64


def spd_with_spectrum(w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    Q = torch.linalg.qr(torch.randn(len(w), len(w), generator=torch.Generator().manual_seed(seed), dtype=DT)).Q
    return (Q * w) @ Q.T


def subspace_distance(U: torch.Tensor, V: torch.Tensor) -> float:
    """‖UUᵀ − VVᵀ‖_2 (sine of the largest principal angle) for orthonormal U, V (n, k)."""
    return float(torch.linalg.matrix_norm(U @ U.T - V @ V.T, ord=2))


def test_exact_when_the_rank_fits_the_sketch() -> None:
    X = torch.randn(200, 12, generator=torch.Generator().manual_seed(1), dtype=DT)
    M = X @ X.T  # rank 12 ≤ k + oversample
    w, U = top_eigh(M, 5, power_iters=0)
    we, Ue = torch.linalg.eigh(M)
    torch.testing.assert_close(w, we.flip(0)[:5], rtol=1e-10, atol=0)
    assert subspace_distance(U, Ue.flip(1)[:, :5]) < 1e-8
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=DT), rtol=0, atol=1e-12)


def test_power_iterations_converge_at_the_gap_rate() -> None:
    w_true = torch.cat([torch.linspace(10, 1, 8, dtype=DT), torch.full((292,), 1e-2, dtype=DT)])
    w_true = w_true + 1e-4 * torch.rand(300, generator=torch.Generator().manual_seed(3), dtype=DT)
    M = spd_with_spectrum(w_true)
    we, Ue = torch.linalg.eigh(M)
    errors = []
    for q in (0, 1, 2, 3):
        w, U = top_eigh(M, 8, power_iters=q, seed=4)
        errors.append(float((w - we.flip(0)[:8]).abs().max()))
        assert bool((w <= we.flip(0)[:8] + 1e-12).all())  # Ritz values never exceed the eigenvalues
    assert errors[3] < 1e-9
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False))  # each round shrinks the error


def test_full_width_and_determinism() -> None:
    M = spd_with_spectrum(torch.linspace(1, 2, 15, dtype=DT))
    w, U = top_eigh(M, 6)  # k + oversample ≥ n: a full eigendecomposition
    torch.testing.assert_close(w, torch.linalg.eigvalsh(M).flip(0)[:6], rtol=1e-12, atol=0)
    big = spd_with_spectrum(torch.logspace(0, -6, 100, dtype=DT))
    a, b, c = top_eigh(big, 4, seed=1), top_eigh(big, 4, seed=1), top_eigh(big, 4, seed=2)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


@pytest.mark.parametrize(("args", "match"), [((torch.eye(3), 0), "k must"), ((torch.eye(3), 4), "k must"),
                                             ((torch.ones(2, 3), 1), "square"), ((torch.eye(3, dtype=torch.long), 1),
                                                                                 "floating")])
def test_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(InputError, match=match):
        top_eigh(*args)
    with pytest.raises(InputError, match="power_iters"):
        top_eigh(torch.eye(3), 1, power_iters=-1)
