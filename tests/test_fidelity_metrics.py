"""Each fidelity metric against a hand computation (numpy float64, textbook formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fisherlab.errors import InputError
from fisherlab.fidelity import metrics
from fisherlab.likelihoods import Categorical, Gaussian
from fisherlab.params import ParamSpec
from fisherlab.structures import DenseFisher
from fisherlab.vocabulary import FisherKind

D = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def spd(n, seed=0):
    A = rand(n, n, seed=seed)
    return A @ A.T + 0.1 * torch.eye(n, dtype=D)


def test_cosine_by_hand():
    u, v = torch.tensor([1.0, 0.0], dtype=D), torch.tensor([1.0, 1.0], dtype=D)
    assert float(metrics.cosine(u, v)) == pytest.approx(1 / math.sqrt(2), abs=1e-15)
    assert float(metrics.cosine(-v, v)) == pytest.approx(-1.0, abs=1e-15)
    U, v = rand(7, 3), rand(7, seed=1)
    Un, vn = U.numpy(), v.numpy()
    expected = [Un[:, k] @ vn / np.linalg.norm(Un[:, k]) / np.linalg.norm(vn) for k in range(3)]
    np.testing.assert_allclose(metrics.cosine(U, v).numpy(), expected, rtol=1e-14)


def test_cosine_of_zero_vector_is_nan():
    assert math.isnan(float(metrics.cosine(torch.zeros(3, dtype=D), rand(3))))


def test_layer_cosines_by_hand():
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 2, bias=False)).double()
    spec = ParamSpec.from_model(model)  # layers "0" (weight 6 + bias 2), "2" (weight 4)
    U, v = rand(spec.dim, 2), rand(spec.dim, seed=3)
    got = metrics.layer_cosines(U, v, spec)
    assert got.shape == (2, 2)
    for k in range(2):
        for row, (a, b) in enumerate([(0, 8), (8, 12)]):
            u_l, v_l = U[a:b, k].numpy(), v[a:b].numpy()
            assert float(got[row, k]) == pytest.approx(u_l @ v_l / np.linalg.norm(u_l) / np.linalg.norm(v_l),
                                                       rel=1e-13)
    np.testing.assert_allclose(metrics.layer_cosines(U[:, 0], v, spec).numpy(), got[:, 0].numpy(), rtol=1e-15)


def test_relative_error_by_hand():
    u, v = torch.tensor([1.0, 2.0, 2.0], dtype=D), torch.tensor([1.0, 0.0, 0.0], dtype=D)
    assert float(metrics.relative_error(u, v)) == pytest.approx(math.sqrt(8), rel=1e-15)
    assert float(metrics.relative_error(v, v)) == 0.0
    assert math.isnan(float(metrics.relative_error(u, torch.zeros(3, dtype=D))))


@pytest.mark.parametrize("form", ["tensor", "callable", "fisher_matrix"])
def test_fisher_relative_error_and_predicted_kl_by_hand(form):
    P = 6
    F = spd(P, seed=4)
    U, v = rand(P, 3, seed=5), rand(P, seed=6)
    spec = ParamSpec((("w"),), (torch.Size([P]),))
    op = {"tensor": F, "callable": lambda W: F @ W,
          "fisher_matrix": DenseFisher(spec, FisherKind.TRUE, D, torch.device("cpu"), 2**30, {}, F)}[form]
    Fn, Un, vn = F.numpy(), U.numpy(), v.numpy()
    want_err = [np.sqrt((Un[:, k] - vn) @ Fn @ (Un[:, k] - vn)) / np.sqrt(vn @ Fn @ vn) for k in range(3)]
    np.testing.assert_allclose(metrics.fisher_relative_error(U, v, op).numpy(), want_err, rtol=1e-13)
    want_kl = [0.5 * Un[:, k] @ Fn @ Un[:, k] for k in range(3)]
    np.testing.assert_allclose(metrics.predicted_kl(U, op).numpy(), want_kl, rtol=1e-13)
    assert float(metrics.predicted_kl(U[:, 1], op)) == pytest.approx(want_kl[1], rel=1e-13)
    assert float(metrics.fisher_relative_error(v, v, op)) == 0.0


def test_fisher_metrics_make_one_product():
    F, calls = spd(5), []

    def op(W):
        calls.append(W.shape)
        return F @ W

    metrics.fisher_relative_error(rand(5, 4), rand(5, seed=1), op)
    metrics.predicted_kl(rand(5, 4), op)
    assert calls == [(5, 5), (5, 4)]


def test_measured_kl_categorical_by_hand():
    z0, z1 = rand(4, 3), rand(4, 3, seed=1)
    p = np.exp(z0.numpy()) / np.exp(z0.numpy()).sum(1, keepdims=True)
    q = np.exp(z1.numpy()) / np.exp(z1.numpy()).sum(1, keepdims=True)
    want = np.mean(np.sum(p * np.log(p / q), axis=1))
    assert float(metrics.measured_kl(Categorical(), z0, z1)) == pytest.approx(want, rel=1e-13)
    assert float(metrics.measured_kl(Categorical(), z0, z0)) == 0.0


def test_measured_kl_gaussian_by_hand():
    z0, z1, sigma = rand(5, 2), rand(5, 2, seed=1), 0.7
    want = np.mean(np.sum((z0.numpy() - z1.numpy()) ** 2, axis=1)) / (2 * sigma**2)
    assert float(metrics.measured_kl(Gaussian(sigma), z0, z1)) == pytest.approx(want, rel=1e-13)


def test_loss_change_by_hand():
    z0, z1, y = rand(4, 3), rand(4, 3, seed=1), torch.tensor([0, 2, 1, 2])

    def ce(z):
        z = z.numpy()
        return np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(4), y.numpy()])

    assert float(metrics.loss_change(Categorical(), z0, z1, y)) == pytest.approx(ce(z1) - ce(z0), rel=1e-13)


def test_shape_errors():
    with pytest.raises(InputError, match=r"shape \(P,\)"):
        metrics.cosine(rand(3), rand(3, 2))
    with pytest.raises(InputError, match="P = 3"):
        metrics.relative_error(rand(4), rand(3))
    with pytest.raises(InputError, match="differ"):
        metrics.measured_kl(Categorical(), rand(2, 3), rand(3, 3))


def test_measured_kl_and_loss_change_of_a_sequence_likelihood_are_token_means():
    """TokenLikelihood on (N, T·C): KL and loss change averaged over the counted tokens only (by hand)."""
    from fisherlab.likelihoods import TokenLikelihood

    N, T, C = 3, 4, 5
    z0, z1 = rand(N, T, C, seed=4), rand(N, T, C, seed=5)
    y = torch.randint(0, C, (N, T), generator=torch.Generator().manual_seed(6))
    y[0, 2:] = y[2, 0] = -100
    mask = y != -100
    lik = TokenLikelihood(Categorical(), T, C, num_sequences=N, num_tokens=int(mask.sum()))
    lp0, lp1 = z0.log_softmax(-1), z1.log_softmax(-1)
    kl = (lp0.exp() * (lp0 - lp1)).sum(-1)[mask].mean()
    nll = [-lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)[mask].mean() for lp in (lp0, lp1)]
    flat0, flat1 = z0.reshape(N, T * C), z1.reshape(N, T * C)
    assert float(metrics.measured_kl(lik, flat0, flat1, y=y)) == pytest.approx(float(kl), rel=1e-13)
    assert float(metrics.loss_change(lik, flat0, flat1, y)) == pytest.approx(float(nll[1] - nll[0]), rel=1e-12)
    with pytest.raises(InputError, match="needs the targets"):
        metrics.measured_kl(lik, flat0, flat1)
