"""True, Monte-Carlo and empirical Fisher spectra at several points of a training run.

Problem: the digits reference MLP (64-32-32-10 tanh, 3,466 parameters, float64, initialised with ``--seed``)
trained with Adam (η = 1e-2, batch 64, 300 steps; :func:`fisherlab.train.train`, whose log is saved as
``training.nc``). At steps 0, 100, 200 and 300 the spectra of the true, MC (one label per input) and empirical
Fisher on the first 512 training samples are computed in the dense, per-layer block and diagonal structures
(:func:`fisherlab.spectra.fisher_spectra`). Output: ``spectra_during_training.nc`` (kind ``spectrum_trajectory``:
the ``spectrum`` variables with a leading dim ``step``), one finished checkpoint per file under ``store/`` (a
rerun resumes), figures and ``report.html``. Seen with seed 0: as the training loss falls to 0.003 the empirical
Fisher collapses (trace 0.015 against 1.09 for the true Fisher at step 300; Kunstner et al., 2019), while the
one-sample MC Fisher keeps the right trace but is noisy (relative Frobenius distance 0.4 to 4) and, like the
empirical one, has rank at most 512 where the true Fisher has rank up to 9 · 512.

The checkpoints come from a replay of the same run (same optimiser, seed and minibatch order as ``train``; the
script checks that its batch losses equal the logged ones), since ``train`` returns only the log.

Run time on this machine (2 shared CPU cores under load, ``--threads 1``), full mode: 63 s measured; ``--quick``
(8 hidden units, 20 steps, checkpoints 0 and 20, 32 samples): 3–4 CPU-s.

    python analyses/spectra_during_training.py [--out results/spectra_during_training] [--quick] [--seed 0]
        [--threads 1]
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
import torch
import xarray as xr
from torch import Tensor, nn

from fisherlab import report
from fisherlab.data import SplitData, iterate_minibatches, load_digits
from fisherlab.fidelity import run_sweep
from fisherlab.likelihoods import get_likelihood
from fisherlab.models import build_model
from fisherlab.params import ParamSpec
from fisherlab.results import ResultsStore, annotate, new_dataset, save_dataset
from fisherlab.spectra import fisher_spectra
from fisherlab.train import train

NAME = "spectra_during_training"
KIND = "spectrum_trajectory"


@dataclass(frozen=True)
class Config:
    """What is trained and measured (full mode; :data:`QUICK` for tests)."""

    widths: tuple[int, ...] = (32, 32)
    lr: float = 1e-2
    batch_size: int = 64
    steps: int = 300
    checkpoint_every: int = 100
    fisher_samples: int = 512
    kinds: tuple[str, ...] = ("true", "mc", "empirical")
    structures: tuple[str, ...] = ("dense", "block", "diag")
    dampings: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    mc_samples: int = 1


FULL = Config()
QUICK = Config(widths=(8,), steps=20, checkpoint_every=20, fisher_samples=32)  # checkpoints 0 and 20


def checkpoints(model: nn.Module, data: SplitData, cfg: Config, seed: int) -> tuple[dict[int, Tensor], np.ndarray]:
    """Replay ``train(rule="adam")``: parameter vectors (P,) at the checkpoint steps and the batch losses.

    Same optimiser (``torch.optim.Adam``, defaults but η), minibatch order (epoch e in the order of
    ``iterate_minibatches(..., seed + e)``) and loss as :func:`fisherlab.train.train`.
    """
    work = copy.deepcopy(model)
    spec = ParamSpec.from_model(work)
    lik = get_likelihood("categorical")
    opt = torch.optim.Adam(work.parameters(), lr=cfg.lr)
    saved, losses, step, epoch = {0: spec.vector(work).detach().clone()}, [], 0, 0
    while step < cfg.steps:
        for x, y in iterate_minibatches(data.X_train, data.y_train, cfg.batch_size, seed + epoch):
            opt.zero_grad(set_to_none=True)
            loss = lik.nll(work(x), y).mean()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                saved[step] = spec.vector(work).detach().clone()
            if step == cfg.steps:
                break
        epoch += 1
    return saved, np.array(losses)


def spectra_at(config: Mapping[str, Any], model: nn.Module, data: SplitData, theta: dict[int, Tensor],
               cfg: Config) -> xr.Dataset:
    """The Fisher spectra at the checkpoint ``config["step"]``."""
    work = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(theta[int(config["step"])], work.parameters())
    n = cfg.fisher_samples
    return fisher_spectra(work, (data.X_train[:n], data.y_train[:n]), kinds=cfg.kinds,
                          structures=cfg.structures, damping=cfg.dampings, mc_samples=cfg.mc_samples,
                          seed=int(config["seed"]), dtype=torch.float64, progress=False,
                          config={"step": int(config["step"])})


def combine(parts: Sequence[xr.Dataset], steps: Sequence[int], cfg: Config, seed: int) -> xr.Dataset:
    """The per-checkpoint spectra stacked along a new leading dim ``step``."""
    stacked = xr.concat([p.drop_attrs() for p in parts], dim="step", combine_attrs="drop")
    coords = {**{k: v.values for k, v in stacked.coords.items()}, "step": list(steps)}
    ds = new_dataset(KIND, {k: (v.dims, v.values) for k, v in stacked.data_vars.items()}, coords,
                     config=dataclasses.asdict(cfg), seed=seed, device="cpu", dtype="float64")
    ds = annotate(ds, {k: (v.attrs["long_name"], v.attrs["units"], v.attrs.get("comment"))
                       for k, v in parts[0].data_vars.items()})
    ds["step"].attrs.update(long_name="Adam steps taken", units="1")
    return ds


def plot(ds: xr.Dataset) -> list[report.Figure]:
    """Dense spectra per Fisher kind at each checkpoint; distance to the true Fisher and trace against step."""
    df = ds.eigenvalue.sel(structure=ds.structure.values[0]).to_dataframe().reset_index()
    top = df.groupby(["step", "kind"]).eigenvalue.transform("max")
    df = df[df.eigenvalue > 1e-12 * top]
    df["rank"] = df.groupby(["step", "kind"]).eig.transform(lambda s: s.max() - s + 1)
    g = sns.relplot(df, x="rank", y="eigenvalue", hue="step", col="kind", kind="line", height=3.4,
                    palette="viridis")
    g.set(xscale="log", yscale="log")
    g.figure.suptitle(f"{ds.structure.values[0]} Fisher spectra during training (descending)", y=1.03)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, var in zip(axes, ("rel_frobenius_to_true", "trace"), strict=True):
        sub = ds[var].to_dataframe().reset_index()
        sns.lineplot(sub, x="step", y=var, hue="kind", style="structure", marker="o", ax=ax)
        ax.set(yscale="log", title=ds[var].attrs.get("long_name", var))
    fig.tight_layout()
    return [("spectra", g.figure), ("distance_and_trace", fig)]


def table(ds: xr.Dataset) -> report.Table:
    """Per checkpoint and Fisher kind (dense): λ_max, trace, distance to the true Fisher, κ at each damping."""
    s = ds.structure.values[0]
    rows = []
    for step in ds.step.values:
        for kind in ds.kind.values:
            sel = ds.sel({"step": step, "kind": kind, "structure": s})
            rows.append([int(step), kind, f"{float(sel.eigenvalue.max()):.3g}", f"{float(sel.trace):.3g}",
                         f"{float(sel.rel_frobenius_to_true):.3g}",
                         *[f"{float(c):.3g}" for c in sel.condition_number.values]])
    return (["step", f"fisher ({s})", "λ_max", "trace", "‖F−F_true‖/‖F_true‖",
             *[f"κ(λ={d:g})" for d in ds.damping.values]], rows)


def main(argv: Sequence[str] | None = None) -> Path:
    """Run (or resume) the analysis; returns the report path."""
    args, cfg = report.start_analysis(NAME, __doc__.splitlines()[0], argv, full=FULL, quick=QUICK)
    data = load_digits(seed=0, dtype=torch.float64)
    model = build_model("mlp", data, seed=args.seed, dtype=torch.float64, widths=cfg.widths).eval()
    log = train(model, data, rule="adam", lr=cfg.lr, steps=cfg.steps, batch_size=cfg.batch_size, seed=args.seed,
                eval_every=cfg.checkpoint_every, progress=False)
    save_dataset(log, args.out / "training.nc")
    theta, losses = checkpoints(model, data, cfg, args.seed)
    if not np.allclose(losses, log.loss.values[: len(losses)], rtol=1e-9, atol=1e-12):
        raise RuntimeError("the checkpoint replay does not reproduce the logged training run")
    configs = {f"step={s}": {"step": s, "seed": args.seed} for s in theta}
    done = run_sweep(configs, ResultsStore(args.out / "store"), lambda c: spectra_at(c, model, data, theta, cfg))
    save_dataset(combine(list(done.values()), list(theta), cfg, args.seed), args.out / f"{NAME}.nc")
    return report.finish_analysis(args.out, KIND, plot, table, title="Fisher spectra during training",
                                  summary="Spectra of the true, Monte-Carlo and empirical Fisher of the digits MLP at "
                                  "several points of an Adam run, and their distance to the true Fisher.")


if __name__ == "__main__":
    main()
