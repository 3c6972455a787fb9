"""Staleness of reconstructed networks: fidelity to exact NGD against the steps since G was last refreshed.

Problem: a digits MLP (64-16-10 tanh, 1,210 parameters, float64, initialised with ``--seed``), full batch of the
first 256 training samples. It is trained for 30 steps by plain GD (η = 0.1) on the network reconstructed with
the ``kfac`` and the ``block`` structure (λ = 1e-2) whose metric G is refreshed every R ∈ {1, 5, 20} steps
(:func:`fisherlab.fidelity.fidelity_trajectory` with ``train_rule="sngd-<structure>"``). At every step the
update the training actually takes (rule ``train``, G possibly stale) and the fresh KFAC and block-NGD updates
are compared with exact NGD at the current parameters. Output: ``staleness.nc`` (kind ``staleness``; dims
``train_rule``, ``refresh_every``, ``step``, ``rule``, ``damping``, ``layer``, with ``steps_since_refresh``),
one finished (structure, R) per file under ``store/`` (a rerun resumes), figures and ``report.html``.
Seen with seed 0: fidelity does not decay monotonically; for the block structure the mean cosine falls from 0.93
just after a refresh to 0.69 four steps later (R = 20), then recovers as training slows down; KFAC moves less
(0.88 → 0.81).

Run time on this machine (2 shared CPU cores under load, ``--threads 1``), full mode: 63 s measured; ``--quick``:
about 10 seconds.

    python analyses/staleness.py [--out results/staleness] [--quick] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import seaborn as sns
import torch
import xarray as xr

from fisherlab import report
from fisherlab.data import load_digits
from fisherlab.fidelity import fidelity_trajectory, run_sweep
from fisherlab.fidelity.evaluate import fidelity_dataset
from fisherlab.models import build_model
from fisherlab.results import ResultsStore, save_dataset

NAME = "staleness"
KIND = "staleness"
#: Name of the measured training update in the combined Dataset (``train:<train_rule>`` in each part).
TRAIN = "train"


@dataclass(frozen=True)
class Config:
    """What is trained and measured (full mode; :data:`QUICK` for tests)."""

    widths: tuple[int, ...] = (16,)
    samples: int = 256
    train_rules: tuple[str, ...] = ("sngd-kfac", "sngd-block")
    refresh_every: tuple[int, ...] = (1, 5, 20)
    steps: int = 30
    rules: tuple[str, ...] = ("kfac", "block-ngd")
    damping: float = 1e-2
    lr: float = 0.1


FULL = Config()
QUICK = Config(widths=(4,), samples=32, refresh_every=(1, 3), steps=4)


def run_one(config: Mapping[str, Any], cfg: Config, seed: int) -> xr.Dataset:
    """The fidelity trajectory of one (train_rule, refresh_every); the training update renamed ``train``."""
    data = load_digits(seed=0, dtype=torch.float64)
    model = build_model("mlp", data, seed=seed, dtype=torch.float64, widths=cfg.widths).eval()
    n = cfg.samples
    ds = fidelity_trajectory(model, (data.X_train[:n], data.y_train[:n]), train_rule=config["train_rule"],
                             steps=cfg.steps, every=1, rules=cfg.rules, damping=cfg.damping, lr=cfg.lr,
                             refresh_every=int(config["refresh_every"]), seed=seed, progress=False,
                             config={"widths": list(cfg.widths), "samples": n})
    return ds.assign_coords(rule=[TRAIN if str(m).startswith("train:") else str(m) for m in ds.rule.values])


def combine(parts: Mapping[tuple[str, int], xr.Dataset], cfg: Config, seed: int) -> xr.Dataset:
    """The trajectories stacked along new dims ``train_rule`` and ``refresh_every``."""
    rows = [xr.concat([parts[m, r].drop_attrs() for r in cfg.refresh_every], dim="refresh_every",
                      combine_attrs="drop") for m in cfg.train_rules]
    stacked = xr.concat(rows, dim="train_rule", combine_attrs="drop")
    coords = {**{k: v.values for k, v in stacked.coords.items()}, "train_rule": list(cfg.train_rules),
              "refresh_every": list(cfg.refresh_every)}
    ds = fidelity_dataset(KIND, {k: (v.dims, v.values) for k, v in stacked.data_vars.items()}, coords,
                          config=dataclasses.asdict(cfg), seed=seed, device="cpu", dtype="float64")
    ds["steps_since_refresh"].attrs.update(long_name="training steps since the last refresh of G", units="1")
    ds["refresh_every"].attrs.update(long_name="steps between refreshes of G", units="1")
    return ds


def _frame(ds: xr.Dataset) -> Any:
    """Cosine of the training update with its staleness, one row per (train_rule, refresh_every, step)."""
    df = ds.cosine.sel({"rule": TRAIN}).isel(damping=0).to_dataframe().reset_index()
    since = ds.steps_since_refresh.to_dataframe().reset_index()
    return df.merge(since, on=["train_rule", "refresh_every", "step"])


def plot(ds: xr.Dataset) -> list[report.Figure]:
    """Cosine to exact NGD of the training update against steps since refresh and against step."""
    df = _frame(ds)
    g = sns.relplot(df, x="steps_since_refresh", y="cosine", hue="refresh_every", col="train_rule", kind="line",
                    marker="o", height=3.4, palette="viridis")
    g.figure.suptitle("stale reconstructed networks: cosine to exact NGD against steps since refresh", y=1.03)
    h = sns.relplot(df, x="step", y="cosine", hue="refresh_every", col="train_rule", kind="line", marker="o",
                    height=3.4, palette="viridis")
    h.figure.suptitle("cosine to exact NGD of the training update along training", y=1.03)
    return [("cosine_vs_staleness", g.figure), ("cosine_vs_step", h.figure)]


def table(ds: xr.Dataset) -> report.Table:
    """Mean cosine of the training update per steps since refresh (rows) and (structure, R) (columns)."""
    df = _frame(ds)
    mean = df.groupby(["steps_since_refresh", "train_rule", "refresh_every"]).cosine.mean().unstack([1, 2])
    return (["steps since refresh", *[f"{m}, R={r}" for m, r in mean.columns]],
            [[int(k), *["—" if v != v else f"{v:.4f}" for v in row]]
             for k, row in zip(mean.index, mean.values, strict=True)])


def main(argv: Sequence[str] | None = None) -> Path:
    """Run (or resume) the analysis; returns the report path."""
    args, cfg = report.start_analysis(NAME, __doc__.splitlines()[0], argv, full=FULL, quick=QUICK)
    configs = {f"{m},R={r}": {"train_rule": m, "refresh_every": r, "seed": args.seed}
               for m in cfg.train_rules for r in cfg.refresh_every}
    done = run_sweep(configs, ResultsStore(args.out / "store"), lambda c: run_one(c, cfg, args.seed))
    parts = {(c["train_rule"], c["refresh_every"]): done[k] for k, c in configs.items()}
    save_dataset(combine(parts, cfg, args.seed), args.out / f"{NAME}.nc")
    return report.finish_analysis(args.out, KIND, plot, table, title="Staleness of reconstructed networks",
                                  summary="How closely GD on a reconstructed network tracks exact NGD as its metric "
                                  "G goes stale between refreshes (docs/method.md, invariant 4).")


if __name__ == "__main__":
    main()
