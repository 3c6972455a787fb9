"""Headline measurement: does plain GD on a reconstructed network (SNGD) train like NGD, and at what cost?

Problems (embedded data, nothing downloaded): the digits MLP (64-32-32-10 tanh, 3,466 parameters; flat 8×8
digits, 1,347 training samples), MNIST-1D with an MLP (40-32-32-10 tanh, 2,698 parameters) and with a CNN
(Conv1d 1→8→16, 2,042 parameters) on 4,000 generated signals (3,200 for training).

Methods (fisherlab.train): SGD, Adam, exact NGD (batch true Fisher, Woodbury/Cholesky solve; digits MLP only —
it costs a P-wide Jacobian per sample and output every step), KFAC-NGD (factors every 10 steps) and SNGD on the
network reconstructed with the kfac and the unit-wise structures (refreshed every 10 steps). λ = 0.1 for every
curvature method, batch size 64, 250 steps, the true Fisher.

A fourth problem, the wide digits MLP (64-1024-1024-10 tanh, 1,126,410 parameters), is where the cost of the roots
shows: SGD, Adam, KFAC-NGD, and SNGD-kfac with exact roots by Cholesky (``sqrt="cholesky"``: the KFAC-NGD
trajectory, by invariant 2) and with rank-64 factor roots (``sqrt="lowrank"``: a different G).

Protocol: for each problem and method, a learning-rate sweep over 4 values, factors of ~3 apart (3 for exact NGD,
the costliest; the grids were widened after a first sweep in which most methods picked an end of a 3-value grid),
on seed 0 picks the lr with the lowest final training loss (every run is kept in ``sweep_<problem>.nc``); that lr
is then run on seeds 1 and 2 as well (seed = model initialisation and minibatch order; the split is fixed).
``runs_<problem>.nc`` holds the three seeds of the chosen runs (dims seed, rule, step), ``summary.nc`` the table
printed at the end (final training loss and test accuracy, mean ± std over seeds; wall-clock and CPU time, median
over seeds). Figures: training loss and test accuracy against steps (mean, min–max band over seeds), wall-clock
time and CPU time (medians over seeds) (PNG and SVG).

Times are those of the update steps only (evaluation excluded), on whatever machine runs this, single-threaded by
default (``--threads``): on a shared 2-core machine, two intra-op threads spin against the other processes and
single steps of every method slow down by up to 100× (measured: SGD on the MNIST-1D CNN 1.3 ms/step with one thread,
5–170 ms/step with two), so wall-clock times with more threads mostly measure the neighbours.

Run time (measured, one thread, 2-core machine, otherwise quiet): 5.5 minutes in full mode, of which the wide MLP
takes about 3.5 and exact NGD on the digits MLP 0.7. ``--quick`` (4 steps, 2 learning rates, 2 seeds, 400
MNIST-1D signals, the wide MLP 256 wide, no warm-up runs, a figure of 2 panels a problem — training loss against
steps and test accuracy against CPU time — instead of 6; for tests) takes about 20 CPU-s on the loaded 2-core
machine, 3–5 of them drawing the figure (11 for the 6-panel figure of the same runs).
``--resume`` reuses the ``runs_<problem>.nc`` files of the same settings (those problems are not rerun).

    python analyses/training_comparison.py [--out results/training_comparison] [--quick] [--threads 1] [--resume]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from fisherlab.data import SplitData, load_digits, load_mnist1d
from fisherlab.models import build_model, reference_mlp
from fisherlab.results import config_of, load_dataset, new_dataset, save_dataset
from fisherlab.train import best_runs, compare, sweep_lr

#: Method name → (fixed keyword arguments of fisherlab.train, learning rates of the sweep).
METHODS: dict[str, tuple[dict[str, Any], list[float]]] = {
    "sgd": ({"rule": "sgd"}, [0.1, 0.3, 1.0, 3.0]),
    "adam": ({"rule": "adam"}, [1e-3, 3e-3, 1e-2, 3e-2]),
    "ngd": ({"rule": "ngd"}, [0.3, 1.0, 3.0]),
    "kfac-ngd": ({"rule": "kfac-ngd"}, [0.03, 0.1, 0.3, 1.0]),
    "sngd-kfac": ({"rule": "sngd", "structure": "kfac"}, [0.03, 0.1, 0.3, 1.0]),
    "sngd-unit": ({"rule": "sngd", "structure": "unit"}, [0.03, 0.1, 0.3, 1.0]),
    "sngd-kfac-cholesky": ({"rule": "sngd", "structure": "kfac", "sqrt": "cholesky"}, [0.03, 0.1, 0.3, 1.0]),
    "sngd-kfac-lowrank": ({"rule": "sngd", "structure": "kfac", "sqrt": "lowrank"}, [0.03, 0.1, 0.3, 1.0]),
}
#: The methods of the wide MLP: exact roots only by Cholesky (eigh roots take the same steps, at a dearer refresh).
WIDE = ("sgd", "adam", "kfac-ngd", "sngd-kfac-cholesky", "sngd-kfac-lowrank")


@dataclass(frozen=True)
class Problem:
    """A dataset (quick → data), a model builder (data, seed, quick → model) and the methods run on it."""

    name: str
    data: Callable[[bool], SplitData]
    model: Callable[[SplitData, int, bool], torch.nn.Module]
    methods: tuple[str, ...]


def _mnist1d(layout: str) -> Callable[[bool], SplitData]:
    return lambda quick: load_mnist1d(n_samples=400 if quick else 4000, seed=0, layout=layout)


PROBLEMS = (
    Problem("digits-mlp", lambda quick: load_digits(seed=0), lambda data, seed, quick: reference_mlp(seed),
            tuple(m for m in METHODS if m not in ("sngd-kfac-cholesky", "sngd-kfac-lowrank"))),
    Problem("digits-wide", lambda quick: load_digits(seed=0),
            lambda data, seed, quick: build_model("mlp", data, seed=seed, widths=(256, 256) if quick else (1024, 1024)),
            WIDE),
    Problem("mnist1d-mlp", _mnist1d("flat"), lambda data, seed, quick: build_model("mlp", data, seed=seed),
            ("sgd", "adam", "kfac-ngd", "sngd-kfac", "sngd-unit")),
    Problem("mnist1d-cnn", _mnist1d("channels"), lambda data, seed, quick: build_model("cnn", data, seed=seed),
            ("sgd", "adam", "kfac-ngd", "sngd-kfac", "sngd-unit")),
)


def lr_grid(problem: Problem, lrs: int | None) -> dict[str, list[float]]:
    """The learning rates each method of ``problem`` is swept over (the first ``lrs`` of each list; all if None)."""
    return {m: METHODS[m][1][:lrs] for m in problem.methods}


def run_problem(problem: Problem, common: dict[str, Any], seeds: list[int], lrs: int | None,
                out: Path) -> xr.Dataset:
    """Sweep on seeds[0], rerun the best lr on the other seeds; save both; return the runs (seed, rule, step)."""
    quick = common.pop("quick")
    data = problem.data(quick)
    methods = {m: METHODS[m][0] for m in problem.methods}
    grid = lr_grid(problem, lrs)
    model = problem.model(data, seeds[0], quick).eval()
    if not quick:  # warm-up (for the times; quick runs time nothing): first calls of eigh, vmap, ... are slow
        compare(model, data, {m: {**kw, "lr": 1e-3} for m, kw in methods.items()},
                **{**common, "steps": 2, "eval_every": 2})
    sweep = sweep_lr(model, data, methods, grid, seed=seeds[0], **common)
    save_dataset(sweep, out / f"sweep_{problem.name}.nc")
    best = best_runs(sweep)
    chosen = {m: {**methods[m], "lr": float(best["lr"].sel({"rule": m}))} for m in problem.methods}
    runs = [best]
    for seed in seeds[1:]:
        runs.append(compare(problem.model(data, seed, quick).eval(), data, chosen, seed=seed, **common))
    stacked = xr.concat([r.drop_attrs() for r in runs], dim="seed", combine_attrs="drop")
    ds = new_dataset("training", dict(stacked.data_vars), {**dict(stacked.coords), "seed": seeds},
                     config={"problem": problem.name, "num_params": sum(p.numel() for p in model.parameters()),
                             "common": common, "runs": chosen, "lr_grid": grid,
                             "selection": "lowest final train loss on seed 0"},
                     seed=seeds[0], device="cpu", dtype="float32", attrs={"problem": problem.name})
    for name, var in best.variables.items():
        if name in ds.variables:
            ds[name].attrs.update(var.attrs)
    save_dataset(ds, out / f"runs_{problem.name}.nc")
    return ds


def summarize(all_runs: dict[str, xr.Dataset]) -> xr.Dataset:
    """Per problem and method: lr, final train loss / test accuracy (mean, std over seeds), times (median)."""
    problems, methods = list(all_runs), list(METHODS)
    shape = (len(problems), len(methods))
    keys = ("lr", "train_loss", "train_loss_std", "test_accuracy", "test_accuracy_std", "time", "cpu_time",
            "ms_per_step", "cpu_ms_per_step")
    table = {k: np.full(shape, np.nan) for k in keys}
    for i, p in enumerate(problems):
        ds = all_runs[p]
        steps = ds.sizes["step"] - 1
        for m in ds["rule"].values.tolist():
            j = methods.index(m)
            run = ds.sel({"rule": m}).isel(step=-1)
            table["lr"][i, j] = float(ds["lr"].sel({"rule": m}).isel(seed=0))
            for var in ("train_loss", "test_accuracy"):
                table[var][i, j], table[f"{var}_std"][i, j] = run[var].mean(), run[var].std()
            table["time"][i, j], table["cpu_time"][i, j] = run.time.median(), run.cpu_time.median()
            table["ms_per_step"][i, j] = 1e3 * table["time"][i, j] / steps
            table["cpu_ms_per_step"][i, j] = 1e3 * table["cpu_time"][i, j] / steps
    return new_dataset("training-summary", {k: (("problem", "rule"), v) for k, v in table.items()},
                       {"problem": problems, "rule": methods}, config={"problems": problems}, seed=None,
                       device="cpu", dtype="float32")


def print_summary(summary: xr.Dataset) -> None:
    """The summary as a table (one line per problem and method that ran)."""
    head = (f"{'problem':<12} {'rule':<18} {'lr':>6} {'final train loss':>17} {'test accuracy':>15} "
            f"{'wall s':>7} {'wall ms/step':>12} {'cpu ms/step':>11}")
    print(head)
    print("-" * len(head))
    for p in summary.problem.values.tolist():
        for m in summary.rule.values.tolist():
            r = summary.sel({"problem": p, "rule": m})
            if np.isnan(r.lr):
                continue
            print(f"{p:<12} {m:<18} {float(r.lr):>6.3g} {float(r.train_loss):>8.4f} ± {float(r.train_loss_std):.4f}"
                  f" {float(r.test_accuracy):>7.3f} ± {float(r.test_accuracy_std):.3f} {float(r.time):>7.1f}"
                  f" {float(r.ms_per_step):>12.1f} {float(r.cpu_ms_per_step):>11.1f}")


AXES = [("step", "train_loss"), ("time", "train_loss"), ("cpu_time", "train_loss"), ("step", "test_accuracy"),
        ("time", "test_accuracy"), ("cpu_time", "test_accuracy")]
#: The panels of ``--quick`` (one of each kind: band over seeds against steps on a log scale, medians against a
#: time on a linear scale): drawing the 24 panels of the full figure took most of a quick run.
QUICK_AXES = [("step", "train_loss"), ("cpu_time", "test_accuracy")]
LABELS = {"step": "step", "time": "wall-clock time (s)", "cpu_time": "CPU time (s)"}


def plot(all_runs: dict[str, xr.Dataset], out: Path, panels: list[tuple[str, str]] = AXES) -> None:
    """Training loss and test accuracy against steps, wall time and CPU time, one row per problem (PNG, SVG).

    ``panels``: the (x, y) of each column (default :data:`AXES`, every combination).

    Drawn outside pyplot under seaborn's whitegrid style, applied only while drawing, and saved by the report's
    :func:`~fisherlab.report.save_figure` (one layout for both files).
    """
    import seaborn as sns
    from matplotlib import rc_context

    from fisherlab.report import legend_outside, new_figure, save_figure

    with rc_context({**sns.axes_style("whitegrid"), **sns.plotting_context("paper")}):
        fig = new_figure(4 * len(panels), 3.4 * len(all_runs))
        axes = fig.subplots(len(all_runs), len(panels), squeeze=False)
        palette = dict(zip(METHODS, sns.color_palette("tab10", len(METHODS)), strict=True))
        for row, (name, ds) in zip(axes, all_runs.items(), strict=True):
            frame = ds[["train_loss", "test_accuracy", "time", "cpu_time"]].to_dataframe().reset_index().dropna(
                subset=["train_loss"])
            for ax, (x, y) in zip(row, panels, strict=True):
                legend = ax is row[-1]  # one legend a problem (its methods), right of its row
                if x == "step":  # mean over seeds, band from min to max
                    sns.lineplot(frame, x=x, y=y, hue="rule", palette=palette, errorbar=("pi", 100), ax=ax,
                                 legend=legend)
                else:  # median over seeds of both the time (robust to load spikes) and the metric at each evaluation
                    median = frame.groupby(["rule", "step"], sort=False)[[x, y]].median().reset_index()
                    sns.lineplot(median, x=x, y=y, hue="rule", palette=palette, sort=False, ax=ax, legend=legend)
                ax.set(title=name, xlabel=LABELS[x], ylabel=y.replace("_", " "),
                       yscale="log" if y == "train_loss" else "linear")
            legend_outside(row[-1], "method")
        save_figure(fig, out / "training_comparison")


def main(argv: list[str] | None = None) -> xr.Dataset:
    """Run every problem, save Datasets and figures under ``--out``, print the summary; returns the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/training_comparison"))
    parser.add_argument("--quick", action="store_true", help="tiny runs for tests")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared machine 2 threads spin against other "
                             "processes and single steps slow down up to 100×)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse runs_<problem>.nc files already in --out made with the same settings")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    common = {"steps": 4, "eval_every": 2, "batch_size": 32} if args.quick else \
        {"steps": 250, "eval_every": 25, "batch_size": 64}
    common.update(damping=0.1, refresh_every=10)
    seeds, lrs = ([0, 1], 2) if args.quick else ([0, 1, 2], None)
    start = time.perf_counter()
    all_runs = {}
    for p in PROBLEMS:
        path = args.out / f"runs_{p.name}.nc"
        done = load_dataset(path, kind="training") if args.resume and path.exists() else None
        if done is not None and config_of(done)["common"] == common and done.seed.values.tolist() == seeds \
                and config_of(done)["lr_grid"] == lr_grid(p, lrs):
            all_runs[p.name] = done
        else:
            all_runs[p.name] = run_problem(p, {**common, "quick": args.quick}, seeds, lrs, args.out)
    summary = summarize(all_runs)
    save_dataset(summary, args.out / "summary.nc")
    plot(all_runs, args.out, QUICK_AXES if args.quick else AXES)
    print_summary(summary)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; results in {args.out}")
    return summary


if __name__ == "__main__":
    main()
