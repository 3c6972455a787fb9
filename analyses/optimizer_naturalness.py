"""Optimizer naturalness: how closely each optimizer's own update tracks exact NGD along its own trajectory.

Problem: the digits MLP (``mlp`` on flattened digits) and the MNIST-1D CNN (``cnn``), float64, initialised with
seeds ``seed``, ``seed+1``, …, full batch of the first ``samples`` training samples. Each optimizer trains its own
run for ``steps`` steps; every ``every`` steps the update it takes there (a dry run of its ``step()``, with its
momentum, moments and preconditioner state of that moment: :class:`fisherlab.fidelity.optimizers.OptimizerRule`)
is compared with exact NGD at the current parameters for two dampings λ of the reference: cosine (scale-free)
and Fisher-norm error (scale-dependent: the optimizer steps with its own learning rate, NGD with η = ``lr``).
Optimizers: SGD, SGD with momentum 0.9, AdamW, Muon (``torch.optim.Muon`` on matrices, AdamW elsewhere; where the
installed torch has it), Shampoo and SOAP (``pytorch_optimizer``, where installed; otherwise left out with a note
in the report), KFAC-NGD (the built-in rule ``kfac`` at λ = ``train_damping`` as the training rule, η =
``ngd_lr``; measured at its own λ with η = ``lr``, the reference's) and SNGD
(:class:`fisherlab.optim.SNGD`, KFAC structure, G refreshed every 5 steps). Output:
``optimizer_naturalness.nc`` (kind ``optimizer_naturalness``; dims ``model``, ``optimizer``, ``seed``, ``step``,
``damping``; variables ``cosine``, ``fisher_rel_error``, ``loss``), one finished (model, optimizer, seed) per file
under ``store/`` (a rerun resumes), figures and ``report.html``.

    python analyses/optimizer_naturalness.py [--out results/optimizer_naturalness] [--quick] [--seed 0] [--threads 1]
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import seaborn as sns
import torch
import xarray as xr

from fisherlab import report
from fisherlab.data import load
from fisherlab.fidelity import fidelity_trajectory, run_sweep
from fisherlab.fidelity.evaluate import fidelity_dataset
from fisherlab.fidelity.optimizers import MuonWithAdamW, OptimizerRule
from fisherlab.fidelity.rules import FunctionRule, get_rule
from fisherlab.models import build_model
from fisherlab.optim import SNGD
from fisherlab.results import ResultsStore, save_dataset

NAME = "optimizer_naturalness"
KIND = "optimizer_naturalness"
#: Model → (data set, layout).
PROBLEMS = {"digits-mlp": ("mlp", "digits", "flat"), "mnist1d-cnn": ("cnn", "mnist1d", "channels")}


@dataclass(frozen=True)
class Config:
    """What is trained and measured (full mode; :data:`QUICK` for tests)."""

    models: tuple[str, ...] = ("digits-mlp", "mnist1d-cnn")
    optimizers: tuple[str, ...] = ("sgd", "momentum", "adamw", "muon", "shampoo", "soap", "kfac-ngd", "sngd")
    seeds: int = 3
    widths: tuple[int, ...] | None = None  # hidden widths of the MLP (None: the built-in 3,466-parameter MLP)
    samples: int = 256
    steps: int = 30
    every: int = 10
    damping: tuple[float, ...] = (1e-3, 1e-1)
    lr: float = 0.1
    sgd_lr: float = 0.1
    adam_lr: float = 3e-3
    train_damping: float = 1e-1
    ngd_lr: float = 0.1


FULL = Config()
QUICK = Config(models=("digits-mlp",), optimizers=("sgd", "adamw", "kfac-ngd", "sngd"), seeds=1, widths=(8,),
               samples=32, steps=2, every=1)

#: Optimizers from the optional library, by name.
LIBRARY = {"shampoo": "Shampoo", "soap": "SOAP"}


def available(name: str) -> bool:
    """Whether the optimizer ``name`` can be built here (Muon: torch ≥ 2.9; Shampoo/SOAP: pytorch_optimizer)."""
    if name == "muon":
        return hasattr(torch.optim, "Muon")
    if name in LIBRARY:
        return importlib.util.find_spec("pytorch_optimizer") is not None
    return True


def factory(name: str, cfg: Config) -> Callable[..., torch.optim.Optimizer]:
    """``params -> Optimizer`` of a torch or library optimizer."""
    if name == "sgd":
        return functools.partial(torch.optim.SGD, lr=cfg.sgd_lr)
    if name == "momentum":
        return functools.partial(torch.optim.SGD, lr=cfg.sgd_lr / 2, momentum=0.9)
    if name == "adamw":
        return functools.partial(torch.optim.AdamW, lr=cfg.adam_lr, weight_decay=0.01)
    if name == "muon":
        return functools.partial(MuonWithAdamW, lr=cfg.adam_lr, weight_decay=0.01)
    import pytorch_optimizer

    return functools.partial(getattr(pytorch_optimizer, LIBRARY[name]), lr=cfg.adam_lr)


def run_one(config: Mapping[str, Any], cfg: Config) -> xr.Dataset:
    """The trajectory of one (model, optimizer, seed): the optimizer's own update measured along its own run."""
    arch, data_name, layout = PROBLEMS[config["model"]]
    seed, name = int(config["seed"]), config["optimizer"]
    split = load(data_name, seed=0, layout=layout).train_subset(cfg.samples).to(dtype=torch.float64)
    widths = {"widths": cfg.widths} if arch == "mlp" and cfg.widths is not None else {}
    model = build_model(arch, split, seed=seed, dtype=torch.float64, **widths).eval()
    common = dict(steps=cfg.steps, every=cfg.every, damping=list(cfg.damping), lr=cfg.lr, seed=seed,
                  dtype=torch.float64, progress=False, config={"samples": cfg.samples, **config})
    if name == "kfac-ngd":  # KFAC-NGD at its own λ as the training rule, measured as the step taken (η = lr)
        kfac = get_rule("kfac")
        rule = FunctionRule(name, lambda ctx, damping, lr: kfac(ctx, cfg.train_damping, lr))
        ds = fidelity_trajectory(model, split, train_rule=rule, rules=[rule], train_lr=cfg.ngd_lr, **common)
    else:
        optimizer: Any
        if name == "sngd":
            optimizer = SNGD(model, split, lr=cfg.ngd_lr, structure="kfac", damping=cfg.train_damping,
                             refresh_every=5, seed=seed)
        else:
            optimizer = OptimizerRule(name, factory(name, cfg))
        ds = fidelity_trajectory(model, split, optimizer=optimizer, rules=[], **common)
    return ds.assign_coords(rule=[name])


