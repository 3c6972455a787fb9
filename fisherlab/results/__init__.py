"""Results: labelled ``xarray.Dataset`` objects with provenance, stored as netCDF-4 (h5netcdf).

Every result fisherlab returns or writes (a spectrum, a fidelity table, a trajectory, a training log) is an
``xarray.Dataset`` with named dimensions and coordinates, ``long_name`` and ``units`` attributes on its variables
and coordinates, CF global attributes (``Conventions``, ``title``, ``history``, ``source``) and *provenance*
attributes that say what produced it. Reading one: ``docs/results.md``.

The package is the base layer every step of fisherlab may use; one module per concern:

* :mod:`~fisherlab.results.schema` — schema version, attribute names, accepted units (:data:`NATS` for nats),
  default coordinate labels, storable attribute values, :func:`annotate`;
* :mod:`~fisherlab.results.metadata` — :func:`provenance`, configurations as JSON (:func:`to_jsonable`,
  :func:`config_of`, :func:`config_diff`, :func:`same_config`) and :func:`merge_provenance`;
* :mod:`~fisherlab.results.builders` — :func:`new_dataset`;
* :mod:`~fisherlab.results.io` — atomic :func:`save_dataset` and validating :func:`load_dataset` (content
  :func:`checksum`, documented ranges :data:`VALID_RANGES`);
* :mod:`~fisherlab.results.upgrade` — files of older schema versions, upgraded on load;
* :mod:`~fisherlab.results.lock` — one writer per folder (a lock file), fisherlab's temporary file names;
* :mod:`~fisherlab.results.manifest` — the manifest of an output folder (:data:`MANIFEST`, :func:`read_manifest`);
* :mod:`~fisherlab.results.store` — :class:`ResultsStore` (one file per key), :func:`guard_output_folder` /
  :func:`release_output_folder`, :func:`check_config` and :func:`load_output_folder`;
* :mod:`~fisherlab.results.sweep` — :func:`run_sweep`, sweeps that resume after an interruption, and
  :func:`open_sweep`, their files combined lazily (sharded results).
"""

from fisherlab.results.builders import new_dataset
from fisherlab.results.io import checksum, load_dataset, save_dataset
from fisherlab.results.manifest import MANIFEST, read_manifest
from fisherlab.results.metadata import (
    PROVENANCE_KEYS,
    config_diff,
    config_of,
    merge_provenance,
    provenance,
    same_config,
    to_jsonable,
)
from fisherlab.results.schema import (
    ACCEPTED_UNITS,
    ATTR_CHECKSUM,
    ATTR_CONFIG,
    ATTR_KIND,
    ATTR_RUN,
    ATTR_SCHEMA,
    CF_ATTRS,
    CONVENTIONS,
    COORDINATES,
    ENGINE,
    KIND_VARIABLES,
    NATS,
    NATS_COMMENT,
    SCHEMA_VERSION,
    VALID_RANGES,
    annotate,
    netcdf_attr_value,
)
from fisherlab.results.store import (
    ResultsStore,
    check_config,
    guard_output_folder,
    load_output_folder,
    release_output_folder,
)
from fisherlab.results.sweep import SWEEP_ATTR, config_key, open_sweep, run_sweep

__all__ = [
    "ACCEPTED_UNITS",
    "ATTR_CHECKSUM",
    "ATTR_CONFIG",
    "ATTR_KIND",
    "ATTR_RUN",
    "ATTR_SCHEMA",
    "CF_ATTRS",
    "CONVENTIONS",
    "COORDINATES",
    "ENGINE",
    "KIND_VARIABLES",
    "MANIFEST",
    "NATS",
    "NATS_COMMENT",
    "PROVENANCE_KEYS",
    "SCHEMA_VERSION",
    "SWEEP_ATTR",
    "VALID_RANGES",
    "ResultsStore",
    "annotate",
    "check_config",
    "checksum",
    "config_diff",
    "config_key",
    "config_of",
    "guard_output_folder",
    "load_dataset",
    "load_output_folder",
    "merge_provenance",
    "netcdf_attr_value",
    "new_dataset",
    "open_sweep",
    "provenance",
    "read_manifest",
    "release_output_folder",
    "run_sweep",
    "same_config",
    "save_dataset",
    "to_jsonable",
]
