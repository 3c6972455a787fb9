"""The GPT's loss and gradient in 1, 2 and 4 chunks against curvlinops' ``gradient_and_loss`` (issue 15).

The problem of ``bench_peers.py --models gpt --ops grad`` (the 1M GPT preset, 32 × 64 tokens, float32; ``--quick``:
the 10k GPT on 8 × 16 tokens): fisherlab's ``FisherEngine.loss_and_gradient`` in its default chunking (one chunk
where ``gradient_bytes`` of the batch fits the working bytes) and with ``chunk_size`` giving 2 and 4 chunks, beside
curvlinops when it is importable (the peers' venv). Per thread count (``--threads``), every method is warmed up
twice and timed in ``--repeats`` rounds whose order is reversed every other round (ABBA), each call after a
``gc.collect()``: wall-clock median and minimum, CPU-time (``time.process_time``) median and minimum, the minor
page faults of a call (``ru_minflt``, median), and the medians over rounds of the per-round wall and CPU ratios to
the default chunking and to curvlinops. The load average is printed with every block. Each variant's
gradient is checked against the default's (relative difference).

    /tmp/fisherlab-peers/bin/python benchmarks/bench_gradient.py [--threads 2,1] [--repeats 21] [--quick]
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_peers.py (spinning threads on a shared CPU)

import argparse
import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_bytes, header, rel_diff
from bench_peers import flat, problem
from bench_transformer import Peer

from fisherlab.engine import FisherEngine


def methods(quick: bool) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable[[Any], torch.Tensor]]]:
    """The timed calls by label, and how to read each one's gradient (P,)."""
    p = problem("gpt", 512, quick, torch.device("cpu"))
    default = FisherEngine(p.model, (p.X, p.y), "categorical", kind="empirical", dtype=torch.float32,
                           progress=False)
    n, size = len(p.X), default.gradient_chunk_size()
    print(f"GPT P = {p.P:,}, {n} × {p.X.shape[1]} tokens; gradient_bytes({n}) = "
          f"{format_bytes(default.gradient_bytes(n))}, working bytes {format_bytes(default._working_bytes)}: "
          f"default chunks of {size}")
    runs: dict[str, Callable[[], Any]] = {f"fisherlab, default ({-(-n // size)} × {size})": default.loss_and_gradient}
    for chunks in (2, 4):
        engine = FisherEngine(p.model, (p.X, p.y), "categorical", kind="empirical", dtype=torch.float32,
                              chunk_size=n // chunks, progress=False)
        runs[f"fisherlab, {chunks} × {n // chunks}"] = engine.loss_and_gradient
    reads: dict[str, Callable[[Any], torch.Tensor]] = dict.fromkeys(runs, lambda r: r[1])
    peer = Peer(p.model, p.X, p.y, p.y)
    if peer.available:
        runs["curvlinops gradient_and_loss"] = peer.ggn(p.y).gradient_and_loss
        reads["curvlinops gradient_and_loss"] = lambda r: flat(list(r[0]))
    return runs, reads


def time_block(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """ABBA rounds: wall and CPU seconds and minor page faults of each call."""
    for fn in runs.values():
        fn()
        fn()
    out = {name: {"wall": [], "cpu": [], "faults": []} for name in runs}
    order = list(runs)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            gc.collect()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            cpu, wall = time.process_time(), time.perf_counter()
            runs[name]()
            out[name]["wall"].append(time.perf_counter() - wall)
            out[name]["cpu"].append(time.process_time() - cpu)
            out[name]["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
    return out


def print_block(times: dict[str, dict[str, list[float]]], references: list[str]) -> None:
    """One row per method; the ratios are medians over rounds of the per-round ratios (wall, CPU) to each reference."""
    head = ["method", "wall med ms", "wall min", "cpu med", "cpu min", "minflt"]
    for ref in references:
        head += [f"/ {ref.split(',')[0].split(' ')[0]} wall", "cpu"]
    rows = [head]
    for name, t in times.items():
        row = [name, *(f"{f(t[k]) * 1e3:.1f}" for k in ("wall", "cpu") for f in (statistics.median, min)),
               f"{statistics.median(t['faults']):.0f}"]
        for ref in references:
            row += [f"{statistics.median(a / b for a, b in zip(t[k], times[ref][k], strict=True)):.3f}"
                    for k in ("wall", "cpu")]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="2,1", help="comma-separated intra-op thread counts (default 2,1)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per thread count (default 21, quick 4)")
    parser.add_argument("--quick", action="store_true", help="smoke run: the 10k GPT on 8 × 16 tokens")
    args = parser.parse_args()
    repeats = args.repeats or (4 if args.quick else 21)
    header("GPT loss and gradient: chunkings and curvlinops, float32", torch.device("cpu"))
    runs, reads = methods(args.quick)
    names = list(runs)
    references = [names[0], *(names[-1:] if names[-1].startswith("curvlinops") else [])]
    expected = reads[names[0]](runs[names[0]]())
    print("rel. diff to the default: " + ", ".join(f"{name} {rel_diff(reads[name](runs[name]()), expected):.1e}"
                                                     for name in names[1:]))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        before = " ".join(f"{x:.1f}" for x in os.getloadavg())
        times = time_block(runs, repeats)
        after = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"\n{threads} thread(s), {repeats} ABBA rounds, load average {before} → {after}")
        print_block(times, references)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
