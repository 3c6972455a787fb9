"""One writer per folder: an advisory lock file, fisherlab's temporary file names, removal of stale temporaries.

* :func:`hold_folder` / :func:`release_folder` — an exclusive lock on ``FOLDER/.fisherlab.lock`` (:data:`LOCK_FILE`)
  taken with ``fcntl.flock``. The operating system drops the lock when its process ends, however it ends
  (``kill -9`` included), so a crashed run never leaves a folder locked. Within one process the lock is
  re-entrant (a count per folder). A process that finds the folder held waits up to ``wait`` seconds, then is
  refused with an :class:`~fisherlab.errors.InputError` naming the holder (process id, host, since when).
  ``fcntl`` is POSIX-only: elsewhere (Windows) no lock is taken and a ``UserWarning`` says that concurrent runs
  into the folder are not detected.
* :func:`temp_path` / :func:`is_temp_name` — every file fisherlab writes goes first to a temporary
  ``.NAME.<32 hex digits>.tmp`` in the same folder (unique per call, created with ``O_EXCL``) and is renamed
  over ``NAME``; :func:`remove_stale_temps` deletes such leftovers of killed runs (and the fixed names older
  versions used), only those older than the lock holder's claim.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from fisherlab.errors import InputError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: The lock file of a folder (hidden; it stays in the folder, holding the last holder's process id).
LOCK_FILE = ".fisherlab.lock"

#: Temporary files fisherlab writes before renaming them over their target: ``.NAME.<uuid4 hex>.tmp``.
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")

#: Fixed temporary names of earlier fisherlab versions (removed as stale like the others).
LEGACY_TEMP_NAMES = frozenset({".fisherlab-run.json.tmp", ".report.html.tmp"})

_POLL_S = 0.05


@dataclass
class _Held:
    fd: int | None  # None where fcntl is missing
    count: int
    since: float  # time.time() when this process took the lock


_HELD: dict[Path, _Held] = {}


def _key(folder: Path) -> Path:
    return Path(folder).expanduser().resolve()


def _holder_text(fd: int, attempts: int = 10) -> str:
    """Who holds the lock, from the lock file (retried briefly: the holder writes it just after locking)."""
    for attempt in range(attempts):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            return f"process {info['pid']} on {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            if attempt + 1 < attempts:
                time.sleep(0.01)
    return "another process"


def _write_holder(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def hold_folder(folder: Path, *, wait: float = 0.0, what: str = "folder") -> float:
    """Take (or re-enter) this process's exclusive lock on ``folder``, which must exist.

    Args:
        folder: The folder.
        wait: Seconds to wait for another process's lock to be released (0: refuse at once).
        what: How to name the folder in a refusal (e.g. ``"output folder"``).

    Returns:
        When this process took the lock (``time.time()``; the first time, for a re-entry).

    Raises:
        InputError: If another process holds the folder after ``wait`` seconds (the holder is named), ``wait`` is
            negative, or the lock file can't be created (e.g. a read-only folder).
    """
    key = _key(folder)
    held = _HELD.get(key)
    if held is not None:
        held.count += 1
        return held.since
    if not isinstance(wait, (int, float)) or isinstance(wait, bool) or not wait >= 0:
        raise InputError(f"wait must be a number of seconds >= 0, got {wait!r}")
    if fcntl is None:  # pragma: no cover - Windows
        warnings.warn(f"no fcntl on this platform: fisherlab can't lock {key}, so two runs into it at once are not "
                      "detected; start one run per folder", UserWarning, stacklevel=3)
        _HELD[key] = _Held(None, 1, time.time())
        return _HELD[key].since
    try:
        fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise InputError(f"can't lock the {what} {key}: {err.strerror or err}") from err
    deadline = time.monotonic() + float(wait)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                holder = _holder_text(fd)
                os.close(fd)
                waited = f" after waiting {wait:g} s" if wait else ""
                raise InputError(f"the {what} {key} is in use by {holder}{waited}: one fisherlab run per folder "
                                 "at a time; wait for it to finish or choose another folder") from None
            time.sleep(min(_POLL_S, remaining))
        except OSError as err:
            os.close(fd)
            raise InputError(f"can't lock the {what} {key}: {err.strerror or err}") from err
    _write_holder(fd)
    _HELD[key] = _Held(fd, 1, time.time())
    return _HELD[key].since


def release_folder(folder: Path) -> None:
    """Undo one :func:`hold_folder` of this process; the last one releases the lock (nothing if not held)."""
    key = _key(folder)
    held = _HELD.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    del _HELD[key]
    if held.fd is not None:
        fcntl.flock(held.fd, fcntl.LOCK_UN)
        os.close(held.fd)


def holds(folder: Path) -> bool:
    """Whether this process holds the lock on ``folder``."""
    return _key(folder) in _HELD


def temp_path(path: Path) -> Path:
    """A fresh temporary name next to ``path``: ``.NAME.<uuid4 hex>.tmp`` (:data:`TEMP_NAME`)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """Have ``write(tmp)`` write a fresh temporary file next to ``target``, then rename it over ``target``.

    The temporary is :func:`temp_path`'s, the rename ``os.replace``: no reader sees a partial file at ``target``,
    whatever stops the write (an error, a Ctrl-C, a study's lane stopped). The temporary is removed on any
    exception, which goes on as it is; one left by a killed process is removed by the next run's claim of the
    folder (:func:`remove_stale_temps`). Results files, the manifest, the report's figures and page are written so.
    """
    tmp = temp_path(target)  # unique: two writers of one file at once don't collide
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary file name of fisherlab (:data:`TEMP_NAME` or a legacy fixed name)."""
    return name in LEGACY_TEMP_NAMES or TEMP_NAME.match(name) is not None


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``path`` (``O_EXCL``) and ``fsync`` it; the file is closed in every case.

    Raises:
        OSError: From the filesystem (the partial file is left for the caller to remove).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder: Path, before: float, patterns: tuple[str, ...] = ("*", "*/*")) -> list[Path]:
    """Delete fisherlab's temporary files in ``folder`` last modified before ``before`` (``time.time()``).

    Only names :func:`is_temp_name` accepts are touched; call it while holding the folder (:func:`hold_folder`),
    with ``before`` the time the lock was taken, so that only temporaries of runs that ended before are removed.

    Args:
        folder: The folder.
        before: Cut-off modification time.
        patterns: Glob patterns (relative to ``folder``) searched: the folder and its subfolders.

    Returns:
        The files removed.
    """
    removed = []
    for pattern in patterns:
        for path in Path(folder).glob(pattern):
            if not is_temp_name(path.name):
                continue
            try:
                if path.is_file() and path.stat().st_mtime < before:
                    path.unlink()
                    removed.append(path)
            except OSError:  # gone meanwhile, or not ours to remove: left as it is
                continue
    return removed


__all__ = ["LEGACY_TEMP_NAMES", "LOCK_FILE", "TEMP_NAME", "hold_folder", "holds", "is_temp_name", "release_folder",
           "remove_stale_temps", "temp_path", "write_atomically", "write_bytes_durably"]
