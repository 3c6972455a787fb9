"""The run store: a folder of results files keyed by name, and the guard that claims an output folder for a run.

* :class:`ResultsStore` — one netCDF file per key (written atomically by
  :func:`~fisherlab.results.save_dataset`), so a crashed sweep keeps its finished work; :meth:`~ResultsStore.load_all`
  loads or concatenates every entry.
* :func:`guard_output_folder` — claims an output folder for one run: takes the folder's lock
  (:mod:`~fisherlab.results.lock`: one run per folder at a time; a second is refused or waits) and records the
  run's configuration in the folder's manifest (:data:`MANIFEST`, :mod:`~fisherlab.results.manifest`), which
  then lists every results file written into the folder. A rerun of the same configuration resumes; another
  configuration is refused unless told to overwrite, and overwriting deletes only what the manifest lists.
* :func:`check_config` — a results file must carry the configuration it is reused for (resuming a run or a
  sweep); :func:`load_output_folder` — every results file of a folder, for reading it whole (the report).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from fisherlab.errors import InputError, ResultsFileError
from fisherlab.results.io import PathLike, load_dataset, save_dataset
from fisherlab.results.lock import hold_folder, holds, release_folder, remove_stale_temps
from fisherlab.results.manifest import (
    MANIFEST,
    add_claim,
    claim_for,
    drop_claim,
    read_manifest,
    write_manifest,
)
from fisherlab.results.metadata import config_diff, config_json, config_of, to_jsonable
from fisherlab.results.schema import ATTR_RUN


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

    def load(self, key: str, *, config: Mapping[str, Any] | None = None, **validation: Any) -> xr.Dataset:
        """Load the entry ``key``.

        Args:
            key: The entry's key.
            config: If given, the configuration the entry must carry (:func:`check_config`): an entry reused
                when a run resumes must come from that run's configuration.
            **validation: Passed to :func:`load_dataset` (``kind``, ``required_vars``, ``strict``, ...).

        Returns:
            The Dataset.

        Raises:
            ResultsFileError: If the entry is missing or fails validation, or carries no readable configuration
                while ``config`` is given.
            InputError: If it carries another configuration than ``config`` (the file and keys are named).
        """
        path = self.path(key)
        ds = load_dataset(path, **validation)
        if config is not None:
            check_config(ds, config, path)
        return ds

    @contextmanager
    def lock(self, *, wait: float = 0.0) -> Iterator[None]:
        """Hold the store's folder for this process (:func:`~fisherlab.results.lock.hold_folder`) while in the block.

        Creates the folder. On entry, temporary files of earlier runs killed while saving are removed.

        Args:
            wait: Seconds to wait for another process holding the store.

        Raises:
            InputError: If another process holds the store after ``wait`` seconds (it is named).
        """
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"can't create the results store {self.directory}: {err.strerror or err}") from err
        since = hold_folder(self.directory, wait=wait, what="results store")
        try:
            remove_stale_temps(self.directory, since, ("*",))
            yield
        finally:
            release_folder(self.directory)

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


def check_config(ds: xr.Dataset, config: Mapping[str, Any], file: PathLike) -> None:
    """Refuse a results Dataset that does not carry ``config``.

    Every key of ``config`` must be in the Dataset's ``config`` attribute with an equal value
    (:func:`~fisherlab.results.config_diff` rules); keys the producer added of its own (``likelihood``,
    ``num_params``, ...) are not compared.

    Args:
        ds: A loaded results Dataset.
        config: The configuration it must carry.
        file: The file it came from (named in the errors).

    Raises:
        ResultsFileError: If ``ds`` has no readable ``config`` attribute.
        InputError: If a key differs or is missing (the keys are named).
    """
    expected = json.loads(config_json(config))
    try:
        stored = config_of(ds)
    except ResultsFileError as err:
        raise ResultsFileError(f"results file {file} can't be reused: {err}; delete it to recompute it") from err
    diff = config_diff({k: stored[k] for k in expected if k in stored}, expected)
    if diff:
        raise InputError(f"results file {file} holds results of a different configuration (differs in: "
                         f"{', '.join(diff)}); delete it or choose another folder to recompute it")


def _run_of(path: Path) -> dict[str, Any] | None:
    """The ``fisherlab_run`` configuration a results file was stamped with, read from its attributes only."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get(ATTR_RUN)
    except (OSError, ValueError):  # not HDF5: not fisherlab's, left for the reader that needs it to refuse
        return None
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        run = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        return None
    return run if isinstance(run, dict) else None


