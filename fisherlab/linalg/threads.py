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
27–36 s wall one after the other on 2 threads, 6.5–7.6 s side by side on one thread each. :func:`side_by_side`
does the same for longer independent jobs (the parts of a study), each in a thread of its own with an equal share
of the intra-op threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["concurrently", "lane_threads", "serial", "side_by_side"]

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


def lane_threads(lanes: int, device: torch.device) -> int:
    """Intra-op threads each of ``lanes`` jobs gets under :func:`side_by_side` (0: they run one after the other).

    ``torch.get_num_threads() // lanes`` on the CPU when that is at least one thread a lane and there are two lanes
    or more; else 0 (off the CPU, one lane, or fewer threads than lanes).
    """
    if device.type != "cpu" or lanes < 2:
        return 0
    return torch.get_num_threads() // lanes


def side_by_side(lanes: Sequence[Callable[[], None]], device: torch.device) -> None:
    """Run the lanes at once, each in a thread of its own on :func:`lane_threads` intra-op threads; else in turn.

    Each lane is a job that calls no other lane's objects in an order that matters (e.g. parts of a study that share
    only computed, read-only objects). The caller's thread waits (a Ctrl-C reaches it: the lanes' threads are
    daemons, left to end with the process) and keeps its own thread count; the first error of a lane, in lane
    order, is raised once every lane has ended.
    """
    share = lane_threads(len(lanes), device)
    if share < 1:
        for lane in lanes:
            lane()
        return
    errors: list[BaseException | None] = [None] * len(lanes)

    def run(k: int) -> None:
        torch.set_num_threads(share)  # this thread's intra-op threads (OpenMP's and MKL's counts are per thread)
        try:
            lanes[k]()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors[k] = exc

    threads = torch.get_num_threads()
    workers = [threading.Thread(target=run, args=(k,), daemon=True, name=f"fisherlab-lane-{k}")
               for k in range(len(lanes))]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():
                worker.join(0.25)  # in slices, so that a KeyboardInterrupt reaches this thread
    finally:
        torch.set_num_threads(threads)  # the count new threads start with, as before
    for exc in errors:
        if exc is not None:
            raise exc
