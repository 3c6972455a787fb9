"""Fidelity of every update rule to exact NGD as a function of the damping λ and of the batch size N.

Problem: the digits reference MLP (64-32-32-10 tanh, 3,466 parameters, float64) at its initialisation (``--seed``),
on the first N training samples of the digits split for N in 64, 256, 1024. At each N every rule of
:data:`fisherlab.fidelity.DEFAULT_RULES` (GD, Adam, exact NGD with the true / MC / empirical Fisher, block, KFAC,
EKFAC, unit-wise, diagonal and low-rank preconditioners, and GD on the reconstructed networks ``sngd-*``;
``sngd-dense`` is left out: it is exact NGD by invariant 3 and costs a dense 3,466² eigendecomposition per λ) is
compared with exact NGD −η (F + λI)⁻¹ ∇L on the same batch (:func:`fisherlab.fidelity.evaluate_fidelity`) for
λ in 1e-4 … 1e-1 and η = 0.1. Output: ``fidelity_vs_damping_batch.nc`` (kind ``fidelity_batch``; dims
``rule``, ``damping``, ``batch_size``, ``layer``), one finished batch size per file under ``store/`` (a rerun
resumes), figures and ``report.html``.

Run time on this machine (2 shared CPU cores under load, ``--threads 1``), full mode: 110 s measured; ``--quick``:
about 10 seconds. With torch's default 2 threads on the busy machine dense eigendecompositions ran up to 100×
slower (thread oversubscription), hence ``--threads``.

    python analyses/fidelity_vs_damping_batch.py [--out results/fidelity_vs_damping_batch] [--quick] [--seed 0]
        [--threads 1]
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
from fisherlab.fidelity import DEFAULT_RULES, evaluate_fidelity, run_sweep
from fisherlab.fidelity.evaluate import fidelity_dataset
from fisherlab.models import build_model
from fisherlab.results import ResultsStore, save_dataset

NAME = "fidelity_vs_damping_batch"
KIND = "fidelity_batch"


@dataclass(frozen=True)
class Config:
    """What is measured (full mode; :data:`QUICK` for tests)."""

    widths: tuple[int, ...] = (32, 32)
    batch_sizes: tuple[int, ...] = (64, 256, 1024)
    dampings: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    rules: tuple[str, ...] = tuple(r for r in DEFAULT_RULES if r != "sngd-dense")
    lr: float = 0.1
    mc_samples: int = 1


FULL = Config()
QUICK = Config(widths=(8,), batch_sizes=(16, 32), dampings=(1e-3, 1e-1),
               rules=("gd", "ngd", "kfac", "diag", "empirical-ngd", "sngd-kfac", "sngd-block"))


def measure_batch(config: Mapping[str, Any], cfg: Config, seed: int) -> xr.Dataset:
    """Fidelity of every rule at one batch size (dims method, damping, layer)."""
    data = load_digits(seed=0, dtype=torch.float64)
    model = build_model("mlp", data, seed=seed, dtype=torch.float64, widths=cfg.widths).eval()
    n = int(config["batch_size"])
    return evaluate_fidelity(model, (data.X_train[:n], data.y_train[:n]), rules=cfg.rules, damping=cfg.dampings,
                             lr=cfg.lr, seed=seed, mc_samples=cfg.mc_samples, progress=False,
                             config={"batch_size": n, "widths": list(cfg.widths)})


def combine(parts: Sequence[xr.Dataset], batch_sizes: Sequence[int], cfg: Config, seed: int) -> xr.Dataset:
    """The per-batch-size Datasets stacked along a new dim ``batch_size``."""
    stacked = xr.concat([p.drop_attrs() for p in parts], dim="batch_size", combine_attrs="drop")
    coords = {**{k: v.values for k, v in stacked.coords.items()}, "batch_size": list(batch_sizes)}
    ds = fidelity_dataset(KIND, {k: (v.dims, v.values) for k, v in stacked.data_vars.items()}, coords,
                          config=dataclasses.asdict(cfg), seed=seed, device="cpu", dtype="float64",
                          attrs={"ngd_solver": parts[0].attrs.get("ngd_solver", "")})
    ds["batch_size"].attrs.update(long_name="samples N in the batch of F and ∇L", units="1")
    return ds


def plot(ds: xr.Dataset) -> list[report.Figure]:
    """Cosine to exact NGD and Fisher-norm error against λ, one panel per batch size, a line per rule."""
    figs = []
    for var, log in (("cosine", False), ("fisher_rel_error", True)):
        df = ds[var].to_dataframe().reset_index()
        g = sns.relplot(df, x="damping", y=var, hue="rule", col="batch_size", kind="line", marker="o",
                        height=3.4)
        g.set(xscale="log", yscale="log" if log else "linear")
        g.figure.suptitle(f"{ds[var].attrs.get('long_name', var)} against damping and batch size", y=1.03)
        figs.append((var, g.figure))
    return figs


def table(ds: xr.Dataset) -> report.Table:
    """Cosine to exact NGD per rule (rows) and (batch size, λ) (columns)."""
    cols = [(int(n), float(d)) for n in ds.batch_size.values for d in ds.damping.values]
    cos = ds.cosine.transpose("rule", "batch_size", "damping").values.reshape(ds.sizes["rule"], -1)
    rows = [[m, *[f"{c:.3f}" for c in row]] for m, row in zip(ds.rule.values, cos, strict=True)]
    return (["rule", *[f"N={n}, λ={d:g}" for n, d in cols]], rows)


def main(argv: Sequence[str] | None = None) -> Path:
    """Run (or resume) the analysis; returns the report path."""
    args, cfg = report.start_analysis(NAME, __doc__.splitlines()[0], argv, full=FULL, quick=QUICK)
    store = ResultsStore(args.out / "store")
    configs = {f"batch_size={n}": {"batch_size": n, "seed": args.seed} for n in cfg.batch_sizes}
    done = run_sweep(configs, store, lambda c: measure_batch(c, cfg, args.seed))
    save_dataset(combine(list(done.values()), cfg.batch_sizes, cfg, args.seed), args.out / f"{NAME}.nc")
    return report.finish_analysis(args.out, KIND, plot, table,
                                  title="Fidelity to exact NGD against damping and batch size",
                                  summary="Cosine similarity and Fisher-norm error of every update rule relative to "
                                  "exact NGD, for each damping λ and batch size N (digits MLP at init).")


if __name__ == "__main__":
    main()