def _results_files(folder: Path) -> list[Path]:
    """The ``*.nc`` files of ``folder`` and its subfolders (one level), hidden ones left out."""
    return sorted(p for pattern in ("*.nc", "*/*.nc") for p in folder.glob(pattern)
                  if not p.name.startswith(".") and p.is_file())


def _relative(folder: Path, path: Path) -> str:
    return path.relative_to(folder).as_posix()


def _delete_listed(folder: Path, listed: Iterable[str]) -> None:
    """Delete the files a manifest lists, and the report and figures drawn from the listed top-level files."""
    root = folder.resolve()
    stems = []
    for name in listed:
        path = (folder / name).resolve()
        if root not in path.parents:  # a hand-edited manifest naming a file outside the folder: not touched
            continue
        path.unlink(missing_ok=True)
        if path.parent == root:
            stems.append(path.stem)
    for stem in stems:
        for figure in (folder / "figures").glob(f"{stem}_*"):
            if figure.suffix in (".png", ".svg"):
                figure.unlink()
    (folder / "report.html").unlink(missing_ok=True)


def _claim(folder: Path, config: dict[str, Any], overwrite: bool) -> bool:
    """The checks and the manifest of :func:`guard_output_folder` (the folder's lock held)."""
    manifest = read_manifest(folder)
    listed = manifest["files"] if manifest else []
    stamped = {p: run for p in _results_files(folder) if (run := _run_of(p)) is not None}
    others = {p: diff for p, run in stamped.items() if (diff := config_diff(run, config))}
    manifest_diff = config_diff(manifest["config"], config) if manifest else []
    if not manifest_diff and not others:
        files = [*listed, *(_relative(folder, p) for p in stamped)]
        write_manifest(folder, config, files, manifest["created"] if manifest else None)
        return manifest is not None or bool(stamped)
    diff = sorted(set(manifest_diff).union(*others.values()))
    named = f"; files written by another configuration: {', '.join(_relative(folder, p) for p in others)}" if (
        others) else ""
    if not overwrite:
        raise InputError(f"{folder} holds results of a different configuration (differs in: {', '.join(diff)})"
                         f"{named}; choose another --out or pass --overwrite")
    unlisted = [_relative(folder, p) for p in others if _relative(folder, p) not in listed]
    if unlisted:
        raise InputError(f"--overwrite: {folder} holds results files of another configuration that its manifest "
                         f"{MANIFEST} does not list, so they are not deleted: {', '.join(unlisted)}; move them "
                         "away or choose another --out (nothing was deleted)")
    try:
        _delete_listed(folder, listed)
    except OSError as err:
        raise ResultsFileError(f"--overwrite: could not delete the results of {folder}: {err}") from err
    write_manifest(folder, config, [])
    return False


