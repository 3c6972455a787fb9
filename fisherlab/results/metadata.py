"""Metadata of a results Dataset: provenance (what produced it), its configuration as JSON, CF global attributes.

:func:`provenance` returns the Dataset attributes that say what produced it:

=====================  ===================================================================
attribute              meaning
=====================  ===================================================================
``fisherlab_schema``   integer version of the file layout (:data:`~fisherlab.results.schema.SCHEMA_VERSION`)
``fisherlab_kind``     what the Dataset holds: ``"spectrum"``, ``"fidelity"``, ``"fidelity_trajectory"``, ...
``fisherlab_version``  version of the installed fisherlab package (``"unknown"`` if not installed)
``torch_version``      ``torch.__version__``
``numpy_version``      ``numpy.__version__``
``xarray_version``     ``xarray.__version__``
``python_version``     ``platform.python_version()``
``platform``           ``platform.platform()``
``device``             the torch device the computation ran on, e.g. ``"cpu"``, ``"cuda:0"``
``dtype``              the torch dtype it ran in, without the ``torch.`` prefix, e.g. ``"float64"``
``seed``               the random seed (an int), or the string ``"none"`` when no seed was set
``config``             the full configuration as JSON (sorted keys, see :func:`to_jsonable`)
``created``            UTC creation time, ISO 8601 to the second, e.g. ``"2026-01-31T12:00:00+00:00"``
``git_commit``         ``git rev-parse HEAD`` of the checkout holding fisherlab, else ``"unknown"``
``world_size``         only under ``torch.distributed`` with more than one process: the number of processes
``backend``            with ``world_size``: the ``torch.distributed`` backend (``"gloo"``, ``"nccl"``)
=====================  ===================================================================

and :func:`cf_attributes` the CF global attributes derived from them (``Conventions``, ``title``, ``history``,
``source``). :func:`config_of`, :func:`config_diff` and :func:`same_config` read and compare configurations;
:func:`merge_provenance` checks that several Datasets come from the same software and summarises them.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from fisherlab.errors import InputError, ResultsFileError
from fisherlab.results.schema import (
    ATTR_CONFIG,
    ATTR_KIND,
    ATTR_SCHEMA,
    CONVENTIONS,
    INT64_MAX,
    INT64_MIN,
    SCHEMA_VERSION,
    is_tensor,
    loaded_torch,
    python_attr,
)

if TYPE_CHECKING:
    import torch

#: Dataset attributes returned by :func:`provenance` (``fisherlab_kind`` is added when a kind is given).
PROVENANCE_KEYS: tuple[str, ...] = (
    ATTR_SCHEMA,
    "fisherlab_version",
    "torch_version",
    "numpy_version",
    "xarray_version",
    "python_version",
    "platform",
    "device",
    "dtype",
    "seed",
    ATTR_CONFIG,
    "created",
    "git_commit",
)

#: Attributes that :func:`merge_provenance` requires to agree across Datasets.
_MUST_AGREE = ("fisherlab_version", "torch_version")


# ----------------------------------------------------------------------------------------------------------
# JSON configuration
# ----------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_jsonable(obj: Any, *, name: str = "config") -> Any:
    """Convert a configuration value to plain JSON types (dict, list, str, int, float, bool, None).

    Conversions: mappings -> ``dict`` (keys must be strings), tuples and lists -> ``list``, sets and
    frozensets -> sorted ``list``, ``torch.dtype`` -> its name without ``torch.`` (``"float64"``),
    ``torch.device`` -> ``str(device)`` (``"cpu"``, ``"cuda:0"``), ``pathlib`` paths -> ``str``, numpy scalars
    and 0-d arrays -> the Python scalar, numpy arrays and torch tensors -> nested lists, enums -> their
    value, dataclass instances -> ``dict`` of their fields. NaN and infinities are kept (Python's ``json``
    writes and reads them as ``NaN``/``Infinity``).

    Args:
        obj: The value to convert.
        name: How to name ``obj`` in error messages; nested values are named ``name.key`` / ``name[i]``.

    Returns:
        A value made only of JSON types.

    Raises:
        InputError: If some value (named by its key path) or some mapping key can't be converted.
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, np.generic):
        if isinstance(obj, (np.number, np.bool_)) and not isinstance(obj, np.complexfloating):
            return obj.item()
        if isinstance(obj, np.str_):
            return str(obj)
        raise InputError(f"{name}: numpy value of type {type(obj).__name__} is not JSON-serialisable")
    torch = loaded_torch()
    if torch is not None and isinstance(obj, torch.dtype):
        return _dtype_name(obj)
    if torch is not None and isinstance(obj, torch.device):
        return str(obj)
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value, name=name)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_jsonable(getattr(obj, f.name), name=f"{name}.{f.name}")
            for f in dataclasses.fields(obj)
        }
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise InputError(f"{name}: key {key!r} is not a string; JSON objects need string keys")
            out[key] = to_jsonable(value, name=f"{name}.{key}")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, name=f"{name}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(v, name=f"{name}{{}}") for v in obj]
        try:
            return sorted(items)
        except TypeError as err:
            raise InputError(f"{name}: a set of mixed types can't be ordered for JSON") from err
    if is_tensor(obj):
        return to_jsonable(obj.detach().cpu().numpy(), name=name)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise InputError(f"{name}: numpy array of dtype {obj.dtype} is not JSON-serialisable")
        return obj.tolist()
    raise InputError(f"{name}: value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def config_json(config: Mapping[str, Any], *, name: str = "config") -> str:
    """A configuration mapping as JSON text with sorted keys (values converted by :func:`to_jsonable`).

    Raises:
        InputError: If ``config`` is not a mapping or holds a value that is not JSON-serialisable.
    """
    if not isinstance(config, Mapping):
        raise InputError(f"{name} must be a mapping, got {type(config).__name__}")
    return json.dumps(to_jsonable(config, name=name), sort_keys=True)


def config_of(ds: xr.Dataset) -> dict[str, Any]:
    """Parse the ``config`` attribute of a results Dataset.

    Args:
        ds: A Dataset built by :func:`~fisherlab.results.new_dataset` or loaded by
            :func:`~fisherlab.results.load_dataset`.

    Returns:
        The configuration as a dictionary of JSON types.

    Raises:
        ResultsFileError: If the attribute is missing, not valid JSON, or not a JSON object.
    """
    source = ds.encoding.get("source", "<in-memory dataset>")
    if ATTR_CONFIG not in ds.attrs:
        raise ResultsFileError(f"results dataset {source} has no '{ATTR_CONFIG}' attribute")
    text = ds.attrs[ATTR_CONFIG]
    if not isinstance(text, str):
        raise ResultsFileError(
            f"'{ATTR_CONFIG}' attribute of {source} is not a string: {type(text).__name__}"
        )
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise ResultsFileError(f"'{ATTR_CONFIG}' attribute of {source} is not valid JSON: {err}") from err
    if not isinstance(parsed, dict):
        raise ResultsFileError(f"'{ATTR_CONFIG}' attribute of {source} is not a JSON object")
    return parsed


def _as_config(obj: xr.Dataset | Mapping[str, Any], which: str) -> dict[str, Any]:
    if isinstance(obj, xr.Dataset):
        return config_of(obj)
    if isinstance(obj, Mapping):
        # Round-trip through JSON so that an in-memory config compares like the stored one (tuple == list).
        return json.loads(config_json(obj, name=which))
    raise InputError(f"{which} must be an xarray.Dataset or a mapping, got {type(obj).__name__}")


def _drop_path(cfg: dict[str, Any], dotted: str) -> None:
    parts = dotted.split(".")
    node: Any = cfg
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else key
            if key not in a or key not in b:
                out.append(sub)
            else:
                _diff(a[key], b[key], sub, out)
        return
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(path)
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{path}[{i}]", out)
        return
    if isinstance(a, bool) or isinstance(b, bool):
        if type(a) is not type(b) or a != b:
            out.append(path)
        return
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if not (
            a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
        ):
            out.append(path)
        return
    if type(a) is not type(b) or a != b:
        out.append(path)


def config_diff(
    a: xr.Dataset | Mapping[str, Any], b: xr.Dataset | Mapping[str, Any], ignore: Iterable[str] = ()
) -> list[str]:
    """List the configuration keys on which two configurations differ.

    Values are compared after :func:`to_jsonable` (so a tuple equals the same list); ``1`` equals ``1.0``, NaN
    equals NaN, and ``True`` differs from ``1``.

    Args:
        a: A results Dataset (its ``config`` attribute is used) or a configuration mapping.
        b: Likewise.
        ignore: Keys to leave out of the comparison; a dotted path (``"optim.lr"``) names a nested key.

    Returns:
        Sorted dotted key paths that differ or are present in only one configuration; empty if they agree.

    Raises:
        InputError: If an argument is neither a Dataset nor a mapping, or holds a non-serialisable value.
        ResultsFileError: If a Dataset has no readable ``config`` attribute.
    """
    if isinstance(ignore, str):
        raise InputError("ignore must be an iterable of key names, not a single string")
    ca, cb = _as_config(a, "a"), _as_config(b, "b")
    for key in ignore:
        _drop_path(ca, key)
        _drop_path(cb, key)
    out: list[str] = []
    _diff(ca, cb, "", out)
    return out


def same_config(
    a: xr.Dataset | Mapping[str, Any], b: xr.Dataset | Mapping[str, Any], ignore: Iterable[str] = ()
) -> bool:
    """Whether two configurations agree, ignoring some keys (see :func:`config_diff` for the rules).

    Args:
        a: A results Dataset (its ``config`` attribute is used) or a configuration mapping.
        b: Likewise.
        ignore: Keys to leave out of the comparison; a dotted path (``"optim.lr"``) names a nested key.

    Returns:
        ``True`` if no key differs.
    """
    return not config_diff(a, b, ignore)


# ----------------------------------------------------------------------------------------------------------
# Provenance of one Dataset
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _git_commit() -> str:
    """``git rev-parse HEAD`` of the checkout that holds the fisherlab package, or ``"unknown"``."""
    package_dir = Path(__file__).resolve().parent
    if "site-packages" in package_dir.parts or "dist-packages" in package_dir.parts:
        return "unknown"
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=package_dir,
            capture_output=True,
            text=True,
            timeout=2.0,
            check=False,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except Exception:  # noqa: BLE001 - git missing, timeout, permission: provenance must never fail
        return "unknown"
    commit = result.stdout.strip()
    if result.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}([0-9a-f]{24})?", commit):
        return "unknown"
    return commit


