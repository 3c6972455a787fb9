"""The GPT 1M rows of bench_peers (gradient, KFAC-reduce) A/B: this working tree against a git revision and curvlinops.

The same case as ``bench_peers.py --models gpt``: ``fisherlab.models.GPT`` preset "1M", ``output="sequence"``,
32 sequences × 64 tokens, float32, empirical Fisher. Rows: ``kfac-reduce`` (``fisher(..., structure="kfac",
approx="reduce")`` end to end: engine built, then the factors), ``kfac-reduce-built`` (``KFACFisher.from_engine`` on
an engine built beforehand), ``grad`` (``FisherEngine.loss_and_gradient``); curvlinops' ``KFACLinearOperator(
kfac_approx="reduce").compute_kronecker_factors()`` and ``gradient_and_loss`` beside them.

Each method is a few worker processes (``--replicas``; one process's timings can sit several percent off
another's, the same code at the same load) that import their tree's fisherlab and wait for orders: the baseline
``--baseline`` (default HEAD), exported by ``git archive`` into a temporary folder; the candidate, the working tree
or, with ``--paths``, the baseline with the working tree's versions of those files (one's own change alone, in a
tree that others edit too); and the peer, curvlinops, run from the candidate's tree. The controller makes one call
at a time, round-robin over the methods (the order rotated every round, the replicas taken in turn), each on the
thread count of the row, so every method sees the same load. Printed per row: at ``--threads`` (default 2) and on
one thread, the wall-clock median of the rounds, the median over rounds of each method's ratio to each other
method of its round, and the CPU-time (``time.process_time``) minimum, overall and per process — on one thread
the A/B figure least affected by other processes on the cores; the parallel regions of one call at ``--threads``
(OpenMP regions whose team has several threads, each a barrier that waits for a descheduled thread on shared cores:
counted by an LD_PRELOAD shim around libgomp's ``GOMP_parallel``, :data:`SHIM`, compiled with the system's C
compiler; not counted without one); and the load average at the start and end.

    /tmp/fisherlab-peers/bin/python benchmarks/bench_gpt_ab.py [--baseline HEAD] [--rounds 21] [--threads 2]
        [--rows kfac-reduce,kfac-reduce-built,grad] [--replicas 2] [--paths fisherlab/layers.py,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import PATHS_HELP, ROOT, revision_trees

ROWS = ("kfac-reduce", "kfac-reduce-built", "grad")

WORKER = r"""
import gc, json, os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
root, peer_only = sys.argv[1], sys.argv[2] == "peer"
sys.path[:0] = [root, os.path.join(root, "benchmarks")]
import ctypes
import torch
from bench_peers import engine, fisherlab_fisher, problem
from bench_transformer import Peer
import fisherlab
from fisherlab.structures.kfac import KFACFisher
assert fisherlab.__file__.startswith(root), (fisherlab.__file__, root)
p = problem("gpt", 512, False, torch.device("cpu"))
eng = engine(p, "empirical")
peer = Peer(p.model, p.X, p.y, p.y)
if peer_only:
    G = peer.ggn(p.y)
    calls = {"kfac-reduce": lambda: peer.kfac("empirical", "reduce").compute_kronecker_factors(),
             "grad": G.gradient_and_loss}
else:
    calls = {"kfac-reduce": lambda: fisherlab_fisher(p, "empirical", "kfac", approx="reduce"),
             "kfac-reduce-built": lambda: KFACFisher.from_engine(eng, approx="reduce"),
             "grad": eng.loss_and_gradient}
for threads in (1, torch.get_num_threads()):
    torch.set_num_threads(threads)
    for fn in calls.values():
        fn()
count = getattr(ctypes.CDLL(None), "fisherlab_parallel_regions", None)  # the shim's, when it is preloaded
if count is not None:
    count.restype = ctypes.c_long
print(json.dumps(sorted(calls)), flush=True)
for line in sys.stdin:
    row, threads = line.split()
    fn = calls[row]
    torch.set_num_threads(int(threads))
    gc.collect()
    k = count() if count else 0
    w, c = time.perf_counter(), time.process_time()
    fn()
    w, c = time.perf_counter() - w, time.process_time() - c
    print(json.dumps([w, c, count() - k if count else -1]), flush=True)