def guard_output_folder(out: PathLike, config: dict[str, Any], *, overwrite: bool = False,
                        wait: float = 0.0) -> bool:
    """Claim ``out`` for a run with ``config``; returns True when the folder already holds this configuration.

    The claim holds the folder's lock (one run per folder: another process claiming it waits up to ``wait``
    seconds, then is refused) until this process ends or calls :func:`release_output_folder`; meanwhile every
    results file written into the folder is listed in its manifest (:data:`MANIFEST`) and stamped with
    ``config``. A folder holding results of a *different* configuration — by its manifest, or by the
    configuration a results file in it was stamped with (a file copied in from another folder; a deleted
    manifest) — is refused unless ``overwrite`` is set. Overwriting deletes only the files the manifest lists
    (and the report and figures drawn from them); a file of another configuration it does not list is never
    deleted: the claim is refused, naming it. The same configuration is accepted, so an interrupted run resumes.
    Temporary files of runs killed while saving are removed.

    Args:
        out: The output folder (created when missing).
        config: The run's configuration (converted by :func:`~fisherlab.results.to_jsonable`).
        overwrite: Replace the results of another configuration.
        wait: Seconds to wait while another process holds the folder (0: refuse at once).

    Returns:
        Whether the folder already held results of this configuration.

    Raises:
        InputError: If the folder holds another configuration and ``overwrite`` is not set (the differing keys
            are named), holds unlisted files of another configuration, is held by another process (named), or
            can't be created.
        ResultsFileError: If its manifest is corrupt (named, with the remedy) or can't be written.
    """
    folder = Path(out).expanduser().absolute()
    config = to_jsonable(config)
    if not isinstance(config, dict):
        raise InputError(f"config must be a mapping, got {type(config).__name__}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"can't create the output folder {folder}: {err.strerror or err}") from err
    claimed = claim_for(folder / MANIFEST)
    reentry = claimed is not None and claimed.folder == folder.resolve()
    since = hold_folder(folder, wait=wait, what="output folder")
    try:
        resumed = _claim(folder, config, overwrite)
    except BaseException:
        release_folder(folder)
        raise
    if reentry:
        release_folder(folder)  # one lock count per claim
    add_claim(folder, json.dumps(config, sort_keys=True))
    remove_stale_temps(folder, since)
    return resumed


def release_output_folder(out: PathLike) -> None:
    """End this process's claim on ``out`` (:func:`guard_output_folder`); nothing if it holds none.

    The folder's lock is released and files written into it later are no longer listed in its manifest.
    """
    folder = Path(out).expanduser().absolute()
    claimed = claim_for(folder / MANIFEST)
    if claimed is None or claimed.folder != folder.resolve():
        return
    drop_claim(folder)
    if holds(folder):
        release_folder(folder)


def load_output_folder(folder: PathLike, files: Iterable[PathLike] | None = None, *,
                       strict: bool = True) -> dict[Path, xr.Dataset]:
    """Load the results files of an output folder to read them together (a report), refusing mixed runs.

    Each file is loaded with :func:`load_dataset` (``kind_variables=True``: it holds what readers of its kind
    read). Files stamped with the configuration of the run that wrote them (``fisherlab_run``) must agree with
    the folder's manifest, or without one with each other: a file copied in from another run's folder is
    refused, not mixed into the report.

    Args:
        folder: The output folder.
        files: The files to load (default: its ``*.nc``, sorted).
        strict: Passed to :func:`load_dataset`.

    Returns:
        ``{path: Dataset}`` in the order of ``files``.

    Raises:
        ResultsFileError: A file is corrupt, foreign, tampered with, lacks a variable of its kind, or the
            manifest is corrupt (each named).
        InputError: A file was written by a run of another configuration (named, with the keys).
    """
    folder = Path(folder)
    paths = sorted(folder.glob("*.nc")) if files is None else [Path(f) for f in files]
    manifest = read_manifest(folder)
    reference = manifest["config"] if manifest else None
    source = MANIFEST
    out: dict[Path, xr.Dataset] = {}
    for path in paths:
        ds = load_dataset(path, kind_variables=True, strict=strict)
        run = json.loads(ds.attrs[ATTR_RUN]) if isinstance(ds.attrs.get(ATTR_RUN), str) else None
        if isinstance(run, dict):
            if reference is None:
                reference, source = run, path.name
            diff = config_diff(run, reference)
            if diff:
                raise InputError(f"results file {path} was written by a run of another configuration than "
                                 f"{source} records (differs in: {', '.join(diff)}); move it out of {folder}")
        out[path] = ds
    return out


__all__ = ["MANIFEST", "ResultsStore", "check_config", "guard_output_folder", "load_output_folder",
           "release_output_folder"]
