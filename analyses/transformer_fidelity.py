"""Fidelity of every applicable update rule to exact NGD on a GPT language model, against the damping λ.

Problem: fisherlab's nanoGPT-style :class:`~fisherlab.models.GPT` (``output="sequence"``, pre-LN causal blocks,
learned positions) on the procedural sort-lm task (:func:`fisherlab.data.make_sort_lm`: a prompt of 6 values in
[0, 8), SEP, the prompt sorted; next-token targets, the prompt's ignored with −100, so 6 of the 12 positions
count), float64, at its initialisation (``--seed``), on the first N training sequences. The loss and every Fisher
are token means (docs/sequences.md). Every rule that runs on a sequence model is compared with exact NGD
−η (F + λI)⁻¹ ∇L on the same batch (:func:`fisherlab.fidelity.evaluate_fidelity`, Cholesky): GD, Adam, the
true / MC / empirical exact solves, block, KFAC with the *expand* and the *reduce* approximation of Eschenhagen
et al. (2023) for the layers shared over positions (``kfac`` is expand, ``kfac-reduce`` is defined here), EKFAC
(expand), unit-wise, diagonal and low-rank, and GD on the KFAC-reconstructed network ``sngd-kfac`` (by
invariant 2 the step of ``kfac``). Output:
``transformer_fidelity.nc`` (kind ``transformer_fidelity``, the variables of a ``fidelity`` Dataset; dims ``rule``,
``damping``, ``layer``), the finished configuration under ``store/`` (a rerun resumes), figures, ``report.html``,
and a markdown table (rule × λ, cosine to exact NGD) printed at the end.

Run time on this machine (2 CPU cores shared with other jobs, ``--threads 1``), full mode: 48 s
(17 s of CPU) measured before ``sngd-kfac`` ran (it adds one reconstruction per damping); ``--quick``: 10 s of
CPU.

    python analyses/transformer_fidelity.py [--out results/transformer_fidelity] [--quick] [--seed 0]
        [--threads 1]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import seaborn as sns
import torch
import xarray as xr

from fisherlab import report
from fisherlab.data import make_sort_lm
from fisherlab.fidelity import evaluate_fidelity, run_sweep
from fisherlab.fidelity.rules import Rule, StructuredNGD
from fisherlab.models import build_model
from fisherlab.results import ResultsStore, save_dataset
from fisherlab.vocabulary import KFACApprox, Structure

NAME = "transformer_fidelity"
KIND = "transformer_fidelity"  # a kind of its own: the report draws it with this script's plot and table

#: KFAC's reduce approximation as a rule (not registered: rules.py registers the expand one as kfac). EKFAC-reduce
#: is left out: RuleContext fits EKFAC's scalings in the eigenbasis of the context's expand KFAC when that is built,
#: whatever ``approx`` (measured: the step equal to ekfac's, 25 % from an EKFAC-reduce built on its own).
EXTRA_RULES: dict[str, Rule] = {
    "kfac-reduce": StructuredNGD("kfac-reduce", Structure.KFAC, {"approx": KFACApprox.REDUCE.value}),
}


@dataclass(frozen=True)
class Config:
    """What is measured (full mode; :data:`QUICK` for tests)."""

    d_model: int = 8
    n_layers: int = 2
    n_heads: int = 2
    length: int = 6
    n_values: int = 8
    n_sequences: int = 32
    dampings: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    rules: tuple[str, ...] = ("gd", "adam", "ngd", "block-ngd", "kfac", "kfac-reduce", "ekfac", "unit", "diag",
                              "empirical-ngd", "mc-ngd", "lowrank", "sngd-kfac")
    lr: float = 0.1


FULL = Config()
QUICK = Config(n_layers=1, length=3, n_values=4, n_sequences=4, dampings=(1e-3, 1e-1),
               rules=("gd", "ngd", "kfac", "kfac-reduce", "diag", "sngd-kfac"))


def measure(config: Mapping[str, Any], cfg: Config) -> xr.Dataset:
    """The fidelity Dataset of every rule at the GPT's initialisation (dims rule, damping, layer)."""
    seed = int(config["seed"])
    data = make_sort_lm(n_samples=4 * cfg.n_sequences, length=cfg.length, n_values=cfg.n_values, seed=seed)
    model = build_model("gpt", data, seed=seed, dtype=torch.float64, d_model=cfg.d_model, n_layers=cfg.n_layers,
                        n_heads=cfg.n_heads).eval()
    n = cfg.n_sequences
    rules = [EXTRA_RULES.get(r, r) for r in cfg.rules]
    return evaluate_fidelity(model, (data.X_train[:n], data.y_train[:n]), rules=rules, damping=cfg.dampings,
                             lr=cfg.lr, dtype=torch.float64, seed=seed, ngd_solver="cholesky", progress=False,
                             config={"n_sequences": n, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
                                     "n_heads": cfg.n_heads, "data": "sort-lm", "length": cfg.length,
                                     "n_values": cfg.n_values})