def code_provenance() -> dict[str, str]:
    """The ``fisherlab_version`` and ``git_commit`` of this process, as :func:`provenance` records them."""
    return {"fisherlab_version": package_version(), "git_commit": _git_commit()}


def package_version() -> str:
    """The installed fisherlab version, or ``"unknown"``."""
    try:
        return importlib.metadata.version("fisherlab")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _device_str(device: Any) -> str:
    import torch

    if isinstance(device, torch.device):
        return str(device)
    if isinstance(device, str):
        try:
            return str(torch.device(device))
        except (RuntimeError, ValueError) as err:
            raise InputError(f"device {device!r} is not a torch device: {err}") from err
    raise InputError(f"device must be a torch.device or a string, got {type(device).__name__}")


def _dtype_str(dtype: Any) -> str:
    import torch

    if isinstance(dtype, torch.dtype):
        return _dtype_name(dtype)
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if isinstance(getattr(torch, name, None), torch.dtype):
            return _dtype_name(getattr(torch, name))
        raise InputError(f"dtype {dtype!r} is not a torch dtype")
    raise InputError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")


def _seed_value(seed: Any) -> int | str:
    if seed is None:
        return "none"
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an int or None, got {type(seed).__name__}")
    seed = int(seed)
    if not INT64_MIN <= seed <= INT64_MAX:
        raise InputError(f"seed {seed} does not fit in int64")
    return seed


