"""The results schema: version, attribute names, units and coordinate conventions, storable attribute values.

What a fisherlab results Dataset may hold, independent of how it is built (:mod:`~fisherlab.results.builders`)
or stored (:mod:`~fisherlab.results.io`):

* :data:`SCHEMA_VERSION` and the names of the fisherlab attributes (:data:`ATTR_SCHEMA`, :data:`ATTR_KIND`,
  :data:`ATTR_CONFIG`); the CF global attributes every Dataset carries (:data:`CF_ATTRS`, conventions
  :data:`CONVENTIONS`).
* Units: every ``units`` attribute is one of :data:`ACCEPTED_UNITS`, all valid UDUNITS strings (checked by
  :func:`check_units`). Dimensionless quantities have ``"1"``. UDUNITS has no unit for nats (``"nat"`` parses
  as nano-atmospheres), so quantities in natural-log units — losses, KL divergences, Fisher eigenvalues and
  traces (nats per squared parameter unit; parameters are dimensionless) — have units ``"1"`` and the
  ``comment`` :data:`NATS_COMMENT` (``annotate(ds, {"loss": ("mean loss", *NATS)})``).
* Coordinates carry a ``long_name`` (and ``units`` where they have one): :data:`COORDINATES` gives the
  defaults for the coordinates fisherlab uses, applied by :func:`annotate_coordinates`. Dimension names never
  collide with keyword arguments of xarray's ``sel``/``isel`` (:data:`RESERVED_DIMS`): ``ds.sel(method=[...])``
  would be read as xarray's own ``method=`` and silently select every rule.
* netCDF attribute values (:func:`netcdf_attr_value`): attribute values that are ``bool`` become ``int``
  (``True`` -> ``1``), sequences of bools int arrays; lists and tuples become 1-D arrays (on load numeric ones
  come back as numpy arrays, string ones as lists, and a sequence of length one as a scalar); ``None``,
  dictionaries (encode them yourself with ``json.dumps``), empty or nested sequences, sequences of mixed types
  and integers outside int64 are refused with :class:`~fisherlab.errors.InputError`.
* What readers may rely on: :data:`VALID_RANGES` (the documented range of a variable, by name: a cosine lies in
  [-1, 1], a condition number is >= 1; :func:`out_of_range` finds values outside) and :data:`KIND_VARIABLES` (the
  variables every Dataset of a kind holds); the attributes :data:`ATTR_CHECKSUM` (content checksum) and
  :data:`ATTR_RUN` (the run that claimed the folder a file was written into) are written on save.
* Variable attributes that netCDF/CF decoding would consume or act on (:data:`RESERVED_VAR_ATTRS`) are refused,
  and so is a ``units`` attribute containing ``" since "`` on a variable that is not a datetime (CF decoding
  would turn its numbers into dates on load) — :func:`check_variable_attrs`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, Union

import numpy as np
import xarray as xr

from fisherlab.errors import InputError


def loaded_torch() -> ModuleType | None:
    """The torch module if this process has imported it, else None.

    A value can only be a torch object once torch is imported, so the results layer never imports torch to
    recognise one: loading, checking and saving results (the report, the lock and upgrade paths) do not pay
    torch's import.
    """
    return sys.modules.get("torch")


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.Tensor`` (without importing torch)."""
    torch = loaded_torch()
    return torch is not None and isinstance(value, torch.Tensor)

#: Version of the results-file layout written by fisherlab; :func:`~fisherlab.results.load_dataset` reads
#: versions 1..this. Version 2 renamed the dims ``method`` -> ``rule`` and ``fisher_kind`` -> ``kind``, made
#: every ``units`` a UDUNITS string and added the CF global attributes (:mod:`~fisherlab.results.upgrade`).
SCHEMA_VERSION: int = 2

#: The xarray backend used for every read and write.
ENGINE: str = "h5netcdf"

