"""fisherlab.train: one loop for SGD, momentum, Adam, exact NGD, KFAC-NGD and SNGD, recorded as xarray Datasets."""

from __future__ import annotations

import copy
from functools import cache

import numpy as np
import pytest
import torch
from torch import nn

from fisherlab.data import SplitData, load_digits
from fisherlab.errors import InputError
from fisherlab.models import MLP, build_model
from fisherlab.params import ParamSpec
from fisherlab.results import config_of
from fisherlab.train import RULES, best_runs, compare, sweep_lr, train

LRS = {"sgd": 0.2, "momentum": 0.05, "adam": 3e-3, "ngd": 0.3, "kfac-ngd": 0.3, "sngd": 0.3}


@cache
def digits(dtype: torch.dtype = torch.float32) -> SplitData:
    return load_digits(seed=0, dtype=dtype).train_subset(256)


def small_mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return MLP(64, [16], 10, "tanh").to(dtype).eval()


def test_every_method_starts_from_the_same_point_and_learns() -> None:
    model, data = small_mlp(), digits()
    state = copy.deepcopy(model.state_dict())
    runs = {m: train(model, data, rule=m, lr=LRS[m], steps=40, batch_size=32, eval_every=20, damping=0.1)
            for m in RULES}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the model is untouched
    first = {m: float(r.loss[0]) for m, r in runs.items()}
    # same initial batch loss: same init, same first batch (sngd evaluates it through the reconstructed network)
    assert len({v for m, v in first.items() if m != "sngd"}) == 1, first
    assert abs(first["sngd"] - first["sgd"]) < 1e-5 * first["sgd"]
    for m, r in runs.items():
        assert float(r.train_loss[-1]) < 0.7 * float(r.train_loss[0]), m
        assert float(r.test_accuracy[-1]) > 0.5, m
        assert r.attrs["diverged"] == 0
    assert runs["kfac-ngd"].refresh.values[:11].tolist() == [1] + [0] * 9 + [1]
    assert runs["ngd"].refresh.values[:-1].all() and not runs["sgd"].refresh.values.any()


def test_dataset_layout_and_provenance() -> None:
    ds = train(small_mlp(), digits(), rule="sngd", lr=0.2, steps=12, batch_size=32, eval_every=5, seed=3,
               structure="unit", refresh_every=4)
    assert ds.sizes == {"step": 13}
    assert set(ds.data_vars) == {"loss", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "time",
                                 "cpu_time", "refresh"}
    assert np.isnan(ds.loss[-1]) and not np.isnan(ds.loss[:-1]).any()
    evaluated = ~np.isnan(ds.train_loss.values)
    assert np.flatnonzero(evaluated).tolist() == [0, 5, 10, 12]
    assert ds.refresh.values.nonzero()[0].tolist() == [0, 4, 8]
    assert (np.diff(ds.time.values) > 0).all() and ds.time[0] == 0 and (np.diff(ds.cpu_time.values) >= 0).all()
    assert ds.attrs["fisherlab_kind"] == "training" and ds.attrs["seed"] == 3 and ds.attrs["rule"] == "sngd"
    assert '"structure": "unit"' in ds.attrs["config"]
    assert ds.loss.attrs["units"] == "1" and ds.loss.attrs["comment"] == "natural-log units (nats)"


def test_same_seed_same_numbers_other_seed_other_batches() -> None:
    model, data = small_mlp(), digits()
    for method in ("sgd", "sngd"):
        a, b = (train(model, data, rule=method, lr=0.1, steps=8, batch_size=32, eval_every=4, seed=1)
                for _ in range(2))
        for var in ("loss", "train_loss", "test_accuracy", "refresh"):
            np.testing.assert_array_equal(a[var].values, b[var].values)
    c = train(model, data, rule="sgd", lr=0.1, steps=8, batch_size=32, eval_every=4, seed=2)
    assert not np.array_equal(a.loss.values[1:], c.loss.values[1:])


