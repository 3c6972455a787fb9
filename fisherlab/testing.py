"""Regression-test helpers for users of fisherlab (and for fisherlab's own tests).

* :func:`assert_tracks_ngd` — an update rule, or the user's optimizer along its own short trajectory, must keep
  its cosine similarity to exact NGD above a threshold on a given model and data (whole network, and optionally
  every layer).
* :func:`assert_dataset_close` — compare a results Dataset with a stored ("golden") one: same dims, coords and
  variables; values within per-variable tolerances; on failure a diff that names each variable, its largest
  absolute and relative differences and the coordinates of the worst point.
* The pytest plugin :mod:`fisherlab.pytest_plugin` adds a ``golden`` fixture that stores and compares golden
  Datasets, regenerated with ``--fisherlab-update-golden``.

Example::

    from fisherlab.testing import assert_tracks_ngd
    assert_tracks_ngd("kfac", model, (X, y), min_cosine=0.9, damping=1e-3, dtype=torch.float64)
    assert_tracks_ngd(optimizer=lambda params: torch.optim.Adam(params, lr=1e-3), model=model, data=(X, y),
                      min_cosine=0.3, steps=20, every=5)

A golden Dataset of an optimizer's fidelity curve: ``golden.check("my_adam_curve", fidelity_trajectory(model, data,
optimizer=..., rules=(), steps=20, every=5), {"cosine": (1e-6, 1e-9)})`` with the ``golden`` fixture of the
plugin (the README has a complete test file).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from fisherlab.errors import InputError

if TYPE_CHECKING:
    from fisherlab.fidelity.rules import Rule

#: Tolerance (rtol, atol) for a numeric variable; ``None`` leaves the variable's values out of the comparison.
Tolerance = tuple[float, float] | None

#: Default tolerance of :func:`assert_dataset_close`: float64 round-off across platforms and BLAS builds.
DEFAULT_TOLERANCE: tuple[float, float] = (1e-7, 1e-12)


def assert_tracks_ngd(
    rule: str | Rule | None = None,
    model: nn.Module | None = None,
    data: Any = None,
    *,
    optimizer: Any = None,
    min_cosine: float,
    steps: int | None = None,
    every: int = 5,
    damping: float | Sequence[float] = 1e-3,
    likelihood: str = "categorical",
    min_layer_cosine: float | None = None,
    dtype: torch.dtype | None = torch.float64,
    **kwargs: Any,
) -> xr.Dataset:
    """Assert that an update rule's, or an optimizer's, cosine similarity to exact NGD stays ≥ ``min_cosine``.

    Three forms:

    * ``assert_tracks_ngd("kfac", model, data, min_cosine=0.9)`` — a rule at the model's state
      (:func:`fisherlab.evaluate_fidelity`);
    * ``assert_tracks_ngd("kfac", model, data, min_cosine=0.9, steps=20, every=5)`` — the rule along its own
      training trajectory (:func:`fisherlab.fidelity_trajectory` with ``train_rule=rule``);
    * ``assert_tracks_ngd(optimizer=opt, model=model, data=data, min_cosine=0.5, steps=20, every=5)`` — an
      optimizer (an instance over ``model``'s parameters, which is copied with the model and not changed, or a
      factory ``params -> Optimizer``) along its own trajectory, its update measured at steps 0, ``every``, …
      and ``steps`` (default 10).

    Args:
        rule: A registered rule name or a Rule (not with ``optimizer``).
        model: The network (not modified).
        data: The batch: ``(X, y)``, a SplitData or a DataLoader (the trajectories train on it full-batch).
        optimizer: The optimizer to check (instead of ``rule``).
        min_cosine: Threshold on the whole-network cosine similarity, at every damping and measured step.
        steps: Training steps of the trajectory (None: the rule at the current state only; an optimizer: 10).
        every: Measure every this many steps (and at the last).
        damping: λ of the exact NGD reference, one value or several (each must pass).
        likelihood: Likelihood name.
        min_layer_cosine: If given, threshold on every layer's cosine similarity too.
        dtype: Compute dtype (float64 by default, so that round-off cannot decide a test).
        **kwargs: Passed to :func:`fisherlab.evaluate_fidelity` or :func:`fisherlab.fidelity_trajectory`
            (``lr``, ``train_lr``, ``memory_budget``, ...).

    Returns:
        The fidelity (or trajectory) Dataset, for further checks.

    Raises:
        AssertionError: With the measured cosine per step, damping and layer, if a threshold is not met or the
            rule could not be evaluated.
        InputError: Neither or both of ``rule`` and ``optimizer``, or no model or data.
    """
    from fisherlab.fidelity import evaluate_fidelity, fidelity_trajectory

    if (rule is None) == (optimizer is None):
        raise InputError("assert_tracks_ngd checks a rule or an optimizer: pass exactly one of them")
    if model is None or data is None:
        raise InputError("assert_tracks_ngd needs the model and the data")
    common = dict(damping=damping, likelihood=likelihood, dtype=dtype, **kwargs)
    if optimizer is not None:
        ds = fidelity_trajectory(model, data, optimizer=optimizer, rules=(), steps=10 if steps is None else steps,
                                 every=every, **common)
        name, what = str(ds["rule"].values[0]), "optimizer"
    elif steps is None:
        ds = evaluate_fidelity(model, data, rules=[rule], **common)
        name, what = str(ds["rule"].values[0]), "rule"
    else:
        ds = fidelity_trajectory(model, data, train_rule=rule, rules=[rule], steps=steps, every=every, **common)
        name, what = str(ds["rule"].values[0]), "rule"
    row = ds.sel(rule=name)
    failures, lines = [], []
    for step in (row["step"].values if "step" in row.dims else [None]):
        at_step = row if step is None else row.sel(step=step)
        where = "" if step is None else f"step {int(step)}, "
        if not int(at_step["available"]):
            failures.append(f"{where}could not be evaluated: {at_step['unavailable_reason'].item()}")
            continue
        for lam in ds["damping"].values:
            at = at_step.sel(damping=lam)
            cos = float(at["cosine"])
            layers = {str(k): float(v) for k, v in zip(ds["layer"].values, at["cosine_layer"].values, strict=True)}
            lines.append(f"  {where}damping {lam:g}: cosine {cos:.6f}; per layer "
                         + ", ".join(f"{k}: {v:.6f}" for k, v in layers.items()))
            if not cos >= min_cosine:
                failures.append(f"{where}cosine {cos:.6f} < {min_cosine} at damping {lam:g}")
            if min_layer_cosine is not None:
                failures += [f"{where}layer {k!r} cosine {v:.6f} < {min_layer_cosine} at damping {lam:g}"
                             for k, v in layers.items() if not v >= min_layer_cosine]
    if failures:
        raise AssertionError(f"{what} {name!r} does not track exact NGD: " + "; ".join(failures)
                             + "\nmeasured:\n" + "\n".join(lines))
    return ds


# ------------------------------------------------------------------------------------------ Datasets
def _coords_at(da: xr.DataArray, flat_index: int) -> str:
    """``dim=value`` for each dim of ``da`` at the flat (row-major) index."""
    if da.ndim == 0:
        return "(scalar)"
    idx = np.unravel_index(flat_index, da.shape)
    parts = []
    for dim, i in zip(da.dims, idx, strict=True):
        label = da[dim].values[i] if dim in da.coords else i
        parts.append(f"{dim}={label.item() if isinstance(label, np.generic) else label}")
    return ", ".join(parts)


def _compare_values(name: str, actual: xr.DataArray, expected: xr.DataArray, tol: tuple[float, float]) -> str:
    """A description of how ``actual`` differs from ``expected`` beyond ``tol``, or ``""``."""
    if actual.dims != expected.dims or actual.shape != expected.shape:
        return f"variable {name!r}: dims/shape {dict(actual.sizes)} != golden {dict(expected.sizes)}"
    a, e = np.asarray(actual.values), np.asarray(expected.values)
    numeric = a.dtype.kind in "biuf" and e.dtype.kind in "biuf"
    if not numeric:
        diff = np.asarray(a != e)
        if not diff.any():
            return ""
        worst = int(np.flatnonzero(diff.ravel())[0])
        return (f"variable {name!r}: {int(diff.sum())} of {diff.size} values differ; first at "
                f"{_coords_at(actual, worst)}: {a.ravel()[worst].item()!r} != golden {e.ravel()[worst].item()!r}")
    a, e = a.astype(np.float64), e.astype(np.float64)
    rtol, atol = tol
    nan_mismatch = np.isnan(a) != np.isnan(e)
    both = ~np.isnan(a) & ~np.isnan(e)
    inf_mismatch = both & (np.isinf(a) | np.isinf(e)) & (a != e)
    finite = both & np.isfinite(a) & np.isfinite(e)
    abs_diff = np.where(finite, np.abs(a - e), 0.0)
    bad = nan_mismatch | inf_mismatch | (finite & (abs_diff > atol + rtol * np.abs(e)))
    if not bad.any():
        return ""
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(finite, abs_diff / np.abs(e), 0.0)
    rel = np.where(np.isnan(rel), np.inf, rel)  # 0/0 cannot happen for a bad point; x/0 is inf
    excess = np.where(bad, np.where(finite, abs_diff - atol - rtol * np.abs(e), np.inf), -np.inf)
    worst = int(np.argmax(excess.ravel()))
    return (f"variable {name!r}: {int(bad.sum())} of {bad.size} values outside rtol={rtol:g}, atol={atol:g}; "
            f"max abs diff {abs_diff.max():.3e}, max rel diff {np.where(bad, rel, 0).max():.3e}; worst at "
            f"{_coords_at(actual, worst)}: {a.ravel()[worst].item()!r} vs golden {e.ravel()[worst].item()!r}"
            + (f"; NaN in one but not the other at {int(nan_mismatch.sum())} point(s)"
               if nan_mismatch.any() else ""))


def dataset_differences(
    result: xr.Dataset,
    golden: xr.Dataset,
    tolerances: Mapping[str, Tolerance] | None = None,
    *,
    default: tuple[float, float] = DEFAULT_TOLERANCE,
    check_attrs: Iterable[str] = (),
) -> list[str]:
    """Every difference between ``result`` and ``golden`` beyond the tolerances, one line each (empty: equal).

    Checked: dimension names and sizes; coordinate names and values (numeric coords with the coordinate's
    tolerance, else ``default``; string coords exactly); data-variable names; each variable's dims and values
    (numeric within ``|a − e| ≤ atol + rtol |e|``, NaN only where the golden has NaN, infinities equal;
    strings exactly); and the Dataset attributes named in ``check_attrs``.

    Args:
        result: The Dataset computed now.
        golden: The reference Dataset.
        tolerances: ``{variable or coordinate: (rtol, atol)}``; ``None`` skips that variable's values.
        default: (rtol, atol) of the variables not in ``tolerances``.
        check_attrs: Dataset attributes that must be equal.
    """
    for what, ds in (("result", result), ("golden", golden)):
        if not isinstance(ds, xr.Dataset):
            raise InputError(f"{what} must be an xarray.Dataset; got {type(ds).__name__}")
    tolerances = dict(tolerances or {})
    unknown = sorted(set(tolerances) - set(map(str, result.variables)) - set(map(str, golden.variables)))
    if unknown:
        raise InputError(f"tolerances name {unknown}, which are in neither Dataset "
                         f"(variables: {sorted(map(str, golden.variables))})")
    for name, tol in tolerances.items():
        if tol is not None and (len(tol) != 2 or min(tol) < 0):
            raise InputError(f"tolerance of {name!r} must be None or a pair (rtol, atol) >= 0; got {tol!r}")
    problems = []
    dims_a, dims_e = dict(result.sizes), dict(golden.sizes)
    if dims_a != dims_e:
        problems.append(f"dims differ: {dims_a} != golden {dims_e}")
    for kind, names_a, names_e in (("coordinate", result.coords, golden.coords),
                                   ("data variable", result.data_vars, golden.data_vars)):
        missing, extra = sorted(set(names_e) - set(names_a)), sorted(set(names_a) - set(names_e))
        if missing:
            problems.append(f"{kind}(s) missing from the result: {missing}")
        if extra:
            problems.append(f"{kind}(s) not in the golden Dataset: {extra}")
    if dims_a == dims_e:
        for name in [*golden.coords, *golden.data_vars]:
            if name not in result.variables:
                continue
            tol = tolerances.get(str(name), default)
            if tol is None:
                continue
            problem = _compare_values(str(name), result[name], golden[name], tol)
            if problem:
                problems.append(problem)
    for attr in check_attrs:
        a, e = result.attrs.get(attr, "<missing>"), golden.attrs.get(attr, "<missing>")
        if not np.array_equal(np.asarray(a), np.asarray(e)):
            problems.append(f"attribute {attr!r}: {a!r} != golden {e!r}")
    return problems


def assert_dataset_close(
    result: xr.Dataset,
    golden: xr.Dataset,
    tolerances: Mapping[str, Tolerance] | None = None,
    *,
    default: tuple[float, float] = DEFAULT_TOLERANCE,
    check_attrs: Iterable[str] = (),
) -> None:
    """Assert that ``result`` matches ``golden`` within per-variable tolerances (see :func:`dataset_differences`).

    Raises:
        AssertionError: Listing every difference: which dims/coords/variables are missing or extra, and for each
            variable out of tolerance the number of bad points, the max abs and rel differences, and the coords
            and values at the worst point.

    Example:
        >>> assert_dataset_close(ds, golden, {"cosine": (1e-6, 1e-9), "kl_measured": (1e-4, 1e-12)})
    """
    problems = dataset_differences(result, golden, tolerances, default=default, check_attrs=check_attrs)
    if problems:
        source = golden.encoding.get("source", "the golden Dataset")
        raise AssertionError(f"Dataset differs from {source}:\n  - " + "\n  - ".join(problems))


__all__ = ["DEFAULT_TOLERANCE", "Tolerance", "assert_dataset_close", "assert_tracks_ngd", "dataset_differences"]
