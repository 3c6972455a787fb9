"""netCDF-4 files of results Datasets: atomic :func:`save_dataset`, validating :func:`load_dataset`.

Files are written atomically (:func:`save_dataset`): a temporary file in the target directory is written,
flushed to disk and renamed over the target, so a crash never leaves a partial results file and never
destroys the previous one. On write, attribute values are converted by
:func:`~fisherlab.results.schema.netcdf_attr_value` and variable attributes checked by
:func:`~fisherlab.results.schema.check_variable_attrs` (reserved names, accepted units); string arrays of
``object`` or numpy ``StringDType`` dtype are written as fixed-width unicode (``<U``); any ``encoding`` carried
by the Dataset (e.g. from a previously loaded file) is dropped, so values are written in their in-memory dtype
and round-trip exactly.

:func:`load_dataset` reads a file fully into memory, closes it, returns numpy scalar attributes as plain Python
``int``/``float``, validates it, and upgrades a file of an older schema to the current one
(:func:`~fisherlab.results.upgrade.upgrade`, with a :class:`~fisherlab.errors.SchemaUpgradeWarning`).

Integrity: :func:`save_dataset` stores a content checksum of every variable and coordinate (:func:`checksum`,
attribute :data:`~fisherlab.results.schema.ATTR_CHECKSUM`); :func:`load_dataset` recomputes it and refuses a file
whose values were changed after fisherlab wrote it, and a file with values outside their documented range
(:data:`~fisherlab.results.schema.VALID_RANGES`, e.g. a cosine of 7), or, with ``strict=False``, loads it with a
:class:`~fisherlab.errors.ResultsIntegrityWarning`. The netCDF file is built in memory and then written to the
temporary file with plain ``os.write`` calls, so a full disk or an I/O error is an ordinary
:class:`~fisherlab.errors.ResultsFileError` (HDF5 never holds a half-written file on disk) and the caller can go on.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Union

import numpy as np
import xarray as xr

from fisherlab.errors import InputError, ResultsFileError, ResultsIntegrityWarning
from fisherlab.results import manifest
from fisherlab.results.lock import write_atomically, write_bytes_durably
from fisherlab.results.schema import (
    ATTR_CHECKSUM,
    ATTR_KIND,
    ATTR_RUN,
    ATTR_SCHEMA,
    ENGINE,
    KIND_VARIABLES,
    SCHEMA_VERSION,
    check_variable_attrs,
    clean_attrs,
    out_of_range,
    python_attr,
)
from fisherlab.results.upgrade import upgrade

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------------------------------------
# Preparing a Dataset for netCDF
# ----------------------------------------------------------------------------------------------------------


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
        var.attrs = clean_attrs(var.attrs, f"variable '{name}'")
        var.encoding = {}
        check_variable_attrs(str(name), var)
        fixed = _fixed_unicode(str(name), var)
        if fixed is not var:
            (replace_coords if name in out.coords else replace_vars)[str(name)] = fixed
    if replace_coords:
        out = out.assign_coords(replace_coords)
    for name, var in replace_vars.items():
        out[name] = var
    out.attrs = clean_attrs(out.attrs, "dataset")
    out.encoding = {}
    return out


# ----------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------


def checksum(ds: xr.Dataset) -> str:
    """Content checksum of a Dataset's variables and coordinates: ``"sha256:<hex>"``.

    SHA-256 over every variable in name order: its name, dims, shape and dtype (as JSON), then its values —
    numbers as little-endian bytes (every NaN as the same NaN), strings as JSON text, so that what
    :func:`save_dataset` writes and :func:`load_dataset` reads hash alike. Attributes are not included.

    Args:
        ds: The Dataset.

    Returns:
        The checksum text.
    """
    digest = hashlib.sha256()
    for name in sorted(map(str, ds.variables)):
        var = ds.variables[name]
        values = np.asarray(var.values)
        if values.dtype.kind in "OSUT":
            tag, data = "str", json.dumps(np.asarray(values, dtype=object).ravel().tolist()).encode()
        else:
            if values.dtype.kind in "fc":
                values = np.where(np.isnan(values), np.asarray(np.nan, dtype=values.dtype), values)
            little = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
            tag, data = little.dtype.str.lstrip("<>|="), little.tobytes()
        digest.update(json.dumps([name, list(map(str, var.dims)), list(values.shape), tag]).encode() + b"\0")
        digest.update(data)
    return "sha256:" + digest.hexdigest()


def _write_netcdf(ds: xr.Dataset, path: Path) -> None:
    """Write ``ds`` to the new file ``path``: built in memory by h5netcdf, then written and ``fsync``-ed.

    HDF5 never has the file open, so a write error (a full disk) can't leave HDF5 cleaning up a broken file
    when the interpreter exits. A separate function so that tests can make it fail midway.
    """
    write_bytes_durably(path, bytes(ds.to_netcdf(None, engine=ENGINE)))


def _fsync_dir(directory: Path) -> None:
    if sys.platform.startswith("win"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass


def save_dataset(ds: xr.Dataset, path: PathLike) -> Path:
    """Write a results Dataset to a netCDF-4 file atomically.

    The Dataset is built in memory, written to a hidden temporary file (``.NAME.<random>.tmp``) in the target's
    directory, flushed to disk with ``fsync`` and renamed over ``path`` with ``os.replace``. If anything fails
    (a full disk included), the temporary file is removed, an existing file at ``path`` is left as it was and a
    :class:`~fisherlab.errors.ResultsFileError` says why; the process can go on. Parent directories are
    created. The Dataset passed in is not modified; the conversions of the module docstring apply to the copy
    that is written, which also gets the content :func:`checksum` (attribute ``fisherlab_checksum``) and, inside
    an output folder this process has claimed (:func:`~fisherlab.results.guard_output_folder`), the claim's
    configuration (``fisherlab_run``); the file is then listed in the folder's manifest.

    Args:
        ds: A Dataset carrying ``fisherlab_schema`` and ``fisherlab_kind`` (as
            :func:`~fisherlab.results.new_dataset` makes).
        path: The file to write (conventionally ``*.nc``).

    Returns:
        The absolute path written.

    Raises:
        InputError: If ``ds`` is not a Dataset, lacks the fisherlab attributes, or holds a value netCDF can't
            store or units that are not accepted (named in the message).
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
    prepared.attrs[ATTR_CHECKSUM] = checksum(prepared)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        claim = manifest.claim_for(target)
        if claim is not None:
            prepared.attrs[ATTR_RUN] = claim.config_json
        else:
            prepared.attrs.pop(ATTR_RUN, None)
        write_atomically(target, lambda tmp: _write_netcdf(prepared, tmp))
    except OSError as err:
        if isinstance(err, ResultsFileError):
            raise
        raise ResultsFileError(f"could not write results file {target}: {err}") from err
    _fsync_dir(target.parent)
    if claim is not None:
        manifest.record_file(claim, target)
    return target


