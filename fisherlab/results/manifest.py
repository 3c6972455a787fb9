"""The manifest of an output folder and the claims this process holds on output folders.

A claimed output folder (:func:`~fisherlab.results.guard_output_folder`) holds :data:`MANIFEST`, a JSON object::

    {"config": {...}, "created": "2026-01-31T12:00:00+00:00", "files": ["fidelity.nc", "store/seed=0.nc"]}

``config`` is the configuration of the run that claimed the folder, ``files`` every results file fisherlab wrote
into it (paths relative to the folder, ``/``-separated). While this process holds the claim, every
:func:`~fisherlab.results.save_dataset` into the folder or one of its subfolders adds the file to ``files`` and
stamps the Dataset with the claim's configuration (attribute :data:`~fisherlab.results.schema.ATTR_RUN`), so a
results file says which run wrote it even when the manifest is lost. ``--overwrite`` deletes only the listed
files (:func:`~fisherlab.results.store.guard_output_folder`).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fisherlab.errors import ResultsFileError
from fisherlab.results.lock import write_atomically, write_bytes_durably

#: File name of the manifest of an output folder.
MANIFEST = "fisherlab-run.json"


@dataclass
class Claim:
    """An output folder this process holds for a run: the folder and the run's configuration (JSON text)."""

    folder: Path
    config_json: str


_CLAIMS: dict[Path, Claim] = {}

#: Held while :func:`record_file` reads and rewrites a manifest: threads of this process that save at once (the lanes
#: of a study) would each rewrite the manifest they read, the other's file left out (29 of 80 lost by two threads).
#: Other processes are kept out by the folder's lock.
_RECORDING = threading.Lock()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder`` (``config``, ``created``, ``files``), or None when it has none.

    A manifest without ``files`` (written before fisherlab listed them) lists none.

    Raises:
        ResultsFileError: Naming the manifest, if it can't be read, is not valid JSON, or lacks or mistypes a key
            (the remedy: delete it; every results file carries its configuration, checked on the next run).
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    remedy = ("; delete it to let the next run claim the folder again (the results files carry their "
              "configuration and are checked against the run's)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsFileError(f"can't read the run manifest {path}: {err}{remedy}") from err
    except json.JSONDecodeError as err:
        raise ResultsFileError(f"the run manifest {path} is not valid JSON ({err}){remedy}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise ResultsFileError(f"the run manifest {path} has no 'config' object{remedy}")
    files = manifest.setdefault("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        raise ResultsFileError(f"the run manifest {path}: 'files' is not a list of file names{remedy}")
    if not isinstance(manifest.setdefault("created", ""), str):
        raise ResultsFileError(f"the run manifest {path}: 'created' is not a string{remedy}")
    return manifest


def write_manifest(folder: Path, config: dict[str, Any], files: list[str], created: str | None = None) -> None:
    """Write the manifest of ``folder`` atomically (a unique temporary file, ``fsync``, rename).

    Raises:
        ResultsFileError: If it can't be written (the previous manifest, if any, is left as it was).
    """
    path = Path(folder) / MANIFEST
    text = json.dumps({"config": config, "created": created or datetime.now(timezone.utc).isoformat(),
                       "files": sorted(set(files))}, indent=1)
    try:  # a Ctrl-C, or a study's lane stopped (LaneStopped), leaves no temporary either
        write_atomically(path, lambda tmp: write_bytes_durably(tmp, text.encode("utf-8")))
    except OSError as err:
        raise ResultsFileError(f"could not write the run manifest {path}: {err}") from err


def add_claim(folder: Path, config_json: str) -> None:
    """Record that this process holds ``folder`` for a run of ``config_json`` (its lock already taken)."""
    key = Path(folder).resolve()
    _CLAIMS[key] = Claim(key, config_json)


def drop_claim(folder: Path) -> None:
    """Forget this process's claim on ``folder`` (nothing if none)."""
    _CLAIMS.pop(Path(folder).resolve(), None)


def claim_for(path: Path) -> Claim | None:
    """The claim of this process whose folder holds ``path`` (its directory or one above), nearest first."""
    directory = Path(path).parent.resolve()
    for folder in (directory, *directory.parents):
        if folder in _CLAIMS:
            return _CLAIMS[folder]
    return None


def record_file(claim: Claim, path: Path) -> None:
    """Add ``path`` (a file written under ``claim.folder``) to the folder's manifest (thread-safe).

    Raises:
        ResultsFileError: If the manifest can't be read or written (the file itself is written; it is then not
            listed, so ``--overwrite`` won't delete it).
    """
    relative = Path(path).parent.resolve().joinpath(Path(path).name).relative_to(claim.folder).as_posix()
    config = json.loads(claim.config_json)
    with _RECORDING:
        manifest = read_manifest(claim.folder)
        if manifest is None or manifest["config"] != config:
            write_manifest(claim.folder, config, [relative])
        elif relative not in manifest["files"]:
            write_manifest(claim.folder, config, [*manifest["files"], relative], manifest["created"])


__all__ = ["MANIFEST", "Claim", "add_claim", "claim_for", "drop_claim", "read_manifest", "record_file",
           "write_manifest"]
