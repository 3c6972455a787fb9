"""Run a CPU LAPACK call on one thread: the symmetric eigenvalue solver waits on every thread once per column.

The tridiagonal reduction of ``torch.linalg.eigvalsh`` (LAPACK ``?sytrd``: one symmetric matrix-vector product per
column, each a parallel region with its barrier) synchronises the intra-op threads about 2n times for an n×n
matrix. When the cores are shared with other processes, a thread the scheduler has set aside holds up every such
barrier for a time slice: measured here (2 cores, load ≈ 3, n = 3,466, float64) 12.5–14.0 s wall on 2 threads
against 4.0–4.4 s on one, the same 3–4× for a random symmetric matrix as for the preconditioned Fishers of the
geometry (so neither the values nor denormals are the cause; flushing denormals changed nothing, single-threaded
a preconditioned layer block took 1.44 CPU s and a random one of its size 1.34 s). GEMM-shaped work (Cholesky,
products) is hardly affected and keeps its threads. :func:`serial` limits torch to one intra-op thread for the
block and restores the previous count; off the CPU it does nothing. :func:`concurrently` runs several
independent problems (e.g. spectra) at once instead, each on one thread, as many at a time as torch has threads:
no barrier between threads, and on quiet cores every thread still works. Two 2,500×2,500 spectra, load ≈ 3.5:
27–36 s wall one after the other on 2 threads, 6.5–7.6 s side by side on one thread each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["concurrently", "serial"]

T = TypeVar("T")


@contextmanager
def serial(device: torch.device) -> Iterator[None]:
    """One intra-op thread inside the block when ``device`` is the CPU (restored afterwards); else nothing."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def concurrently(tasks: Sequence[Callable[[], T]], device: torch.device) -> list[T]:
    """Each task's result, in order: on the CPU each task on one intra-op thread, ``torch.get_num_threads()`` at once.

    For independent LAPACK calls such as several eigenvalue problems (module docstring); the tasks are started in
    the given order (put the largest first). Off the CPU, or with one thread, they run one after the other.
    """
    if device.type != "cpu":
        return [task() for task in tasks]
    workers = min(torch.get_num_threads(), len(tasks))
    with serial(device):
        if workers <= 1:
            return [task() for task in tasks]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda task: task(), tasks))