ATTR_SCHEMA = "fisherlab_schema"
ATTR_KIND = "fisherlab_kind"
ATTR_CONFIG = "config"
#: Content checksum written by :func:`~fisherlab.results.save_dataset` and verified (then removed from the
#: Dataset) by :func:`~fisherlab.results.load_dataset`: ``"sha256:<hex>"`` (:func:`~fisherlab.results.checksum`).
ATTR_CHECKSUM = "fisherlab_checksum"
#: Configuration (JSON) of the run that claimed the output folder a file was written into
#: (:mod:`~fisherlab.results.manifest`); absent for files written outside a claimed folder.
ATTR_RUN = "fisherlab_run"

#: The CF conventions the Datasets follow (global attribute ``Conventions``).
CONVENTIONS = "CF-1.10"

#: CF global attributes of every results Dataset: ``Conventions`` (:data:`CONVENTIONS`), ``title`` (what it
#: holds), ``history`` (creation time and the fisherlab call that made it, one line per later change) and
#: ``source`` (fisherlab and torch versions).
CF_ATTRS: tuple[str, ...] = ("Conventions", "title", "history", "source")

#: The ``units`` strings a results variable may carry (all parse with UDUNITS), with what each is for.
ACCEPTED_UNITS: dict[str, str] = {
    "1": "dimensionless: ratios, cosines, eigenvalues of preconditioned matrices, counts, indices, flags, "
         "learning rates and damping; also quantities in nats, with the comment NATS_COMMENT",
    "s": "seconds: wall-clock and CPU times",
}

#: ``comment`` attribute of a quantity in natural-log units (its ``units`` are ``"1"``).
NATS_COMMENT = "natural-log units (nats)"

#: ``(units, comment)`` of a quantity in nats, to splice into an :func:`annotate` spec.
NATS: tuple[str, str] = ("1", NATS_COMMENT)

#: Default ``(long_name, units)`` of the coordinates fisherlab uses (``units`` None: the coordinate has none,
#: e.g. names).
COORDINATES: dict[str, tuple[str, str | None]] = {
    "rule": ("update rule", None),
    "train_rule": ("rule the model was trained with", None),
    "damping": ("damping λ", "1"),
    "layer": ("layer (path of the module that owns the parameters)", None),
    "step": ("training step", "1"),
    "kind": ("Fisher kind", None),
    "structure": ("Fisher structure", None),
    "eig": ("eigenvalue index, ascending", "1"),
    "layer_eig": ("eigenvalue index within the layer block, ascending", "1"),
    "probe": ("SLQ probe index", "1"),
    "node": ("Lanczos node index", "1"),
    "candidate": ("learning-rate candidate index", "1"),
    "seed": ("random seed", "1"),
}

#: Documented ranges ``(min, max)`` of results variables, by variable name (one name, one quantity: a name means
#: the same everywhere). :func:`out_of_range` finds finite values outside them (NaN marks a value that was not
#: measured and is not flagged); :func:`~fisherlab.results.load_dataset` refuses (or, with ``strict=False``,
#: warns about) such a file.
VALID_RANGES: dict[str, tuple[float, float]] = {
    "cosine": (-1.0, 1.0),
    "cosine_layer": (-1.0, 1.0),
    "rel_error": (0.0, np.inf),
    "fisher_rel_error": (0.0, np.inf),
    "update_norm": (0.0, np.inf),
    "condition_number": (1.0, np.inf),
    "layer_condition_number": (1.0, np.inf),
    "available": (0.0, 1.0),
    "train_accuracy": (0.0, 1.0),
    "test_accuracy": (0.0, 1.0),
    "time": (0.0, np.inf),
    "cpu_time": (0.0, np.inf),
    "weights": (0.0, 1.0),
    "density": (0.0, np.inf),
    "null_fraction": (0.0, 1.0),
    "null_fraction_lower": (0.0, 1.0),
}

#: Relative slack of :data:`VALID_RANGES` for rounding (a float32 cosine of 1 + 1e-7 is in range).
RANGE_SLACK = 1e-6

