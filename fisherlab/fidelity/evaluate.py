"""Fidelity of every update rule at one state: a Dataset with dims ``rule``, ``damping``, ``layer``.

For each damping λ the exact NGD update v = −η (F + λI)⁻¹ ∇L (METHOD.md §3) is the reference, and every rule's
update u (same state, batch, λ and η; original coordinates) is compared with it by the metrics of
:mod:`fisherlab.fidelity.metrics` (METHOD.md §5). A rule whose structure does not fit the memory budget, does
not support a layer of the model or is numerically singular at the damping is recorded as unavailable (NaN
metrics, the reason in ``unavailable_reason``) instead of aborting the evaluation, unless
``skip_unavailable=False``. A rule whose metrics are not all finite (e.g. a zero update, whose cosine is undefined)
is recorded as unavailable the same way, with the metrics named in the reason: a rule marked available has finite
metrics at every damping.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from fisherlab import results
from fisherlab.checks import check_dampings, check_lr, parse_enum
from fisherlab.errors import (
    InputError,
    MemoryBudgetError,
    NonFiniteError,
    SingularMatrixError,
    UnsupportedLayerError,
)
from fisherlab.fidelity import metrics
from fisherlab.fidelity.rules import Rule, RuleContext, UpdateRule, check_rules
from fisherlab.likelihoods import Likelihood
from fisherlab.ngd import ITERATIVE_SOLVERS, NGDSolver

#: Errors that make one rule unavailable at a state without invalidating the others (its structure does not fit
#: the budget, has no rule for a layer, or is numerically singular at this damping).
UNAVAILABLE = (MemoryBudgetError, UnsupportedLayerError, SingularMatrixError)

#: Rules evaluated when none are named.
DEFAULT_RULES = ("gd", "adam", "ngd", "block-ngd", "kfac", "ekfac", "unit", "diag", "empirical-ngd", "mc-ngd",
                 "lowrank", "sngd-dense", "sngd-block", "sngd-kfac")

#: (long_name, units[, comment]) of every variable a fidelity Dataset may hold (units: UDUNITS, nats as NATS).
ANNOTATIONS: dict[str, tuple[str, ...]] = {
    "cosine": ("cosine similarity to exact NGD", "1"),
    "cosine_layer": ("per-layer cosine similarity to exact NGD", "1"),
    "rel_error": ("relative error ||u - v|| / ||v||", "1"),
    "fisher_rel_error": ("Fisher-norm relative error sqrt((u-v)'F(u-v)) / sqrt(v'Fv)", "1"),
    "kl_predicted": ("predicted KL 0.5 u'Fu", *results.NATS),
    "kl_measured": ("measured KL between predictive distributions before and after the step", *results.NATS),
    "loss_change": ("loss change L(theta + u) - L(theta)", *results.NATS),
    "update_norm": ("Euclidean norm of the update ||u||", "1"),
    "available": ("rule could be evaluated (1) or not (0)", "1"),
    "unavailable_reason": ("why the rule could not be evaluated", None),
    "ngd_residual": ("relative residual of the exact NGD solve ||(F + lambda I)x - g|| / ||g||", "1"),
    "ngd_iterations": ("CG iterations of the exact NGD solve (0 for Cholesky)", "1"),
    "ngd_products": ("F.v products of the exact NGD solve (0 for the direct solvers)", "1",
                     "a multishift solve serves every damping: each records the shared total"),
    "ngd_preconditioner_products": ("F.v products of building the exact NGD solve's preconditioner", "1",
                                    "shared by every damping: each records the total; 0 for a sketch the "
                                    "lowrank rule built (its products are that rule's)"),
    "ngd_solver": ("solver of the exact NGD solve (fisherlab.ngd.NGDSolver)", None),
    "ngd_preconditioner": ("preconditioner of the exact NGD solve (a structure, or none)", None),
    "loss": ("loss L(theta) on the batch", *results.NATS),
    "grad_norm": ("gradient norm ||grad L||", *results.NATS),
    "damping": ("damping lambda of the exact NGD reference (and of the rules that damp)", "1"),
}

#: Metric variables with dims (rule, damping) [+ layer]; NaN where a rule is unavailable.
METRIC_VARS = ("cosine", "rel_error", "fisher_rel_error", "kl_predicted", "kl_measured", "loss_change",
               "update_norm")

#: Metrics that do not depend on the length of the update (the others change when u is scaled, e.g. by an
#: optimizer's own learning rate); stored as the variable attribute ``scale_dependent`` (0 here, 1 for the rest).
SCALE_FREE_METRICS = ("cosine", "cosine_layer")


def measure(ctx: RuleContext, rules: Mapping[str, UpdateRule], dampings: Sequence[float], lr: float, *,
            skip_unavailable: bool = True) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """Every metric of every rule at the context's state, as ``{name: (dims, array)}``.

    Args:
        ctx: The state.
        rules: ``{rule name: rule}`` (registered rules, or others such as a training loop's own update).
        dampings: λ values.
        lr: η of every rule.
        skip_unavailable: Record rules that raise one of :data:`UNAVAILABLE` instead of raising.

    Dims are ``rule`` (len(rules)), ``damping`` (len(dampings)) and ``layer`` (``spec.layers()`` order).

    Raises:
        NonFiniteError: If a rule returns NaN or infinite values.
        InputError: If a rule returns an update of the wrong shape.
    """
    spec = ctx.spec
    engine = ctx.engine()
    count = None if engine.group is None else engine.num_samples  # each rank's share of the global mean, then summed
    M, D, L = len(rules), len(dampings), len(spec.layers())
    out = {name: np.full((M, D), np.nan) for name in METRIC_VARS}
    out["cosine_layer"] = np.full((M, D, L), np.nan)
    reasons = [""] * M
    F = ctx.fisher()
    loss, g = ctx.loss_and_gradient()
    ctx.share_sketch(rules)
    z0, y = ctx.outputs_and_targets()
    for j, lam in enumerate(dampings):
        v = -lr * ctx.natural_gradient(lam)
        done, columns, measured = [], [], []
        for i, (name, rule) in enumerate(rules.items()):
            if reasons[i]:
                continue
            try:
                with ctx.timed(f"rule {name}"):
                    u = rule(ctx, lam, lr)
            except UNAVAILABLE as exc:
                if not skip_unavailable:
                    raise
                reasons[i] = f"{type(exc).__name__}: {exc}"
                continue
            if not isinstance(u, Tensor) or tuple(u.shape) != (spec.dim,):
                shape = tuple(u.shape) if isinstance(u, Tensor) else type(u)
                raise InputError(f"rule {name!r} returned an update of shape {shape}; expected ({spec.dim},)")
            u = u.to(v.device, v.dtype)
            if not bool(torch.isfinite(u).all()):
                raise NonFiniteError(f"rule {name!r} returned an update with NaN or infinite values at "
                                     f"damping {lam:g}")
            with ctx.timed("measured KL"):
                z1 = ctx.outputs_after(u)
                measured.append(torch.stack([metrics.measured_kl(engine.likelihood, z0, z1, count, y),
                                             metrics.loss_change(engine.likelihood, z0, z1, y, count)]))
            done.append(i)
            columns.append(u)
        if not done:
            continue
        sums = torch.stack(measured)  # (rules done, 2): the means over this rank's samples, or its share of them
        engine.reduce_sum([sums])
        sums = sums.detach().cpu().double().numpy()
        out["kl_measured"][done, j], out["loss_change"][done, j] = sums[:, 0], sums[:, 1]
        U = torch.stack(columns, dim=1)
        with ctx.timed("metrics"):
            fisher_rel_error, kl_predicted = metrics.fisher_metrics(U, v, F)
            values = {
                "cosine": metrics.cosine(U, v),
                "rel_error": metrics.relative_error(U, v),
                "fisher_rel_error": fisher_rel_error,
                "kl_predicted": kl_predicted,
                "update_norm": U.norm(dim=0),
            }
            layer = metrics.layer_cosines(U, v, spec)
        for name, value in values.items():
            out[name][done, j] = value.detach().cpu().double().numpy()
        out["cosine_layer"][done, j, :] = layer.T.detach().cpu().double().numpy()
        for i in done:  # a rule is available only with finite metrics
            bad = [name for name in METRIC_VARS if not np.isfinite(out[name][i, j])]
            if bad:
                zero = " (the exact NGD update is zero)" if float(v.norm()) == 0 else ""
                reasons[i] = (f"non-finite metrics at damping {lam:g}{zero}: "
                              + ", ".join(f"{name}={out[name][i, j]}" for name in bad))
                for name in METRIC_VARS:
                    out[name][i, j] = np.nan
                out["cosine_layer"][i, j, :] = np.nan
    solves = [ctx.solves[("true", lam)] for lam in dampings]
    data = {name: (("rule", "damping"), value) for name, value in out.items() if name != "cosine_layer"}
    data["cosine_layer"] = (("rule", "damping", "layer"), out["cosine_layer"])
    data["available"] = (("rule",), np.array([0 if r else 1 for r in reasons], dtype=np.int64))
    data["unavailable_reason"] = (("rule",), np.array(reasons, dtype=str))
    data["ngd_residual"] = (("damping",), np.array([s.residual for s in solves]))
    data["ngd_iterations"] = (("damping",), np.array([s.iterations for s in solves], dtype=np.int64))
    data["ngd_products"] = (("damping",), np.array([s.products for s in solves], dtype=np.int64))
    data["ngd_preconditioner_products"] = (("damping",), np.array([s.preconditioner_products for s in solves],
                                                                  dtype=np.int64))
    data["ngd_solver"] = (("damping",), np.array([s.solver for s in solves], dtype=str))
    data["ngd_preconditioner"] = (("damping",), np.array([s.preconditioner for s in solves], dtype=str))
    data["loss"] = ((), np.array(float(loss)))
    data["grad_norm"] = ((), np.array(float(g.norm())))
    return data


def solver_attrs(ctx: RuleContext, dampings: Sequence[float]) -> dict[str, Any]:
    """Dataset attributes describing the exact NGD solves (``ngd_solver``, ``cg_tol``, convergence).

    ``ngd_solver`` is the solver of every damping, or the distinct ones joined by ``","`` (the per-damping
    variables ``ngd_solver`` / ``ngd_preconditioner`` say which); ``cg_tol`` is set when any solve iterated;
    ``ngd_seconds`` (JSON list, one per damping in order) the wall time of each solve (a multishift solve serves
    every damping: each records the shared total).
    """
    solves = [ctx.solves[("true", lam)] for lam in dampings]
    solvers = list(dict.fromkeys(s.solver for s in solves))
    attrs: dict[str, Any] = {"ngd_solver": ",".join(solvers), "ngd_converged": int(all(s.converged for s in solves))}
    if any(s in {v.value for v in ITERATIVE_SOLVERS} for s in solvers):
        attrs["cg_tol"] = ctx.cg_tol
    attrs["ngd_seconds"] = json.dumps([s.seconds for s in solves])
    return attrs


def evaluate_fidelity(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    rules: Sequence[str | Rule] = DEFAULT_RULES,
    damping: float | Sequence[float] = 1e-3,
    lr: float = 0.1,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    mc_samples: int = 1,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
    cg_tol: float = 1e-6,
    cg_max_iter: int | None = None,
    ngd_solver: str = "auto",
    structure_kind: str = "auto",
    skip_unavailable: bool = True,
    progress: bool | None = None,
    config: dict | None = None,
    context: RuleContext | None = None,
) -> xr.Dataset:
    """Compare every rule's update with exact NGD at the model's current parameters (METHOD.md §5).

    Args:
        model: The network (not modified).
        data: The batch: ``(X, y)``, a SplitData (training split) or a DataLoader.
        rules: Rule names (see :data:`fisherlab.fidelity.rules.RULES`) or :class:`~fisherlab.fidelity.rules.Rule`
            objects.
        damping: λ, one value or several.
        lr: Learning rate η of every step (the KL and loss columns depend on it; cosines do not).
        likelihood: Likelihood name or object.
        dtype: Compute dtype (float64 for reference numbers).
        device: Compute device.
        seed: Seed of Monte-Carlo labels (``mc-ngd``, and structures that sample).
        mc_samples: Labels per input of the Monte-Carlo Fisher.
        memory_budget: Bytes a dense object may take; above it exact NGD switches to CG.
        chunk_size: Samples per chunk of the engines.
        cg_tol: Relative residual of CG solves.
        cg_max_iter: CG iteration cap (default 10·P).
        ngd_solver: How exact NGD is solved (:class:`fisherlab.ngd.NGDSolver`): ``"auto"`` (Cholesky when the
            dense Fisher fits the budget, else, when ``rules`` include ``lowrank``, CG preconditioned per damping by
            the Nyström preconditioner of that rule's sketch, built first and shared (fewer products than
            multi-shift: :meth:`~fisherlab.fidelity.rules.RuleContext.exact_solve`), otherwise one multi-shift CG
            for all dampings, CG for one), ``"cholesky"``, ``"cg"``, ``"multishift"``, ``"pcg-kfac"`` (CG
            preconditioned by the ``kfac`` rule's KFAC at each damping), ``"pcg-diag"``, ``"pcg-nystrom"`` (by
            the ``lowrank`` sketch, whichever rules are evaluated); every iterative solve stops at the
            unpreconditioned residual ``cg_tol``.
        structure_kind: Fisher kind of the structures built from layer rows (the ``kfac``, ``kfac-reduce``,
            ``ekfac``, ``unit``, ``diag``, ``block-ngd`` rules, their ``sngd-*`` and the ``pcg-kfac``
            preconditioner): ``"auto"`` takes the true Fisher's unless it has more than
            :data:`~fisherlab.fidelity.rules.TRUE_ROWS_MAX` output rows per sample and its dense matrix does not
            fit the budget (a language model: T·(C − 1) rows a sequence), then the Monte-Carlo Fisher's
            (``mc_samples`` labels per token); or ``"true"``, ``"mc"``, ``"empirical"``. Exact NGD (the reference)
            and the metrics always use the true Fisher.
        skip_unavailable: Record a rule that exceeds the budget or meets an unsupported layer as unavailable
            (NaN) instead of raising.
        progress: Progress bars (``None``: only on a terminal).
        config: Extra configuration stored in the provenance.
        context: A :class:`~fisherlab.fidelity.rules.RuleContext` of ``model`` on ``data`` with these settings to
            evaluate in (and to keep what it computes, for the trajectory, geometry and spectrum parts of a study
            at the same parameters); refused, with an InputError, when its data, parameters or settings differ.

    Returns:
        A ``"fidelity"`` Dataset with dims ``rule``, ``damping``, ``layer`` and variables ``cosine``,
        ``cosine_layer``, ``rel_error``, ``fisher_rel_error``, ``kl_predicted``, ``kl_measured``,
        ``loss_change``, ``update_norm``, ``available``, ``unavailable_reason``, ``ngd_residual``,
        ``ngd_iterations``, ``ngd_products``, ``ngd_preconditioner_products``, ``ngd_solver``,
        ``ngd_preconditioner`` (per damping), ``loss``,
        ``grad_norm``; attributes ``ngd_solver`` (the solver(s) used), ``cg_tol`` (iterative solves only),
        ``structure_kind`` (the setting), ``rule_kinds`` (JSON ``{rule: Fisher kind of its update}``, "" for a
        rule without one),
        ``ngd_seconds`` (JSON, seconds of the solve per damping),
        ``lr``, ``num_params``, ``num_samples``, ``timings`` (JSON, seconds per phase)
        and ``total_seconds``. Each metric variable has the attribute ``scale_dependent``: 0 for the cosines
        (unchanged when an update is scaled), 1 for the others (they depend on η — or, for an
        :class:`~fisherlab.fidelity.optimizers.OptimizerRule`, on the optimizer's own learning rate).

    Raises:
        InputError: Unknown rule (the valid ones are listed), bad damping or learning rate.
    """
    start = time.perf_counter()
    rules = check_rules(rules)
    dampings = check_dampings(damping)
    lr = check_lr(lr)
    ngd_solver = parse_enum(NGDSolver, ngd_solver, "NGD solver").value
    settings = dict(likelihood=likelihood, dtype=dtype, device=device, seed=seed, mc_samples=mc_samples,
                    memory_budget=memory_budget, chunk_size=chunk_size, cg_tol=cg_tol, cg_max_iter=cg_max_iter,
                    ngd_solver=ngd_solver, dampings=tuple(dampings), structure_kind=structure_kind)
    if context is not None:
        context.check_shares(model, data, **settings)
    ctx = RuleContext(model, data, **settings, progress=progress) if context is None else context
    data_vars = measure(ctx, rules, dampings, lr, skip_unavailable=skip_unavailable)
    engine = ctx.engine()
    cfg = {"rules": list(rules), "damping": dampings, "lr": lr, "likelihood": repr(ctx.likelihood),
           "mc_samples": mc_samples, "memory_budget": ctx.memory_budget, "cg_tol": cg_tol,
           "ngd_solver": ngd_solver, "structure_kind": ctx.structure_kind, "model": type(model).__name__,
           **(config or {})}
    attrs = {**solver_attrs(ctx, dampings), "structure_kind": ctx.structure_kind,
             "rule_kinds": json.dumps({name: rule.fisher_kind(ctx) for name, rule in rules.items()}),
             "lr": lr, "num_params": engine.spec.dim,
             "num_samples": engine.num_samples, "timings": json.dumps(ctx.timings),
             "total_seconds": time.perf_counter() - start}
    return fidelity_dataset("fidelity", data_vars, {"rule": list(rules), "damping": dampings,
                                                    "layer": list(engine.spec.layers())},
                            config=cfg, seed=seed, device=engine.device, dtype=engine.dtype, attrs=attrs)


def fidelity_dataset(kind: str, data_vars: dict, coords: dict, **kwargs: Any) -> xr.Dataset:
    """:func:`fisherlab.results.new_dataset` plus the ``long_name``/``units`` of :data:`ANNOTATIONS`."""
    ds = results.new_dataset(kind, data_vars, coords, **kwargs)
    for name in (*METRIC_VARS, "cosine_layer"):
        if name in ds.variables:
            ds[name].attrs["scale_dependent"] = int(name not in SCALE_FREE_METRICS)
    return results.annotate(ds, {k: v for k, v in ANNOTATIONS.items() if k in ds.variables})


__all__ = ["ANNOTATIONS", "DEFAULT_RULES", "METRIC_VARS", "SCALE_FREE_METRICS", "UNAVAILABLE",
           "evaluate_fidelity", "fidelity_dataset", "measure", "solver_attrs"]
