"""Sweeps that survive interruption: each finished configuration is saved at once; a rerun resumes.

:func:`run_sweep` walks over named configurations, calls ``fn(config) -> xr.Dataset`` for each one that the
:class:`~fisherlab.results.store.ResultsStore` does not hold yet, and saves the result (atomically) before starting
the next. Ctrl-C (``KeyboardInterrupt``) or any error therefore loses only the configuration in progress; the
rerun loads the finished ones and computes the rest. Each stored Dataset carries the sweep configuration that
produced it (attribute ``sweep_config``, JSON), and a stored entry from a different configuration under the
same key is refused (naming the file and the differing keys) rather than silently reused. The sweep holds the
store's folder (:meth:`~fisherlab.results.store.ResultsStore.lock`) while it runs: a second sweep into the same
store at the same time is refused (or waits ``wait`` seconds), and temporary files of a sweep killed while saving
are removed.

Sharded results: a sweep too large to hold in memory stays one file per configuration; :func:`open_sweep`
combines them lazily (xarray ``open_mfdataset`` on dask) into one Dataset along a ``config`` dim, reading values
only when they are computed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import xarray as xr

from fisherlab.errors import InputError, ResultsFileError
from fisherlab.progress import bar as progress_bar
from fisherlab.results.metadata import config_diff, config_json, to_jsonable
from fisherlab.results.schema import ATTR_KIND, ATTR_SCHEMA, SCHEMA_VERSION
from fisherlab.results.store import ResultsStore

#: Dataset attribute holding the sweep configuration (JSON with sorted keys).
SWEEP_ATTR = "sweep_config"


def config_key(config: Mapping[str, Any]) -> str:
    """A readable store key for a configuration: ``"k1=v1,k2=v2"`` in sorted key order (values as JSON)."""
    items = to_jsonable(config, name="sweep config")
    return ",".join(f"{k}={json.dumps(v, sort_keys=True, separators=(',', ':'))}" for k, v in sorted(items.items()))


def _check_entry(store: ResultsStore, key: str, stored: object, wanted: str) -> None:
    """Refuse a stored entry whose sweep configuration is not ``wanted`` (the file and differing keys named)."""
    if stored == wanted:
        return
    try:
        diff = config_diff(json.loads(stored), json.loads(wanted)) if isinstance(stored, str) else []
    except (json.JSONDecodeError, InputError):
        diff = []
    what = f"differs in: {', '.join(diff)}" if diff else f"it carries {SWEEP_ATTR}={stored!r}"
    raise InputError(f"store {store.directory} holds key {key!r} from a different configuration ({what}; wanted "
                     f"{wanted}); use another store folder or delete {store.path(key)}")


def run_sweep(
    configs: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]],
    store: ResultsStore,
    fn: Callable[[Mapping[str, Any]], xr.Dataset],
    *,
    progress: bool | None = None,
    wait: float = 0.0,
) -> dict[str, xr.Dataset]:
    """Run ``fn`` on every configuration not yet in ``store``, saving each result as soon as it finishes.

    Args:
        configs: ``{key: config}``, or configurations whose keys are :func:`config_key`.
        store: Where finished configurations live (one netCDF file per key).
        fn: ``config -> xr.Dataset`` (a fisherlab results Dataset, e.g. from ``evaluate_fidelity``).
        progress: Progress bar (``None``: only on a terminal).
        wait: Seconds to wait while another process holds the store (0: refuse at once).

    Returns:
        ``{key: Dataset}`` for every configuration, in the given order (loaded from the store when finished
        earlier).

    Raises:
        InputError: Duplicate keys, a stored entry under a key that came from a different configuration (the file
            and the differing keys are named), or the store held by another process.
        ResultsFileError: A stored entry is corrupt, changed after it was written, or can't be written.
        KeyboardInterrupt: Re-raised after an interruption; the configurations finished so far stay in the store
            (a note on the exception says how many).
    """
    if isinstance(configs, Mapping):
        items = [(str(k), dict(v)) for k, v in configs.items()]
    else:
        items = [(config_key(c), dict(c)) for c in configs]
    keys = [k for k, _ in items]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise InputError(f"sweep configurations with duplicate keys: {duplicates}")
    out: dict[str, xr.Dataset] = {}
    finished_now = 0
    with store.lock(wait=wait):
        bar = progress_bar(items, desc="sweep", progress=progress)
        try:
            for key, config in bar:
                wanted = config_json(config, name="sweep config")
                if store.has(key):
                    ds = store.load(key)
                    _check_entry(store, key, ds.attrs.get(SWEEP_ATTR), wanted)
                    out[key] = ds
                    continue
                ds = fn(config)
                if not isinstance(ds, xr.Dataset):
                    raise InputError(f"the sweep function returned {type(ds).__name__} for {key!r}; expected a "
                                     "Dataset")
                ds = ds.assign_attrs({SWEEP_ATTR: wanted})
                store.save(key, ds)
                finished_now += 1
                out[key] = ds
        except KeyboardInterrupt as exc:
            note = (f"sweep interrupted: {len(store.keys())} finished configuration(s) kept in {store.directory} "
                    f"({finished_now} from this run); rerun to resume")
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(note)
            raise
        except ResultsFileError as exc:
            raise ResultsFileError(f"sweep store {store.directory}: {exc}") from exc
        finally:
            bar.close()
    return out


def open_sweep(store: ResultsStore, keys: Iterable[str] | None = None, *, dim: str = "config") -> xr.Dataset:
    """The store's configurations as one Dataset along ``dim``, opened lazily: each file stays on disk.

    ``xarray.open_mfdataset`` (dask arrays, one chunk per file) concatenates the entries of ``keys`` along ``dim``;
    values are read when computed (``.compute()``, ``.values``, a plot), so a sweep larger than memory can be
    reduced (``ds.cosine.mean("config")``) file by file. Variables present in every entry get the ``dim``;
    coordinates that differ between entries (e.g. other dampings) are aligned by outer join, NaN where an entry
    lacks a label. Coordinates added: ``dim`` (the keys) and ``sweep_config`` (``dim``; each entry's configuration
    as JSON, or ``""`` for an entry not written by :func:`run_sweep`). Attributes: those every entry agrees on.

    Files are not checksum-verified here (that reads every value): ``store.load(key)`` verifies one.

    Args:
        store: The store (e.g. of :func:`run_sweep`).
        keys: The entries, in order (default: every key, sorted).
        dim: Name of the new dim.

    Raises:
        InputError: dask missing, no entries, a key not in the store, or entries of different kinds.
        ResultsFileError: An entry of another schema version (``store.load`` upgrades it; save it again) or not a
            fisherlab results file.
    """
    try:
        import dask  # noqa: F401 - xarray's lazy combination runs on it
    except ImportError:
        raise InputError("open_sweep needs dask to combine the files lazily (pip install 'fisherlab[sweeps]', or "
                         "pip install dask); store.load_all() loads them eagerly") from None
    keys = store.keys() if keys is None else [str(k) for k in keys]
    if not keys:
        raise InputError(f"store {store.directory} holds no entries to open")
    missing = [k for k in keys if not store.has(k)]
    if missing:
        raise InputError(f"store {store.directory} has no entries {missing}; it has {store.keys()}")
    configs: list[str] = []
    kinds: set[str] = set()

    def check(ds: xr.Dataset) -> xr.Dataset:
        source = ds.encoding.get("source", "?")
        if ds.attrs.get(ATTR_SCHEMA) != SCHEMA_VERSION:
            raise ResultsFileError(f"{source}: schema {ds.attrs.get(ATTR_SCHEMA)!r}, not {SCHEMA_VERSION} (not a "
                                   "fisherlab results file, or an old one: store.load upgrades it, then save it again)")
        kinds.add(str(ds.attrs.get(ATTR_KIND)))
        configs.append(str(ds.attrs.get(SWEEP_ATTR, "")))
        return ds

    combined = xr.open_mfdataset([store.path(k) for k in keys], engine="h5netcdf", combine="nested", concat_dim=dim,
                                 preprocess=check, data_vars="all", join="outer", combine_attrs="drop_conflicts")
    if len(kinds) > 1:
        combined.close()
        raise InputError(f"store {store.directory} mixes results of kinds {sorted(kinds)}; open each kind's keys")
    combined = combined.assign_coords({dim: keys, "sweep_config": (dim, configs)})
    combined.attrs.pop(SWEEP_ATTR, None)
    return combined


__all__ = ["SWEEP_ATTR", "config_key", "open_sweep", "run_sweep"]