def plot(ds: xr.Dataset) -> list[report.Figure]:
    """Cosine to exact NGD and Fisher-norm error against λ, a line per available rule."""
    ds = ds.sel(rule=ds.rule[ds.available.values == 1])
    figs = []
    for var, log in (("cosine", False), ("fisher_rel_error", True)):
        df = ds[var].to_dataframe().reset_index()
        g = sns.relplot(df, x="damping", y=var, hue="rule", kind="line", marker="o", height=3.6)
        g.set(xscale="log", yscale="log" if log else "linear")
        g.figure.suptitle(f"{ds[var].attrs.get('long_name', var)} against damping (GPT, sort-lm)", y=1.03)
        figs.append((var, g.figure))
    return figs


def table(ds: xr.Dataset) -> report.Table:
    """Cosine to exact NGD per rule (rows) and λ (columns); an unavailable rule shows its reason."""
    rows = []
    for rule in ds.rule.values:
        row = ds.sel(rule=rule)
        if int(row.available) == 0:
            rows.append([str(rule), *["n/a"] * ds.sizes["damping"]])
        else:
            rows.append([str(rule), *[f"{c:.3f}" for c in row.cosine.values]])
    return (["rule", *[f"λ={d:g}" for d in ds.damping.values]], rows)


def markdown(ds: xr.Dataset) -> str:
    """:func:`table` as a markdown table, with the unavailable rules' reasons and the problem's size below."""
    header, rows = table(ds)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    reasons = {str(r): str(ds.unavailable_reason.sel(rule=r).values) for r in ds.rule.values
               if int(ds.available.sel(rule=r)) == 0}
    lines += ["", *[f"- {r}: unavailable, {why}" for r, why in reasons.items()]]
    solver = ds.attrs.get("ngd_solver", "")
    lines += [f"- P = {ds.attrs['num_params']}, N = {ds.attrs['num_samples']} sequences, η = {ds.attrs['lr']:g}, "
              f"exact NGD by {solver} (max residual {np.max(ds.ngd_residual.values):.1e}), "
              f"{ds.attrs['total_seconds']:.0f} s"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Path:
    """Run (or resume) the analysis, print the markdown table; returns the report path."""
    args, cfg = report.start_analysis(NAME, __doc__.splitlines()[0], argv, full=FULL, quick=QUICK)
    store = ResultsStore(args.out / "store")
    done = run_sweep({f"seed={args.seed}": {"seed": args.seed}}, store, lambda c: measure(c, cfg))
    (ds,) = done.values()
    ds = ds.assign_attrs(fisherlab_kind=KIND)
    save_dataset(ds, args.out / f"{NAME}.nc")
    print(markdown(ds))
    return report.finish_analysis(args.out, KIND, plot, table,
                                  title="Fidelity to exact NGD on a GPT language model",
                                  summary="Cosine similarity and Fisher-norm error of every update rule that runs "
                                  "on a sequence model relative to exact NGD, for each damping λ (GPT on sort-lm "
                                  "at init, token-mean loss and Fisher).")


if __name__ == "__main__":
    main()
