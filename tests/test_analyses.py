"""The analyses in analyses/ run in --quick mode, write valid Datasets and a report, and resume without recomputing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from fisherlab.data import load_digits
from fisherlab.models import build_model
from fisherlab.results import load_dataset

ANALYSES = Path(__file__).parents[1] / "analyses"


def load_analysis(name: str) -> ModuleType:
    """Import analyses/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", ANALYSES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(name: str, out: Path) -> ModuleType:
    module = load_analysis(name)
    module.main(["--quick", "--threads", "1", "--out", str(out)])
    return module


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, tuple[ModuleType, Path]]:
    done = {}
    for name in ("spectra_during_training", "fidelity_vs_damping_batch", "staleness", "lowrank_roots"):
        out = tmp_path_factory.mktemp(name)
        done[name] = (run(name, out), out)
    return done


def check_report(out: Path) -> None:
    page = (out / "report.html").read_text()
    files = sorted(out.glob("*.nc"))
    assert files
    for f in files:
        assert f.name in page


def mtimes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in sorted(folder.glob("*.nc"))}


@pytest.fixture
def without_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun skips drawing report.html again (most of a resumed quick run's time): the resume tests assert on the
    store only, and each first run's report is checked by check_report."""
    from fisherlab import report

    monkeypatch.setattr(report, "build_report", lambda out, **_: Path(out) / "report.html")


def test_spectra_during_training(outputs) -> None:
    module, out = outputs["spectra_during_training"]
    cfg = module.QUICK
    ds = load_dataset(out / "spectra_during_training.nc", kind="spectrum_trajectory",
                      required_dims=("step", "kind", "structure", "eig", "damping"))
    assert ds.step.values.tolist() == list(range(0, cfg.steps + 1, cfg.checkpoint_every))
    assert set(ds.kind.values) == set(cfg.kinds)
    ev = ds.eigenvalue.values
    assert np.isfinite(ev).all()
    assert ev.min() > -1e-10 * np.abs(ev).max()  # Fisher matrices are PSD
    true_dense = ds.rel_frobenius_to_true.sel({"kind": "true", "structure": "dense"}).values
    np.testing.assert_allclose(true_dense, 0.0, atol=1e-12)
    # independent reference at step 0: trace of the empirical Fisher = mean squared per-sample gradient norm
    data = load_digits(seed=0, dtype=torch.float64)
    model = build_model("mlp", data, seed=0, dtype=torch.float64, widths=cfg.widths).eval()
    n = cfg.fisher_samples
    sq = 0.0
    for x, y in zip(data.X_train[:n], data.y_train[:n], strict=True):
        loss = torch.nn.functional.cross_entropy(model(x[None]), y[None])
        sq += sum(float((g**2).sum()) for g in torch.autograd.grad(loss, list(model.parameters())))
    trace = float(ds.trace.sel({"step": 0, "kind": "empirical", "structure": "dense"}))
    assert trace == pytest.approx(sq / n, rel=1e-9)
    training = load_dataset(out / "training.nc", kind="training")
    assert np.isfinite(training.loss.values[:-1]).all()
    check_report(out)


def test_fidelity_vs_damping_batch(outputs) -> None:
    module, out = outputs["fidelity_vs_damping_batch"]
    cfg = module.QUICK
    ds = load_dataset(out / "fidelity_vs_damping_batch.nc", kind="fidelity_batch",
                      required_dims=("rule", "damping", "batch_size"))
    assert ds.batch_size.values.tolist() == list(cfg.batch_sizes)
    assert ds.rule.values.tolist() == list(cfg.rules)
    cos = ds.cosine.values
    assert np.isfinite(cos).all() and (np.abs(cos) <= 1 + 1e-12).all()
    assert (ds.fisher_rel_error.values >= 0).all()
    # exact NGD is the reference itself; GD on the network reconstructed with its own structure equals that
    # structure's NGD step (invariant 2), so their cosines agree
    np.testing.assert_allclose(ds.cosine.sel({"rule": "ngd"}).values, 1.0, atol=1e-10)
    np.testing.assert_allclose(ds.cosine.sel({"rule": "sngd-kfac"}).values,
                               ds.cosine.sel({"rule": "kfac"}).values, atol=1e-8)
    check_report(out)


def test_staleness(outputs) -> None:
    module, out = outputs["staleness"]
    cfg = module.QUICK
    ds = load_dataset(out / "staleness.nc", kind="staleness",
                      required_dims=("train_rule", "refresh_every", "step", "rule"))
    assert ds.refresh_every.values.tolist() == list(cfg.refresh_every)
    assert ds.step.values.tolist() == list(range(cfg.steps + 1))
    cos = ds.cosine.values
    assert np.isfinite(cos).all() and (np.abs(cos) <= 1 + 1e-12).all()
    since = ds.steps_since_refresh
    for r in cfg.refresh_every:  # G refreshed every r steps: staleness counts 0, 1, ..., r-1, 0, ...
        expected = [s % r for s in range(cfg.steps + 1)]
        assert since.sel({"refresh_every": r}).values.tolist() == [expected] * len(cfg.train_rules)
    # a just-refreshed network's step is the fresh structured NGD step
    for train_rule, fresh in (("sngd-kfac", "kfac"), ("sngd-block", "block-ngd")):
        sel = ds.sel({"train_rule": train_rule}).isel(damping=0)
        mask = sel.steps_since_refresh.values == 0
        np.testing.assert_allclose(sel.cosine.sel({"rule": module.TRAIN}).values[mask],
                                   sel.cosine.sel({"rule": fresh}).values[mask], atol=1e-8)
    check_report(out)


def test_lowrank_roots(outputs) -> None:
    module, out = outputs["lowrank_roots"]
    cfg = module.QUICK
    ds = load_dataset(out / "lowrank_roots.nc", kind="lowrank_roots", required_dims=("seed", "rule", "damping"))
    assert ds.seed.values.tolist() == list(cfg.seeds)
    assert ds.rule.values.tolist() == ["sngd-kfac", *[f"sngd-kfac-r{k}" for k in sorted(cfg.ranks, reverse=True)],
                                         *cfg.floors]
    assert ds.root_rank.values.tolist() == [0, *sorted(cfg.ranks, reverse=True), *[0] * len(cfg.floors)]
    cos = ds.cosine.values
    assert np.isfinite(cos).all() and (np.abs(cos) <= 1 + 1e-12).all()
    assert (ds.ngd_residual.values <= 1e-6).all()  # the CG reference converged
    # every factor of the quick MLP is wider than 2k: the rank-k steps differ from the exact-root step
    assert not np.allclose(ds.cosine.sel({"rule": "sngd-kfac-r1"}), ds.cosine.sel({"rule": "sngd-kfac"}))
    check_report(out)


@pytest.mark.parametrize("name", ["fidelity_vs_damping_batch", "staleness", "spectra_during_training",
                                  "lowrank_roots"])
def test_rerun_resumes(outputs, name: str, without_report: None) -> None:
    _, out = outputs[name]
    before = mtimes(out / "store")
    assert before
    run(name, out)
    assert mtimes(out / "store") == before


def test_optimizer_naturalness(tmp_path, request: pytest.FixtureRequest) -> None:
    from fisherlab import fidelity_trajectory
    from fisherlab.data import load

    out = tmp_path / "naturalness"
    module = run("optimizer_naturalness", out)
    cfg = module.QUICK
    ds = load_dataset(out / "optimizer_naturalness.nc", kind="optimizer_naturalness",
                      required_dims=("model", "optimizer", "seed", "step", "damping"))
    assert ds.optimizer.values.tolist() == list(cfg.optimizers)
    assert ds.damping.values.tolist() == list(cfg.damping)
    assert ds.step.values.tolist() == list(range(0, cfg.steps + 1, cfg.every))
    cos = ds.cosine.values
    assert np.isfinite(cos).all() and (np.abs(cos) <= 1 + 1e-12).all()
    # independently: torch.optim.SGD's own trajectory is plain GD trained by the built-in rule with the same η
    split = load("digits", seed=0, layout="flat").train_subset(cfg.samples).to(dtype=torch.float64)
    model = build_model("mlp", split, seed=0, dtype=torch.float64, widths=cfg.widths).eval()
    ref = fidelity_trajectory(model, split, train_rule="gd", rules=["gd"], train_lr=cfg.sgd_lr, steps=cfg.steps,
                              every=cfg.every, damping=list(cfg.damping), lr=cfg.lr, dtype=torch.float64,
                              progress=False)
    sgd = ds.sel(model="digits-mlp", optimizer="sgd", seed=0)
    np.testing.assert_allclose(sgd.cosine.values, ref.cosine.sel(rule="gd").values, rtol=0, atol=1e-10)
    np.testing.assert_allclose(sgd.loss.values, ref.loss.values, rtol=1e-12)
    # SGD's own η is the reference's here, so its Fisher-norm error is gd's too (a scale-dependent metric)
    np.testing.assert_allclose(sgd.fisher_rel_error.values, ref.fisher_rel_error.sel(rule="gd").values, rtol=1e-10)
    check_report(out)
    before = mtimes(out / "store")
    request.getfixturevalue("without_report")
    module.main(["--quick", "--threads", "1", "--out", str(out)])  # resumes: nothing recomputed (report not redrawn)
    assert mtimes(out / "store") == before
