"""Fidelity along a training run: train with one rule and measure every rule every few steps.

The model (a copy; the caller's is not modified) is trained full-batch on ``data`` with ``train_rule`` for
``steps`` steps; at steps 0, ``every``, 2·``every``, … and at the last step every rule of ``rules`` is compared
with exact NGD at the current parameters (:func:`fisherlab.fidelity.evaluate.measure`), giving a Dataset with
dims ``step``, ``rule``, ``damping``, ``layer``.

Training rules (a registered name or a :class:`~fisherlab.fidelity.rules.Rule` object):

* any update rule (``"gd"``, ``"ngd"``, ``"kfac"``, ...): each step applies that rule's update computed at the
  current parameters, with ``train_damping`` and ``train_lr``;
* a :class:`~fisherlab.fidelity.rules.ReconstructedGD` rule (``"sngd-kfac"``, ``"sngd-kfac-lowrank"``, ...) with
  ``refresh_every=R``: plain GD on its reconstructed network (:func:`fisherlab.reconstruct`, with the rule's
  structure and root method), whose metric G is recomputed (refreshed) only every R steps. The update the
  training actually takes is then measured too, as rule ``"train:<train_rule>"``, and the
  variable ``steps_since_refresh`` (dim ``step``) says how stale its G was: fidelity as a function of the
  steps since the last refresh (METHOD.md §4, invariant 4).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn
from tqdm.auto import tqdm

from fisherlab.checks import check_dampings, check_lr, check_positive_int, renamed
from fisherlab.errors import InputError
from fisherlab.fidelity.evaluate import (
    fidelity_dataset,
    measure,
    solver_attrs,
)
from fisherlab.fidelity.rules import ReconstructedGD, Rule, RuleContext, UpdateRule, check_rules, get_rule
from fisherlab.likelihoods import Likelihood
from fisherlab.params import ParamSpec

#: Rules measured along a trajectory when none are named (the cheaper ones).
DEFAULT_TRAJECTORY_RULES = ("gd", "adam", "ngd", "block-ngd", "kfac", "diag", "empirical-ngd")


class RuleTrainer:
    """Training by an update rule: each step is the rule's update at the current parameters."""

    def __init__(self, rule: Rule, damping: float, lr: float):
        self.rule = rule
        self.damping, self.lr = damping, lr
        self.steps_since_refresh = 0

    def step(self, ctx: RuleContext) -> Tensor:
        """The update (P,) to apply at the context's state."""
        return self.rule(ctx, self.damping, self.lr)

    def as_rule(self) -> UpdateRule | None:
        """The training update as a rule to measure, when it differs from the fresh rule (never here)."""
        return None


class ReconstructedTrainer:
    """Plain GD on the network of a :class:`ReconstructedGD` rule, G refreshed every ``refresh_every`` steps."""

    def __init__(self, rule: ReconstructedGD, damping: float, lr: float, refresh_every: int):
        self.rule, self.damping, self.lr = rule, damping, lr
        self.refresh_every = refresh_every
        self.net: Any = None

    @property
    def steps_since_refresh(self) -> int:
        """GD steps taken since G was last computed."""
        return 0 if self.net is None else self.net.steps_since_refresh

    def _network(self, ctx: RuleContext) -> Any:
        """The reconstructed network at the context's state, built or refreshed when due."""
        if self.net is None:
            self.net = self.rule.network(ctx, self.damping)
        elif self.net.steps_since_refresh >= self.refresh_every:
            with ctx.timed(f"refresh {self.rule.name}"):
                self.net.refresh(ctx.data)
        return self.net

    def step(self, ctx: RuleContext) -> Tensor:
        """The update (P,) GD on the (possibly stale) reconstructed network takes, in original coordinates."""
        net = self._network(ctx)
        update = net.gd_update(ctx.data, self.lr)
        net.load_original(net.original_vector() + update)
        net.count_step()
        return update

    def as_rule(self) -> UpdateRule:
        """The (possibly stale) network's update at the current state, as a rule (λ is the network's own)."""

        def rule(ctx: RuleContext, damping: float, lr: float) -> Tensor:
            return self._network(ctx).gd_update(ctx.data, lr)

        return rule