@pytest.mark.parametrize(("kind", "sqrt"), [("true", "eigh"), ("mc", "eigh"), ("true", "cholesky")])
def test_sngd_equals_kfac_ngd_with_the_same_refresh_schedule(kind: str, sqrt: str) -> None:
    """Between refreshes GD on θ' is −η G⁻¹∇L with G frozen: exactly KFAC-NGD with cached inverses."""
    model, data = small_mlp(torch.float64), digits(torch.float64)
    kw = {"lr": 0.3, "steps": 15, "batch_size": 32, "eval_every": 5, "damping": 0.05, "refresh_every": 4,
          "kind": kind, "seed": 4}
    a = train(model, data, rule="kfac-ngd", **kw)
    b = train(model, data, rule="sngd", structure="kfac", sqrt=sqrt, **kw)
    np.testing.assert_allclose(b.loss.values[:-1], a.loss.values[:-1], rtol=1e-12)
    np.testing.assert_allclose(b.train_loss.values, a.train_loss.values, rtol=1e-12)


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_kfac_ngd_preconditioning_forms_take_the_same_steps(model_name: str) -> None:
    """(S⁻¹Δᵀ)(ĀA⁻¹) from the rows (Linear layers) equals S⁻¹∇W̄A⁻¹ from the gradient matrix."""
    data = digits(torch.float64) if model_name == "mlp" else load_digits(seed=0, layout="image", dtype=torch.float64)
    model = small_mlp(torch.float64) if model_name == "mlp" else \
        build_model("cnn", data, seed=0, dtype=torch.float64, channels=(4,)).eval()
    kw = {"lr": 0.3, "steps": 8, "batch_size": 16, "eval_every": 4, "damping": 0.05, "refresh_every": 3}
    runs = {mode: train(model, data, rule="kfac-ngd", kfac_precondition=mode, **kw)
            for mode in ("dense", "factored", "auto")}
    for mode in ("factored", "auto"):
        np.testing.assert_allclose(runs[mode].loss.values[:-1], runs["dense"].loss.values[:-1], rtol=1e-10)
        np.testing.assert_allclose(runs[mode].train_loss.values, runs["dense"].train_loss.values, rtol=1e-10)
    assert config_of(runs["factored"])["kfac_precondition"] == "factored"
    with pytest.raises(InputError, match="kfac_precondition"):
        train(model, data, rule="kfac-ngd", kfac_precondition="sparse", **kw)


def test_compare_and_sweep() -> None:
    model, data = small_mlp(), digits()
    common = {"steps": 6, "batch_size": 32, "eval_every": 3}
    ds = compare(model, data, {"sgd": {"lr": 0.1}, "sngd-kfac": {"rule": "sngd", "lr": 0.1}}, **common)
    assert ds.sizes == {"rule": 2, "step": 7}
    assert ds.rule.values.tolist() == ["sgd", "sngd-kfac"] and ds.lr.values.tolist() == [0.1, 0.1]
    first = ds.loss.isel(step=0).values
    assert abs(first[0] - first[1]) < 1e-5 * first[0]
    assert ds.refresh.sel({"rule": "sngd-kfac"}).values[0] == 1
    sweep = sweep_lr(model, data, {"sgd": {}, "adam": {}}, {"sgd": [0.01, 0.3], "adam": [1e-3]}, **common)
    assert sweep.sizes == {"rule": 2, "candidate": 2, "step": 7}
    adam = sweep.sel({"rule": "adam"})
    assert np.isnan(adam.lr.values[1]) and adam.diverged.values[1] == 1
    final = sweep.train_loss.sel({"rule": "sgd"}).isel(step=-1).values
    assert sweep.best.sel({"rule": "sgd"}) == int(np.argmin(final)) and sweep.best.sel({"rule": "adam"}) == 0
    best = best_runs(sweep)
    assert best.sizes == {"rule": 2, "step": 7}
    assert float(best.lr.sel({"rule": "sgd"})) == [0.01, 0.3][int(np.argmin(final))]


def test_divergence_is_recorded() -> None:
    torch.manual_seed(0)
    relu = MLP(64, [16, 16], 10, "relu").eval()
    ds = train(relu, digits(), rule="sgd", lr=1e30, steps=20, batch_size=32, eval_every=5)
    assert ds.attrs["diverged"] == 1
    assert np.isnan(ds.loss.values[-3:]).all()


