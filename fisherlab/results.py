"""Results files: labelled ``xarray.Dataset`` objects with provenance, stored as netCDF-4 (h5netcdf).

Every result fisherlab writes (a spectrum, a fidelity table, a trajectory, a training log) is an
``xarray.Dataset`` with named dimensions and coordinates, ``long_name`` and ``units`` attributes on its
variables, and *provenance* attributes on the Dataset that say what produced it:

=====================  ===================================================================
attribute              meaning
=====================  ===================================================================
``fisherlab_schema``   integer version of this file layout (:data:`SCHEMA_VERSION`)
``fisherlab_kind``     what the Dataset holds: ``"spectrum"``, ``"fidelity"``, ``"trajectory"``, ...
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
=====================  ===================================================================

Files are written atomically (:func:`save_dataset`): a temporary file in the target directory is written,
flushed to disk and renamed over the target, so a crash never leaves a partial results file and never
destroys the previous one. :func:`load_dataset` reads a file fully into memory, closes it, and validates it.

netCDF conversions (documented, applied by :func:`new_dataset` and :func:`save_dataset`; see
:func:`netcdf_attr_value`):

* attribute values that are ``bool`` become ``int`` (``True`` -> ``1``), sequences of bools int arrays;
* lists and tuples become 1-D arrays; on load numeric ones come back as numpy arrays, string ones as lists,
  and a sequence of length one comes back as a scalar;
* numpy scalar attributes are loaded back as plain Python ``int``/``float``;
* ``None``, dictionaries (encode them yourself with ``json.dumps``), empty or nested sequences, sequences of
  mixed types, and integers outside int64 are refused with :class:`~fisherlab.errors.InputError`;
* string arrays of ``object`` or numpy ``StringDType`` dtype are written as fixed-width unicode (``<U``);
* variable attributes that netCDF/CF decoding would consume or act on (``_FillValue``, ``missing_value``,
  ``scale_factor``, ``add_offset``, ``coordinates``, ``dtype``, ``calendar``, ``_Unsigned``, ``_Encoding``,
  ``compress``) are refused, and so is a ``units`` attribute containing ``" since "`` on a variable that is
  not a datetime (CF decoding would turn its numbers into dates on load);
* any ``encoding`` carried by the Dataset (e.g. from a previously loaded file) is dropped: values are written
  in their in-memory dtype, so they round-trip exactly.
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
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Union

import numpy as np
import torch
import xarray as xr

from fisherlab.errors import InputError, ResultsFileError

__all__ = [
    "ATTR_CONFIG",
    "ATTR_KIND",
    "ATTR_SCHEMA",
    "ENGINE",
    "PROVENANCE_KEYS",
    "SCHEMA_VERSION",
    "ResultsStore",
    "annotate",
    "config_diff",
    "config_of",
    "load_dataset",
    "merge_provenance",
    "netcdf_attr_value",
    "new_dataset",
    "provenance",
    "same_config",
    "save_dataset",
    "to_jsonable",
]

#: Version of the results-file layout written by this module; :func:`load_dataset` reads versions 1..this.
SCHEMA_VERSION: int = 1

#: The xarray backend used for every read and write.
ENGINE: str = "h5netcdf"

ATTR_SCHEMA = "fisherlab_schema"
ATTR_KIND = "fisherlab_kind"
ATTR_CONFIG = "config"

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

#: Variable attributes consumed or acted on by netCDF/CF encoding and decoding: refused on save.
_RESERVED_VAR_ATTRS = frozenset(
    {
        "_FillValue",
        "missing_value",
        "scale_factor",
        "add_offset",
        "coordinates",
        "dtype",
        "calendar",
        "_Unsigned",
        "_Encoding",
        "compress",
    }
)

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

AttrValue = Union[str, int, float, np.ndarray, list]
PathLike = Union[str, "os.PathLike[str]"]


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
    if isinstance(obj, torch.dtype):
        return _dtype_name(obj)
    if isinstance(obj, torch.device):
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
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().numpy(), name=name)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise InputError(f"{name}: numpy array of dtype {obj.dtype} is not JSON-serialisable")
        return obj.tolist()
    raise InputError(f"{name}: value of type {type(obj).__name__} is not JSON-serialisable: {obj!r}")


def _config_json(config: Mapping[str, Any]) -> str:
    if not isinstance(config, Mapping):
        raise InputError(f"config must be a mapping, got {type(config).__name__}")
    return json.dumps(to_jsonable(config), sort_keys=True)


def config_of(ds: xr.Dataset) -> dict[str, Any]:
    """Parse the ``config`` attribute of a results Dataset.

    Args:
        ds: A Dataset built by :func:`new_dataset` or loaded by :func:`load_dataset`.

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
        return json.loads(json.dumps(to_jsonable(obj, name=which), sort_keys=True))
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
# Provenance
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


