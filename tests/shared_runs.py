"""Runs built once per test session and shared by every pytest-xdist worker: the main job on small settings and one
rebuild of its report (each is most of half a minute of CPU on the loaded machine; tests/test_cli.py and
tests/test_report.py assert on the same run).

The first worker to ask builds a run under a file lock in the session's shared temporary folder (the parent of
the workers' own, or pytest's basetemp without xdist, so never a previous session's); the others wait for the lock
and read what it built. The folders are read-only by convention: a test that changes a run works on a copy
(:func:`main_job_copy`).
"""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SMALL = ["--data", "synthetic-multiclass", "--n-samples", "48", "--no-progress"]
#: The main job of both files: every part, a reconstructed network's rule (sngd-kfac) and the block structure's
#: (block-ngd), three dampings (the middle one, λ = 0.01, is the trajectory's and the report's), 4 training steps
#: with G refreshed every 3 (stale at the end).
MAIN_JOB = [*SMALL, "--rules", "gd", "ngd", "block-ngd", "kfac", "sngd-kfac", "--damping", "1e-3", "1e-2", "1e-1",
            "--steps", "4", "--every", "2", "--refresh-every", "3", "--trajectory-rules", "gd", "ngd", "kfac",
            "--geometry-structures", "block", "kfac", "--geometry-damping", "1e-2",
            "--spectrum-kinds", "true", "empirical"]


def session_folder(factory: pytest.TempPathFactory) -> Path:
    """The temporary folder every worker of this session shares."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``session/shared/<name>``, made by ``build(folder)`` by the first worker that asks (the others wait)."""
    root = session_folder(factory) / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed build in another worker left
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def main_job(factory: pytest.TempPathFactory) -> Path:
    """The output folder of ``fisherlab fidelity`` on :data:`MAIN_JOB` (shared: do not change it)."""
    from fisherlab.cli import main

    def build(folder: Path) -> None:
        assert main(["fidelity", "--out", str(folder / "run"), *MAIN_JOB]) == 0

    return built_once(factory, "main_job", build) / "run"


def main_job_copy(factory: pytest.TempPathFactory, name: str) -> Path:
    """A copy of :func:`main_job`'s folder of the caller's own (file times kept)."""
    return Path(shutil.copytree(main_job(factory), factory.mktemp(name) / "run"))


def report_rebuild(factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``fisherlab report`` on a copy of the main job, its report.html deleted first, with a figure of the user's
    open: the exit status, the page before and after, pyplot's figure numbers before (the user's included) and
    after, and matplotlib's rcParams before and after."""

    def build(folder: Path) -> None:
        import matplotlib
        import matplotlib.pyplot as plt

        from fisherlab.cli import main

        run = Path(shutil.copytree(main_job(factory), folder / "run"))
        first = (run / "report.html").read_bytes()
        (run / "report.html").unlink()
        mine = plt.figure()  # a figure of the user's: kept open
        open_before, style = plt.get_fignums(), dict(matplotlib.rcParams)
        try:
            status = main(["report", str(run)])
            state = {"status": status, "first": first, "again": (run / "report.html").read_bytes(),
                     "mine": mine.number, "open_before": open_before, "fignums": plt.get_fignums(), "style": style,
                     "style_after": dict(matplotlib.rcParams)}
        finally:
            plt.close(mine)
        (folder / "state.pickle").write_bytes(pickle.dumps(state))

    return pickle.loads((built_once(factory, "report_rebuild", build) / "state.pickle").read_bytes())
