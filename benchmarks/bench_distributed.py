"""Data-parallel F·v and CG on torch.distributed (gloo, CPU): 1 and 2 processes, bytes sent, a cost model (issue 14).

Case: the wide MLP 64-1024-1024-10 (tanh, P = 1,126,410) of bench_implicit.py on the first N standardized digits
training samples (default N = 512), categorical likelihood, true Fisher, float32. Each world size W is a group of
W subprocesses (this file with ``--worker``) on 127.0.0.1 with gloo; each rank holds its
:func:`fisherlab.distributed.shard` of the N samples and ``--threads`` torch threads (default 1: one core per rank,
so the ceiling of W ranks is W× one process; on a loaded machine several threads per process mostly wait for
each other). Timed on every rank after a barrier, reported by rank 0 (the slowest rank sets the
pace, since every product ends in an all-reduce):

* ``F·v`` — ``engine.matmat(v)``: the rank's partial product on its shard, then one all-reduce of P floats;
* ``all-reduce of P floats`` — the communication alone (``torch.distributed.all_reduce`` of a P-vector);
* ``CG solve`` — one exact-NGD solve (F + λI)x = ∇L by CG, λ = 1e-2, capped at ``--cg-iters`` iterations (so
  every world does the same work; the products include the final residual check).

Bytes: every collective fisherlab calls in one product is counted (elements × itemsize of the buffer), and a ring
all-reduce sends 2(W − 1)/W of it per rank. The cost model printed at the end: t(W) = c·N/W + a(W), with c the
measured seconds per sample of one process's product and a(W) the measured all-reduce; on GPUs the same model
with c from arithmetic (≈ 10·P FLOPs per sample: forward 2P, forward-mode 4P, reverse 4P) and a bandwidth B:
a ≈ α + 2(W − 1)/W · 4P / B.

    python benchmarks/bench_distributed.py [--n 512] [--worlds 1 2] [--repeats 5] [--cg-iters 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

WIDTHS = (1024, 1024)
DAMPING = 1e-2
TIMEOUT_S = 1800


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """One rank: build its engine on its shard, time F·v, the all-reduce alone and a CG solve; rank 0 writes."""
    import datetime

    import torch.distributed as dist
    from bench_dense import digits

    from fisherlab.distributed import shard
    from fisherlab.engine import FisherEngine
    from fisherlab.models import MLP
    from fisherlab.ngd import solve_ngd

    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
    sent: list[int] = []
    reduce = dist.all_reduce

    def counted(tensor: torch.Tensor, *a: object, **k: object) -> object:
        sent.append(tensor.numel() * tensor.element_size())
        return reduce(tensor, *a, **k)

    dist.all_reduce = counted  # count what fisherlab sends (this benchmark process only)
    torch.manual_seed(0)
    model = MLP(64, WIDTHS, 10, "tanh").eval()
    X, y = digits(args.n, torch.device("cpu"))
    mine = shard(args.n, rank, world)
    engine = FisherEngine(model, (X[mine.start: mine.stop], y[mine.start: mine.stop]), "categorical", kind="true",
                          dtype=torch.float32, progress=False)
    P = engine.spec.dim
    v = torch.randn(P, generator=torch.Generator().manual_seed(1))
    grad = engine.loss_and_gradient()[1]

    def barrier() -> None:
        if world > 1:
            reduce(torch.zeros(1))

    def timed(fn: object) -> list[float]:
        fn()  # warm-up (the first product also linearises the model)
        out = []
        for _ in range(args.repeats):
            barrier()
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
        return out

    sent.clear()
    engine.matmat(v)
    per_product = {"calls": len(sent), "bytes": sum(sent)}
    buf = torch.randn(P)
    result = {
        "P": P, "local": len(mine), "threads": args.threads, "product": per_product,
        "fv": timed(lambda: engine.matmat(v)),
        "allreduce": timed(lambda: reduce(buf)) if world > 1 else [0.0],
    }
    info: list[object] = []
    result["cg"] = timed(lambda: info.append(solve_ngd(engine, grad, DAMPING, solver="cg", cg_tol=1e-12,
                                                       cg_max_iter=args.cg_iters)[1]))
    result["cg_products"] = info[-1].products
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def run_world(world: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Run ``world`` ranks of :func:`worker`; returns rank 0's measurements."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / f"world{world}.json"
    threads = args.threads
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--worker", "--n", str(args.n), "--repeats", str(args.repeats),
           "--cg-iters", str(args.cg_iters), "--threads", str(threads)]
    procs = [subprocess.Popen([*cmd, "--rank", str(r), "--world", str(world), "--port", str(port), "--out", str(out)],
                              env=env) for r in range(world)]
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise SystemExit(f"world {world}: a rank failed ({[p.returncode for p in procs]})")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="samples N (default 512)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="world sizes (default 1 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each measurement (default 5)")
    parser.add_argument("--cg-iters", type=int, default=10, help="CG iterations of the solve (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    for name in ("--rank", "--world", "--port"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.rank, args.world, args.port, args, args.out)
        return
    torch.set_num_threads(args.threads)  # the header shows a rank's threads
    header(f"data-parallel F·v and CG, MLP 64-{WIDTHS[0]}-{WIDTHS[1]}-10 tanh, N={args.n}, float32, gloo",
           torch.device("cpu"))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runs = {w: run_world(w, args, Path(tmp)) for w in args.worlds}
    P = runs[args.worlds[0]]["P"]
    med = {w: {k: statistics.median(r[k]) for k in ("fv", "allreduce", "cg")} for w, r in runs.items()}
    base = med[args.worlds[0]]
    print(f"P = {P:,}; one all-reduce buffer = {4 * P / 1e6:.2f} MB (float32); medians of {args.repeats} runs")
    cols = ("W", "threads/rank", "samples/rank", "F·v s", "speed-up", "all-reduce s", "bytes/product",
            "ring bytes sent/rank", f"CG s ({runs[args.worlds[0]]['cg_products']} products)", "CG speed-up")
    rows = []
    for w, r in runs.items():
        m = med[w]
        ring = 2 * (w - 1) / w * r["product"]["bytes"]
        rows.append((str(w), str(r["threads"]), str(r["local"]), f"{m['fv']:.3f}", f"{base['fv'] / m['fv']:.2f}",
                     f"{m['allreduce']:.4f}", f"{r['product']['bytes']:,} in {r['product']['calls']}",
                     f"{ring / 1e6:.2f} MB", f"{m['cg']:.2f}", f"{base['cg'] / m['cg']:.2f}"))
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(wd) for c, wd in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(wd) for c, wd in zip(row, widths, strict=True)))
    one = med.get(1)
    if one is not None:
        c = one["fv"] / args.n
        print(f"\ncost model t(W) = c·N/W + a(W): c = {c * 1e3:.3f} ms per sample here (1 process)")
        for w in args.worlds:
            if w > 1:
                a = med[w]["allreduce"]
                print(f"  W={w}: a = {a * 1e3:.1f} ms measured (gloo, loopback) → {8 * P * (w - 1) / w / a / 1e9:.2f} "
                      f"GB/s effective; communication ≤ compute per rank from N ≥ {w * a / c:.0f} samples")
    flops = 10 * P
    print(f"GPU model: ≈ 10·P = {flops / 1e6:.1f} MFLOP per sample per product; all-reduce 2(W−1)/W·4P bytes")
    for name, rate, bandwidth, alpha in (("H100/H200 NVLink", 30e12, 200e9, 30e-6),
                                         ("PCIe / 100 Gb/s network", 30e12, 10e9, 50e-6)):
        c = flops / rate
        for w in (2, 8):
            a = alpha + 2 * (w - 1) / w * 4 * P / bandwidth
            print(f"  {name}, W={w}: c ≈ {c * 1e6:.2f} µs/sample, a ≈ {a * 1e6:.0f} µs → communication ≤ compute "
                  f"per rank from N ≥ {w * a / c:,.0f} samples (efficiency ≥ 50 %)")


if __name__ == "__main__":
    main()
