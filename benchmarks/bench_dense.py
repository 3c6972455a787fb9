"""Dense true Fisher on the reference case, against the naive assembly's matrix product (issue 2, Performance).

Reference case: digits (scikit-learn, standardized), first N = 1024 training samples; MLP 64-32-32-10 with tanh
(P = 3,466); categorical likelihood; true Fisher; float32. The reference time is one float32 product
(N·C × P)ᵀ(N·C × P) with C = 10, the arithmetic of a naive dense assembly; the target is fisherlab's dense Fisher
in at most 0.7× that time. A second table shows that peak memory is set by the chunk size, not by N: the same
chunk size for N = 1024 and N = 4096 (digits inputs repeated) gives about the same peak beyond the P×P matrix.

When curvlinops or nngeometry can be imported (the peers venv, see benchmarks/README.md) they are timed in the
same run: curvlinops ``GGNLinearOperator @ I`` (the GGN equals the true Fisher for softmax cross-entropy) and
nngeometry ``FIM(..., PMatDense)``; their matrices are compared with fisherlab's.

    python benchmarks/bench_dense.py [--device cpu|cuda] [--repeats 5] [--quick]
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# Before torch loads libgomp: OpenMP threads that spin while they wait steal the time of their partners on a
# shared CPU, which makes every small parallel op cost a scheduler slice (see benchmarks/README.md). Set
# OMP_WAIT_POLICY=ACTIVE in the environment to measure with spinning threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Row,
    header,
    optional_import,
    parse_args,
    peak_memory,
    print_table,
    rel_diff,
    rows_from_times,
    time_methods,
)

from fisherlab import fisher
from fisherlab.data import load_digits
from fisherlab.engine import FisherEngine
from fisherlab.models import reference_mlp

N_REFERENCE = 1024
NUM_CLASSES = 10
MEMORY_CHUNK = 256


def digits(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``n`` standardized digits training samples (repeated cyclically past the 1,347 there are)."""
    data = load_digits(seed=0)
    reps = -(-n // data.n_train)
    X = data.X_train.repeat(reps, 1)[:n].to(device)
    y = data.y_train.repeat(reps)[:n].to(device)
    return X, y


def dense_fisher(model: nn.Module, X: Tensor, y: Tensor, chunk_size: int | None = None) -> Tensor:
    """fisherlab's dense true Fisher, end to end (engine construction included), as a P×P tensor."""
    return fisher(model, (X, y), "categorical", kind="true", structure="dense", dtype=torch.float32,
                  device=X.device, chunk_size=chunk_size, progress=False).to_dense()


def factor_rows_only(model: nn.Module, X: Tensor, y: Tensor) -> Callable[[], None]:
    """The factor rows U of every chunk without the Gram product (where the rest of the time goes)."""
    engine = FisherEngine(model, (X, y), "categorical", kind="true", dtype=torch.float32, device=X.device,
                          progress=False)

    def run() -> None:
        for _ in engine.iter_factor_rows():
            pass

    return run


def peer_methods(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, Callable[[], Tensor]]:
    """Dense true Fisher by curvlinops and nngeometry, when importable."""
    methods: dict[str, Callable[[], Tensor]] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    curvlinops = optional_import("curvlinops")
    if curvlinops is not None:
        def curvlinops_dense() -> Tensor:
            op = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)],
                                              check_deterministic=False)
            return op @ torch.eye(P, dtype=X.dtype, device=X.device)

        methods["curvlinops GGN @ I"] = curvlinops_dense
    metrics = optional_import("nngeometry.metrics")
    pmat = optional_import("nngeometry.object")
    if metrics is not None and pmat is not None:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=len(X))

        def nngeometry_dense() -> Tensor:
            F = metrics.FIM(model, loader, pmat.PMatDense, variant="classif_logits", device=X.device)
            return F.to_torch()

        methods["nngeometry FIM PMatDense"] = nngeometry_dense
    return methods


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = args.device
    header("dense true Fisher, digits MLP 64-32-32-10 tanh, float32", device)
    model = reference_mlp(seed=0, device=device).eval()
    P = sum(p.numel() for p in model.parameters())
    X, y = digits(N_REFERENCE, device)

    A = torch.randn(N_REFERENCE * NUM_CLASSES, P, device=device)
    product = f"product (N·C×P)ᵀ(N·C×P), N·C = {N_REFERENCE * NUM_CLASSES}"
    methods: dict[str, Callable[[], object]] = {
        product: lambda: A.T @ A,
        "fisherlab dense": lambda: dense_fisher(model, X, y),
        "  of which factor rows": factor_rows_only(model, X, y),
    }
    peers = peer_methods(model, X, y)
    methods.update(peers)
    times = time_methods(methods, device, args.repeats)
    peaks = {name: peak_memory(fn, device) for name, fn in methods.items()}
    F = dense_fisher(model, X, y)
    notes = {name: f"rel. diff to fisherlab {rel_diff(fn(), F):.1e}" for name, fn in peers.items()}
    notes["fisherlab dense"] = "target ≤ 0.70"
    case = f"N={N_REFERENCE} P={P}"
    print_table(rows_from_times(case, times, times[product], peaks, notes), "× product")

    sizes = (N_REFERENCE // 2, 2 * N_REFERENCE) if args.quick else (N_REFERENCE, 4 * N_REFERENCE)
    matrix_bytes = P * P * 4
    rows = []
    for n in sizes:
        Xn, yn = digits(n, device)
        start = time.perf_counter()
        peak = peak_memory(lambda Xn=Xn, yn=yn: dense_fisher(model, Xn, yn, MEMORY_CHUNK), device)
        seconds = time.perf_counter() - start
        beyond = None if peak is None else peak - matrix_bytes
        rows.append(Row(f"N={n} chunk={MEMORY_CHUNK}", "fisherlab dense (one run)", seconds, peak=peak,
                        note=f"beyond the P×P matrix: {beyond / 2**20:.1f} MiB" if beyond is not None else ""))
    print("peak memory at a fixed chunk size (P×P float32 matrix = "
          f"{matrix_bytes / 2**20:.1f} MiB; the result itself is included in the peak)")
    print_table(rows, "")


if __name__ == "__main__":
    main()
