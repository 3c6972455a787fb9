"""Optimizers as update rules (fisherlab.fidelity.optimizers), trajectories of the user's own training and the probe.

References are written here, independently of fisherlab: Adam and momentum SGD from the recorded gradients by
their textbook formulas, gradients by plain autograd, exact NGD by evaluate_fidelity's brute-force-tested path.
"""

from __future__ import annotations

import copy
import importlib
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fisherlab.errors import InputError
from fisherlab.fidelity import (
    FidelityProbe,
    OptimizerRule,
    RuleContext,
    evaluate_fidelity,
    fidelity_trajectory,
    get_rule,
    optimizer_rules,
)
from fisherlab.fidelity import optimizers as opt_rules
from fisherlab.fidelity.rules import FunctionRule
from fisherlab.models import MLP
from fisherlab.optim import SNGD
from fisherlab.testing import assert_tracks_ngd

D = torch.float64
EPS = torch.finfo(D).eps


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = MLP(6, [5], 3, "tanh").to(D).eval()
    X = torch.randn(40, 6, generator=g, dtype=D)
    y = torch.randint(0, 3, (40,), generator=g)
    return model, X, y


def grad_of(model, X, y):
    """∇ mean cross-entropy by plain autograd, flat in named_parameters order."""
    model.zero_grad()
    F.cross_entropy(model(X), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def state_equal(a, b):
    """Two optimizer state dicts equal, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, z) for x, z in zip(a, b, strict=True))
    return a == b


# --------------------------------------------------------------------------------------- exact updates
def test_sgd_rule_equals_gd(problem):
    model, X, y = problem
    ctx = RuleContext(model, (X, y))
    lr = 0.3
    gd = get_rule("gd")(ctx, 1e-3, lr)
    factory = OptimizerRule("sgd", lambda p: torch.optim.SGD(p, lr=lr))
    bound = OptimizerRule(None, torch.optim.SGD(model.parameters(), lr=lr))
    theta = flat(model)
    for rule in (factory, bound):
        u = rule(ctx, 1e-3, lr)
        # Δθ is read as fl(θ − ηg) − θ: exact up to the rounding of θ − ηg, |error| ≤ ε|θ| (half an ulp + slack)
        assert ((u - gd).abs() <= EPS * theta.abs()).all()
    assert bound.name == "optimizer:SGD"
    ds = evaluate_fidelity(model, (X, y), rules=["gd", factory], damping=[1e-3, 1e-1], lr=lr, dtype=D)
    np.testing.assert_allclose(ds.cosine.sel(rule="sgd"), ds.cosine.sel(rule="gd"), rtol=1e-12)
    np.testing.assert_allclose(ds.kl_predicted.sel(rule="sgd"), ds.kl_predicted.sel(rule="gd"), rtol=1e-12)


@pytest.mark.parametrize("cls, wd", [(torch.optim.Adam, 0.0), (torch.optim.AdamW, 0.05)])
def test_adam_after_k_steps_matches_adam_written_out(problem, cls, wd):
    model, X, y = problem
    model = copy.deepcopy(model)
    lr, (b1, b2), eps, k = 0.02, (0.9, 0.99), 1e-8, 4
    opt = cls(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    grads = []
    for _ in range(k):
        grads.append(grad_of(model, X, y))
        opt.step()
    theta = flat(model)
    grads.append(grad_of(model, X, y))  # the gradient of the measured step, at θ_k
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for g in grads:
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
    t = k + 1
    step = -lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    expected = step - lr * wd * theta  # AdamW: θ(1 − ηλ) first (decoupled), then the Adam step
    u = OptimizerRule(None, opt)(RuleContext(model, (X, y)), 1e-3, 0.1)
    torch.testing.assert_close(u, expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_sgd_at_step_k_is_the_momentum_buffer_update(problem, nesterov):
    model, X, y = problem
    model = copy.deepcopy(model)
    lr, mu, wd, k = 0.1, 0.8, 0.01, 5
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
    buf = None
    for _ in range(k):
        g = grad_of(model, X, y) + wd * flat(model)
        buf = g if buf is None else mu * buf + g
        opt.step()
    g = grad_of(model, X, y) + wd * flat(model)
    buf = mu * buf + g
    expected = -lr * (g + mu * buf if nesterov else buf)
    u = OptimizerRule(None, opt)(RuleContext(model, (X, y)), 1e-3, 0.1)
    torch.testing.assert_close(u, expected, rtol=1e-10, atol=1e-15)


def test_param_groups_schedules_and_frozen_parameters(problem):
    model, X, y = problem
    model = copy.deepcopy(model)
    model.layers[0].bias.requires_grad_(False)  # frozen: not part of θ
    first, last = model.layers[0], model.layers[2]
    opt = torch.optim.SGD([{"params": [first.weight], "lr": 0.1}, {"params": list(last.parameters())}], lr=0.01)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        grad_of(model, X, y)
        opt.step()
        schedule.step()
    # lr now 0.05 (group 0) and 0.005 (group 1)
    ctx = RuleContext(model, (X, y))
    assert ctx.spec.names == ("layers.0.weight", "layers.2.weight", "layers.2.bias")
    g = ctx.gradient
    n0 = first.weight.numel()
    u = OptimizerRule(None, opt)(ctx, 1e-3, 0.1)
    torch.testing.assert_close(u[:n0], -0.05 * g[:n0], rtol=1e-12, atol=1e-16)
    torch.testing.assert_close(u[n0:], -0.005 * g[n0:], rtol=1e-12, atol=1e-16)
    assert opt.param_groups[0]["lr"] == 0.05 and schedule.last_epoch == 3


class _ScalesItsGradient(torch.optim.SGD):
    """SGD that doubles ``.grad`` in place before stepping (some optimizers write into the gradient)."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad.mul_(2)
        return super().step(closure)


def test_an_optimizer_that_writes_into_the_gradient_leaves_the_context_intact(problem):
    model, X, y = problem
    ctx = RuleContext(model, (X, y))
    g = ctx.gradient.clone()
    u = OptimizerRule(None, _ScalesItsGradient(model.parameters(), lr=0.1))(ctx, 1e-3, 0.1)
    assert torch.equal(ctx.gradient, g)  # repaired: the other rules still see ∇L
    assert ((u + 0.2 * g).abs() <= EPS * flat(model).abs()).all()


# ------------------------------------------------------------------------------------- invisibility
def _make(name, model, X, y):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01)
    if name == "lbfgs":
        return torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=3)
    return SNGD(model, (X, y), lr=0.2, damping=1e-2, refresh_every=3, structure="kfac")