#: Variables and coordinates every Dataset of a kind fisherlab produces holds: what the report, its tables and
#: the headline read (``load_dataset(..., kind_variables=True)`` requires them).
KIND_VARIABLES: dict[str, tuple[str, ...]] = {
    "fidelity": ("rule", "damping", "cosine", "rel_error", "fisher_rel_error", "kl_predicted", "kl_measured",
                 "loss_change"),
    "fidelity_trajectory": ("rule", "step", "cosine", "loss"),
    "geometry": ("structure", "damping", "eigenvalue", "condition_number"),
    "spectrum": ("kind", "structure", "damping", "eig", "eigenvalue", "trace", "condition_number",
                 "rel_frobenius_to_true"),
    "spectral_density": ("kind", "log10_eigenvalue", "probe", "node", "density", "null_fraction", "lambda_max",
                         "trace", "trace_stderr"),
    "training": ("loss",),
}

#: Keyword arguments of xarray's ``sel``/``isel``: a dimension of that name can't be selected by keyword.
RESERVED_DIMS = frozenset({"method", "tolerance", "drop", "indexers", "missing_dims"})

#: Variable attributes consumed or acted on by netCDF/CF encoding and decoding: refused on save.
RESERVED_VAR_ATTRS = frozenset(
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

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

AttrValue = Union[str, int, float, np.ndarray, list]


# ----------------------------------------------------------------------------------------------------------
# Units and annotations
# ----------------------------------------------------------------------------------------------------------


def check_units(units: Any, where: str) -> str:
    """Return ``units`` if it is one of :data:`ACCEPTED_UNITS`.

    Raises:
        InputError: Naming ``where``, the units and the accepted ones (and, for nats, the convention).
    """
    if isinstance(units, str) and units in ACCEPTED_UNITS:
        return units
    hint = " (quantities in nats: units '1' with the comment NATS_COMMENT, e.g. *NATS)" if (
        isinstance(units, str) and "nat" in units) else ""
    raise InputError(f"{where}: units {units!r} are not one of the accepted UDUNITS strings "
                     f"{sorted(ACCEPTED_UNITS)}{hint}")


def annotate(ds: xr.Dataset, spec: Mapping[str, tuple[str, ...]]) -> xr.Dataset:
    """Set ``long_name``, ``units`` and ``comment`` attributes on variables of ``ds`` (in place).

    Args:
        ds: The Dataset to annotate.
        spec: ``{variable_or_coordinate_name: (long_name, units)}`` or ``(long_name, units, comment)``; units
            are one of :data:`ACCEPTED_UNITS` (``"1"`` for dimensionless, :data:`NATS` for nats), or ``None``
            for a variable without units (names, text).

    Returns:
        ``ds`` itself, for chaining.

    Raises:
        InputError: If a name is not a variable or coordinate of ``ds`` (all such names are listed), a value is
            not such a tuple of strings, or units are not accepted. Nothing is changed in that case.
    """
    if not isinstance(ds, xr.Dataset):
        raise InputError(f"annotate expects an xarray.Dataset, got {type(ds).__name__}")
    missing = [name for name in spec if name not in ds.variables]
    if missing:
        raise InputError(f"annotate: {missing} not in dataset (variables: {sorted(map(str, ds.variables))})")
    for name, value in spec.items():
        if (not isinstance(value, tuple) or len(value) not in (2, 3) or not isinstance(value[0], str)
                or not all(v is None or isinstance(v, str) for v in value[1:])):
            raise InputError(f"annotate: value for '{name}' must be a (long_name, units[, comment]) tuple of "
                             "strings (units may be None)")
        if value[1] is not None:
            check_units(value[1], f"annotate: variable '{name}'")
    for name, (long_name, units, *comment) in spec.items():
        attrs = ds.variables[name].attrs
        attrs["long_name"] = long_name
        if units is None:
            attrs.pop("units", None)
        else:
            attrs["units"] = units
        if comment and comment[0] is not None:
            attrs["comment"] = comment[0]
    return ds


def annotate_coordinates(ds: xr.Dataset) -> xr.Dataset:
    """Give every coordinate of ``ds`` named in :data:`COORDINATES` and without a ``long_name`` its defaults.

    Returns:
        ``ds`` itself (changed in place).
    """
    for name in ds.coords:
        if name in COORDINATES and "long_name" not in ds[name].attrs:
            long_name, units = COORDINATES[str(name)]
            ds[name].attrs.update(long_name=long_name, **({} if units is None else {"units": units}))
    return ds


# ----------------------------------------------------------------------------------------------------------
# netCDF attribute values
# ----------------------------------------------------------------------------------------------------------


def _scalar_attr(value: Any, where: str) -> str | int | float | None:
    """Plain scalar for a netCDF attribute, or None if ``value`` is not a scalar."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if not INT64_MIN <= value <= INT64_MAX:
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
    if is_tensor(value):
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


def clean_attrs(attrs: Mapping[Any, Any], where: str) -> dict[str, AttrValue]:
    """Every attribute of ``attrs`` converted by :func:`netcdf_attr_value` (names must be non-empty strings)."""
    out: dict[str, AttrValue] = {}
    for key, value in attrs.items():
        if not isinstance(key, str) or not key:
            raise InputError(f"{where}: attribute name {key!r} is not a non-empty string")
        out[key] = netcdf_attr_value(value, f"{where} attribute '{key}'")
    return out


def check_variable_attrs(name: str, var: xr.Variable) -> None:
    """Refuse reserved attributes (:data:`RESERVED_VAR_ATTRS`), unaccepted units and CF time units.

    Raises:
        InputError: Naming the variable and the attribute.
    """
    reserved = sorted(RESERVED_VAR_ATTRS & set(var.attrs))
    if reserved:
        raise InputError(
            f"variable '{name}': attribute(s) {reserved} are reserved by netCDF/CF encoding and would change "
            "the values on load; rename them"
        )
    if "units" not in var.attrs:
        return
    units = var.attrs["units"]
    if isinstance(units, str) and " since " in f" {units} " and var.dtype.kind != "M":
        raise InputError(
            f"variable '{name}': units {units!r} look like CF time units and would decode its values as "
            "dates; use other units (e.g. 's') or store datetime64 values"
        )
    check_units(units, f"variable '{name}'")


def out_of_range(ds: xr.Dataset) -> list[str]:
    """Describe the finite values of ``ds`` outside :data:`VALID_RANGES` (one line per variable, the first place).

    Returns:
        E.g. ``["'cosine': 1 value(s) outside [-1, 1], e.g. 7 at rule='gd', damping=0.001"]``; empty when every
        value is in range.
    """
    problems = []
    for name, (lo, hi) in VALID_RANGES.items():
        if name not in ds.variables or ds.variables[name].dtype.kind not in "biuf":
            continue
        var = ds.variables[name]
        values = np.asarray(var.values, dtype=np.float64)
        slack = RANGE_SLACK * max(1.0, *(abs(b) for b in (lo, hi) if np.isfinite(b)))
        with np.errstate(invalid="ignore"):
            bad = np.isfinite(values) & ((values < lo - slack) | (values > hi + slack))
        if not bad.any():
            continue
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        where = ", ".join(f"{d}={ds[d].values[i].item()!r}" if d in ds.coords else f"{d}[{i}]"
                          for d, i in zip(var.dims, first, strict=True))
        problems.append(f"'{name}': {int(bad.sum())} value(s) outside [{lo:g}, {hi:g}], e.g. "
                        f"{values[first]:g}" + (f" at {where}" if where else ""))
    return problems


def python_attr(value: Any) -> Any:
    """A numpy scalar attribute as the plain Python ``int``/``float``/``str``; other values unchanged."""
    if isinstance(value, np.generic):
        return value.item()
    return value


__all__ = ["ACCEPTED_UNITS", "ATTR_CHECKSUM", "ATTR_CONFIG", "ATTR_KIND", "ATTR_RUN", "ATTR_SCHEMA", "CF_ATTRS",
           "CONVENTIONS", "COORDINATES", "ENGINE", "KIND_VARIABLES", "NATS", "NATS_COMMENT", "RANGE_SLACK",
           "RESERVED_DIMS", "RESERVED_VAR_ATTRS", "SCHEMA_VERSION", "VALID_RANGES", "annotate",
           "annotate_coordinates", "check_units", "check_variable_attrs", "clean_attrs", "netcdf_attr_value",
           "out_of_range", "python_attr"]
