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

import ctypes
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["LaneStopped", "concurrently", "lane_threads", "serial", "side_by_side"]

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
    only computed, read-only objects). The caller's thread waits and keeps its own thread count; the first error
    of a lane, in lane order, is raised once every lane has ended.

    **Interrupted** (a Ctrl-C, or any other exception raised in the caller's thread while it waits): each lane still
    running is stopped (:func:`_stop`: :class:`LaneStopped` is raised in its thread at its next Python step, so
    ``finally`` blocks run, e.g. a results file being written is removed) and joined before the caller's exception
    goes on; what a lane finished before is kept. The wait is that of the torch or LAPACK call a lane is inside
    (one call: an eigendecomposition of the study's largest block, seconds; the tasks of a
    :func:`concurrently` running in the lane end first). A second Ctrl-C during that wait stops waiting: the
    process may then end while a lane is inside torch (a C++ abort, ``terminate called without an active
    exception``, exit status 134), which the wait is there to prevent.
    """
    share = lane_threads(len(lanes), device)
    if share < 1:
        for lane in lanes:
            lane()
        return
    errors: list[BaseException | None] = [None] * len(lanes)
    ended = [threading.Event() for _ in lanes]  # the caller waits on these, not on Thread.join (see _join)

    def run(k: int) -> None:
        try:
            try:
                torch.set_num_threads(share)  # this thread's intra-op threads (OpenMP's and MKL's are per thread)
                lanes[k]()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors[k] = exc
            finally:
                ended[k].set()
        except LaneStopped:  # it came after the job had ended
            ended[k].set()

    threads = torch.get_num_threads()
    workers = [threading.Thread(target=run, args=(k,), daemon=True, name=f"fisherlab-lane-{k}")
               for k in range(len(lanes))]
    try:
        for worker in workers:
            worker.start()
        _join(workers, ended)
    except BaseException:
        for worker, end in zip(workers, ended, strict=True):
            if not end.is_set():
                _stop(worker)
        _join(workers, ended)  # before the exception goes on: a process that ends with a lane inside torch aborts
        raise
    finally:
        torch.set_num_threads(threads)  # the count new threads start with, as before
    for exc in errors:
        if exc is not None:
            raise exc


class LaneStopped(BaseException):
    """Raised in a lane's thread by :func:`side_by_side` when the caller is interrupted.

    Not an ``Exception``, so that no ``except Exception`` of the lane's job takes it for its own error.
    """


def _stop(worker: threading.Thread) -> None:
    """Raise :class:`LaneStopped` in ``worker`` at its next Python step.

    CPython's ``PyThreadState_SetAsyncExc``: a thread inside a C call, e.g. a LAPACK routine, gets it when the call
    returns; a thread that has ended is not touched (the call finds no such thread).
    """
    if worker.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(LaneStopped))


def _join(workers: Sequence[threading.Thread], ended: Sequence[threading.Event]) -> None:
    """Wait until each of ``workers`` has ended its job (its event is set, or it is no longer alive), then join it.

    The waits are ``Event.wait`` slices of 0.25 s, which a KeyboardInterrupt leaves intact: a ``Thread.join``
    interrupted by one can mark a running thread as stopped (CPython 3.11's ``_wait_for_tstate_lock``). A worker
    never started (the caller was interrupted while starting them) is passed over.
    """
    for worker, end in zip(workers, ended, strict=True):
        if worker.ident is None:
            continue
        while not end.wait(0.25) and worker.is_alive():
            pass
        worker.join()  # past its job: it ends at once
