"""Shared benchmark utilities: argument parsing, timing (median after warm-up), peak memory, tables.

Timing: every method is warmed up, then the methods are run round-robin ``repeats`` times so that a change in
machine load hits all of them alike; the table reports the median, and a ratio to a reference method is the
median over rounds of the ratio within each round. On CUDA the device is synchronised before
and after every timed call.

Peak memory: the peak bytes of tensors allocated during one call, above those allocated at its start: on CUDA
``torch.cuda.max_memory_allocated``, on CPU the running sum of the allocation events that the torch profiler
records with ``profile_memory=True`` (measured in a separate, untimed call).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def parse_args(description: str, default_repeats: int = 5,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse ``--device``, ``--repeats`` (default ``default_repeats``) and ``--quick`` (2 repeats, smaller side
    cases), and a benchmark's own options (``add_arguments(parser)`` adds them, so ``--help`` lists them)."""
    parser = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed runs per method (default {default_repeats}, quick 2)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller side cases")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.repeats is None:
        args.repeats = 2 if args.quick else default_repeats
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.device = torch.device(args.device)
    return args


def header(title: str, device: torch.device) -> None:
    """Print what ran where: title, date, torch version, device, threads, and the machine's load average."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"== {title}")
    print(f"   {datetime.date.today().isoformat()}  torch {torch.__version__}  device {device} ({where})  "
          f"threads {torch.get_num_threads()} on {os.cpu_count()} cores  load average {load}  "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on CUDA; no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_methods(methods: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                 warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of each method: ``warmup`` untimed calls each, then ``repeats`` round-robin rounds."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's native start/stop log lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes of tensors allocated while ``fn()`` runs, above those allocated before (None if unknown)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return peak
    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        del result
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except (AttributeError, RuntimeError):  # profiler internals differ in this torch version
        return None
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def format_bytes(n: float | None) -> str:
    """``"12.3 MiB"``; ``""`` for None."""
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


@dataclass
class Row:
    """One line of a results table."""

    case: str
    method: str
    seconds: float
    ratio: float | None = None
    peak: int | None = None
    note: str = ""


def rows_from_times(case: str, times: dict[str, list[float]], reference: float | list[float] | None,
                    peaks: dict[str, int | None] | None = None, notes: dict[str, str] | None = None) -> list[Row]:
    """Rows with the median of each method's times and its ratio to ``reference``.

    ``reference`` is either seconds, or the reference's seconds in each round of :func:`time_methods`; then the
    ratio is the median over rounds of the ratios within a round (calls close in time see the same machine load).
    """
    out = []
    for name, ts in times.items():
        med = statistics.median(ts)
        if isinstance(reference, list):
            ratio: float | None = statistics.median(t / r for t, r in zip(ts, reference, strict=True))
        else:
            ratio = med / reference if reference else None
        out.append(Row(case, name, med, ratio, (peaks or {}).get(name), (notes or {}).get(name, "")))
    return out


def print_table(rows: list[Row], ratio_label: str) -> None:
    """Print rows as an aligned table: case, method, median seconds, ratio, peak memory, note."""
    head = ("case", "method", "median s", ratio_label, "peak mem", "note")
    body = [(r.case, r.method, f"{r.seconds:.4f}", "" if r.ratio is None else f"{r.ratio:.2f}",
             format_bytes(r.peak), r.note) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    for line in (head, *body):
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    print()


def optional_import(name: str) -> ModuleType | None:
    """The module ``name``, or None when it cannot be imported (peers live in a separate venv)."""
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖_F / ‖b‖_F, in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


#: The repository root (this folder's parent).
ROOT = Path(__file__).resolve().parent.parent

#: Help of the ``--paths`` option of :func:`revision_trees`' scripts.
PATHS_HELP = ("comma-separated files: the candidate is the baseline with the working tree's versions of these "
              "(default: the whole working tree)")


def revision_trees(tmp: Path, baseline: str, paths: str) -> tuple[Path, Path]:
    """The source tree of git revision ``baseline``, extracted into ``tmp``/base, and the candidate's: the working
    tree (:data:`ROOT`), or with ``paths`` (comma-separated, relative to the root) the baseline with the working
    tree's versions of those files (``tmp``/candidate)."""
    base, candidate = tmp / "base", ROOT
    base.mkdir()
    archive = subprocess.run(["git", "archive", baseline], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
    if paths:
        candidate = tmp / "candidate"
        shutil.copytree(base, candidate)
        for path in paths.split(","):
            shutil.copy2(ROOT / path, candidate / path)
    return base, candidate
