"""fisherlab.train on a language model: the GPT (output="sequence") on make_sort_lm, every rule, float64.

The objective is the mean cross-entropy over the counted tokens (labels −100 left out), written out here with
log_softmax; g is its autograd gradient. One step of each rule from θ on train's first batch must be:
sgd and momentum −η g; adam −η g / (|g| + ε) (its first step); ngd −η (F + λI)⁻¹ g with F the per-token Fisher
(1/N_tok) Σ_n Σ_t m_nt J_ntᵀ (diag p − p pᵀ) J_nt from per-sample Jacobian loops; kfac-ngd and sngd (structure
kfac) −η G⁻¹ g with G the damped KFAC of the batch (π split written out, to_dense). Then a few steps lower the
token-mean loss, and the token accuracy is the fraction of counted tokens predicted right.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherlab import fisher
from fisherlab.data import iterate_minibatches, make_sort_lm
from fisherlab.likelihoods import get_likelihood
from fisherlab.models import GPT
from fisherlab.params import ParamSpec
from fisherlab.train import RULES, _stepper, train

DT = torch.float64
LAM, LR, BATCH = 0.05, 0.3, 12
TOL = 1e-9
OPTIONS = {"damping": LAM, "momentum": 0.9, "kind": "true", "ngd_solver": "auto", "cg_tol": 1e-6, "split": "pi",
           "structure": "kfac", "kfac_precondition": "auto", "reconstruct_options": {"seed": 0}}


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, object, tuple[Tensor, Tensor]]:
    """A 1-layer GPT with logits at every position (P = 706), sort-lm with k = 3 (6 tokens, 3 counted), float64."""
    data = make_sort_lm(n_samples=48, length=3, n_values=4, seed=1).to(dtype=DT)
    torch.manual_seed(0)
    model = GPT(vocab=data.meta["vocab"], seq_len=6, d_model=8, n_layers=1, n_heads=2, d_ff=16,
                output="sequence").to(DT).eval()
    with torch.no_grad():  # non-trivial norms
        for name, p in model.named_parameters():
            if "ln" in name or name.startswith("norm"):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=DT))
    batch = next(iterate_minibatches(data.X_train, data.y_train, BATCH, 0))  # train's first batch (seed 0)
    return model, data, batch


def token_loss(z: Tensor, y: Tensor) -> Tensor:
    """Σ_{n,t: y ≠ −100} −log softmax(z_nt)[y_nt] / N_tok."""
    mask = y != -100
    picked = F.log_softmax(z, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum()


def gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(token_loss(model(x), y), list(model.parameters()))])


def token_fisher(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(1/N_tok) Σ_n Σ_t m_nt J_ntᵀ (diag p_nt − p_nt p_ntᵀ) J_nt, J by per-sample backward loops."""
    J = ref.jacobians(nn.Sequential(model, nn.Flatten(1)), x)  # (N, T·C, P)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)  # (N, T, C)
    N, T, C = p.shape
    total = 0.0
    for n in range(N):
        for t in range(T):
            if y[n, t] != -100:
                Jt = J[n, t * C:(t + 1) * C]
                total = total + Jt.T @ (torch.diag(p[n, t]) - torch.outer(p[n, t], p[n, t])) @ Jt
    return total / int((y != -100).sum())


def damped_kfac(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Per layer (S + sI) ⊗ (A + aI), a = π√λ, s = √λ/π, π² = (tr A/dim A)/(tr S/dim S); norms B + λI; dense."""
    return ref.damped_kfac_dense(fisher(model, batch, "categorical", structure="kfac"), LAM)


def reference_update(rule: str, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    g = gradient(model, *batch)
    if rule in ("sgd", "momentum"):
        return -LR * g
    if rule == "adam":
        return -LR * g / (g.abs() + 1e-8)
    if rule == "ngd":
        return -LR * torch.linalg.solve(token_fisher(model, *batch) + LAM * torch.eye(len(g), dtype=DT), g)
    return -LR * torch.linalg.solve(damped_kfac(model, batch), g)  # kfac-ngd, sngd (structure kfac)


@pytest.fixture(scope="module")
def references(setup) -> dict[str, Tensor]:
    model, _, batch = setup
    return {rule: reference_update(rule, model, batch) for rule in RULES}


@pytest.mark.parametrize("rule", RULES)
def test_one_step_is_the_reference_update(setup, references, rule: str) -> None:
    model, _, batch = setup
    work = copy.deepcopy(model)
    stepper = _stepper(rule, work, get_likelihood("categorical"), LR, **OPTIONS)
    loss, _ = stepper.step(*batch, True)
    spec = ParamSpec.from_model(model)
    with torch.no_grad():
        assert abs(float(loss) - float(token_loss(model(batch[0]), batch[1]))) < 1e-12  # the token mean
    delta = spec.vector(stepper.model if rule != "sngd" else stepper.model.load_into(copy.deepcopy(model))) \
        - spec.vector(model)
    expected = references[rule]
    error = float((delta - expected).norm() / expected.norm())
    assert error < TOL


@pytest.mark.parametrize("rule", RULES)
def test_train_records_the_token_mean_loss_after_the_reference_step(setup, references, rule: str) -> None:
    """train end to end: train_loss[1] is the token-mean loss of the training split at θ + reference update."""
    model, data, _ = setup
    moved = copy.deepcopy(model)
    spec = ParamSpec.from_model(model)
    with torch.no_grad():
        for name, d in spec.unflatten(references[rule]).items():
            moved.get_parameter(name).add_(d)
        expected = float(token_loss(moved(data.X_train), data.y_train))
    ds = train(model, data, rule=rule, lr=LR, steps=1, batch_size=BATCH, damping=LAM, eval_every=1)
    assert abs(float(ds.train_loss[1]) - expected) < 1e-10 * expected


@pytest.mark.parametrize("rule", RULES)
def test_a_few_steps_lower_the_loss_and_accuracy_counts_tokens(setup, rule: str) -> None:
    model, data, _ = setup
    lr = 0.02 if rule == "adam" else LR  # Adam's steps are ~η per coordinate
    ds = train(model, data, rule=rule, lr=lr, steps=4, batch_size=BATCH, damping=LAM, eval_every=4)
    assert ds.attrs["stopped"] == "no"
    assert float(ds.train_loss[-1]) < float(ds.train_loss[0])
    with torch.no_grad():
        z, y = model(data.X_test), data.y_test
    counted = y != -100
    accuracy = int(((z.argmax(-1) == y) & counted).sum()) / int(counted.sum())
    assert abs(float(ds.test_accuracy[0]) - accuracy) < 1e-12
    assert abs(float(ds.test_loss[0]) - float(token_loss(z, y))) < 1e-12