def _train(name, problem, probe_every):
    """A user's loop: random minibatches drawn from the global generators; a probe every step, or never."""
    model, X, y = problem
    model = copy.deepcopy(model)
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    opt = _make(name, model, X, y)
    probe = FidelityProbe(model, (X, y), rules=["gd"], every=1, damping=[1e-3, 1e-1]) if probe_every else None
    before = after = None
    for step in range(6):
        idx = torch.randperm(40)[:16 + int(np.random.randint(0, 8)) + random.randint(0, 4)]
        xb, yb = X[idx], y[idx]

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        if probe is not None:
            before = copy.deepcopy(opt.state_dict())
            assert probe(step, opt)
            after = opt.state_dict()
            assert state_equal(before, after)
        if name == "lbfgs":
            opt.step(closure)
        else:
            closure()
            opt.step(**({"batch": (xb, yb)} if name == "sngd" else {}))
    return model, opt, probe


@pytest.mark.parametrize("name", ["sgd", "adam", "lbfgs", "sngd"])
def test_measuring_is_invisible(problem, name):
    plain, plain_opt, _ = _train(name, problem, probe_every=False)
    measured, measured_opt, probe = _train(name, problem, probe_every=True)
    for a, b in zip(plain.parameters(), measured.parameters(), strict=True):
        assert torch.equal(a, b)
    assert state_equal(plain_opt.state_dict(), measured_opt.state_dict())
    ds = probe.dataset()
    assert list(ds.step.values) == list(range(6))
    assert list(ds.rule.values) == [f"optimizer:{type(plain_opt).__name__}", "gd"]
    assert ds.available.all() and np.isfinite(ds.cosine).all()
    if name == "sngd":  # the probe records how stale the optimizer's G was
        assert list(ds.steps_since_refresh.values) == [0, 1, 2, 3, 1, 2]


