"""Matrix-free F·v on a 1.1M-parameter MLP against the arithmetic of three passes (issue 2, Performance).

Case: MLP 64-1024-1024-10 with tanh (P = 1,126,410), the first N = 512 standardized digits training samples,
categorical likelihood, true Fisher, float32. The floor is the sum of three passes timed with plain torch: one
forward (``model(X)`` under no_grad), one forward-mode pass (``torch.func.jvp`` of the functional model) and one
reverse pass (``torch.autograd.grad`` of the outputs given a cotangent, forward excluded). The target is
``ImplicitFisher @ v`` in at most 1.3× that floor. The first product of a new operator also linearizes the model
(and caches the per-chunk graphs); it is timed separately, construction included.

When curvlinops can be imported (the peers venv, see benchmarks/README.md), ``GGNLinearOperator @ v`` (the GGN
equals the true Fisher for softmax cross-entropy) is timed in the same run and compared with fisherlab's.

    python benchmarks/bench_implicit.py [--device cpu|cuda] [--repeats 15] [--quick]

Measured 2026-12-02, 2 shared cores (load 3.8), peers venv (torch 2.14.1), ``--repeats 7``: floor 0.0684 s;
``ImplicitFisher @ v`` 0.0606 s (0.89× floor), first product 0.0886 s, curvlinops ``GGN @ v`` 0.0879 s (rel. diff
9.0e-08): fisherlab 0.69× curvlinops, first product 1.01×. Before the one-pass product (engine.matmat: ``vjp`` of
``jvp``, Λ in closed form; the commit before fc40730, same machine back to back, median of per-round ratios):
product 0.74× → 0.81× (same 0.060 s; noise of the peer), first product 3.59× → 1.20×; on the 10M-parameter
GPT (32 × 64 tokens) product 1.14× → 0.96×, first product 1.61× → 1.26×.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    header,
    optional_import,
    parse_args,
    peak_memory,
    print_table,
    rel_diff,
    rows_from_times,
    time_methods,
)
from bench_dense import digits

from fisherlab import fisher
from fisherlab.models import MLP

N = 512
WIDTHS = (1024, 1024)
COLUMNS = 16


def floor_passes(model: nn.Module, X: Tensor) -> dict[str, Callable[[], object]]:
    """Forward, forward-mode and reverse pass of the model with plain torch (the arithmetic floor of F·v)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
    z = functional_call(model, leaves, (X,))
    cotangent = torch.randn_like(z)

    def forward() -> Tensor:
        with torch.no_grad():
            return model(X)

    def forward_mode() -> Tensor:
        return jvp(lambda p: functional_call(model, p, (X,)), (params,), (tangents,))[1]

    def reverse() -> tuple[Tensor, ...]:
        return torch.autograd.grad(z, list(leaves.values()), cotangent, retain_graph=True)

    return {"floor: forward": forward, "floor: forward-mode (jvp)": forward_mode,
            "floor: reverse (grad)": reverse}


def implicit(model: nn.Module, X: Tensor, y: Tensor):
    """fisherlab's ImplicitFisher of the true Fisher."""
    return fisher(model, (X, y), "categorical", kind="true", structure="implicit", dtype=torch.float32,
                  device=X.device, progress=False)


def curvlinops_product(model: nn.Module, X: Tensor, y: Tensor) -> Callable[[Tensor], Tensor] | None:
    """curvlinops' GGN (= true Fisher for cross-entropy) times a vector, when importable."""
    curvlinops = optional_import("curvlinops")
    if curvlinops is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)
    return lambda v: op @ v


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_repeats=15)  # short calls: more rounds against load noise
    device = args.device
    header(f"matrix-free true Fisher product, MLP 64-{WIDTHS[0]}-{WIDTHS[1]}-10 tanh, N={N}, float32", device)
    torch.manual_seed(0)
    model = MLP(64, WIDTHS, 10, "tanh").to(device).eval()
    P = sum(p.numel() for p in model.parameters())
    X, y = digits(N, device)
    v = torch.randn(P, device=device)
    V = torch.randn(P, COLUMNS, device=device)
    F = implicit(model, X, y)

    floor = floor_passes(model, X)
    methods: dict[str, Callable[[], object]] = {
        **floor,
        "fisherlab ImplicitFisher @ v": lambda: F @ v,
        "fisherlab first product (build + @ v)": lambda: implicit(model, X, y) @ v,
        f"fisherlab @ V, {COLUMNS} columns": lambda: F @ V,
    }
    notes = {"fisherlab ImplicitFisher @ v": "target ≤ 1.30"}
    peer = curvlinops_product(model, X, y)
    if peer is not None:
        methods["curvlinops GGN @ v"] = lambda: peer(v)
        notes["curvlinops GGN @ v"] = f"rel. diff to fisherlab {rel_diff(peer(v), F @ v):.1e}"
    times = time_methods(methods, device, args.repeats)
    floor_rounds = [sum(ts) for ts in zip(*(times[name] for name in floor), strict=True)]
    floor_seconds = statistics.median(floor_rounds)
    many = times[f"fisherlab @ V, {COLUMNS} columns"]
    notes[f"fisherlab @ V, {COLUMNS} columns"] = f"{statistics.median(many) / COLUMNS:.4f} s per column"
    peaks = {name: peak_memory(fn, device) for name, fn in methods.items() if not name.startswith("floor")}
    print(f"floor = forward + forward-mode + reverse = {floor_seconds:.4f} s (median over rounds);  P = {P:,}")
    print_table(rows_from_times(f"N={N} P={P}", times, floor_rounds, peaks, notes), "× floor")


if __name__ == "__main__":
    main()