def _integrity(ds: xr.Dataset, file: Path, strict: bool) -> None:
    """Verify the stored checksum and the documented ranges; raise (strict) or warn."""
    problems = []
    stored = ds.attrs.pop(ATTR_CHECKSUM, None)
    if stored is not None and stored != checksum(ds):
        problems.append("its values were changed after fisherlab wrote it (the content checksum does not match)")
    outside = out_of_range(ds)
    if outside:
        problems.append("values outside their documented range (VALID_RANGES): " + "; ".join(outside))
    if not problems:
        return
    message = f"results file {file}: " + "; ".join(problems)
    if strict:
        raise ResultsFileError(message + "; its values are not trusted (load_dataset(..., strict=False) reads it "
                                         "anyway, with a warning)")
    warnings.warn(message + " (loaded because strict=False)", ResultsIntegrityWarning, stacklevel=3)


def load_dataset(
    path: PathLike,
    *,
    kind: str | None = None,
    required_vars: Iterable[str] = (),
    required_dims: Iterable[str] = (),
    required_attrs: Iterable[str] = (),
    kind_variables: bool = False,
    strict: bool = True,
) -> xr.Dataset:
    """Load a results file fully into memory (the file is closed on return), validate it, upgrade an old one.

    Numpy scalar attributes are returned as plain Python ``int``/``float``; the ``config`` attribute stays a
    JSON string (parse it with :func:`~fisherlab.results.config_of`). A file of an older schema version is
    upgraded in memory (dims ``method`` -> ``rule``, ``fisher_kind`` -> ``kind``, ...; see
    :mod:`~fisherlab.results.upgrade`) with a :class:`~fisherlab.errors.SchemaUpgradeWarning` naming the file and
    the changes; the ``required_*`` names are those of the current schema. The content checksum is verified
    (and removed from the returned attributes) and values are checked against their documented ranges (module
    docstring); files written before fisherlab stored checksums are accepted without one.

    Args:
        path: The netCDF file.
        kind: If given, the file's ``fisherlab_kind`` must equal it.
        required_vars: Names that must be variables or coordinates of the Dataset.
        required_dims: Names that must be dimensions of the Dataset.
        required_attrs: Names that must be Dataset attributes.
        kind_variables: Also require the variables every Dataset of the file's kind holds
            (:data:`~fisherlab.results.schema.KIND_VARIABLES`; what the report reads).
        strict: Refuse a file whose checksum does not match or whose values are out of range; ``False`` loads
            it with a :class:`~fisherlab.errors.ResultsIntegrityWarning`.

    Returns:
        The Dataset.

    Raises:
        ResultsFileError: If the file is missing, not a readable netCDF file, not written by fisherlab, of an
            unsupported schema version, of another kind, or lacks a required variable, dimension or attribute
            (each missing one is named); with ``strict``, if its values were changed after it was written or lie
            outside their documented range.
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
    ds.attrs = {k: python_attr(v) for k, v in ds.attrs.items()}
    for var in ds.variables.values():
        var.attrs = {k: python_attr(v) for k, v in var.attrs.items()}

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
    _integrity(ds, file, strict)
    ds = upgrade(ds, file)
    if kind is not None and ds.attrs[ATTR_KIND] != kind:
        raise ResultsFileError(f"results file {file} holds kind '{ds.attrs[ATTR_KIND]}', expected '{kind}'")
    problems: list[str] = []
    if kind_variables:
        required_vars = [*required_vars, *KIND_VARIABLES.get(str(ds.attrs[ATTR_KIND]), ())]
    missing_vars = [v for v in dict.fromkeys(required_vars) if v not in ds.variables]
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


__all__ = ["checksum", "load_dataset", "save_dataset"]