def _apply(model: nn.Module, spec: ParamSpec, update: Tensor) -> None:
    """θ ← θ + update, in place on the model's parameters."""
    step = spec.unflatten(update)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in step.items():
            params[name].add_(delta.to(params[name].device, params[name].dtype))


def fidelity_trajectory(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    train_rule: str | Rule = "ngd",
    steps: int = 20,
    every: int = 5,
    rules: Sequence[str] = DEFAULT_TRAJECTORY_RULES,
    damping: float | Sequence[float] = 1e-3,
    lr: float = 0.1,
    train_lr: float | None = None,
    train_damping: float | None = None,
    refresh_every: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    mc_samples: int = 1,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
    cg_tol: float = 1e-6,
    cg_max_iter: int | None = None,
    skip_unavailable: bool = True,
    progress: bool | None = None,
    config: dict | None = None,
    **deprecated: Any,
) -> xr.Dataset:
    """Train with ``train_rule`` and measure the fidelity of every rule every ``every`` steps.

    Args:
        model: The initial network (copied; not modified).
        data: The training batch (full batch): ``(X, y)``, a SplitData (training split) or a DataLoader.
        likelihood: Likelihood name or object.
        train_rule: A registered rule name or a Rule; a :class:`~fisherlab.fidelity.rules.ReconstructedGD` rule
            trains its reconstructed network (``train_method=`` is the deprecated spelling).
        steps: Training steps.
        every: Measure at every ``every``-th step (and at the last).
        rules: Rules measured at each point.
        damping: λ values of the measurements.
        lr: η of the measured updates.
        train_lr: η of training (default ``lr``).
        train_damping: λ of training (default: the first damping).
        refresh_every: For reconstructed training: steps between refreshes of G (default: ``every``).
        dtype: Compute dtype.
        device: Compute device.
        seed: Seed of Monte-Carlo labels.
        mc_samples: Labels per input of the Monte-Carlo Fisher.
        memory_budget: Bytes a dense object may take; above it exact NGD switches to CG.
        chunk_size: Samples per chunk of the engines.
        cg_tol: Relative residual of CG solves.
        cg_max_iter: CG iteration cap.
        skip_unavailable: Record unavailable rules as NaN instead of raising.
        progress: Progress bar (``None``: only on a terminal).
        config: Extra configuration stored in the provenance.
        **deprecated: ``train_method=`` (now ``train_rule``).

    Returns:
        A ``"fidelity_trajectory"`` Dataset: the variables of ``evaluate_fidelity`` with a leading dim ``step``,
        plus ``steps_since_refresh`` (step; 0 for rule training). If training leaves the finite numbers, the
        remaining points are NaN (``steps_since_refresh`` −1, reasons ``"diverged"``) and the attribute
        ``diverged_at_step`` says where (−1: no divergence).
    """
    start = time.perf_counter()
    train_rule = renamed(deprecated, "train_method", "train_rule", train_rule, "ngd", "fidelity_trajectory")
    if deprecated:
        raise InputError(f"fidelity_trajectory got unexpected keyword argument(s) {sorted(deprecated)}")
    rules = check_rules(rules)
    trained = get_rule(train_rule)
    dampings = check_dampings(damping)
    lr = check_lr(lr)
    train_lr = lr if train_lr is None else check_lr(train_lr)
    train_damping = dampings[0] if train_damping is None else check_dampings(train_damping)[0]
    for name, value in (("steps", steps), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
            raise InputError(f"{name} must be an integer >= {0 if name == 'steps' else 1}; got {value!r}")
    ctx_kwargs = dict(likelihood=likelihood, dtype=dtype, device=device, seed=seed, mc_samples=mc_samples,
                      memory_budget=memory_budget, chunk_size=chunk_size, cg_tol=cg_tol, cg_max_iter=cg_max_iter,
                      progress=progress)
    work = copy.deepcopy(model).to(device=device, dtype=dtype)  # trained in the compute dtype
    if isinstance(trained, ReconstructedGD):
        refresh_every = check_positive_int(every if refresh_every is None else refresh_every, "refresh_every")
        trainer: RuleTrainer | ReconstructedTrainer = ReconstructedTrainer(trained, train_damping, train_lr,
                                                                           refresh_every)
    else:
        trainer = RuleTrainer(trained, train_damping, train_lr)
    measured: dict[str, UpdateRule] = dict(rules)
    stale = trainer.as_rule()
    if stale is not None:
        measured[f"train:{trained.name}"] = stale
    points = sorted({*range(0, steps + 1, every), steps})
    records, since, timings = [], [], {}
    bar = tqdm(total=steps + 1, desc=f"trajectory ({trained.name})",
               disable=None if progress is None else not progress)
    diverged_at = -1
    for step in range(steps + 1):
        ctx = RuleContext(work, data, **ctx_kwargs)
        if step in points:
            records.append(measure(ctx, measured, dampings, lr, skip_unavailable=skip_unavailable))
            since.append(trainer.steps_since_refresh)  # after measuring: a due refresh has happened
            last_ctx = ctx
        if step < steps:
            update = trainer.step(ctx)
            _apply(work, ctx.spec, update)
            if not _finite_state(work, update):  # training left the finite numbers: the rest is NaN
                diverged_at = step + 1
                break
        for k, v in ctx.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        bar.update(1)
    bar.close()
    blank = {k: (dims, _blank(a)) for k, (dims, a) in records[0].items()}
    records += [blank] * (len(points) - len(records))
    since += [-1] * (len(points) - len(since))
    return _stack(records, points, since, list(measured), trained.name, dampings, last_ctx, timings, start,
                  config={"train_rule": trained.name, "steps": steps, "every": every, "lr": lr,
                          "train_lr": train_lr, "train_damping": train_damping, "refresh_every": refresh_every,
                          "rules": list(rules), "damping": dampings, "likelihood": repr(last_ctx.likelihood),
                          "mc_samples": mc_samples, "cg_tol": cg_tol, "model": type(model).__name__,
                          **(config or {})}, diverged_at=diverged_at)


def _finite_state(model: nn.Module, update: Tensor) -> bool:
    """Whether the update and the model's parameters are all finite."""
    return bool(torch.isfinite(update).all()) and all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _blank(a: np.ndarray) -> np.ndarray:
    """An array like ``a`` marking a point after divergence: NaN (floats), 0 (ints), "diverged" (strings)."""
    fill = {"f": np.nan, "i": 0, "U": "diverged"}[a.dtype.kind]
    return np.full(a.shape, fill, dtype=a.dtype if a.dtype.kind != "U" else "<U8")


def _stack(records: list[dict], points: list[int], since: list[int], names: list[str], train_rule: str,
           dampings: list[float], ctx: RuleContext, timings: dict, start: float, config: dict, *,
           diverged_at: int) -> xr.Dataset:
    """One Dataset from the per-point measurements, with a leading dim ``step``."""
    stacked = {name: (("step", *dims), np.stack([rec[name][1] for rec in records]))
               for name, (dims, _) in records[0].items()}
    stacked["steps_since_refresh"] = (("step",), np.array(since, dtype=np.int64))
    engine = ctx.engine()
    attrs = {**solver_attrs(ctx, dampings), "lr": config["lr"], "train_rule": train_rule,
             "diverged_at_step": diverged_at,
             "num_params": engine.spec.dim, "num_samples": engine.num_samples, "timings": json.dumps(timings),
             "total_seconds": time.perf_counter() - start}
    ds = fidelity_dataset("fidelity_trajectory", stacked,
                          {"step": points, "rule": names, "damping": dampings,
                           "layer": list(engine.spec.layers())},
                          config=config, seed=ctx.seed, device=engine.device, dtype=engine.dtype, attrs=attrs)
    ds["steps_since_refresh"].attrs.update(long_name="training steps since the last refresh of G", units="1")
    return ds


__all__ = ["DEFAULT_TRAJECTORY_RULES", "ReconstructedTrainer", "RuleTrainer", "fidelity_trajectory"]