def _package_version() -> str:
    try:
        return importlib.metadata.version("fisherlab")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _device_str(device: Any) -> str:
    if isinstance(device, torch.device):
        return str(device)
    if isinstance(device, str):
        try:
            return str(torch.device(device))
        except (RuntimeError, ValueError) as err:
            raise InputError(f"device {device!r} is not a torch device: {err}") from err
    raise InputError(f"device must be a torch.device or a string, got {type(device).__name__}")


def _dtype_str(dtype: Any) -> str:
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
    if not _INT64_MIN <= seed <= _INT64_MAX:
        raise InputError(f"seed {seed} does not fit in int64")
    return seed


def provenance(
    config: Mapping[str, Any],
    *,
    seed: int | None,
    device: torch.device | str,
    dtype: torch.dtype | str,
    kind: str | None = None,
) -> dict[str, str | int | float]:
    """Provenance attributes for a results Dataset (the keys of :data:`PROVENANCE_KEYS`).

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
    attrs: dict[str, str | int | float] = {
        ATTR_SCHEMA: SCHEMA_VERSION,
        "fisherlab_version": _package_version(),
        "torch_version": str(torch.__version__),
        "numpy_version": np.__version__,
        "xarray_version": xr.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "device": _device_str(device),
        "dtype": _dtype_str(dtype),
        "seed": _seed_value(seed),
        ATTR_CONFIG: _config_json(config),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }
    if kind is not None:
        attrs[ATTR_KIND] = _check_kind(kind)
    return attrs


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]*", kind):
        raise InputError(f"kind must be a non-empty identifier-like string (e.g. 'spectrum'), got {kind!r}")
    return kind


# ----------------------------------------------------------------------------------------------------------
# netCDF attribute and variable conversion
# ----------------------------------------------------------------------------------------------------------


def _scalar_attr(value: Any, where: str) -> str | int | float | None:
    """Plain scalar for a netCDF attribute, or None if ``value`` is not a scalar."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise InputError(f"{where}: integer {value} does not fit in int64")
        return value
    if isinstance(value, (float, np.floating)):
        return value if isinstance(value, np.floating) else float(value)
    return None


