"""Trajectory mode (training + periodic fidelity) and interruption-safe sweeps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fisherlab.errors import InputError
from fisherlab.fidelity import RULES, evaluate_fidelity, fidelity_trajectory, register_rule
from fisherlab.models import MLP
from fisherlab.results import ResultsStore, new_dataset
from fisherlab.results.sweep import SWEEP_ATTR, config_key, run_sweep
from fisherlab.testing import assert_dataset_close

D = torch.float64
METRICS = ["cosine", "cosine_layer", "rel_error", "fisher_rel_error", "kl_predicted", "kl_measured", "loss_change"]


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = MLP(6, [5], 3, "tanh").double().eval()
    X = torch.randn(32, 6, generator=g, dtype=D)
    y = torch.randint(0, 3, (32,), generator=g)
    return model, X, y


def gd_by_hand(model, X, y, lr, steps):
    """Plain autograd GD on the mean cross-entropy (independent of fisherlab)."""
    model = copy.deepcopy(model)
    for _ in range(steps):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return model


def test_gd_trajectory_matches_hand_trained_states(problem):
    model, X, y = problem
    before = [p.clone() for p in model.parameters()]
    ds = fidelity_trajectory(model, (X, y), train_rule="gd", steps=4, every=2, rules=["gd", "ngd", "block-ngd"],
                             damping=[1e-2, 1e-1], lr=0.05, train_lr=0.5, dtype=D)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # not modified
    assert ds.attrs["fisherlab_kind"] == "fidelity_trajectory"
    assert list(ds["step"].values) == [0, 2, 4]
    assert ds["cosine"].dims == ("step", "rule", "damping")
    np.testing.assert_array_equal(ds["steps_since_refresh"].values, 0)
    for step in (0, 2, 4):
        state = gd_by_hand(model, X, y, 0.5, step)
        ref = evaluate_fidelity(state, (X, y), rules=["gd", "ngd", "block-ngd"], damping=[1e-2, 1e-1], lr=0.05,
                                dtype=D)
        at = ds.sel(step=step).drop_vars("step")
        assert_dataset_close(at[METRICS], ref[METRICS], default=(1e-8, 1e-12))
        assert float(at["loss"]) == pytest.approx(float(ref["loss"]), rel=1e-12)
    assert np.all(np.diff(ds["loss"].values) < 0)  # GD with a small step decreases the loss


def test_reconstructed_training_records_staleness(problem):
    model, X, y = problem
    ds = fidelity_trajectory(model, (X, y), train_rule="sngd-kfac", steps=6, every=1, refresh_every=3,
                             rules=["ngd", "sngd-kfac"], damping=1e-1, lr=0.05, train_lr=0.5, dtype=D)
    train = "train:sngd-kfac"
    assert list(ds["rule"].values) == ["ngd", "sngd-kfac", train]
    np.testing.assert_array_equal(ds["steps_since_refresh"].values, [0, 1, 2, 0, 1, 2, 0])
    fresh = ds.sel({"rule": "sngd-kfac"})["cosine"].values[:, 0]
    trained = ds.sel({"rule": train})["cosine"].values[:, 0]
    refreshed = ds["steps_since_refresh"].values == 0
    # just after a refresh the training update is the fresh reconstructed update at that point
    np.testing.assert_allclose(trained[refreshed], fresh[refreshed], atol=1e-9)
    # between refreshes G is stale: the training update differs from the fresh one
    assert np.all(np.abs(trained[~refreshed] - fresh[~refreshed]) > 1e-6)
    assert np.all(np.isfinite(ds["cosine"].values))


def test_reconstructed_training_with_refresh_every_step_stays_fresh(problem):
    model, X, y = problem
    ds = fidelity_trajectory(model, (X, y), train_rule="sngd-dense", steps=3, every=1, refresh_every=1,
                             rules=["ngd"], damping=1e-1, lr=0.05, train_lr=0.2, dtype=D)
    np.testing.assert_allclose(ds.sel({"rule": "train:sngd-dense"})["cosine"].values, 1.0, atol=1e-10)
    # and training with exact NGD by rule visits the same states
    by_rule = fidelity_trajectory(model, (X, y), train_rule="ngd", steps=3, every=1, rules=["ngd"], damping=1e-1,
                                  lr=0.05, train_lr=0.2, dtype=D)
    np.testing.assert_allclose(ds["loss"].values, by_rule["loss"].values, rtol=1e-9)


def test_diverged_training_leaves_nan_points(problem):
    model, X, y = problem
    register_rule("explode", lambda ctx, damping, lr: torch.full_like(ctx.gradient, float("inf")))
    try:
        ds = fidelity_trajectory(model, (X, y), train_rule="explode", steps=4, every=1, rules=["gd", "ngd"],
                                 damping=1e-1, dtype=D)
    finally:
        RULES.pop("explode")
    assert ds.attrs["diverged_at_step"] == 1
    assert np.isfinite(ds["cosine"].sel(step=0)).all() and np.isnan(ds["cosine"].sel(step=[1, 2, 3, 4])).all()
    assert list(ds["steps_since_refresh"].values) == [0, -1, -1, -1, -1]
    assert set(ds["unavailable_reason"].sel(step=4).values) == {"diverged"}


@pytest.mark.parametrize("kwargs, match", [({"train_rule": "sgd"}, "unknown update rule 'sgd'.*'gd'"),
                                           ({"steps": -1}, "steps"), ({"every": 0}, "every"),
                                           ({"train_rule": "sngd-kfac", "refresh_every": 0}, "refresh_every")])
def test_trajectory_bad_input(problem, kwargs, match):
    model, X, y = problem
    with pytest.raises(InputError, match=match):
        fidelity_trajectory(model, (X, y), rules=["gd"], **kwargs)


# ------------------------------------------------------------------------------------------------- sweeps
def small_dataset(config):
    return new_dataset("fidelity", {"value": ((), float(config["lr"]) * 2)}, config=dict(config), seed=0,
                       device="cpu", dtype=D)


def test_run_sweep_keeps_finished_configs_on_interrupt_and_resumes(tmp_path):
    store = ResultsStore(tmp_path / "sweep")
    configs = [{"lr": lr, "rule": "gd"} for lr in (0.1, 0.2, 0.3, 0.4, 0.5)]
    calls = []

    def interrupted(config):
        calls.append(config["lr"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return small_dataset(config)

    with pytest.raises(KeyboardInterrupt) as info:
        run_sweep(configs, store, interrupted, progress=False)
    assert "2 finished configuration(s) kept" in "".join(getattr(info.value, "__notes__", [""]))
    assert store.keys() == sorted(config_key(c) for c in configs[:2])
    kept = {k: store.load(k) for k in store.keys()}

    calls.clear()
    out = run_sweep(configs, store, lambda c: (calls.append(c["lr"]), small_dataset(c))[1], progress=False)
    assert calls == [0.3, 0.4, 0.5]  # only the unfinished ones ran
    assert list(out) == [config_key(c) for c in configs]
    assert [float(ds["value"]) for ds in out.values()] == [0.2, 0.4, 0.6, 0.8, 1.0]
    for k, ds in kept.items():
        assert ds.attrs["created"] == out[k].attrs["created"]  # loaded, not recomputed
    assert len(store) == 5


def test_run_sweep_refuses_entry_from_other_config(tmp_path):
    store = ResultsStore(tmp_path)
    run_sweep({"a": {"lr": 0.1}}, store, small_dataset, progress=False)
    assert store.load("a").attrs[SWEEP_ATTR] == '{"lr": 0.1}'
    with pytest.raises(InputError, match="different configuration"):
        run_sweep({"a": {"lr": 0.2}}, store, small_dataset, progress=False)
    with pytest.raises(InputError, match="duplicate"):
        run_sweep([{"lr": 0.1}, {"lr": 0.1}], store, small_dataset, progress=False)


def test_trajectory_in_a_shared_context_measures_the_same(problem):
    """Step 0 measured in a context already used (its Fisher and solves reused) gives the same Dataset."""
    from fisherlab.fidelity.rules import RuleContext

    model, X, y = problem
    data = (X, y)
    kwargs = dict(train_rule="sngd-kfac", steps=4, every=2, refresh_every=3, rules=["gd", "ngd", "block-ngd"],
                  damping=[1e-1], lr=0.05, train_lr=0.5, dtype=D)
    alone = fidelity_trajectory(model, data, **kwargs)
    ctx = RuleContext(model, data, "categorical", dtype=D, dampings=(1e-2, 1e-1))
    ctx.natural_gradient(1e-1)  # work of an earlier part: the solve at step 0 is not repeated
    solved = dict(ctx.solves)
    shared = fidelity_trajectory(model, data, **kwargs, context=ctx)
    for var in METRICS + ["loss", "grad_norm"]:
        np.testing.assert_allclose(shared[var].values, alone[var].values, rtol=1e-11, atol=1e-14)
    assert ctx.solves == solved  # step 0 took the context's solve
    with pytest.raises(InputError, match="same data"):
        fidelity_trajectory(model, (X, y), **kwargs, context=ctx)
    with pytest.raises(InputError, match="optimizer"):
        fidelity_trajectory(model, data, optimizer=lambda p: torch.optim.SGD(p, lr=0.1), steps=2, every=1, rules=[],
                            damping=[1e-1], dtype=D, context=ctx)
