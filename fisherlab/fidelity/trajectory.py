"""Fidelity along a training run: train with one rule or optimizer and measure every rule every few steps.

The model (a copy; the caller's is not modified) is trained full-batch on ``data`` with ``train_rule`` (or the
user's ``optimizer``) for ``steps`` steps; at steps 0, ``every``, 2·``every``, … and at the last step every rule
of ``rules`` is compared with exact NGD at the current parameters (:func:`fisherlab.fidelity.evaluate.measure`),
giving a Dataset with dims ``step``, ``rule``, ``damping``, ``layer``.

Training rules (a registered name or a :class:`~fisherlab.fidelity.rules.Rule` object):

* any update rule (``"gd"``, ``"ngd"``, ``"kfac"``, ...): each step applies that rule's update computed at the
  current parameters, with ``train_damping`` and ``train_lr``;
* a :class:`~fisherlab.fidelity.rules.ReconstructedGD` rule (``"sngd-kfac"``, ``"sngd-kfac-lowrank"``, ...) with
  ``refresh_every=R``: plain GD on its reconstructed network (:func:`fisherlab.reconstruct`, with the rule's
  structure and root method), whose metric G is recomputed (refreshed) only every R steps. The update the
  training actually takes is then measured too, as rule ``"train:<train_rule>"``, and the
  variable ``steps_since_refresh`` (dim ``step``) says how stale its G was: fidelity as a function of the
  steps since the last refresh (docs/method.md, invariant 4).

Training with the user's **optimizer** (``optimizer=``: a ``torch.optim.Optimizer`` over the model's parameters,
a factory ``params -> Optimizer``, or an :class:`~fisherlab.fidelity.optimizers.OptimizerRule`): each step is
one real ``step()`` with the batch gradient (and a closure where the optimizer needs one), and at each measured
point the update the optimizer takes there is measured by a dry run as rule ``"optimizer:<Class>"`` — the very
update the training then takes, with the optimizer's state, learning rate and schedule of that moment. An
instance is copied together with the model (its state comes along; the caller's optimizer is not modified); a
factory is called on the copy's trainable parameters.

:class:`FidelityProbe` does the same for the user's own training loop: ``probe(step, optimizer)`` every step,
``probe.dataset()`` at the end. In every case damping is a property of the reference (exact NGD with λ, the
``damping`` dim); an optimizer's update does not depend on it.
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

from fisherlab.checks import check_dampings, check_device, check_dtype, check_lr, check_positive_int, renamed
from fisherlab.errors import InputError
from fisherlab.fidelity.evaluate import (
    fidelity_dataset,
    measure,
    solver_attrs,
)
from fisherlab.fidelity.optimizers import (
    OptimizerRule,
    build_optimizer,
    check_binding,
    check_dense_gradients,
    check_optimizer,
    dry_run,
    isolated_rng,
    loss_closure,
)
from fisherlab.fidelity.rules import ReconstructedGD, Rule, RuleContext, UpdateRule, check_rules, get_rule
from fisherlab.likelihoods import Likelihood
from fisherlab.params import ParamSpec
from fisherlab.progress import bar as progress_bar

#: Rules measured along a trajectory when none are named (the cheaper ones).
DEFAULT_TRAJECTORY_RULES = ("gd", "adam", "ngd", "block-ngd", "kfac", "diag", "empirical-ngd")


class RuleTrainer:
    """Training by an update rule: each step is the rule's update at the current parameters."""

    #: Whether :meth:`step` moves the model itself (else the loop applies the update it returns).
    in_place = False

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

    in_place = False

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


