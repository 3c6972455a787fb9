"""Likelihoods (docs/method.md) against closed forms written out independently, autograd, and brute-force KL.

Tolerances (float64): closed forms 1e-12 relative (absolute 1e-15 where entries underflow at extreme logits);
sampling moments within 5 standard errors at a fixed seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
import torch.nn.functional as nnf
from scipy import integrate
from torch import Tensor

from fisherlab.errors import InputError
from fisherlab.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    Categorical,
    Gaussian,
    Likelihood,
    TokenLikelihood,
    get_likelihood,
    register,
)
from fisherlab.vocabulary import FisherKind

F64 = torch.float64
SIGMA = 0.6
LIKS = {"categorical": Categorical(), "gaussian": Gaussian(SIGMA), "bernoulli": Bernoulli()}
EXTREME = torch.tensor([[50.0, -50.0, 0.0, 1.0], [-50.0, -50.0, -50.0, -50.0], [50.0, 50.0, -50.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0], [30.0, -20.0, 5.0, -45.0]], dtype=F64)


def logits(n: int = 6, c: int = 4, seed: int = 0, scale: float = 2.0) -> Tensor:
    return scale * torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=F64)


def targets(name: str, z: Tensor, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    if name == "categorical":
        return torch.randint(0, z.shape[1], (z.shape[0],), generator=gen)
    if name == "gaussian":
        return torch.randn(z.shape, generator=gen, dtype=F64)
    return torch.randint(0, 2, z.shape, generator=gen).to(F64)


def closed_form_lambda(name: str, z: np.ndarray) -> np.ndarray:
    """Λ(z_n) for every row, (N, C, C), in numpy."""
    if name == "categorical":
        e = np.exp(z - z.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        return np.stack([np.diag(q) - np.outer(q, q) for q in p])
    if name == "gaussian":
        return np.broadcast_to(np.eye(z.shape[1]) / SIGMA**2, (len(z), z.shape[1], z.shape[1]))
    p = 1 / (1 + np.exp(-z))
    return np.stack([np.diag(q * (1 - q)) for q in p])


@pytest.mark.parametrize("name", list(LIKS))
@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme"])
def test_fisher_factor_reproduces_output_fisher(name, extreme):
    z = EXTREME if extreme else logits()
    B = LIKS[name].fisher_factor(z)
    expected = closed_form_lambda(name, z.numpy())
    assert B.shape[:2] == z.shape and B.shape[2] <= z.shape[1] and torch.isfinite(B).all()
    if name == "categorical":
        assert B.shape[2] == z.shape[1] - 1  # Λ has rank C − 1 (1 ⟂ its range)
    got = (B @ B.transpose(1, 2)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    w = logits(seed=5, scale=1.0)[: len(z)]
    np.testing.assert_allclose(LIKS[name].fisher_apply(z, w).numpy(), np.einsum("nij,nj->ni", expected, w.numpy()),
                               rtol=1e-12, atol=1e-15)


def test_categorical_factor_float32_extreme_logits():
    B = Categorical().fisher_factor(EXTREME.float())
    assert torch.isfinite(B).all()
    np.testing.assert_allclose((B @ B.transpose(1, 2)).double().numpy(), closed_form_lambda("categorical",
                               EXTREME.numpy()), atol=1e-6)


def test_categorical_single_class_has_zero_fisher():
    assert torch.equal(Categorical().fisher_factor(torch.zeros(3, 1, dtype=F64)), torch.zeros(3, 1, 1, dtype=F64))


@pytest.mark.parametrize("name", list(LIKS))
def test_nll_and_grad_z_match_formulas_and_autograd(name):
    lik, z = LIKS[name], logits()
    y = targets(name, z)
    rlik = ref.RefLikelihood(name, SIGMA)
    np.testing.assert_allclose(lik.nll(z, y).numpy(), [float(rlik.nll(z[n], y[n])) for n in range(len(z))],
                               rtol=1e-13)
    torch_loss = {"categorical": lambda: nnf.cross_entropy(z, y, reduction="none"),
                  "gaussian": lambda: nnf.mse_loss(z, y, reduction="none").sum(1) / (2 * SIGMA**2),
                  "bernoulli": lambda: nnf.binary_cross_entropy_with_logits(z, y, reduction="none").sum(1)}[name]()
    np.testing.assert_allclose(lik.nll(z, y).numpy(), torch_loss.numpy(), rtol=1e-13)
    zz = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(lik.nll(zz, y).sum(), zz)
    np.testing.assert_allclose(lik.grad_z(z, y).numpy(), auto.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(lik.grad_z_autograd(z, y).numpy(), auto.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(LIKS))
def test_hessian_factor_equals_autograd_hessian_and_lambda(name):
    lik, z = LIKS[name], logits(n=4)
    y = targets(name, z)
    K = lik.hessian_factor(z, y)
    rlik = ref.RefLikelihood(name, SIGMA)
    for n in range(len(z)):
        H = rlik.hessian(z[n], y[n])
        np.testing.assert_allclose((K[n] @ K[n].T).numpy(), H.numpy(), atol=1e-13)
        np.testing.assert_allclose(H.numpy(), closed_form_lambda(name, z.numpy())[n], atol=1e-13)


def kl_brute_force(name: str, zp: np.ndarray, zq: np.ndarray) -> float:
    """KL(p(· | zp) ‖ p(· | zq)) for one sample: a sum over classes / outcomes, or a numerical integral."""
    if name == "categorical":
        p, q = np.exp(zp) / np.exp(zp).sum(), np.exp(zq) / np.exp(zq).sum()
        return float((p * np.log(p / q)).sum())
    if name == "bernoulli":
        p, q = 1 / (1 + np.exp(-zp)), 1 / (1 + np.exp(-zq))
        return float((p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum())
    total = 0.0
    for mp, mq in zip(zp, zq, strict=True):  # independent coordinates: integrate each 1-D KL over x
        def integrand(x: float, mp: float = mp, mq: float = mq) -> float:
            lp = -((x - mp) ** 2) / (2 * SIGMA**2)
            return math.exp(lp) / math.sqrt(2 * math.pi * SIGMA**2) * (lp + (x - mq) ** 2 / (2 * SIGMA**2))
        total += integrate.quad(integrand, mp - 12 * SIGMA, mp + 12 * SIGMA, epsabs=1e-13, epsrel=1e-12)[0]
    return total


@pytest.mark.parametrize("name", list(LIKS))
def test_kl_against_brute_force(name):
    lik, zp, zq = LIKS[name], logits(n=4, seed=2), logits(n=4, seed=3)
    kl = lik.kl(zp, zq)
    assert kl.shape == (4,)
    expected = [kl_brute_force(name, a, b) for a, b in zip(zp.numpy(), zq.numpy(), strict=True)]
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-9)
    assert torch.allclose(lik.kl(zp, zp), torch.zeros(4, dtype=F64), atol=1e-14)


@pytest.mark.parametrize("name", list(LIKS))
def test_kl_is_half_fisher_quadratic_form_to_second_order(name):
    """KL(z ‖ z + εd) = ½ ε² dᵀ Λ(z) d + O(ε³): the link between the Fisher and the KL."""
    lik, z, d = LIKS[name], logits(n=3, seed=4), logits(n=3, seed=6, scale=1.0)
    quad = 0.5 * np.einsum("ni,nij,nj->n", d.numpy(), closed_form_lambda(name, z.numpy()), d.numpy())
    for eps in (1e-2, 1e-3):
        ratio = lik.kl(z, z + eps * d).numpy() / (eps**2 * quad)
        np.testing.assert_allclose(ratio, 1.0, atol=30 * eps)


@pytest.mark.parametrize("name", list(LIKS))
def test_samples_have_the_model_mean(name):
    lik, z, S = LIKS[name], logits(n=3, c=3, seed=7, scale=1.0), 20_000
    draws = lik.sample(z, S, torch.Generator().manual_seed(0))
    again = lik.sample(z, S, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    if name == "categorical":
        assert draws.shape == (3, S) and draws.dtype == torch.int64
        mean = nnf.one_hot(draws, 3).double().mean(1)
        p = torch.softmax(z, -1)
        se = (p * (1 - p) / S).sqrt()
    elif name == "gaussian":
        assert draws.shape == (3, S, 3)
        mean, p, se = draws.mean(1), z, torch.full_like(z, SIGMA / math.sqrt(S))
        assert torch.allclose(draws.std(1), torch.full_like(z, SIGMA), rtol=0.03)
    else:
        assert draws.shape == (3, S, 3) and bool(((draws == 0) | (draws == 1)).all())
        mean, p = draws.mean(1), torch.sigmoid(z)
        se = (p * (1 - p) / S).sqrt()
    assert bool(((mean - p).abs() <= 5 * se).all()), (mean, p)


def test_gaussian_sample_is_independent_of_batching():
    """Drawing rows one at a time gives the same draws as drawing them all at once (same generator)."""
    lik, z = Gaussian(0.5), logits(n=20, c=3)
    gen = torch.Generator().manual_seed(3)
    whole = lik.sample(z, 4, gen)
    gen.manual_seed(3)
    parts = torch.cat([lik.sample(z[i: i + 7], 4, gen) for i in range(0, 20, 7)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_categorical_pieces_draw_the_labels_of_multinomial_piece_by_piece(dtype):
    """sample_pieces equals torch.multinomial on the softmax, piece by piece with one generator, bit for bit (rows
    with zero probabilities included, 1 and 3 samples), and leaves the generator where those draws leave it."""
    z = logits(n=41, c=7, seed=2, scale=3.0).to(dtype)
    z[::4, 2] = -300.0  # probability 0 after the softmax
    lik = Categorical()
    for size, S in ((5, 1), (41, 1), (1, 1), (6, 3)):
        gen, again = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        expected = torch.cat([torch.multinomial(torch.softmax(piece, -1), S, replacement=True, generator=again)
                              for piece in z.split(size)])
        assert torch.equal(lik.sample_pieces(z, size, S, gen), expected), (size, S)
        assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=again))


def test_registry():
    assert isinstance(get_likelihood("categorical"), Categorical)
    g = Gaussian(0.3)
    assert get_likelihood(g) is g and get_likelihood("gaussian", sigma=2.0).sigma == 2.0
    assert {"categorical", "gaussian", "bernoulli"} <= set(LIKELIHOODS)

    class Tempered(Categorical):
        name = "tempered_test"

    try:
        assert register(Tempered) is Tempered and isinstance(get_likelihood("tempered_test"), Tempered)
    finally:
        LIKELIHOODS.pop("tempered_test")
    with pytest.raises(InputError, match="non-empty `name`"):
        register(type("Nameless", (Likelihood,), {}))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(InputError, match="sigma must be positive and finite"):
            Gaussian(bad)


# ------------------------------------------------------------------------------------------------ sequences
@pytest.mark.parametrize("name", list(LIKS))
def test_token_likelihood_against_per_token_closed_forms(name):
    """TokenLikelihood on (n, T·C): c Σ_t m_t ℓ_t, its gradient and Hessian by autograd, c · blockdiag Λ, KL."""
    n, T, C = 3, 4, 4
    base, z = LIKS[name], logits(n=n * T, c=C, seed=8).reshape(n, T * C)
    y = targets(name, z.reshape(n * T, C), seed=9)
    y = y.reshape(n, T) if name == "categorical" else y.reshape(n, T, C)
    if name == "categorical":
        y[0, 2:] = -100
    mask = (y != -100) if name == "categorical" else torch.ones(n, T, dtype=torch.bool)
    tok = TokenLikelihood(base, T, C, num_sequences=5, num_tokens=int(mask.sum()) + 7)  # counts of "all ranks"
    c = 5 / (int(mask.sum()) + 7)
    assert tok.scale == pytest.approx(c) and torch.equal(tok.token_mask(tok.check_targets(z, y)), mask)
    rlik = ref.RefLikelihood(name, SIGMA)
    zt = z.reshape(n, T, C)
    expected = [c * sum(float(rlik.nll(zt[i, t], y[i, t])) for t in range(T) if mask[i, t]) for i in range(n)]
    np.testing.assert_allclose(tok.nll(z, y).numpy(), expected, rtol=1e-13)
    zz = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(tok.nll(zz, y).sum(), zz)
    np.testing.assert_allclose(tok.grad_z(z, y).numpy(), auto.numpy(), rtol=1e-12, atol=1e-15)
    lam = closed_form_lambda(name, zt.reshape(-1, C).numpy()).reshape(n, T, C, C)
    block = np.zeros((n, T * C, T * C))
    for t in range(T):
        block[:, t * C:(t + 1) * C, t * C:(t + 1) * C] = c * lam[:, t]
    B = tok.fisher_factor(z)
    assert B.shape == (n, T * C, T * (C - 1) if name == "categorical" else T * C)
    np.testing.assert_allclose((B @ B.transpose(1, 2)).numpy(), block, rtol=1e-12, atol=1e-15)
    w = logits(n=n, c=T * C, seed=10, scale=1.0)
    np.testing.assert_allclose(tok.fisher_apply(z, w).numpy(), np.einsum("nij,nj->ni", block, w.numpy()),
                               rtol=1e-12, atol=1e-15)
    K = tok.hessian_factor(z, y)
    for i in range(n):
        hess = torch.autograd.functional.hessian(lambda zi, i=i: tok.nll(zi.unsqueeze(0), y[i: i + 1])[0], z[i])
        np.testing.assert_allclose((K[i] @ K[i].T).numpy(), hess.numpy(), atol=1e-13)
    zq = z + 0.2 * logits(n=n, c=T * C, seed=11, scale=1.0)
    kl = [c * sum(kl_brute_force(name, zt[i, t].numpy(), zq.reshape(n, T, C)[i, t].numpy())
                  for t in range(T) if mask[i, t]) for i in range(n)]
    np.testing.assert_allclose(tok.kl(z, zq, y).numpy(), kl, rtol=1e-9)


@pytest.mark.parametrize("name", list(LIKS))
def test_token_likelihood_factors_and_draws_are_per_token(name):
    """true / ggn factors block-diagonal over tokens, empirical / mc rows per sequence, draws per token."""
    n, T, C, S = 2, 3, 4, 5
    base, z = LIKS[name], logits(n=n * T, c=C, seed=12).reshape(n, T * C)
    y = targets(name, z.reshape(n * T, C), seed=13)
    y = y.reshape(n, T) if name == "categorical" else y.reshape(n, T, C)
    tok = TokenLikelihood(base, T, C, num_sequences=n)
    draws = tok.sample(z, S, torch.Generator().manual_seed(1))
    per_token = base.sample(z.reshape(n * T, C), S, torch.Generator().manual_seed(1))
    assert draws.shape == (n, S, T, *per_token.shape[2:])
    for i in range(n):
        for t in range(T):
            assert torch.equal(draws[i, :, t], per_token[i * T + t])
    for kind in FisherKind:
        M = tok.output_factor(kind, z, y, draws)
        MtM = (M.transpose(1, 2) @ M).numpy()
        if kind in (FisherKind.TRUE, FisherKind.GGN):
            other = tok.fisher_factor(z) if kind is FisherKind.TRUE else tok.hessian_factor(z, y)
            np.testing.assert_allclose(MtM, (other @ other.transpose(1, 2)).numpy(), rtol=1e-12, atol=1e-15)
            continue
        g = tok.grad_z(z, y) if kind is FisherKind.EMPIRICAL else torch.stack(
            [tok.grad_z(z, draws[:, s]) for s in range(S)], 1) / math.sqrt(S)
        g = g.reshape(n, -1, T * C)  # rows of the whole sequence's loss: ∇_z ℓ̃_n / √c
        np.testing.assert_allclose(M.numpy(), g.numpy() / math.sqrt(tok.scale), rtol=1e-12, atol=1e-15)
