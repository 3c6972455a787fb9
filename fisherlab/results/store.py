"""The run store: a folder of results files keyed by name, and the guard that claims an output folder for a run.

* :class:`ResultsStore` — one netCDF file per key (written atomically by
  :func:`~fisherlab.results.save_dataset`), so a crashed sweep keeps its finished work; :meth:`~ResultsStore.load_all`
  loads or concatenates every entry.
* :func:`guard_output_folder` — an output folder records the configuration of the run that filled it in its
  manifest (:data:`MANIFEST`, JSON); a rerun of the same configuration resumes, another configuration is refused
  unless told to overwrite.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from fisherlab.errors import InputError, ResultsFileError
from fisherlab.results.io import PathLike, load_dataset, save_dataset
from fisherlab.results.metadata import config_diff, to_jsonable

#: The manifest of an output folder: ``{"config": ..., "created": ...}`` of the run that claimed it.
MANIFEST = "fisherlab-run.json"


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


def guard_output_folder(out: PathLike, config: dict[str, Any], *, overwrite: bool = False) -> bool:
    """Claim ``out`` for a run with ``config``; returns True when the folder already holds this configuration.

    A folder holding results of a *different* configuration (its :data:`MANIFEST` says which) is refused unless
    ``overwrite`` is set, in which case its results, figures and report are removed first. The same
    configuration is accepted, so an interrupted sweep resumes.

    Args:
        out: The output folder (created when missing).
        config: The run's configuration (converted by :func:`~fisherlab.results.to_jsonable`).
        overwrite: Replace the results of another configuration.

    Returns:
        Whether the folder already held results of this configuration.

    Raises:
        InputError: If the folder holds another configuration and ``overwrite`` is not set (the differing keys
            are named).
    """
    out = Path(out)
    manifest = out / MANIFEST
    config = to_jsonable(config)
    if manifest.is_file():
        old = json.loads(manifest.read_text())["config"]
        diff = config_diff(old, config)
        if not diff:
            return True
        if not overwrite:
            raise InputError(
                f"{out} holds results of a different configuration (differs in: {', '.join(diff)}); "
                "choose another --out or pass --overwrite"
            )
        for pattern in ("*.nc", "figures/*", "report.html", "store/*.nc"):
            for f in out.glob(pattern):
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"config": config, "created": datetime.now(timezone.utc).isoformat()}, indent=1))
    os.replace(tmp, manifest)
    return False


__all__ = ["MANIFEST", "ResultsStore", "guard_output_folder"]