def netcdf_attr_value(value: Any, where: str = "attribute") -> AttrValue:
    """Convert an attribute value to one netCDF (h5netcdf) can store, following the module's rules.

    Strings, ints and floats (Python or numpy) are kept; bools become ints; lists, tuples and 1-D numpy arrays
    of numbers, bools or strings become a 1-D numpy array (numbers) or a list of ``str`` (strings).

    Args:
        value: The attribute value.
        where: How to name the attribute in error messages.

    Returns:
        The storable value.

    Raises:
        InputError: For ``None``, mappings, empty, nested or mixed-type sequences, integers outside int64, and
            any other type.
    """
    scalar = _scalar_attr(value, where)
    if scalar is not None:
        return scalar
    if value is None:
        raise InputError(f"{where}: None can't be stored in a netCDF attribute; leave the attribute out")
    if isinstance(value, Mapping):
        raise InputError(
            f"{where}: a mapping can't be stored in a netCDF attribute; store json.dumps(...) of it"
        )
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, (list, tuple, np.ndarray)):
        try:
            arr = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=object)
        except ValueError as err:
            raise InputError(f"{where}: a ragged sequence can't be stored in a netCDF attribute") from err
        if arr.ndim != 1:
            raise InputError(
                f"{where}: only 1-D sequences can be stored in a netCDF attribute, got {arr.ndim}-D"
            )
        if arr.size == 0:
            raise InputError(
                f"{where}: an empty sequence can't be stored in a netCDF attribute (its type is lost)"
            )
        if isinstance(value, np.ndarray):
            items: Sequence[Any] = value.tolist()
        else:
            items = list(value)
        if all(isinstance(v, (str, np.str_)) for v in items):
            return [str(v) for v in items]
        if all(isinstance(v, (bool, np.bool_)) for v in items):
            return np.asarray(items, dtype=np.int64)
        numeric = (int, float, np.integer, np.floating)
        if all(isinstance(v, numeric) and not isinstance(v, (bool, np.bool_)) for v in items):
            if isinstance(value, np.ndarray):
                return value.copy()
            if all(isinstance(v, (int, np.integer)) for v in items):
                try:
                    return np.asarray(items, dtype=np.int64)
                except OverflowError as err:
                    raise InputError(f"{where}: an integer does not fit in int64") from err
            return np.asarray(items, dtype=np.float64)
        raise InputError(
            f"{where}: a sequence stored in a netCDF attribute must hold only numbers, only bools or only "
            f"strings, got {sorted({type(v).__name__ for v in items})}"
        )
    raise InputError(f"{where}: value of type {type(value).__name__} can't be stored in a netCDF attribute")


def _clean_attrs(attrs: Mapping[Any, Any], where: str) -> dict[str, AttrValue]:
    out: dict[str, AttrValue] = {}
    for key, value in attrs.items():
        if not isinstance(key, str) or not key:
            raise InputError(f"{where}: attribute name {key!r} is not a non-empty string")
        out[key] = netcdf_attr_value(value, f"{where} attribute '{key}'")
    return out


def _check_var_attrs(name: str, var: xr.Variable) -> None:
    reserved = sorted(_RESERVED_VAR_ATTRS & set(var.attrs))
    if reserved:
        raise InputError(
            f"variable '{name}': attribute(s) {reserved} are reserved by netCDF/CF encoding and would change "
            "the values on load; rename them"
        )
    units = var.attrs.get("units")
    if isinstance(units, str) and " since " in f" {units} " and var.dtype.kind != "M":
        raise InputError(
            f"variable '{name}': units {units!r} look like CF time units and would decode its values as "
            "dates; use other units (e.g. 's') or store datetime64 values"
        )


def _fixed_unicode(name: str, var: xr.Variable) -> xr.Variable:
    if var.dtype.kind not in "OT":
        return var
    values = np.asarray(var.values, dtype=object).ravel()
    bad = [type(v).__name__ for v in values if not isinstance(v, str)]
    if bad:
        raise InputError(
            f"variable '{name}' has dtype {var.dtype} holding non-string values ({sorted(set(bad))}); "
            "only string object arrays can be written"
        )
    fixed = np.array(np.asarray(var.values, dtype=object).tolist(), dtype=str).reshape(var.shape)
    return xr.Variable(var.dims, fixed, attrs=var.attrs)


def _prepare(ds: xr.Dataset) -> xr.Dataset:
    """Return a netCDF-ready shallow copy of ``ds``: attributes cleaned, strings fixed-width, no encoding."""
    out = ds.copy(deep=False)
    replace_coords: dict[str, xr.Variable] = {}
    replace_vars: dict[str, xr.Variable] = {}
    for name, var in out.variables.items():
        var.attrs = _clean_attrs(var.attrs, f"variable '{name}'")
        var.encoding = {}
        _check_var_attrs(str(name), var)
        fixed = _fixed_unicode(str(name), var)
        if fixed is not var:
            (replace_coords if name in out.coords else replace_vars)[str(name)] = fixed
    if replace_coords:
        out = out.assign_coords(replace_coords)
    for name, var in replace_vars.items():
        out[name] = var
    out.attrs = _clean_attrs(out.attrs, "dataset")
    out.encoding = {}
    return out


