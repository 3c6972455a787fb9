"""Eigenvalues on one thread and several spectra side by side, against numpy.linalg.eigvalsh (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fisherlab.linalg.threads import concurrently, serial
from fisherlab.structures.base import eigvalsh

D = torch.float64
CPU = torch.device("cpu")


def symmetric(n: int, seed: int) -> torch.Tensor:
    A = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=D)
    return A + A.T


def with_denormals(n: int, seed: int) -> torch.Tensor:
    """A near-identity matrix (the geometry's block-structure case) whose off-diagonal holds subnormal entries."""
    M = torch.eye(n, dtype=D) + 1e-16 * symmetric(n, seed)
    M[0, 1:] = M[1:, 0] = 3e-310  # below the smallest normal float64, 2.2e-308
    assert 0 < float(M[0, 1]) < np.finfo(np.float64).tiny
    return M


def relative(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.abs(actual.numpy() - expected).max() / np.abs(expected).max())


def test_eigvalsh_against_numpy_including_subnormal_entries():
    threads = torch.get_num_threads()
    for M in (symmetric(60, 0), with_denormals(60, 1)):
        assert relative(eigvalsh(M), np.linalg.eigvalsh(M.numpy())) <= 1e-12
    assert torch.get_num_threads() == threads
    batch = torch.stack([symmetric(9, s) for s in range(3)])
    want = np.stack([np.linalg.eigvalsh(B.numpy()) for B in batch])
    assert relative(eigvalsh(batch), want) <= 1e-12
    half = symmetric(6, 4).to(torch.bfloat16)
    assert eigvalsh(half).dtype == torch.bfloat16


def test_concurrently_keeps_order_and_values_and_the_thread_count():
    threads = torch.get_num_threads()
    mats = [symmetric(n, n) for n in (80, 5, 40, 1)] + [with_denormals(30, 7)]
    spectra = concurrently([lambda M=M: eigvalsh(M) for M in mats], CPU)
    assert torch.get_num_threads() == threads
    for M, ev in zip(mats, spectra, strict=True):
        assert relative(ev, np.linalg.eigvalsh(M.numpy())) <= 1e-12
    assert concurrently([], CPU) == []
    seen = concurrently([torch.get_num_threads, torch.get_num_threads], CPU)
    assert seen == [1, 1]  # each task on one intra-op thread


def test_serial_restores_the_thread_count_after_an_error():
    threads = torch.get_num_threads()
    try:
        with serial(CPU):
            assert torch.get_num_threads() == 1
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == threads


def test_side_by_side_runs_the_lanes_at_once_on_one_thread_each():
    """Two lanes at once (each waits for the other to start), one intra-op thread each, the caller's count kept;
    their spectra against numpy; the first lane error is raised after both end; one thread: one after the other."""
    import threading

    from fisherlab.linalg.threads import lane_threads, side_by_side

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert lane_threads(2, CPU) == 1 and lane_threads(1, CPU) == 0 and lane_threads(3, CPU) == 0
        started = [threading.Event(), threading.Event()]
        seen, spectra = {}, {}

        def lane(k: int, M: torch.Tensor) -> None:
            started[k].set()
            assert started[1 - k].wait(60)  # the other lane runs meanwhile
            seen[k] = torch.get_num_threads()
            spectra[k] = eigvalsh(M)

        mats = [symmetric(70, 1), symmetric(50, 2)]
        side_by_side([lambda k=k: lane(k, mats[k]) for k in range(2)], CPU)
        assert seen == {0: 1, 1: 1} and torch.get_num_threads() == 2
        for k, M in enumerate(mats):
            assert relative(spectra[k], np.linalg.eigvalsh(M.numpy())) <= 1e-12
        ended = []

        def fails() -> None:
            raise ValueError("lane 0")

        with pytest.raises(ValueError, match="lane 0"):
            side_by_side([fails, lambda: ended.append(1)], CPU)
        assert ended == [1] and torch.get_num_threads() == 2
        torch.set_num_threads(1)  # fewer threads than lanes: in turn, in the caller's thread
        order = []
        side_by_side([lambda: order.append((0, threading.get_ident())),
                      lambda: order.append((1, threading.get_ident()))], CPU)
        assert order == [(0, threading.get_ident()), (1, threading.get_ident())]
    finally:
        torch.set_num_threads(threads)


def test_an_interrupt_between_two_lane_starts_stops_the_started_lane_and_goes_on(monkeypatch):
    """A Ctrl-C while the lanes are being started (here: the second ``Thread.start`` raises it): the first lane is
    stopped and joined (its ``finally`` ran), the second never runs, and the caller gets the KeyboardInterrupt —
    not the RuntimeError of joining a thread that was never started."""
    import threading
    import time

    from fisherlab.linalg.threads import side_by_side

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    start = threading.Thread.start
    calls, events = [], []

    def start_then_interrupt(self: threading.Thread) -> None:
        calls.append(self.name)
        if len(calls) == 2:
            deadline = time.monotonic() + 30
            while "first started" not in events and time.monotonic() < deadline:  # the first lane is in its job
                time.sleep(0.001)
            raise KeyboardInterrupt
        start(self)

    def first() -> None:
        try:
            events.append("first started")
            while True:
                time.sleep(0.01)
        finally:
            events.append("first cleaned up")

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            side_by_side([first, lambda: events.append("second ran")], CPU)
        assert len(calls) == 2 and "second ran" not in events and events[-1] == "first cleaned up"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
