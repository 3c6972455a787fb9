"""The fidelity study: the main job of ``fisherlab fidelity``.

One configuration (:class:`StudyConfig`) runs four parts on one model and data set, each saved as a Dataset in
the output folder as soon as it finishes (a rerun after Ctrl-C resumes from the finished parts):

1. ``fidelity.nc`` — every update rule against exact NGD at the initial parameters, for several dampings
   (:func:`fisherlab.fidelity.evaluate_fidelity`);
2. ``trajectory.nc`` — the same measurement every few steps along a training run
   (:func:`fisherlab.fidelity.fidelity_trajectory`);
3. ``geometry.nc`` — condition numbers of F + λI and of G^{-1/2}(F + λI)G^{-1/2} per structure
   (:func:`fisherlab.fidelity.fisher_geometry`);
4. ``spectrum.nc`` — spectra of the true, Monte-Carlo and empirical Fishers (:func:`fisherlab.fisher_spectra`).

Then :func:`fisherlab.report.build_report` draws the figures and writes ``report.html``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from fisherlab import data as fdata
from fisherlab.errors import InputError
from fisherlab.models import build_model
from fisherlab.results import ResultsStore, save_dataset

DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: The data layout each model family takes on the embedded data sets (None: not supported).
LAYOUTS = {
    ("mlp", "digits"): "flat", ("cnn", "digits"): "image", ("resnet", "digits"): "image",
    ("mlp", "mnist1d"): "flat", ("cnn", "mnist1d"): "channels", ("resnet", "mnist1d"): "channels",
    ("lstm", "mnist1d"): "sequence", ("lstm", "digits"): None,
}

PARTS = ("fidelity", "trajectory", "geometry", "spectrum")


@dataclass
class StudyConfig:
    """Everything a fidelity study depends on (recorded in every Dataset's provenance).

    Attributes:
        model: Reference network name (:data:`fisherlab.models.MODELS`).
        data: Embedded data set name (digits, mnist1d, synthetic-*).
        n_samples: Training samples used (the first ``n_samples`` of the training split; None: all).
        rules: Update rules compared with exact NGD at the initial parameters (``sngd-full``: invariant 3 in the
            results, about 3 s per damping for P = 3,466 with its Cholesky roots).
        dampings: λ values.
        lr: Learning rate η of every measured step.
        train_method: Method of the training trajectory (a rule name or ``sngd-<structure>``).
        train_lr: Learning rate of the trajectory's training steps.
        steps: Training steps of the trajectory.
        every: Measure fidelity every ``every`` steps.
        refresh_every: Refresh interval of a reconstructed network when ``train_method`` is ``sngd-*``.
        trajectory_rules: Rules measured along the trajectory.
        geometry_structures: Structures G whose preconditioned geometry is measured.
        geometry_dampings: λ values of the geometry part (each costs one eigendecomposition per structure).
        spectrum_kinds: Fisher kinds whose spectra are computed.
        parts: Parts of the study to run.
        seed: Seed of data split, initialisation and Monte-Carlo labels.
        device: Torch device.
        dtype: ``"float64"`` or ``"float32"``.
    """

    model: str = "mlp"
    data: str = "digits"
    n_samples: int | None = 512
    rules: list[str] = field(default_factory=lambda: ["gd", "adam", "ngd", "block-ngd", "kfac", "ekfac", "unit",
                                                      "diag", "empirical-ngd", "mc-ngd", "lowrank", "sngd-full",
                                                      "sngd-block", "sngd-kfac"])
    dampings: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    lr: float = 0.1
    train_method: str = "sngd-kfac"
    train_lr: float = 0.5
    steps: int = 40
    every: int = 4
    refresh_every: int = 10
    trajectory_rules: list[str] = field(default_factory=lambda: ["gd", "adam", "ngd", "block-ngd", "kfac", "diag",
                                                                 "empirical-ngd"])
    geometry_structures: list[str] = field(default_factory=lambda: ["block", "kfac", "diag"])
    geometry_dampings: list[float] = field(default_factory=lambda: [1e-3])
    spectrum_kinds: list[str] = field(default_factory=lambda: ["true", "mc", "empirical"])
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float64"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.parts) - set(PARTS))
        if unknown:
            raise InputError(f"unknown study part(s) {unknown}; valid: {list(PARTS)}")
        if self.dtype not in DTYPES:
            raise InputError(f"unknown dtype {self.dtype!r}; valid: {sorted(DTYPES)}")
        from fisherlab.fidelity.rules import check_rules

        check_rules(self.rules)
        check_rules(self.trajectory_rules)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain values (for provenance and the output-folder manifest)."""
        return {"command": "fidelity", **dataclasses.asdict(self)}


def load_model_and_data(model: str, data: str, *, n_samples: int | None, seed: int, device: str,
                        dtype: torch.dtype) -> tuple[torch.nn.Module, fdata.SplitData]:
    """The seeded model (eval mode) and the embedded data it takes, on ``device`` in ``dtype``."""
    kwargs: dict[str, Any] = {"seed": seed}
    if data in ("digits", "mnist1d"):
        layout = LAYOUTS.get((model, data))
        if layout is None:
            raise InputError(f"model {model!r} does not take data {data!r}; use data 'mnist1d'")
        kwargs["layout"] = layout
    split = fdata.load(data, **kwargs)
    if n_samples is not None:
        split = split.train_subset(n_samples)
    split = split.to(device=device, dtype=dtype)
    net = build_model(model, split, seed=seed, dtype=dtype, device=device).eval()
    return net, split


def likelihood_for(split: fdata.SplitData) -> str:
    """The likelihood matching a data set's task."""
    return {"multiclass": "categorical", "binary": "bernoulli", "regression": "gaussian"}[split.task]


def _log(message: str) -> None:
    print(message, flush=True)


def run_study(cfg: StudyConfig, out: str | Path, *, progress: bool | None = None,
              log: Callable[[str], None] = _log) -> dict[str, xr.Dataset]:
    """Run the parts of the study not yet in ``out`` and save each as ``out/<part>.nc`` when it finishes.

    Returns:
        ``{part: Dataset}`` for every part of ``cfg.parts``.
    """
    from fisherlab.fidelity import evaluate_fidelity, fidelity_trajectory, fisher_geometry
    from fisherlab.spectra import fisher_spectra

    out = Path(out)
    dtype = DTYPES[cfg.dtype]
    model, split = load_model_and_data(cfg.model, cfg.data, n_samples=cfg.n_samples, seed=cfg.seed,
                                       device=cfg.device, dtype=dtype)
    lik = likelihood_for(split)
    common = {"likelihood": lik, "dtype": dtype, "device": cfg.device, "seed": cfg.seed, "progress": progress,
              "config": cfg.to_dict()}
    jobs: dict[str, Callable[[], xr.Dataset]] = {
        "fidelity": lambda: evaluate_fidelity(model, split, rules=cfg.rules, damping=cfg.dampings, lr=cfg.lr,
                                              **common),
        "trajectory": lambda: fidelity_trajectory(
            model, split, train_method=cfg.train_method, steps=cfg.steps, every=cfg.every,
            rules=cfg.trajectory_rules, damping=cfg.dampings[len(cfg.dampings) // 2], lr=cfg.lr,
            train_lr=cfg.train_lr, refresh_every=cfg.refresh_every, **common),
        "geometry": lambda: fisher_geometry(model, split, structures=cfg.geometry_structures,
                                            damping=cfg.geometry_dampings,
                                            **common),
        "spectrum": lambda: fisher_spectra(model, split, lik, kinds=cfg.spectrum_kinds, seed=cfg.seed, dtype=dtype,
                                           device=cfg.device, progress=progress, config=cfg.to_dict()),
    }
    store = ResultsStore(out)
    results: dict[str, xr.Dataset] = {}
    for part in cfg.parts:
        if store.has(part):
            log(f"[{part}] already in {out}: kept (delete {store.path(part)} to recompute)")
            results[part] = store.load(part)
            continue
        start = time.perf_counter()
        log(f"[{part}] running ...")
        ds = jobs[part]()
        save_dataset(ds, store.path(part))
        results[part] = ds
        log(f"[{part}] done in {time.perf_counter() - start:.1f} s -> {store.path(part)}")
    return results


def headline(results: dict[str, xr.Dataset]) -> str:
    """One paragraph saying what the study found (HTML-safe text)."""
    parts = []
    if "fidelity" in results:
        ds = results["fidelity"]
        d = float(ds.damping.values[len(ds.damping) // 2])
        cos = ds.cosine.sel(damping=d).to_series().dropna().sort_values(ascending=False)
        ranked = ", ".join(f"{m} {c:.3f}" for m, c in cos.items())
        parts.append(f"At the initial parameters with damping λ = {d:g}, cosine similarity of each rule's update "
                     f"to exact NGD: {ranked}.")
    if "trajectory" in results:
        ds = results["trajectory"]
        last = ds.cosine.isel(step=-1)
        if "damping" in last.dims:
            last = last.isel(damping=0)
        cos = last.to_series().dropna().sort_values(ascending=False)
        parts.append(f"After {int(ds.step.values[-1])} training steps: " +
                     ", ".join(f"{m} {c:.3f}" for m, c in cos.items()) + ".")
    if "geometry" in results:
        ds = results["geometry"]
        if "condition_number" in ds:
            cn = ds.condition_number.isel(damping=0).to_series().dropna()
            parts.append("Condition number of the Fisher the (reconstructed) network sees, λ = "
                         f"{float(ds.damping[0]):g}: " + ", ".join(f"{k} {v:.3g}" for k, v in cn.items()
                                                                    if np.isfinite(v)) + ".")
    return " ".join(parts)
