"""Low-rank local Fisher layers: how much fidelity to exact NGD the cheap ``sqrt="lowrank"`` roots give up.

Problem: a digits MLP (64-128-128-10 tanh, 26,122 parameters, float64) at its initialisation, for each seed of
``seeds``, on the first 512 training samples. Compared with exact NGD −η (F + λI)⁻¹ ∇L (by CG: the dense Fisher is
not formed) for λ in 1e-3, 1e-2, 1e-1 (:func:`fisherlab.fidelity.evaluate_fidelity`): GD on the network
reconstructed with KFAC factors and exact roots (``sngd-kfac``), the same with every factor wider than 2k replaced
by its top-k eigen-part plus mean remainder (``sngd-kfac-r<k>``, ``sqrt="lowrank"``, k in 4, 8, 16, 32), and GD
and the diagonal preconditioner as floors. The low-rank roots cost O(n·k) per row instead of O(n²)
(benchmarks/bench_reconstruct.py measures the step times). Output: ``lowrank_roots.nc`` (kind ``lowrank_roots``;
dims ``seed``, ``rule``, ``damping``, ``layer``; coordinate ``root_rank`` per rule, 0 where no low-rank root
is used), one finished seed per file under ``store/`` (a rerun resumes), figures and ``report.html``.

Seen (mean over seeds 0–2, cosine to exact NGD at λ = 1e-3 / 1e-2 / 1e-1): exact roots 0.660 / 0.890 / 0.972;
k = 32 the same (0.661 / 0.891 / 0.972); k = 16: 0.621 / 0.890 / 0.971; k = 8: 0.470 / 0.825 / 0.958; k = 4:
0.412 / 0.771 / 0.934, close to plain GD (0.376 / 0.722 / 0.943). Half the width (k = 16 of 128) costs little;
below that the low-rank step falls towards GD, most at small damping.

Run time on this machine (2 CPU cores, ``--threads 1``), full mode: 10 s measured; ``--quick``: 3 seconds.

    python analyses/lowrank_roots.py [--out results/lowrank_roots] [--quick] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import seaborn as sns
import torch
import xarray as xr

from fisherlab import report
from fisherlab.data import load_digits
from fisherlab.fidelity import evaluate_fidelity, run_sweep
from fisherlab.fidelity.evaluate import fidelity_dataset
from fisherlab.fidelity.rules import ReconstructedGD
from fisherlab.models import build_model
from fisherlab.results import ResultsStore, save_dataset
from fisherlab.vocabulary import RootMethod, Structure

NAME = "lowrank_roots"
KIND = "lowrank_roots"
#: Memory budget of the exact-NGD reference: small enough that the Fisher stays implicit (CG).
BUDGET = 2**28


@dataclass(frozen=True)
class Config:
    """What is measured (full mode; :data:`QUICK` for tests)."""

    widths: tuple[int, ...] = (128, 128)
    samples: int = 512
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    dampings: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    seeds: tuple[int, ...] = (0, 1, 2)
    floors: tuple[str, ...] = ("gd", "diag")
    lr: float = 0.1


FULL = Config()
QUICK = Config(widths=(8,), samples=32, ranks=(1, 2), dampings=(1e-2,), seeds=(0,))


def rank_rule(k: int) -> ReconstructedGD:
    """GD on the network reconstructed with rank-k KFAC roots."""
    return ReconstructedGD(f"sngd-kfac-r{k}", Structure.KFAC, RootMethod.LOWRANK, {"root_rank": k})


def rules(cfg: Config) -> list[str | ReconstructedGD]:
    """Rules in table order: exact-root KFAC, the ranks from largest to smallest, the floors."""
    return ["sngd-kfac", *[rank_rule(k) for k in sorted(cfg.ranks, reverse=True)], *cfg.floors]


def run_one(config: Mapping[str, Any], cfg: Config) -> xr.Dataset:
    """The fidelity of every rule for one initialisation seed."""
    seed = int(config["seed"])
    data = load_digits(seed=0, dtype=torch.float64)
    model = build_model("mlp", data, seed=seed, dtype=torch.float64, widths=cfg.widths).eval()
    n = cfg.samples
    return evaluate_fidelity(model, (data.X_train[:n], data.y_train[:n]), rules=rules(cfg), damping=cfg.dampings,
                             lr=cfg.lr, dtype=torch.float64, seed=seed, memory_budget=BUDGET, progress=False,
                             config={"widths": list(cfg.widths), "samples": n})


def combine(parts: Mapping[int, xr.Dataset], cfg: Config, seed: int) -> xr.Dataset:
    """The seeds stacked along a new dim ``seed``, with the rank of each method as a coordinate."""
    stacked = xr.concat([parts[s].drop_attrs() for s in cfg.seeds], dim="seed", combine_attrs="drop")
    ranks = {rank_rule(k).name: k for k in cfg.ranks}
    coords = {**{k: v.values for k, v in stacked.coords.items()}, "seed": list(cfg.seeds)}
    ds = fidelity_dataset(KIND, {k: (v.dims, v.values) for k, v in stacked.data_vars.items()}, coords,
                          config=dataclasses.asdict(cfg), seed=seed, device="cpu", dtype="float64")
    ds = ds.assign_coords(root_rank=("rule", [ranks.get(str(m), 0) for m in ds.rule.values]))
    ds["root_rank"].attrs.update(long_name="rank k of the low-rank factor roots (0: none)", units="1")
    ds["seed"].attrs.update(long_name="initialisation seed", units="1")
    return ds


def _frame(ds: xr.Dataset) -> Any:
    return ds.cosine.to_dataframe().reset_index()


def plot(ds: xr.Dataset) -> list[report.Figure]:
    """Cosine to exact NGD against the rank k of the roots, one line per damping, exact-root KFAC dashed."""
    df = _frame(ds)
    lowrank = df[df.rule.str.startswith("sngd-kfac-r")].copy()
    lowrank["rank"] = lowrank.rule.str.removeprefix("sngd-kfac-r").astype(int)
    lowrank["λ"] = lowrank.damping.map(lambda v: f"{v:g}")
    exact = df[df.rule == "sngd-kfac"].groupby("damping").cosine.mean()
    colors = dict(zip([f"{v:g}" for v in exact.index], sns.color_palette("viridis", len(exact)), strict=True))
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sns.lineplot(lowrank, x="rank", y="cosine", hue="λ", marker="o", palette=colors, ax=ax)
    for lam, value in exact.items():
        ax.axhline(value, ls="--", color=colors[f"{lam:g}"], lw=1, label=f"exact roots, λ={lam:g}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="rank k of the factor roots", ylabel="cosine to exact NGD",
           title="low-rank KFAC roots (mean and spread over seeds)")
    ax.legend(fontsize=7)
    return [("cosine_vs_rank", fig)]


def table(ds: xr.Dataset) -> report.Table:
    """Mean cosine to exact NGD over seeds (± spread), rules × dampings."""
    mean, spread = ds.cosine.mean("seed"), ds.cosine.max("seed") - ds.cosine.min("seed")
    header = ["rule", *[f"λ={lam:g}" for lam in ds.damping.values]]
    rows = [[str(m), *[f"{float(mean.sel({'rule': m, 'damping': lam})):.4f} "
                       f"(±{float(spread.sel({'rule': m, 'damping': lam})) / 2:.4f})" for lam in ds.damping.values]]
            for m in ds.rule.values]
    return header, rows


def main(argv: Sequence[str] | None = None) -> Path:
    """Run (or resume) the analysis; returns the report path."""
    args, cfg = report.start_analysis(NAME, __doc__.splitlines()[0], argv, full=FULL, quick=QUICK)
    configs = {f"seed={s}": {"seed": s} for s in cfg.seeds}
    done = run_sweep(configs, ResultsStore(args.out / "store"), lambda c: run_one(c, cfg))
    save_dataset(combine({c["seed"]: done[k] for k, c in configs.items()}, cfg, args.seed), args.out / f"{NAME}.nc")
    return report.finish_analysis(args.out, KIND, plot, table, title="Low-rank local Fisher layers",
                                  summary="Fidelity to exact NGD of GD on networks reconstructed with rank-k roots of "
                                  "the KFAC factors (sqrt='lowrank'), against exact roots (docs/method.md).")


if __name__ == "__main__":
    main()
