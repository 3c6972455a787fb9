"""Upgrading results files of older schema versions, so that files written by an earlier fisherlab keep loading.

:func:`upgrade` (called by :func:`~fisherlab.results.load_dataset`) brings a Dataset of schema version ``v``
to :data:`~fisherlab.results.schema.SCHEMA_VERSION` one step at a time and says what it changed with a
:class:`~fisherlab.errors.SchemaUpgradeWarning` naming the file. The file itself is not touched; save the
Dataset again to store the upgrade.

Schema 1 -> 2 (issue 9, one vocabulary):

* dims, coordinates, variables and Dataset attributes renamed by :data:`RENAMED_IN_2`: ``method`` -> ``rule``
  (fidelity, trajectory and training Datasets: ``ds.sel(method=...)`` hit xarray's own ``method=`` keyword),
  ``train_method`` -> ``train_rule``, ``fisher_kind`` -> ``kind`` (spectra, spectral densities);
* rule names renamed by :data:`RULES_RENAMED_IN_2` (``sngd-full`` -> ``sngd-dense``, also as
  ``train:sngd-full``) in the ``rule`` and ``train_rule`` coordinates and the ``train_rule`` attribute;
* ``units`` that are not UDUNITS strings replaced by :data:`UNITS_IN_1` (nats: ``"1"`` with the comment
  :data:`~fisherlab.results.schema.NATS_COMMENT`);
* the CF global attributes added (``Conventions``, ``title``, ``source``; ``history`` from ``created``, plus a
  line for the upgrade) and the default coordinate ``long_name``/``units``.

The ``config`` attribute is left as it was: it records the run with the names of its time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import xarray as xr

from fisherlab.errors import ResultsFileError, SchemaUpgradeWarning
from fisherlab.results.metadata import default_title, package_version, source_of
from fisherlab.results.schema import (
    ATTR_KIND,
    ATTR_SCHEMA,
    CONVENTIONS,
    NATS,
    SCHEMA_VERSION,
    annotate_coordinates,
)

#: Names (dims, coordinates, variables, Dataset attributes) renamed from schema 1 to 2.
RENAMED_IN_2: dict[str, str] = {"method": "rule", "train_method": "train_rule", "fisher_kind": "kind"}

#: Rule names renamed from schema 1 to 2.
RULES_RENAMED_IN_2: dict[str, str] = {"sngd-full": "sngd-dense"}

#: ``units`` written by schema 1 that are not UDUNITS strings -> ``(units, comment or None)``.
UNITS_IN_1: dict[str, tuple[str, str | None]] = {
    "nat": NATS,
    "nats": NATS,
    "nat per parameter unit": NATS,
    "nat / parameter²": NATS,
    "parameter units": ("1", None),
    "1 / decade": ("1", None),
    "log10(nat / parameter²)": ("1", None),
}


def _rule_name(name: str) -> str:
    prefix = "train:" if name.startswith("train:") else ""
    return prefix + RULES_RENAMED_IN_2.get(name.removeprefix(prefix), name.removeprefix(prefix))


def _from_1(ds: xr.Dataset, file: Path) -> tuple[xr.Dataset, list[str]]:
    """Schema 1 -> 2 (module docstring); returns the Dataset and what changed, one phrase each."""
    changes = []
    names = {old: new for old, new in RENAMED_IN_2.items() if old in ds.variables or old in ds.dims}
    clash = sorted(new for new in names.values() if new in ds.variables or new in ds.dims)
    if clash:
        raise ResultsFileError(f"can't upgrade {file}: it has both the old and the new name(s) {clash}")
    ds = ds.rename(names)
    changes += [f"dim/variable '{old}' -> '{new}'" for old, new in names.items()]
    for old, new in RENAMED_IN_2.items():
        if old in ds.attrs:
            if new in ds.attrs:
                raise ResultsFileError(f"can't upgrade {file}: it has both attributes '{old}' and '{new}'")
            ds.attrs[new] = ds.attrs.pop(old)
            changes.append(f"attribute '{old}' -> '{new}'")
    for coord in ("rule", "train_rule"):
        if coord in ds.coords and ds[coord].dtype.kind == "U":
            old_values = [str(v) for v in ds[coord].values.ravel()]
            new_values = [_rule_name(v) for v in old_values]
            if new_values != old_values:
                ds = ds.assign_coords({coord: ds[coord].copy(data=np.array(new_values).reshape(ds[coord].shape))})
                changes += [f"{coord} '{a}' -> '{b}'" for a, b in zip(old_values, new_values, strict=True) if a != b]
    if isinstance(ds.attrs.get("train_rule"), str) and _rule_name(ds.attrs["train_rule"]) != ds.attrs["train_rule"]:
        changes.append(f"attribute train_rule '{ds.attrs['train_rule']}' -> '{_rule_name(ds.attrs['train_rule'])}'")
        ds.attrs["train_rule"] = _rule_name(ds.attrs["train_rule"])
    fixed: dict[str, list[str]] = {}
    for name, var in ds.variables.items():
        units = var.attrs.get("units")
        if isinstance(units, str) and units in UNITS_IN_1:
            var.attrs["units"], comment = UNITS_IN_1[units]
            if comment is not None:
                var.attrs.setdefault("comment", comment)
            fixed.setdefault(units, []).append(str(name))
    changes += [f"units {units!r} -> {UNITS_IN_1[units][0]!r} ({', '.join(vars_)})" for units, vars_ in fixed.items()]
    annotate_coordinates(ds)
    old = ds.attrs
    history = f"{old.get('created', 'unknown time')}: fisherlab {old.get('fisherlab_version', 'unknown')}"
    ds.attrs = {"Conventions": CONVENTIONS, "title": old.get("title", default_title(old[ATTR_KIND])),
                "history": old.get("history", history), "source": old.get("source", source_of(old)),
                **old, ATTR_SCHEMA: 2}
    return ds, changes


#: Upgrade steps: schema version -> function bringing a Dataset of that version to the next one.
_STEPS: dict[int, Callable[[xr.Dataset, Path], tuple[xr.Dataset, list[str]]]] = {1: _from_1}


def upgrade(ds: xr.Dataset, file: Path) -> xr.Dataset:
    """Bring ``ds``, loaded from ``file``, to the current schema (unchanged if it is current).

    Args:
        ds: A Dataset whose ``fisherlab_schema`` is between 1 and the current version.
        file: Where it was loaded from (named in the warning and errors).

    Returns:
        The upgraded Dataset.

    Warns:
        SchemaUpgradeWarning: Naming ``file``, the versions and every change.

    Raises:
        ResultsFileError: If the file holds both an old and its new name.
    """
    start = ds.attrs[ATTR_SCHEMA]
    if start == SCHEMA_VERSION:
        return ds
    changes: list[str] = []
    for version in range(start, SCHEMA_VERSION):
        ds, step = _STEPS[version](ds, file)
        changes += step
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ds.attrs["history"] += (f"\n{now}: upgraded from schema {start} to {SCHEMA_VERSION} on load by fisherlab "
                            f"{package_version()}")
    warnings.warn(SchemaUpgradeWarning(
        f"{file}: results file of fisherlab schema {start} upgraded to {SCHEMA_VERSION} in memory: "
        + ("; ".join(changes) or "CF attributes added") + ". Save it again to store the upgrade."), stacklevel=3)
    return ds


__all__ = ["RENAMED_IN_2", "RULES_RENAMED_IN_2", "UNITS_IN_1", "upgrade"]