class OptimizerTrainer:
    """Training by an optimizer bound to the trained model: each step is one real ``step()`` with ∇L of the batch."""

    in_place = True

    def __init__(self, rule: OptimizerRule):
        self.rule = rule

    @property
    def steps_since_refresh(self) -> int:
        """Steps since the optimizer last recomputed its curvature (its ``steps_since_refresh``, else 0)."""
        return int(getattr(self.rule.optimizer, "steps_since_refresh", 0))

    def step(self, ctx: RuleContext) -> Tensor:
        """Take the step on the context's model (in place); returns its update (P,)."""
        optimizer = self.rule.optimizer
        closure = loss_closure(ctx.model, ctx) if self.rule.uses_closure(optimizer) else None
        return dry_run(optimizer, ctx.model, ctx.spec, ctx.gradient, closure, name=self.rule.name, restore=False)

    def as_rule(self) -> UpdateRule | None:
        """The optimizer is measured under its own name (never a second rule)."""
        return None


def bind_optimizer(model: nn.Module, optimizer: Any, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None,
                   lr: float | None = None) -> tuple[nn.Module, OptimizerRule]:
    """A copy of ``model`` (in ``dtype`` on ``device``) and the optimizer as a rule bound to the copy.

    Args:
        model: The user's model (not modified).
        optimizer: An optimizer over ``model``'s parameters (copied together with the model, state and all; the
            original is not modified), a factory ``params -> Optimizer`` (called on the copy's trainable
            parameters), or an :class:`~fisherlab.fidelity.optimizers.OptimizerRule` of either.
        dtype: Compute dtype of the copy (default: the model's).
        device: Its device (default: the model's).
        lr: η for a factory rule that ``takes_lr``.

    Raises:
        InputError: Not an optimizer or factory, an optimizer over other tensors or only some trainable
            parameters, sparse gradients, or a factory that fails.
    """
    check_dense_gradients(model)
    rule = optimizer if isinstance(optimizer, OptimizerRule) else None
    target = optimizer if rule is None else rule.optimizer
    if hasattr(target, "param_groups"):
        check_optimizer(target)
        check_binding(target, model, ParamSpec.from_model(model))
        work, bound = copy.deepcopy((model, target))
        first = next(iter(work.parameters()))
        before = (first.dtype, first.device)
        work.to(device=device, dtype=dtype)
        if (first.dtype, first.device) != before:  # state tensors follow the parameters (load_state_dict casts)
            bound.load_state_dict(copy.deepcopy(bound.state_dict()))
    elif callable(target):
        work = copy.deepcopy(model).to(device=device, dtype=dtype)
        named = dict(work.named_parameters())
        params = [named[n] for n in ParamSpec.from_model(work).names]
        bound = build_optimizer(target, params) if rule is None else rule.build(params, lr)
    else:
        raise InputError(f"optimizer must be a torch.optim.Optimizer or a factory params -> Optimizer; "
                         f"got {type(target)}")
    # a bare factory's rule is named after the class it built
    return work, OptimizerRule(None if rule is None else rule.name, bound,
                               closure=None if rule is None else rule.closure)