def test_trajectory_measured_every_step_equals_one_measured_rarely(problem):
    model, X, y = problem
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    state = copy.deepcopy(opt.state_dict())
    theta = flat(model)
    kw = dict(optimizer=opt, rules=["gd", "ngd"], steps=6, damping=1e-2, dtype=D)
    every = fidelity_trajectory(model, (X, y), every=1, **kw)
    rarely = fidelity_trajectory(model, (X, y), every=3, **kw)
    assert torch.equal(flat(model), theta) and state_equal(opt.state_dict(), state)  # the user's are untouched
    sel = every.sel(step=[0, 3, 6])
    for var in ("loss", "cosine", "fisher_rel_error", "kl_measured"):
        np.testing.assert_array_equal(sel[var].values, rarely[var].values)
    assert every.attrs["train_rule"] == "optimizer:Adam" and list(every.rule.values)[0] == "optimizer:Adam"
    assert every.cosine.attrs["scale_dependent"] == 0 and every.rel_error.attrs["scale_dependent"] == 1


def test_trajectory_follows_the_optimizer_and_measures_its_update(problem):
    """The trajectory's states are those of a hand-written Adam loop, and its measured update is Adam's."""
    model, X, y = problem
    lr = 0.02
    ds = fidelity_trajectory(model, (X, y), optimizer=lambda p: torch.optim.Adam(p, lr=lr), rules=["gd"],
                             steps=4, every=2, damping=1e-2, dtype=D)
    hand = copy.deepcopy(model)
    m = v = 0
    for step in range(5):
        g = grad_of(hand, X, y)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        update = -lr * (m / (1 - 0.9 ** (step + 1))) / ((v / (1 - 0.999 ** (step + 1))).sqrt() + 1e-8)
        if step in (0, 2, 4):
            ref = evaluate_fidelity(hand, (X, y), rules=[FunctionRule("hand", lambda *_, u=update: u)],
                                    damping=1e-2, dtype=D)
            at = ds.sel(step=step, rule="optimizer:Adam")
            assert float(at.loss) == pytest.approx(float(ref.loss), rel=1e-12)
            np.testing.assert_allclose(at.cosine, ref.cosine.sel(rule="hand"), rtol=1e-8)
            np.testing.assert_allclose(at.update_norm, ref.update_norm.sel(rule="hand"), rtol=1e-8)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat(hand) + update, hand.parameters())


def test_trajectory_with_lbfgs_steps_as_a_hand_written_closure_loop(problem):
    model, X, y = problem
    factory = lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=3, history_size=4)  # noqa: E731
    ds = fidelity_trajectory(model, (X, y), optimizer=factory, rules=["gd"], steps=3, every=1, damping=1e-2,
                             dtype=D)
    hand = copy.deepcopy(model)
    opt = factory(list(hand.parameters()))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(hand(X), y)
        loss.backward()
        return loss

    for step in range(4):
        with torch.no_grad():
            loss = float(F.cross_entropy(hand(X), y))
        assert float(ds.loss.sel(step=step)) == pytest.approx(loss, rel=1e-10)
        theta = flat(hand)
        opt.step(closure)
        if step < 3:  # the measured update is the step LBFGS then takes
            norm = float((flat(hand) - theta).norm())
            assert float(ds.update_norm.sel(step=step, rule="optimizer:LBFGS", damping=1e-2)) == pytest.approx(
                norm, rel=1e-8)