def test_curvature_breakdown_stops_the_run() -> None:
    torch.manual_seed(0)
    dead = MLP(64, [8], 10, "relu").eval()
    with torch.no_grad():
        dead.layers[0].bias.fill_(-1e3)  # every hidden unit dead: the first layer's S factor is 0
    ds = train(dead, digits(), rule="kfac-ngd", lr=0.1, steps=5, batch_size=32, eval_every=5)
    assert ds.attrs["diverged"] == 1 and "SingularMatrixError" in ds.attrs["stopped"]
    assert np.isnan(ds.loss.values).all()


def test_bad_input() -> None:
    model, data = small_mlp(), digits()
    with pytest.raises(InputError, match="unknown training rule"):
        train(model, data, rule="lbfgs", lr=0.1, steps=2)
    with pytest.raises(InputError, match="steps"):
        train(model, data, rule="sgd", lr=0.1, steps=0)
    with pytest.raises(InputError, match="lr"):
        train(model, data, rule="sgd", lr=-1.0, steps=2)
    with pytest.raises(InputError, match="SplitData"):
        train(model, (data.X_train, data.y_train), rule="sgd", lr=0.1, steps=2)
    dropout = nn.Sequential(nn.Linear(64, 8), nn.Dropout(0.2), nn.Linear(8, 10))
    with pytest.raises(InputError, match="Dropout"):
        train(dropout, data, rule="sgd", lr=0.1, steps=2)


def test_param_spec_order_of_updates() -> None:
    """KFAC-NGD's per-layer gather/scatter puts each update on its own parameter (checked against SGD at λ → ∞)."""
    model, data = small_mlp(torch.float64), digits(torch.float64)
    lam = 1e16  # (S + sI) ⊗ (A + aI) ≈ λ I: KFAC-NGD with lr·λ is SGD with lr
    a = train(model, data, rule="kfac-ngd", lr=0.1 * lam, steps=3, batch_size=32, eval_every=1, damping=lam,
              split="sqrt")
    b = train(model, data, rule="sgd", lr=0.1, steps=3, batch_size=32, eval_every=1)
    np.testing.assert_allclose(a.train_loss.values, b.train_loss.values, rtol=1e-5)
    assert ParamSpec.from_model(model).dim == 64 * 16 + 16 + 16 * 10 + 10


@pytest.mark.slow
def test_training_comparison_analysis_quick(tmp_path) -> None:
    """analyses/training_comparison.py --quick writes its Datasets and figures and returns the summary."""
    import importlib.util
    import sys
    from pathlib import Path

    from fisherlab.results import load_dataset

    path = Path(__file__).resolve().parents[1] / "analyses" / "training_comparison.py"
    spec = importlib.util.spec_from_file_location("training_comparison", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    threads = torch.get_num_threads()
    try:
        spec.loader.exec_module(module)
        summary = module.main(["--quick", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
        del sys.modules[spec.name]
    problems = [p.name for p in module.PROBLEMS]
    for name in problems:
        runs = load_dataset(tmp_path / f"runs_{name}.nc", kind="training")
        assert runs.sizes["seed"] == 2 and runs.sizes["step"] == 5
        assert load_dataset(tmp_path / f"sweep_{name}.nc").sizes["candidate"] == 2
    assert (tmp_path / "training_comparison.png").stat().st_size > 0 and (tmp_path / "training_comparison.svg").exists()
    assert summary.problem.values.tolist() == problems
    assert np.isnan(summary.lr.sel({"problem": "mnist1d-mlp", "rule": "ngd"}))
    assert summary.lr.sel({"problem": "digits-mlp", "rule": "ngd"}) > 0
    # Cholesky roots take the KFAC-NGD steps (invariant 2 over the run), so both pick the same lr and curve
    wide = load_dataset(tmp_path / "runs_digits-wide.nc", kind="training")
    assert float(wide.lr.sel({"rule": "sngd-kfac-cholesky"})[0]) == float(wide.lr.sel({"rule": "kfac-ngd"})[0])
    np.testing.assert_allclose(wide.loss.sel({"rule": "sngd-kfac-cholesky"}).values[:, :-1],
                               wide.loss.sel({"rule": "kfac-ngd"}).values[:, :-1], rtol=1e-4)