def _hyperparameters(optimizer: Any) -> list[dict[str, Any]]:
    """Each param group's hyperparameters (numbers, strings, tuples of them), for the provenance."""
    simple = (bool, int, float, str, type(None))
    out = []
    for group in optimizer.param_groups:
        out.append({k: (float(v) if isinstance(v, Tensor) and v.numel() == 1 else
                        v if isinstance(v, simple) or (isinstance(v, tuple) and all(isinstance(x, simple) for x in v))
                        else repr(v))
                    for k, v in group.items() if k != "params"})
    return out


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
    train_rule: str | Rule | None = None,
    optimizer: Any = None,
    steps: int = 20,
    every: int = 5,
    rules: Sequence[str | Rule] = DEFAULT_TRAJECTORY_RULES,
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
    context: RuleContext | None = None,
    **deprecated: Any,
) -> xr.Dataset:
    """Train with ``train_rule`` or ``optimizer`` and measure the fidelity of every rule every ``every`` steps.

    Args:
        model: The initial network (copied; not modified).
        data: The training batch (full batch): ``(X, y)``, a SplitData (training split) or a DataLoader.
        likelihood: Likelihood name or object.
        train_rule: A registered rule name or a Rule (default ``"ngd"``); a
            :class:`~fisherlab.fidelity.rules.ReconstructedGD` rule trains its reconstructed network
            (``train_method=`` is the deprecated spelling).
        optimizer: Train with this optimizer instead (module docstring): an optimizer over ``model``'s
            parameters (copied with the model; not modified), a factory ``params -> Optimizer`` or an
            :class:`~fisherlab.fidelity.optimizers.OptimizerRule`. Its update is measured at each point as rule
            ``"optimizer:<Class>"`` (first), with its own learning rate. A learning-rate scheduler does not come
            along (it belongs to a training loop): to measure a scheduled run, use :class:`FidelityProbe` in it.
        steps: Training steps.
        every: Measure at every ``every``-th step (and at the last).
        rules: Rules measured at each point (may be empty when ``optimizer`` is given).
        damping: λ values of the measurements: the damping of the exact NGD reference (and of the built-in rules
            that have one).
        lr: η of the measured updates (of the reference and the built-in rules).
        train_lr: η of rule training (default ``lr``), and of an optimizer factory that takes the learning rate.
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
        context: A :class:`~fisherlab.fidelity.rules.RuleContext` of ``model`` on ``data`` with these settings,
            already used elsewhere (e.g. by :func:`~fisherlab.evaluate_fidelity` at the same parameters): step 0
            is measured with it, so its Fishers, structures and solves are not computed again (refused, with an
            InputError, when its data, parameters or settings differ).
        **deprecated: ``train_method=`` (now ``train_rule``).

    Returns:
        A ``"fidelity_trajectory"`` Dataset: the variables of ``evaluate_fidelity`` with a leading dim ``step``,
        plus ``steps_since_refresh`` (step; 0 for rule training). If training leaves the finite numbers, the
        remaining points are NaN (``steps_since_refresh`` −1, reasons ``"diverged"``) and the attribute
        ``diverged_at_step`` says where (−1: no divergence).
    """
    start = time.perf_counter()
    train_rule = renamed(deprecated, "train_method", "train_rule", train_rule, None, "fidelity_trajectory")
    if deprecated:
        raise InputError(f"fidelity_trajectory got unexpected keyword argument(s) {sorted(deprecated)}")
    if optimizer is not None and train_rule is not None:
        raise InputError("fidelity_trajectory trains with train_rule= or with optimizer=, not both")
    rules = {} if optimizer is not None and not rules else check_rules(rules)
    trained = None if optimizer is not None else get_rule("ngd" if train_rule is None else train_rule)
    dampings = check_dampings(damping)
    lr = check_lr(lr)
    train_lr = lr if train_lr is None else check_lr(train_lr)
    train_damping = dampings[0] if train_damping is None else check_dampings(train_damping)[0]
    for name, value in (("steps", steps), ("every", every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "steps" else 1):
            raise InputError(f"{name} must be an integer >= {0 if name == 'steps' else 1}; got {value!r}")
    ctx_kwargs = dict(likelihood=likelihood, dtype=dtype, device=device, seed=seed, mc_samples=mc_samples,
                      memory_budget=memory_budget, chunk_size=chunk_size, cg_tol=cg_tol, cg_max_iter=cg_max_iter,
                      progress=progress, dampings=tuple(dampings))  # one multi-shift solve serves every λ
    dtype, device = check_dtype(dtype), None if device is None else check_device(device)
    measured: dict[str, UpdateRule] = {}
    if optimizer is not None:
        work, bound = bind_optimizer(model, optimizer, dtype=dtype, device=device, lr=train_lr)
        if bound.name in rules:
            raise InputError(f"the optimizer's rule name {bound.name!r} is also in rules")
        trainer: RuleTrainer | ReconstructedTrainer | OptimizerTrainer = OptimizerTrainer(bound)
        measured[bound.name] = bound
        trained_name, train_config = bound.name, {"optimizer": bound.name,
                                                  "optimizer_param_groups": _hyperparameters(bound.optimizer)}
    else:
        work = copy.deepcopy(model).to(device=device, dtype=dtype)  # trained in the compute dtype
        trained_name, train_config = trained.name, {"train_rule": trained.name}
        if isinstance(trained, ReconstructedGD):
            refresh_every = check_positive_int(every if refresh_every is None else refresh_every, "refresh_every")
            trainer = ReconstructedTrainer(trained, train_damping, train_lr, refresh_every)
        else:
            trainer = RuleTrainer(trained, train_damping, train_lr)
    measured.update(rules)
    if context is not None:
        if trainer.in_place:
            raise InputError("context= shares the work of rule training; an optimizer trains a model of its own")
        context.check_shares(work, data, **ctx_kwargs)
    spec = ParamSpec.from_model(work)  # the update's ordering at every step (an engine only where one measures)
    stale = trainer.as_rule()
    if stale is not None:
        measured[f"train:{trained_name}"] = stale
    points = sorted({*range(0, steps + 1, every), steps})
    records, since, timings = [], [], {}
    bar = progress_bar(total=steps + 1, desc=f"trajectory ({trained_name})", progress=progress)
    diverged_at = -1
    for step in range(steps + 1):
        ctx = context if step == 0 and context is not None else RuleContext(work, data, **ctx_kwargs)
        before = dict(ctx.timings)  # a shared context comes with the timings of its earlier use
        if step in points:
            with isolated_rng([ctx.engine().device]):  # measuring never changes what training draws next
                records.append(measure(ctx, measured, dampings, lr, skip_unavailable=skip_unavailable))
            since.append(trainer.steps_since_refresh)  # after measuring: a due refresh has happened
            summary = _summary(ctx, dampings)
        if step < steps:
            update = trainer.step(ctx)
            if not trainer.in_place:
                _apply(work, spec, update)
            if not _finite_state(work, update):  # training left the finite numbers: the rest is NaN
                diverged_at = step + 1
                break
        for k, v in ctx.timings.items():
            timings[k] = timings.get(k, 0.0) + v - before.get(k, 0.0)
        bar.update(1)
    bar.close()
    blank = {k: (dims, _blank(a)) for k, (dims, a) in records[0].items()}
    records += [blank] * (len(points) - len(records))
    since += [-1] * (len(points) - len(since))
    return _stack(records, points, since, list(measured), trained_name, dampings, summary, timings, start,
                  config={**train_config, "steps": steps, "every": every, "lr": lr,
                          "train_lr": train_lr, "train_damping": train_damping, "refresh_every": refresh_every,
                          "rules": list(rules), "damping": dampings, "likelihood": summary["likelihood"],
                          "mc_samples": mc_samples, "cg_tol": cg_tol, "model": type(model).__name__,
                          **(config or {})}, diverged_at=diverged_at)


class FidelityProbe:
    """Fidelity along the user's own training loop: call the probe every step, read its Dataset at the end.

    At every ``every``-th step it measures, at the model's current parameters and on ``data``, the update the
    optimizer would take now (a dry run, :class:`~fisherlab.fidelity.optimizers.OptimizerRule`; rule
    ``"optimizer:<Class>"``) and the built-in ``rules``, against exact NGD with each damping λ. Measuring changes
    nothing: not the model, its gradients, the optimizer (state, ``param_groups``, hooks) or the random
    generators, so a loop with the probe trains bit for bit as one without it.

    Example::

        probe = FidelityProbe(model, (X, y), rules=["gd", "kfac"], every=10)
        for step in range(steps):
            probe(step, optimizer)  # before the step: the update about to be taken
            optimizer.zero_grad()
            loss_fn(model(X), y).backward()
            optimizer.step()
        ds = probe.dataset()  # dims step, rule, damping, layer

    Args:
        model: The model being trained (measured in place and left as it was; in eval mode if it has dropout or
            batch norm). Measured in its own dtype and device.
        data: The batch the measurements use: ``(X, y)``, a SplitData (training split) or a DataLoader.
        likelihood: Likelihood name or object.
        rules: Built-in rules measured beside the optimizer (names or Rule objects; may be empty).
        every: Measure when ``step % every == 0``.
        damping: λ of the exact NGD reference (one or several).
        lr: η of the reference and the built-in rules (the optimizer steps with its own).
        seed, mc_samples, memory_budget, chunk_size, cg_tol, cg_max_iter, skip_unavailable, progress: As for
            :func:`fidelity_trajectory`.
        config: Extra configuration stored in the provenance.

    Raises:
        InputError: Bad options (at construction); at a call, an optimizer over other tensors or only some
            trainable parameters, sparse gradients, a failing step, or a different set of rules than at the
            first measured call.
    """

    def __init__(self, model: nn.Module, data: Any, likelihood: str | Likelihood = "categorical", *,
                 rules: Sequence[str | Rule] = (), every: int = 1, damping: float | Sequence[float] = 1e-3,
                 lr: float = 0.1, seed: int = 0, mc_samples: int = 1, memory_budget: int | None = None,
                 chunk_size: int | None = None, cg_tol: float = 1e-6, cg_max_iter: int | None = None,
                 skip_unavailable: bool = True, progress: bool | None = False, config: dict | None = None):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module; got {type(model)}")
        check_dense_gradients(model)
        self.model, self.data, self.likelihood = model, data, likelihood
        self.rules = check_rules(rules) if rules else {}
        self.every = check_positive_int(every, "every")
        self.dampings, self.lr = check_dampings(damping), check_lr(lr)
        self.skip_unavailable = skip_unavailable
        self._ctx_kwargs = dict(likelihood=likelihood, seed=seed, mc_samples=mc_samples,
                                memory_budget=memory_budget, chunk_size=chunk_size, cg_tol=cg_tol,
                                cg_max_iter=cg_max_iter, progress=progress, dampings=tuple(self.dampings))
        self._config = {"every": self.every, "rules": list(self.rules), "damping": self.dampings, "lr": self.lr,
                        "mc_samples": mc_samples, "cg_tol": cg_tol, "model": type(model).__name__,
                        **(config or {})}
        self._optimizers: dict[int, OptimizerRule] = {}
        self._names: list[str] | None = None
        self._records: list[dict] = []
        self._points: list[int] = []
        self._since: list[int] = []
        self._timings: dict[str, float] = {}
        self._summary: dict[str, Any] | None = None
        self._start = time.perf_counter()

    def _rule(self, optimizer: Any) -> OptimizerRule:
        """The rule of ``optimizer`` (made once per optimizer object, its binding checked)."""
        rule = self._optimizers.get(id(optimizer))
        if rule is None or rule.optimizer is not optimizer:
            rule = OptimizerRule(None, optimizer)
            check_binding(optimizer, self.model, ParamSpec.from_model(self.model))
            self._optimizers = {id(optimizer): rule}
        return rule

    def __call__(self, step: int, optimizer: Any = None, *, force: bool = False) -> bool:
        """Measure at this step if ``step % every == 0`` (or ``force``); returns whether it measured.

        Args:
            step: The training step (the ``step`` coordinate; increasing from call to call).
            optimizer: The optimizer training the model (measured by a dry run), or None (built-in rules only).
            force: Measure whatever the step (e.g. the last one).
        """
        step = check_positive_int(step, "step", minimum=0)
        if not force and step % self.every:
            return False
        if self._points and step <= self._points[-1]:
            raise InputError(f"probe steps must increase; got {step} after {self._points[-1]}")
        measured: dict[str, UpdateRule] = {}
        if optimizer is not None:
            rule = self._rule(optimizer)
            if rule.name in self.rules:
                raise InputError(f"the optimizer's rule name {rule.name!r} is also in rules")
            measured[rule.name] = rule
        measured.update(self.rules)
        if not measured:
            raise InputError("the probe has nothing to measure: pass an optimizer or give it rules")
        if self._names is not None and list(measured) != self._names:
            raise InputError(f"the probe measured rules {self._names} before; now {list(measured)}")
        ctx = RuleContext(self.model, self.data, **self._ctx_kwargs)
        with isolated_rng([ctx.engine().device]):
            self._records.append(measure(ctx, measured, self.dampings, self.lr,
                                         skip_unavailable=self.skip_unavailable))
        self._names = list(measured)
        self._points.append(step)
        self._since.append(int(getattr(optimizer, "steps_since_refresh", 0)))
        self._summary = _summary(ctx, self.dampings)
        if optimizer is not None and "optimizer" not in self._config:
            self._config.update(optimizer=self._names[0], optimizer_param_groups=_hyperparameters(optimizer))
        for k, v in ctx.timings.items():
            self._timings[k] = self._timings.get(k, 0.0) + v
        return True

    def dataset(self) -> xr.Dataset:
        """The measurements so far, as :func:`fidelity_trajectory` returns them (dims step, rule, damping, layer).

        Raises:
            InputError: If nothing has been measured yet.
        """
        if not self._records or self._summary is None or self._names is None:
            raise InputError("the probe has measured nothing yet (call it with step % every == 0)")
        train = self._config.get("optimizer", "the user's loop")
        return _stack(self._records, self._points, self._since, self._names, train, self.dampings,
                      self._summary, self._timings, self._start,
                      config={**self._config, "likelihood": self._summary["likelihood"]}, diverged_at=-1)


def _finite_state(model: nn.Module, update: Tensor) -> bool:
    """Whether the update and the model's parameters are all finite."""
    return bool(torch.isfinite(update).all()) and all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _blank(a: np.ndarray) -> np.ndarray:
    """An array like ``a`` marking a point after divergence: NaN (floats), 0 (ints), "diverged" (strings)."""
    fill = {"f": np.nan, "i": 0, "U": "diverged"}[a.dtype.kind]
    return np.full(a.shape, fill, dtype=a.dtype if a.dtype.kind != "U" else "<U8")


def _summary(ctx: RuleContext, dampings: list[float]) -> dict[str, Any]:
    """What the Dataset needs of a measured context (so that the context, with its Fisher, can be dropped)."""
    engine = ctx.engine()
    return {"solver": solver_attrs(ctx, dampings), "num_params": engine.spec.dim, "num_samples": engine.num_samples,
            "layers": list(engine.spec.layers()), "seed": ctx.seed, "device": engine.device, "dtype": engine.dtype,
            "likelihood": repr(ctx.likelihood)}


def _stack(records: list[dict], points: list[int], since: list[int], names: list[str], train_rule: str,
           dampings: list[float], summary: dict[str, Any], timings: dict, start: float, config: dict, *,
           diverged_at: int) -> xr.Dataset:
    """One Dataset from the per-point measurements, with a leading dim ``step``."""
    stacked = {name: (("step", *dims), np.stack([rec[name][1] for rec in records]))
               for name, (dims, _) in records[0].items()}
    stacked["steps_since_refresh"] = (("step",), np.array(since, dtype=np.int64))
    attrs = {**summary["solver"], "lr": config["lr"], "train_rule": train_rule,
             "diverged_at_step": diverged_at,
             "num_params": summary["num_params"], "num_samples": summary["num_samples"],
             "timings": json.dumps(timings), "total_seconds": time.perf_counter() - start}
    ds = fidelity_dataset("fidelity_trajectory", stacked,
                          {"step": points, "rule": names, "damping": dampings, "layer": summary["layers"]},
                          config=config, seed=summary["seed"], device=summary["device"], dtype=summary["dtype"],
                          attrs=attrs)
    ds["steps_since_refresh"].attrs.update(long_name="training steps since the last refresh of G", units="1")
    return ds


__all__ = ["DEFAULT_TRAJECTORY_RULES", "FidelityProbe", "OptimizerTrainer", "ReconstructedTrainer", "RuleTrainer",
           "bind_optimizer", "fidelity_trajectory"]