# ----------------------------------------------------------------------------------------- built-ins
def test_builtin_rules_warm_up_from_the_current_state(problem):
    model, X, y = problem
    lr, k = 0.1, 3
    # momentum (SGD, μ = 0.9) after k warm-up steps on the batch, parameters reset to θ, by hand
    hand = copy.deepcopy(model)
    theta = flat(hand)
    buf = None
    for _ in range(k):
        g = grad_of(hand, X, y)
        buf = g if buf is None else 0.9 * buf + g
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat(hand) - lr * buf, hand.parameters())
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, hand.parameters())
    expected = -lr * (0.9 * buf + grad_of(hand, X, y))
    rule = OptimizerRule("m3", lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), warmup=k, takes_lr=True)
    ctx = RuleContext(model, (X, y))
    torch.testing.assert_close(rule(ctx, 1e-3, lr), expected, rtol=1e-10, atol=1e-15)
    # no warm-up: Adam's first step is the stateless rule "adam", −η g / (|g| + ε)
    first = OptimizerRule("a0", lambda p, lr: torch.optim.Adam(p, lr=lr), takes_lr=True)
    torch.testing.assert_close(first(ctx, 1e-3, lr), get_rule("adam")(ctx, 1e-3, lr), rtol=1e-12, atol=1e-16)
    assert torch.equal(flat(model), theta)  # the context's model is untouched


def test_every_available_builtin_rule_evaluates(problem):
    model, X, y = problem
    table = optimizer_rules()
    assert set(table) == set(opt_rules._BUILTINS)
    names = [n for n, status in table.items() if status == "available"]
    assert {"momentum", "nesterov", "adam-warm", "adamw", "adagrad", "rmsprop"} <= set(names)
    assert ("muon" in names) == hasattr(torch.optim, "Muon")
    ds = evaluate_fidelity(model, (X, y), rules=names, damping=1e-2, lr=0.05, dtype=D)
    assert ds.available.all() and np.isfinite(ds.cosine).all() and (ds.update_norm > 0).all()


def test_missing_library_says_what_to_install(problem, monkeypatch):
    model, X, y = problem
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # importing it now raises ImportError
    assert "fisherlab[optimizers]" in optimizer_rules()["shampoo"]
    with pytest.raises(InputError, match=r"pytorch_optimizer.*fisherlab\[optimizers\]"):
        evaluate_fidelity(model, (X, y), rules=["shampoo"], dtype=D)


@pytest.mark.skipif(importlib.util.find_spec("pytorch_optimizer") is None, reason="pytorch-optimizer not installed")
def test_library_rules_evaluate_and_are_invisible(problem):
    model, X, y = problem
    ds = evaluate_fidelity(model, (X, y), rules=["shampoo", "soap", "psgd-kron"], damping=1e-2, lr=0.01, dtype=D)
    assert ds.available.all() and np.isfinite(ds.cosine).all()
    import pytorch_optimizer

    work = copy.deepcopy(model)
    opt = pytorch_optimizer.Kron(work.parameters(), lr=0.01)  # draws from NumPy's generator in its step
    grad_of(work, X, y)
    opt.step()
    state, theta, np_state = copy.deepcopy(opt.state_dict()), flat(work), np.random.get_state()
    OptimizerRule(None, opt)(RuleContext(work, (X, y)), 1e-3, 0.1)
    assert state_equal(opt.state_dict(), state) and torch.equal(flat(work), theta)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch has no Muon")
def test_muon_with_adamw_is_muon_on_matrices_and_adamw_on_the_rest(problem):
    model, X, y = problem
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    mixed = opt_rules.MuonWithAdamW(a.parameters(), lr=0.02, weight_decay=0.1)
    mats = [p for p in b.parameters() if p.ndim == 2]
    rest = [p for p in b.parameters() if p.ndim != 2]
    muon = torch.optim.Muon(mats, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=0.02, weight_decay=0.1)
    for _ in range(3):
        grad_of(a, X, y)
        grad_of(b, X, y)
        mixed.step()
        muon.step()
        adamw.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    restored = opt_rules.MuonWithAdamW(copy.deepcopy(model).parameters(), lr=0.02)
    restored.load_state_dict(copy.deepcopy(mixed.state_dict()))
    assert state_equal(restored.state_dict(), mixed.state_dict())