def combine(parts: Mapping[tuple[str, str, int], xr.Dataset], cfg: Config, optimizers: list[str],
            seed: int) -> xr.Dataset:
    """Cosine, Fisher-norm error and loss stacked along new dims ``model``, ``optimizer``, ``seed``."""
    seeds = list(range(seed, seed + cfg.seeds))

    def one(ds: xr.Dataset) -> xr.Dataset:
        return ds[["cosine", "fisher_rel_error", "loss"]].isel(rule=0, drop=True).drop_attrs()

    stacked = xr.concat([xr.concat([xr.concat([one(parts[m, o, s]) for s in seeds], dim="seed") for o in optimizers],
                                   dim="optimizer") for m in cfg.models], dim="model", combine_attrs="drop")
    coords = {"model": list(cfg.models), "optimizer": optimizers, "seed": seeds, "step": stacked.step.values,
              "damping": stacked.damping.values}
    ds = fidelity_dataset(KIND, {k: (v.dims, v.values) for k, v in stacked.data_vars.items()}, coords,
                          config=dataclasses.asdict(cfg), seed=seed, device="cpu", dtype="float64")
    first = next(iter(parts.values()))
    for var in ("cosine", "fisher_rel_error", "loss"):
        ds[var].attrs.update(first[var].attrs)
    ds.attrs["skipped"] = ", ".join(o for o in cfg.optimizers if o not in optimizers) or "none"
    return ds


def plot(ds: xr.Dataset) -> list[report.Figure]:
    """Cosine to exact NGD along each optimizer's trajectory (per λ), and the loss curves beside."""
    cos = ds.cosine.to_dataframe().reset_index()
    g = sns.relplot(cos, x="step", y="cosine", hue="optimizer", col="model", row="damping", kind="line",
                    marker="o", height=3.0, errorbar=("pi", 100))
    g.figure.suptitle("cosine to exact NGD of each optimizer's update along its own trajectory", y=1.02)
    loss = ds.loss.to_dataframe().reset_index()
    h = sns.relplot(loss, x="step", y="loss", hue="optimizer", col="model", kind="line", height=3.0,
                    errorbar=("pi", 100))
    h.figure.suptitle("training loss of each optimizer's run", y=1.04)
    return [("cosine_along_own_trajectory", g.figure), ("loss", h.figure)]


def table(ds: xr.Dataset) -> report.Table:
    """Per (model, optimizer): mean over seeds and measured steps of cosine and Fisher-norm error at each λ."""
    lams = [float(d) for d in ds.damping.values]
    rows = []
    for m in ds.model.values:
        for o in ds.optimizer.values:
            sel = ds.sel(model=m, optimizer=o)
            cells = []
            for d in lams:
                cells += [f"{float(sel.cosine.sel(damping=d).mean()):.3f}",
                          f"{float(sel.fisher_rel_error.sel(damping=d).mean()):.3g}"]
            rows.append([str(m), str(o), *cells, f"{float(sel.loss.isel(step=-1).mean()):.3f}"])
    header = ["model", "optimizer"]
    for d in lams:
        header += [f"cosine (λ={d:g})", f"Fisher-norm error (λ={d:g})"]
    return [*header, f"final loss (step {int(ds.step.values[-1])})"], rows


def main(argv: Sequence[str] | None = None) -> Path:
    """Run (or resume) the analysis; returns the report path."""
    args, cfg = report.start_analysis(NAME, __doc__.splitlines()[0], argv, full=FULL, quick=QUICK)
    optimizers = [o for o in cfg.optimizers if available(o)]
    skipped = [o for o in cfg.optimizers if o not in optimizers]
    seeds = range(args.seed, args.seed + cfg.seeds)
    configs = {f"{m},{o},seed={s}": {"model": m, "optimizer": o, "seed": s}
               for m in cfg.models for o in optimizers for s in seeds}
    done = run_sweep(configs, ResultsStore(args.out / "store"), lambda c: run_one(c, cfg))
    parts = {(c["model"], c["optimizer"], c["seed"]): done[k] for k, c in configs.items()}
    save_dataset(combine(parts, cfg, optimizers, args.seed), args.out / f"{NAME}.nc")
    note = (f" Not installed here, left out: {', '.join(skipped)} (pip install 'fisherlab[optimizers]')."
            if skipped else "")
    return report.finish_analysis(args.out, KIND, plot, table, title="Optimizer naturalness",
                                  summary="How closely the update each optimizer actually takes — with its momentum, "
                                  "moments and preconditioner state — tracks exact NGD at the points its own "
                                  "training visits." + note)


if __name__ == "__main__":
    main()
