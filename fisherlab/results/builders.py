"""Building results Datasets: :func:`new_dataset` stamps variables and coordinates with the schema's conventions.

A Dataset from :func:`new_dataset` carries the CF global attributes (``Conventions``, ``title``, ``history``,
``source``), the provenance attributes (:func:`~fisherlab.results.metadata.provenance`) and its kind; its
coordinates have the default ``long_name``/``units`` of :data:`~fisherlab.results.schema.COORDINATES`; its
attribute values are already in their stored form; units outside
:data:`~fisherlab.results.schema.ACCEPTED_UNITS` and dims named like xarray's ``sel`` keywords are refused.
Label its variables with :func:`~fisherlab.results.schema.annotate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import xarray as xr

from fisherlab.errors import InputError
from fisherlab.results.metadata import calling_function, cf_attributes, check_kind, default_title, provenance
from fisherlab.results.schema import (
    CF_ATTRS,
    RESERVED_DIMS,
    annotate_coordinates,
    check_variable_attrs,
    clean_attrs,
    is_tensor,
)

if TYPE_CHECKING:
    import torch


def _tensor_to_numpy(value: Any) -> Any:
    if is_tensor(value):
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
    """Build a results Dataset stamped with CF attributes, provenance, kind and schema version.

    Args:
        kind: What the Dataset holds (``"spectrum"``, ``"fidelity"``, ``"fidelity_trajectory"``, ``"training"``,
            ...).
        data_vars: As for ``xarray.Dataset``: ``{name: (dims, values[, attrs])}`` or DataArrays; torch
            tensors are converted to numpy arrays.
        coords: As for ``xarray.Dataset``; torch tensors are converted likewise.
        config: The full configuration of the run (see :func:`~fisherlab.results.metadata.provenance`).
        seed: The random seed, or ``None``.
        device: The torch device the computation ran on.
        dtype: The torch dtype it ran in.
        attrs: Extra Dataset attributes; ``title`` replaces the default
            (:func:`~fisherlab.results.metadata.default_title`); they may not override a provenance attribute
            or another CF attribute (``history`` names the fisherlab function that called this one).

    Returns:
        The Dataset, with attributes already in their stored form (bools as ints, see
        :func:`~fisherlab.results.schema.netcdf_attr_value`).

    Raises:
        InputError: If xarray refuses the variables or coordinates, a dim is named like a keyword of xarray's
            ``sel``, an attribute can't be stored, units are not accepted, an extra attribute would override
            provenance, or the provenance arguments are invalid.
    """
    kind = check_kind(kind)
    if not isinstance(data_vars, Mapping):
        raise InputError(f"data_vars must be a mapping, got {type(data_vars).__name__}")
    if coords is not None and not isinstance(coords, Mapping):
        raise InputError(f"coords must be a mapping or None, got {type(coords).__name__}")
    prov = provenance(config, seed=seed, device=device, dtype=dtype, kind=kind)
    extra = dict(attrs or {})
    title = extra.pop("title", default_title(kind))
    clash = sorted(set(extra) & (set(prov) | set(CF_ATTRS)))
    if clash:
        raise InputError(f"attrs may not override provenance attribute(s) {clash}")
    try:
        ds = xr.Dataset(
            {k: _tensor_to_numpy(v) for k, v in data_vars.items()},
            coords=None if coords is None else {k: _tensor_to_numpy(v) for k, v in coords.items()},
        )
    except (ValueError, TypeError, KeyError) as err:
        raise InputError(f"can't build the '{kind}' dataset: {err}") from err
    reserved = sorted(RESERVED_DIMS & set(map(str, ds.dims)))
    if reserved:
        raise InputError(f"the '{kind}' dataset has dim(s) {reserved}, keyword(s) of xarray's sel/isel: "
                         "ds.sel(method=...) would not select along it; name the dim otherwise (e.g. 'rule')")
    for name, var in ds.variables.items():
        var.attrs = clean_attrs(var.attrs, f"variable '{name}'")
        check_variable_attrs(str(name), var)
    annotate_coordinates(ds)
    cf = cf_attributes(prov, title=title, call=calling_function())
    ds.attrs = clean_attrs({**cf, **extra, **prov}, "dataset")
    return ds


__all__ = ["new_dataset"]