"""

#: An LD_PRELOAD shim that counts the OpenMP parallel regions (libgomp's GOMP_parallel, one per
#: ``#pragma omp parallel`` entered: torch's parallel_for, MKL's threaded kernels) whose team has several threads.
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
static long regions = 0;
typedef void (*parallel_t)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*max_threads_t)(void);
void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags) {
    static parallel_t real = 0;
    static max_threads_t max_threads = 0;
    if (!real) {
        real = (parallel_t)dlsym(RTLD_NEXT, "GOMP_parallel");
        max_threads = (max_threads_t)dlsym(RTLD_NEXT, "omp_get_max_threads");
    }
    if ((num_threads ? num_threads : (unsigned)max_threads()) > 1) __atomic_add_fetch(&regions, 1, __ATOMIC_RELAXED);
    real(fn, data, num_threads, flags);
}
long fisherlab_parallel_regions(void) { return regions; }
"""


def region_counter(folder: Path) -> Path | None:
    """The shim (:data:`SHIM`) compiled into ``folder`` (None without a C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    source, library = folder / "regions.c", folder / "libregions.so"
    source.write_text(SHIM)
    built = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(library), str(source), "-ldl"],
                           capture_output=True)
    return library if built.returncode == 0 else None


class Worker:
    """One process: a fisherlab tree (or the peer), each call on the thread count it is given."""

    def __init__(self, name: str, root: Path, peer: bool = False, shim: Path | None = None) -> None:
        self.name = name
        env = os.environ if shim is None else {**os.environ, "LD_PRELOAD": str(shim)}
        self.proc = subprocess.Popen([sys.executable, "-W", "ignore", "-c", WORKER, str(root), "peer" if peer else "-"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root, env=env)
        self.rows: list[str] = []

    def ready(self) -> None:
        self.rows = json.loads(self.proc.stdout.readline())

    def call(self, row: str, threads: int) -> tuple[float, float, int]:
        """(wall s, CPU s, parallel regions with several threads: -1 when not counted) of one call."""
        self.proc.stdin.write(f"{row} {threads}\n")
        self.proc.stdin.flush()
        wall, cpu, regions = json.loads(self.proc.stdout.readline())
        return wall, cpu, regions

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="HEAD", help="git revision the working tree is compared with")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2, help="threads of the wall-clock rounds")
    parser.add_argument("--replicas", type=int, default=2, help="worker processes per method (calls spread)")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--paths", default="", help=PATHS_HELP)
    args = parser.parse_args()
    rows = args.rows.split(",")
    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base, candidate = revision_trees(Path(tmp), args.baseline, args.paths)
        label = f"{rev} + {len(args.paths.split(','))} files" if args.paths else "tree"
        methods = ((f"fisherlab {rev}", base, False), (f"fisherlab {label}", candidate, False),
                   ("curvlinops", candidate, True))
        shim = region_counter(Path(tmp))
        workers = {name: [Worker(name, root, peer, shim) for _ in range(args.replicas)]
                   for name, root, peer in methods}
        for group in workers.values():
            for w in group:
                w.ready()
        print(f"GPT 1M, 32 × 64 tokens, float32; baseline {rev}; {args.rounds} rounds over {args.replicas} "
              f"processes per method; candidate {args.paths or 'the working tree'}; load {load()}")
        for row in rows:
            for threads in sorted({args.threads, 1}, reverse=True):
                names = [name for name, group in workers.items() if row in group[0].rows]
                times: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
                start = load()
                for r in range(args.rounds):
                    for name in names[r % len(names):] + names[:r % len(names)]:
                        times[name].append(workers[name][r % args.replicas].call(row, threads))
                print(f"\n{row}, {threads} thread(s), load {start} -> {load()}")
                for name, ts in times.items():
                    walls, cpus = [t[0] for t in ts], [t[1] for t in ts]
                    ratios = "  ".join(
                        f"/{other} {statistics.median(a[0] / b[0] for a, b in zip(ts, times[other], strict=True)):.3f}"
                        for other in times if other != name)
                    per_process = "/".join(f"{1e3 * min(t[1] for t in ts[k::args.replicas]):.1f}"
                                           for k in range(args.replicas))
                    regions = "" if threads == 1 or ts[-1][2] < 0 else f"  {ts[-1][2]:,} parallel regions"
                    print(f"  {name:28s} wall median {1e3 * statistics.median(walls):7.1f} ms  "
                          f"CPU min {1e3 * min(cpus):7.1f} ms (per process {per_process}){regions}  {ratios}")
                sys.stdout.flush()
        for group in workers.values():
            for w in group:
                w.close()


if __name__ == "__main__":
    main()