# --------------------------------------------------------------------------------------------- errors
class _Failing(torch.optim.SGD):
    def step(self, closure=None):
        super().step(closure)  # moves the parameters and the state ...
        raise RuntimeError("the optimizer broke")  # ... and then fails


def test_bad_inputs_are_named_errors(problem):
    model, X, y = problem
    model = copy.deepcopy(model)
    ctx = RuleContext(model, (X, y))
    other = copy.deepcopy(model)
    with pytest.raises(InputError, match="not parameters of the model"):
        OptimizerRule(None, torch.optim.SGD(other.parameters(), lr=0.1))(ctx, 1e-3, 0.1)
    with pytest.raises(InputError, match=r"\['layers.2.weight', 'layers.2.bias'\] are not in the optimizer"):
        OptimizerRule(None, torch.optim.SGD(model.layers[0].parameters(), lr=0.1))(ctx, 1e-3, 0.1)
    with pytest.raises(InputError, match="closure"):
        OptimizerRule(None, torch.optim.LBFGS(model.parameters()), closure=False)
    with pytest.raises(InputError, match="SparseAdam"):
        OptimizerRule(None, torch.optim.SparseAdam(model.parameters()))
    with pytest.raises(InputError, match="sparse"):
        fidelity_trajectory(nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)),
                            (torch.randint(0, 5, (8, 2)), torch.randint(0, 2, (8,))),
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1), steps=1)
    failing = _Failing(model.parameters(), lr=0.1, momentum=0.9)
    grad_of(model, X, y)
    torch.optim.SGD.step(failing)  # one good step: a momentum buffer exists
    state, theta = copy.deepcopy(failing.state_dict()), flat(model)
    with pytest.raises(InputError, match="the optimizer broke") as info:
        OptimizerRule(None, failing)(RuleContext(model, (X, y)), 1e-3, 0.1)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert state_equal(failing.state_dict(), state) and torch.equal(flat(model), theta)  # restored
    with pytest.raises(InputError, match="name"):
        OptimizerRule(None, lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(InputError, match="not both"):
        fidelity_trajectory(model, (X, y), train_rule="gd", optimizer=failing)
    with pytest.raises(InputError, match="increase"):
        probe = FidelityProbe(model, (X, y), every=1)
        probe(2, torch.optim.SGD(model.parameters(), lr=0.1))
        probe(1, torch.optim.SGD(model.parameters(), lr=0.1))


def test_assert_tracks_ngd_over_an_optimizer_trajectory(problem):
    model, X, y = problem
    ds = assert_tracks_ngd(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), model=model, data=(X, y),
                           min_cosine=0.0, steps=2, every=1, damping=1e-2)
    cosines = ds.cosine.sel(rule="optimizer:SGD").values.ravel()
    with pytest.raises(AssertionError, match=r"optimizer 'optimizer:SGD' does not track exact NGD: step 0"):
        assert_tracks_ngd(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), model=model, data=(X, y),
                          min_cosine=float(cosines.max()) + 1e-3, steps=2, every=1, damping=1e-2)
    assert_tracks_ngd("ngd", model, (X, y), min_cosine=0.999999, steps=2, every=1, damping=1e-2, lr=0.05)
    with pytest.raises(InputError, match="exactly one"):
        assert_tracks_ngd("gd", model, (X, y), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          min_cosine=0.1)


def test_golden_fidelity_curve_of_an_optimizer(problem, golden):
    model, X, y = problem
    ds = fidelity_trajectory(model, (X, y), optimizer=lambda p: torch.optim.Adam(p, lr=0.01), rules=["gd"],
                             steps=6, every=2, damping=[1e-3, 1e-1], dtype=D)
    golden.check("optimizer_trajectory_tiny_mlp", ds[["cosine", "cosine_layer", "fisher_rel_error", "loss"]],
                 {"cosine": (1e-8, 1e-12), "cosine_layer": (1e-8, 1e-12), "fisher_rel_error": (1e-8, 1e-12)})
