"""fisherlab.optim.SNGD: structured NGD as a torch.optim optimizer for the user's own loop."""

from __future__ import annotations

import copy
import io
from functools import cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fisherlab import fisher
from fisherlab.data import iterate_minibatches, load_digits
from fisherlab.errors import InputError
from fisherlab.fidelity import fidelity_trajectory
from fisherlab.models import MLP
from fisherlab.optim import SNGD
from fisherlab.train import train

D = torch.float64


@cache
def digits():
    return load_digits(seed=0, dtype=D).train_subset(256)


def small_mlp():
    torch.manual_seed(0)
    return MLP(64, [16], 10, "tanh").to(D).eval()


def stream(data, batch_size, seed):
    """fisherlab.train's minibatch stream: epoch e in the order of iterate_minibatches(..., seed + e)."""
    epoch = 0
    while True:
        yield from iterate_minibatches(data.X_train, data.y_train, batch_size, seed + epoch)
        epoch += 1


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(model, opt, batches, steps, start=0):
    """The user's loop: zero_grad, backward, step on the step's batch; returns the batch losses."""
    losses = []
    for s in range(start, start + steps):
        x, y = batches[s]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(batch=(x, y))
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("options", [{"structure": "kfac", "damping": 1e-2},
                                     {"structure": "block", "sqrt": "cholesky", "damping": 0.1}])
def test_sngd_reproduces_train_sngd(options):
    data, model = digits(), small_mlp()
    kw = dict(lr=0.2, refresh_every=5, **options)
    ds = train(model, data, rule="sngd", steps=20, batch_size=32, seed=3, eval_every=20, **kw)
    gen = stream(data, 32, 3)
    batches = [next(gen) for _ in range(20)]
    work = copy.deepcopy(model)
    opt = SNGD(work, batches[0], seed=3, **kw)
    losses = run(work, opt, batches, 20)
    np.testing.assert_allclose(losses, ds.loss.values[:20], rtol=1e-12)
    with torch.no_grad():
        final = float(F.cross_entropy(work(data.X_train), data.y_train))
    assert final == pytest.approx(float(ds.train_loss.values[-1]), rel=1e-12)
    assert opt.steps == 20 and opt.network.refreshes == 3  # refreshed before steps 5, 10, 15


def test_sngd_step_is_the_structured_natural_gradient():
    """Step 0 moves θ by −η (G + λ)⁻¹ ∇L, G built independently by fisherlab.fisher (dense: explicit solve)."""
    data, model = digits(), small_mlp()
    x, y = data.X_train[:64], data.y_train[:64]
    for structure in ("dense", "kfac"):
        work = copy.deepcopy(model)
        opt = SNGD(work, (x, y), lr=0.3, damping=1e-2, structure=structure)
        work.zero_grad()
        F.cross_entropy(work(x), y).backward()
        g = torch.cat([p.grad.reshape(-1) for p in work.parameters()])
        theta = flat(work)
        opt.step()
        if structure == "dense":
            G = fisher(model, (x, y), structure="dense").matrix
            expected = -0.3 * torch.linalg.solve(G + 1e-2 * torch.eye(G.shape[0], dtype=D), g)
        else:
            expected = -0.3 * fisher(model, (x, y), structure="kfac").solve(g, 1e-2)
        torch.testing.assert_close(flat(work) - theta, expected, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("options", [{}, {"ema_decay": 0.5, "structure": "block"}])
def test_state_dict_round_trips(options):
    data, model = digits(), small_mlp()
    gen = stream(data, 32, 5)
    batches = [next(gen) for _ in range(20)]
    kw = dict(lr=0.2, damping=1e-2, refresh_every=4, seed=5, **options)
    whole = copy.deepcopy(model)
    run(whole, SNGD(whole, batches[0], **kw), batches, 20)

    first = copy.deepcopy(model)
    opt = SNGD(first, batches[0], **kw)
    run(first, opt, batches, 7)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = small_mlp()  # a fresh model and optimizer (built on other data), then the checkpoint
    resumed.load_state_dict(saved["model"])
    fresh = SNGD(resumed, batches[3], **kw)
    fresh.load_state_dict(saved["optimizer"])
    run(resumed, fresh, batches, 13, start=7)
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert fresh.steps == 20 and fresh.steps_since_refresh == 4  # refreshed before step 16


def test_optimizer_interface_schedules_closure_and_errors():
    data, model = digits(), small_mlp()
    x, y = data.X_train[:64], data.y_train[:64]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    oa = SNGD(a, (x, y), lr=0.2, damping=1e-2)
    ob = SNGD(b, (x, y), lr=0.2, damping=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(ob, lambda step: 0.5)
    assert ob.param_groups[0]["lr"] == 0.1

    def closure():
        oa.zero_grad()
        loss = F.cross_entropy(a(x), y)
        loss.backward()
        return loss

    theta = flat(a)
    loss = oa.step(closure)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(model(x), y).detach()), rel=1e-14)
    ob.zero_grad()
    F.cross_entropy(b(x), y).backward()
    ob.step()
    schedule.step()
    torch.testing.assert_close(flat(b) - theta, 0.5 * (flat(a) - theta), rtol=1e-12, atol=1e-16)
    oa.zero_grad(set_to_none=True)
    assert oa.step() is None and torch.equal(flat(a), flat(a))  # no gradients: no step
    assert oa.steps == 1
    next(a.parameters()).grad = torch.zeros_like(next(a.parameters()))
    with pytest.raises(InputError, match="no gradient"):
        oa.step()
    with pytest.raises(InputError, match="inplace"):
        SNGD(a, (x, y), lr=0.1, inplace=True)
    with pytest.raises(InputError, match="lr"):
        SNGD(a, (x, y), lr=-1.0)
    with pytest.raises(InputError, match="sngd"):
        oa.load_state_dict(torch.optim.SGD(a.parameters(), lr=0.1).state_dict())


def test_sngd_in_fidelity_trajectory_records_its_staleness():
    data, model = digits(), small_mlp()
    x, y = data.X_train[:64], data.y_train[:64]
    opt = SNGD(model, (x, y), lr=0.2, damping=1e-2, refresh_every=3)
    theta = flat(model)
    ds = fidelity_trajectory(model, (x, y), optimizer=opt, rules=["kfac"], steps=4, every=1, damping=1e-2)
    assert torch.equal(flat(model), theta) and opt.steps == 0  # the user's model and optimizer are untouched
    assert list(ds.rule.values) == ["optimizer:SNGD", "kfac"]
    assert list(ds.steps_since_refresh.values) == [0, 1, 2, 3, 1]
    # just after a refresh on the same batch, SNGD's update is the KFAC solve: cosine to NGD equal
    np.testing.assert_allclose(ds.cosine.sel(step=0, rule="optimizer:SNGD"), ds.cosine.sel(step=0, rule="kfac"),
                               rtol=1e-6)