def check_kind(kind: Any) -> str:
    """Return ``kind`` if it is an identifier-like string (``"spectrum"``, ``"fidelity_trajectory"``).

    Raises:
        InputError: Otherwise.
    """
    if not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", kind):
        raise InputError(f"kind must be a non-empty identifier-like string (e.g. 'spectrum'), got {kind!r}")
    return kind


def provenance(
    config: Mapping[str, Any],
    *,
    seed: int | None,
    device: torch.device | str,
    dtype: torch.dtype | str,
    kind: str | None = None,
) -> dict[str, str | int | float]:
    """Provenance attributes for a results Dataset: the keys of :data:`PROVENANCE_KEYS` (and more in parallel).

    In a data-parallel run, also ``world_size`` and ``backend`` (:func:`parallel_provenance`).

    Args:
        config: The full configuration of the run; converted by :func:`to_jsonable` and stored as JSON with
            sorted keys.
        seed: The random seed, or ``None`` (stored as the string ``"none"``).
        device: The torch device the computation ran on (``torch.device`` or a string such as ``"cuda:0"``).
        dtype: The torch dtype it ran in (``torch.float64`` or ``"float64"`` / ``"torch.float64"``).
        kind: If given, also sets ``fisherlab_kind``.

    Returns:
        A dictionary of netCDF-storable attribute values.

    Raises:
        InputError: If the config holds a value that is not JSON-serialisable (the message names its key), or
            if seed, device, dtype or kind is invalid.
    """
    import torch  # provenance is written where torch computed the results

    attrs: dict[str, str | int | float] = {
        ATTR_SCHEMA: SCHEMA_VERSION,
        "fisherlab_version": package_version(),
        "torch_version": str(torch.__version__),
        "numpy_version": np.__version__,
        "xarray_version": xr.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": _device_str(device),
        "dtype": _dtype_str(dtype),
        "seed": _seed_value(seed),
        ATTR_CONFIG: config_json(config),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
    if kind is not None:
        attrs[ATTR_KIND] = check_kind(kind)
    attrs.update(parallel_provenance())
    return attrs


def parallel_provenance() -> dict[str, str | int]:
    """``world_size`` and ``backend`` of the default ``torch.distributed`` group with more than one process, else {}.

    (A single-process Dataset has neither, as before data-parallel runs existed.)
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return {}
    return {"world_size": int(dist.get_world_size()), "backend": str(dist.get_backend())}


def calling_function() -> str:
    """``module.function`` of the fisherlab call that is building a Dataset, for the ``history`` attribute.

    Walking out from the caller (frames of :mod:`fisherlab.results` are skipped): the outermost function of the
    run of fisherlab frames, i.e. the public call the user made (``fisherlab.fidelity.evaluate.evaluate_fidelity``
    rather than its helper); when the first frame is not in fisherlab (a script calling ``new_dataset``), that
    frame's function.
    """
    found = ""
    frame = sys._getframe(1)
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        name = f"{module}.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}"
        if module.split(".")[0] != "fisherlab":
            return found or name
        if module != "fisherlab.results" and not module.startswith("fisherlab.results."):
            found = name
        frame = frame.f_back
    return found or "unknown"


def default_title(kind: str) -> str:
    """The ``title`` of a Dataset of ``kind`` unless its builder gives one: ``"fisherlab <kind> results"``."""
    return f"fisherlab {kind.replace('_', ' ')} results"


def source_of(attrs: Mapping[str, Any]) -> str:
    """The CF ``source`` attribute from provenance ``attrs``: ``"fisherlab <version> (torch <version>)"``."""
    return f"fisherlab {attrs.get('fisherlab_version', 'unknown')} (torch {attrs.get('torch_version', 'unknown')})"


def cf_attributes(prov: Mapping[str, Any], *, title: str, call: str) -> dict[str, str]:
    """The CF global attributes (:data:`~fisherlab.results.schema.CF_ATTRS`) of a Dataset with provenance ``prov``.

    Args:
        prov: What :func:`provenance` returned for the Dataset.
        title: What the Dataset holds.
        call: The fisherlab function that built it (:func:`calling_function`); ``history`` is
            ``"<created>: <call> (fisherlab <version>)"``.
    """
    return {"Conventions": CONVENTIONS, "title": title,
            "history": f"{prov['created']}: {call} (fisherlab {prov['fisherlab_version']})",
            "source": source_of(prov)}


# ----------------------------------------------------------------------------------------------------------
# Provenance across Datasets
# ----------------------------------------------------------------------------------------------------------


def merge_provenance(datasets: Iterable[xr.Dataset] | Mapping[str, xr.Dataset]) -> dict[str, Any]:
    """Check that results Datasets come from the same software and summarise their provenance.

    Args:
        datasets: Datasets (or a mapping of name to Dataset, as
            :meth:`~fisherlab.results.ResultsStore.load_all` returns).

    Returns:
        A summary: ``n_datasets``; ``fisherlab_version`` and ``torch_version`` (single strings, they must
        agree); ``schema_versions``, ``kinds``, ``numpy_versions``, ``xarray_versions``, ``python_versions``,
        ``platforms``, ``devices``, ``dtypes``, ``git_commits`` (sorted lists of the distinct values);
        ``seeds`` (one per Dataset, in order; ``"none"`` where unseeded); ``created_first`` and
        ``created_last``.

    Raises:
        InputError: If no Dataset is given, an item is not a Dataset, or fisherlab or torch versions differ
            (all versions found are named).
        ResultsFileError: If a Dataset lacks a provenance attribute (the Dataset and attribute are named).
    """
    items = list(datasets.items()) if isinstance(datasets, Mapping) else list(enumerate(datasets))
    if not items:
        raise InputError("merge_provenance needs at least one dataset")
    needed = (*PROVENANCE_KEYS, ATTR_KIND)
    for name, ds in items:
        if not isinstance(ds, xr.Dataset):
            raise InputError(f"merge_provenance: item {name!r} is not an xarray.Dataset")
        missing = [k for k in needed if k not in ds.attrs]
        if missing:
            raise ResultsFileError(f"dataset {name!r} lacks provenance attribute(s) {missing}")
    summary: dict[str, Any] = {"n_datasets": len(items)}
    for key in _MUST_AGREE:
        values = sorted({str(ds.attrs[key]) for _, ds in items})
        if len(values) > 1:
            raise InputError(f"datasets were produced by different {key} values: {values}")
        summary[key] = values[0]
    plural = {
        ATTR_SCHEMA: "schema_versions",
        ATTR_KIND: "kinds",
        "numpy_version": "numpy_versions",
        "xarray_version": "xarray_versions",
        "python_version": "python_versions",
        "platform": "platforms",
        "device": "devices",
        "dtype": "dtypes",
        "git_commit": "git_commits",
    }
    for key, out_key in plural.items():
        summary[out_key] = sorted({python_attr(ds.attrs[key]) for _, ds in items}, key=str)
    summary["seeds"] = [python_attr(ds.attrs["seed"]) for _, ds in items]
    created = sorted(str(ds.attrs["created"]) for _, ds in items)
    summary["created_first"] = created[0]
    summary["created_last"] = created[-1]
    return summary


__all__ = ["PROVENANCE_KEYS", "calling_function", "cf_attributes", "check_kind", "code_provenance", "config_diff",
           "config_json", "config_of", "default_title", "merge_provenance", "package_version", "parallel_provenance",
           "provenance", "same_config", "source_of", "to_jsonable"]