def _python_attr(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------------------
# Building Datasets
# ----------------------------------------------------------------------------------------------------------


def _tensor_to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, tuple):
        return tuple(_tensor_to_numpy(v) if i == 1 else v for i, v in enumerate(value))
    return value


def new_dataset(
    kind: str,
    data_vars: Mapping[str, Any],
    coords: Mapping[str, Any] | None = None,
    *,
    config: Mapping[str, Any],
    seed: int | None,
    device: torch.device | str,
    dtype: torch.dtype | str,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Build a results Dataset stamped with provenance, kind and schema version.

    Args:
        kind: What the Dataset holds (``"spectrum"``, ``"fidelity"``, ``"trajectory"``, ``"training"``, ...).
        data_vars: As for ``xarray.Dataset``: ``{name: (dims, values[, attrs])}`` or DataArrays; torch
            tensors are converted to numpy arrays.
        coords: As for ``xarray.Dataset``; torch tensors are converted likewise.
        config: The full configuration of the run (see :func:`provenance`).
        seed: The random seed, or ``None``.
        device: The torch device the computation ran on.
        dtype: The torch dtype it ran in.
        attrs: Extra Dataset attributes; they may not override a provenance attribute.

    Returns:
        The Dataset, with attributes already in their stored form (bools as ints, see
        :func:`netcdf_attr_value`).

    Raises:
        InputError: If xarray refuses the variables or coordinates, an attribute can't be stored, an extra
            attribute would override provenance, or the provenance arguments are invalid.
    """
    kind = _check_kind(kind)
    if not isinstance(data_vars, Mapping):
        raise InputError(f"data_vars must be a mapping, got {type(data_vars).__name__}")
    if coords is not None and not isinstance(coords, Mapping):
        raise InputError(f"coords must be a mapping or None, got {type(coords).__name__}")
    prov = provenance(config, seed=seed, device=device, dtype=dtype, kind=kind)
    extra = dict(attrs or {})
    clash = sorted(set(extra) & set(prov))
    if clash:
        raise InputError(f"attrs may not override provenance attribute(s) {clash}")
    try:
        ds = xr.Dataset(
            {k: _tensor_to_numpy(v) for k, v in data_vars.items()},
            coords=None if coords is None else {k: _tensor_to_numpy(v) for k, v in coords.items()},
        )
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"can't build the '{kind}' dataset: {err}") from err
    for name, var in ds.variables.items():
        var.attrs = _clean_attrs(var.attrs, f"variable '{name}'")
    ds.attrs = {**_clean_attrs(extra, "dataset"), **prov}
    return ds


def annotate(ds: xr.Dataset, spec: Mapping[str, tuple[str, str]]) -> xr.Dataset:
    """Set ``long_name`` and ``units`` attributes on variables of ``ds`` (in place).

    Args:
        ds: The Dataset to annotate.
        spec: ``{variable_or_coordinate_name: (long_name, units)}``; use ``"1"`` for dimensionless units.

    Returns:
        ``ds`` itself, for chaining.

    Raises:
        InputError: If a name is not a variable or coordinate of ``ds`` (all such names are listed), or a
            value is not a pair of strings. Nothing is changed in that case.
    """
    if not isinstance(ds, xr.Dataset):
        raise InputError(f"annotate expects an xarray.Dataset, got {type(ds).__name__}")
    missing = [name for name in spec if name not in ds.variables]
    if missing:
        raise InputError(f"annotate: {missing} not in dataset (variables: {sorted(map(str, ds.variables))})")
    for name, value in spec.items():
        if not isinstance(value, tuple) or len(value) != 2 or not all(isinstance(v, str) for v in value):
            raise InputError(f"annotate: value for '{name}' must be a (long_name, units) pair of strings")
    for name, (long_name, units) in spec.items():
        ds.variables[name].attrs.update(long_name=long_name, units=units)
    return ds


# ----------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------


def _write_netcdf(ds: xr.Dataset, path: Path) -> None:
    """Write ``ds`` to ``path`` (a separate function so tests can make it fail midway)."""
    ds.to_netcdf(path, engine=ENGINE)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    if sys.platform.startswith("win"):
        return
    try:
        _fsync_path(directory)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def save_dataset(ds: xr.Dataset, path: PathLike) -> Path:
    """Write a results Dataset to a netCDF-4 file atomically.

    The Dataset is written to a hidden temporary file (``.NAME.<random>.tmp``) in the target's directory,
    flushed to disk with ``fsync`` and renamed over ``path`` with ``os.replace``. If anything fails, the
    temporary file is removed and an existing file at ``path`` is left as it was. Parent directories are
    created. The Dataset passed in is not modified; the conversions of the module docstring apply to the copy
    that is written.

    Args:
        ds: A Dataset carrying ``fisherlab_schema`` and ``fisherlab_kind`` (as :func:`new_dataset` makes).
        path: The file to write (conventionally ``*.nc``).

    Returns:
        The absolute path written.

    Raises:
        InputError: If ``ds`` is not a Dataset, lacks the fisherlab attributes, or holds a value netCDF can't
            store (named in the message).
        ResultsFileError: If the file can't be written (an ``OSError`` from the filesystem or HDF5).
    """
    if not isinstance(ds, xr.Dataset):
        raise InputError(f"save_dataset expects an xarray.Dataset, got {type(ds).__name__}")
    missing = [a for a in (ATTR_SCHEMA, ATTR_KIND) if a not in ds.attrs]
    if missing:
        raise InputError(
            f"dataset lacks the fisherlab attribute(s) {missing}; "
            "build it with new_dataset() or add provenance()"
        )
    target = Path(path).expanduser().absolute()
    if target.is_dir():
        raise InputError(f"results path is a directory: {target}")
    prepared = _prepare(ds)
    tmp = _temp_path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_netcdf(prepared, tmp)
        _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(err, OSError) and not isinstance(err, ResultsFileError):
            raise ResultsFileError(f"could not write results file {target}: {err}") from err
        raise
    _fsync_dir(target.parent)
    return target


def load_dataset(
    path: PathLike,
    *,
    kind: str | None = None,
    required_vars: Iterable[str] = (),
    required_dims: Iterable[str] = (),
    required_attrs: Iterable[str] = (),
) -> xr.Dataset:
    """Load a results file fully into memory (the file is closed on return) and validate it.

    Numpy scalar attributes are returned as plain Python ``int``/``float``; the ``config`` attribute stays a
    JSON string (parse it with :func:`config_of`).

    Args:
        path: The netCDF file.
        kind: If given, the file's ``fisherlab_kind`` must equal it.
        required_vars: Names that must be variables or coordinates of the Dataset.
        required_dims: Names that must be dimensions of the Dataset.
        required_attrs: Names that must be Dataset attributes.

    Returns:
        The Dataset.

    Raises:
        ResultsFileError: If the file is missing, not a readable netCDF file, not written by fisherlab, of an
            unsupported schema version, of another kind, or lacks a required variable, dimension or attribute
            (each missing one is named).
    """
    for arg_name, arg in (
        ("required_vars", required_vars),
        ("required_dims", required_dims),
        ("required_attrs", required_attrs),
    ):
        if isinstance(arg, str):
            raise InputError(f"{arg_name} must be an iterable of names, not a single string: {arg!r}")
    file = Path(path).expanduser().absolute()
    if not file.exists():
        raise ResultsFileError(f"results file not found: {file}")
    if not file.is_file():
        raise ResultsFileError(f"results path is not a file: {file}")
    try:
        ds = xr.load_dataset(file, engine=ENGINE)
    except Exception as err:  # noqa: BLE001 - h5py/h5netcdf/xarray raise many types for a corrupt file
        raise ResultsFileError(f"not a readable netCDF file: {file}: {type(err).__name__}: {err}") from err
    ds.attrs = {k: _python_attr(v) for k, v in ds.attrs.items()}
    for var in ds.variables.values():
        var.attrs = {k: _python_attr(v) for k, v in var.attrs.items()}

    if ATTR_SCHEMA not in ds.attrs:
        raise ResultsFileError(f"not written by fisherlab (no '{ATTR_SCHEMA}' attribute): {file}")
    schema = ds.attrs[ATTR_SCHEMA]
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise ResultsFileError(f"'{ATTR_SCHEMA}' attribute of {file} is not an integer: {schema!r}")
    if not 1 <= schema <= SCHEMA_VERSION:
        raise ResultsFileError(
            f"unsupported fisherlab schema version {schema} in {file}; "
            f"this fisherlab reads 1..{SCHEMA_VERSION}"
        )
    if ATTR_KIND not in ds.attrs:
        raise ResultsFileError(f"results file {file} has no '{ATTR_KIND}' attribute")
    if kind is not None and ds.attrs[ATTR_KIND] != kind:
        raise ResultsFileError(f"results file {file} holds kind '{ds.attrs[ATTR_KIND]}', expected '{kind}'")
    problems: list[str] = []
    missing_vars = [v for v in required_vars if v not in ds.variables]
    if missing_vars:
        problems.append(f"variable(s) {missing_vars}")
    missing_dims = [d for d in required_dims if d not in ds.dims]
    if missing_dims:
        problems.append(f"dimension(s) {missing_dims}")
    missing_attrs = [a for a in required_attrs if a not in ds.attrs]
    if missing_attrs:
        problems.append(f"attribute(s) {missing_attrs}")
    if problems:
        raise ResultsFileError(f"results file {file} lacks required " + "; ".join(problems))
    return ds


# ----------------------------------------------------------------------------------------------------------
# Store
# ----------------------------------------------------------------------------------------------------------


class ResultsStore:
    """A directory of netCDF results files, one per key, so a crashed sweep keeps its finished work.

    Keys are arbitrary non-empty strings; each maps reversibly to a file name by percent-encoding every
    character other than letters, digits and ``-_.=,+`` (and a leading ``.``), plus the suffix ``.nc``: e.g.
    ``"lr=0.1/seed=3"`` -> ``lr=0.1%2Fseed=3.nc``. Writes go through :func:`save_dataset` and are atomic;
    hidden files (a crash's leftover ``.NAME.<random>.tmp``) and non-``.nc`` files are not keys.

    Args:
        directory: The store's folder; created on the first :meth:`save`.
    """

    SUFFIX = ".nc"
    _SAFE = "-_.=,+"
    _MAX_NAME_BYTES = 200

    def __init__(self, directory: PathLike) -> None:
        self.directory = Path(directory).expanduser().absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise InputError(f"results store path exists and is not a directory: {self.directory}")

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.directory)!r})"

    def _filename(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise InputError(f"store key must be a non-empty string, got {key!r}")
        name = urllib.parse.quote(key, safe=self._SAFE)
        if name.startswith("."):
            name = "%2E" + name[1:]
        name += self.SUFFIX
        if len(name.encode()) > self._MAX_NAME_BYTES:
            raise InputError(
                f"store key is too long for a file name ({len(name.encode())} bytes encoded): {key!r}"
            )
        return name

    def path(self, key: str) -> Path:
        """Return the file that holds ``key``.

        Args:
            key: The entry's key.

        Returns:
            ``directory / encoded(key) + ".nc"``.

        Raises:
            InputError: If the key is empty, not a string, or too long for a file name.
        """
        return self.directory / self._filename(key)

    def has(self, key: str) -> bool:
        """Whether an entry for ``key`` has been saved.

        Args:
            key: The entry's key.

        Returns:
            ``True`` if its file exists.
        """
        return self.path(key).is_file()

    def save(self, key: str, ds: xr.Dataset) -> Path:
        """Atomically write ``ds`` as the entry ``key`` (replacing any previous one).

        Args:
            key: The entry's key.
            ds: A fisherlab results Dataset.

        Returns:
            The file written.
        """
        return save_dataset(ds, self.path(key))

    def load(self, key: str, **validation: Any) -> xr.Dataset:
        """Load the entry ``key``.

        Args:
            key: The entry's key.
            **validation: Passed to :func:`load_dataset` (``kind``, ``required_vars``, ...).

        Returns:
            The Dataset.

        Raises:
            ResultsFileError: If the entry is missing or fails validation.
        """
        return load_dataset(self.path(key), **validation)

    def keys(self) -> list[str]:
        """List the keys of the saved entries, sorted; temporary and other files are ignored.

        Returns:
            The keys (decoded from the file names).
        """
        if not self.directory.is_dir():
            return []
        keys = []
        for entry in self.directory.iterdir():
            name = entry.name
            if name.startswith(".") or not name.endswith(self.SUFFIX) or not entry.is_file():
                continue
            keys.append(urllib.parse.unquote(name[: -len(self.SUFFIX)]))
        return sorted(keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and bool(key) and self.has(key)

    def __len__(self) -> int:
        return len(self.keys())

    def load_all(
        self,
        kind: str | None = None,
        concat_dim: str | None = None,
        *,
        join: str = "exact",
        **validation: Any,
    ) -> dict[str, xr.Dataset] | xr.Dataset:
        """Load every entry, optionally concatenated into one Dataset.

        With ``concat_dim``: if every entry has that dimension, or a scalar coordinate of that name (e.g. each
        sweep point carries ``lr`` as a scalar coordinate), entries are concatenated along it; otherwise a new
        dimension of that name is created whose coordinate is the keys. Dataset attributes that differ between
        entries (``created``, ``seed``, ``config``, ...) are dropped from the result; the ones they share are
        kept. Indexes must agree exactly between entries (``join="exact"``) unless another xarray ``join`` is
        given.

        Args:
            kind: If given, every entry must be of this kind (a mismatch raises rather than being skipped).
            concat_dim: Dimension to concatenate along, or ``None`` to return a dict.
            join: xarray's ``join`` for aligning the other indexes when concatenating.
            **validation: Other :func:`load_dataset` checks applied to each entry.

        Returns:
            ``{key: Dataset}`` in key order, or the concatenated Dataset.

        Raises:
            ResultsFileError: If an entry fails validation, the store is empty while ``concat_dim`` is given,
                or the entries can't be concatenated.
        """
        keys = self.keys()
        loaded = {key: self.load(key, kind=kind, **validation) for key in keys}
        if concat_dim is None:
            return loaded
        if not loaded:
            raise ResultsFileError(f"results store {self.directory} is empty: nothing to concatenate")
        datasets = list(loaded.values())
        existing = all(
            concat_dim in d.dims or (concat_dim in d.coords and d[concat_dim].ndim == 0) for d in datasets
        )
        dim: str | xr.DataArray
        if existing:
            dim = concat_dim
            data_vars = "minimal" if all(concat_dim in d.dims for d in datasets) else "all"
        else:
            dim = xr.DataArray(np.array(keys, dtype=str), dims=concat_dim, name=concat_dim)
            data_vars = "all"
        try:
            return xr.concat(
                datasets,
                dim=dim,
                data_vars=data_vars,
                coords="different",
                compat="equals",
                join=join,
                combine_attrs="drop_conflicts",
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ResultsFileError(
                f"can't concatenate the entries of {self.directory} along '{concat_dim}': {err}"
            ) from err


# ----------------------------------------------------------------------------------------------------------
# Provenance across Datasets
# ----------------------------------------------------------------------------------------------------------


def merge_provenance(datasets: Iterable[xr.Dataset] | Mapping[str, xr.Dataset]) -> dict[str, Any]:
    """Check that results Datasets come from the same software and summarise their provenance.

    Args:
        datasets: Datasets (or a mapping of name to Dataset, as :meth:`ResultsStore.load_all` returns).

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
        summary[out_key] = sorted({_python_attr(ds.attrs[key]) for _, ds in items}, key=str)
    summary["seeds"] = [_python_attr(ds.attrs["seed"]) for _, ds in items]
    created = sorted(str(ds.attrs["created"]) for _, ds in items)
    summary["created_first"] = created[0]
    summary["created_last"] = created[-1]
    return summary
