"""damped_solve against numpy, singular detection, condition numbers against numpy.linalg.cond."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fisherlab.errors import InputError, NonFiniteError, SingularMatrixError
from fisherlab.linalg import condition_number, damped_solve


def spd(n: int, eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * eigs.to(torch.float64)) @ Q.T


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("damping", [0.0, 0.3])
@pytest.mark.parametrize("k", [None, 4])
def test_damped_solve_matches_numpy(damping, k):
    n = 40
    G = spd(n, torch.logspace(0, -6, n), seed=1)
    b = torch.from_numpy(rng(2).standard_normal((n,) if k is None else (n, k)))
    x = damped_solve(G, b, damping)
    ref = np.linalg.solve(G.numpy() + damping * np.eye(n), b.numpy())
    assert x.shape == b.shape and x.dtype == torch.float64
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())


def test_damped_solve_float32_and_symmetrisation():
    n = 20
    G = spd(n, torch.linspace(1, 3, n), seed=3)
    b = torch.from_numpy(rng(4).standard_normal(n))
    x32 = damped_solve(G.float(), b.float(), 0.1)
    assert x32.dtype == torch.float32
    ref = np.linalg.solve(G.numpy() + 0.1 * np.eye(n), b.numpy())
    np.testing.assert_allclose(x32.double().numpy(), ref, rtol=1e-4, atol=1e-5)
    # only the symmetric part of G is used
    K = torch.from_numpy(rng(5).standard_normal((n, n)))
    torch.testing.assert_close(damped_solve(G + (K - K.T), b, 0.1), damped_solve(G, b, 0.1))


@pytest.mark.parametrize("seed", range(6))
def test_singular_undamped_raises_and_damping_fixes(seed):
    n = 30
    rank = [29, 20, 5, 1, 28, 10][seed]
    B = torch.from_numpy(rng(10 + seed).standard_normal((n, rank)))
    G = B @ B.T
    b = torch.from_numpy(rng(20 + seed).standard_normal(n))
    with pytest.raises(SingularMatrixError, match=r"damping=0.*damping > 0"):
        damped_solve(G, b)
    x = damped_solve(G, b, 1e-2)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(G.numpy() + 1e-2 * np.eye(n), b.numpy()), rtol=1e-8)


def test_indefinite_raises_names_damping():
    eigs = torch.linspace(0.1, 1.0, 10)
    eigs[0] = -0.5
    G = spd(10, eigs, seed=6)
    b = torch.ones(10, dtype=torch.float64)
    with pytest.raises(SingularMatrixError, match=r"damping=0.2.*increase the damping"):
        damped_solve(G, b, 0.2)
    with pytest.raises(SingularMatrixError):
        damped_solve(G, b, 0.2, check_singular=False)
    damped_solve(G, b, 0.6)


def test_solve_input_errors():
    G = spd(5, torch.linspace(1, 2, 5))
    with pytest.raises(InputError):
        damped_solve(G, torch.ones(4, dtype=torch.float64))
    with pytest.raises(InputError):
        damped_solve(torch.ones(5, 4, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    with pytest.raises(InputError):
        damped_solve(G, torch.ones(5, dtype=torch.float64), -1.0)
    bad = G.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        damped_solve(bad, torch.ones(5, dtype=torch.float64))
    with pytest.raises(NonFiniteError):
        damped_solve(G, torch.tensor([1.0, 2, math.inf, 0, 0], dtype=torch.float64))


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_condition_number_matches_numpy(damping):
    n = 25
    G = spd(n, torch.logspace(0, -5, n), seed=7)
    ref = np.linalg.cond(G.numpy() + damping * np.eye(n))
    assert condition_number(G, damping) == pytest.approx(ref, rel=1e-6)
    ev = torch.linalg.eigvalsh(G)
    assert condition_number(ev, damping) == pytest.approx(ref, rel=1e-6)
    assert isinstance(condition_number(ev, damping), float)


def test_condition_number_singular_is_inf():
    B = torch.from_numpy(rng(8).standard_normal((10, 4)))
    G = B @ B.T
    assert condition_number(G) == math.inf
    assert math.isfinite(condition_number(G, 0.1))
    assert condition_number(torch.tensor([0.0, 1.0, 2.0])) == math.inf
    assert condition_number(torch.tensor([-1.0, 1.0, 2.0])) == math.inf
    assert condition_number(torch.tensor([-1.0, 1.0, 2.0]), 2.0) == pytest.approx(4.0 / 1.0)
    with pytest.raises(InputError):
        condition_number(torch.ones(2, 2, 2))


def test_checked_symmetric_matrix_skips_passes_not_bits():
    """checked=True (a finite, exactly symmetric G) solves as numpy does, bit for bit as the checked path."""
    n = 30
    G = spd(n, torch.logspace(0, -4, n), seed=3)
    G = torch.triu(G) + torch.triu(G, 1).T  # exactly symmetric
    b = torch.from_numpy(rng(4).standard_normal(n))
    x = damped_solve(G, b, 1e-3, checked=True)
    assert torch.equal(x, damped_solve(G, b, 1e-3))
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(G.numpy() + 1e-3 * np.eye(n), b.numpy()), rtol=1e-9)
