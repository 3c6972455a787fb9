"""KFAC factors, the damped KFAC solve, and CG for exact NGD on a 1.1M-parameter MLP (issue 3, Performance).

Case: MLP 64-1024-1024-10 with tanh (P = 1,126,410), the first N = 1024 standardized digits training samples,
categorical likelihood, float32. Timed (median of ``--repeats`` round-robin runs after one warm-up):

* The KFAC factor pass (``KFACFisher.from_engine`` on a built engine) for the true Fisher (closed-form output
  factor, R = C − 1 = 9 rows per sample: curvlinops' "type-2"), Monte Carlo (1 label per sample) and empirical
  kinds; the engine construction (data checks, MC label draws) is timed on its own row. Floor: the same
  arithmetic in plain torch — one forward pass keeping the layer inputs and pre-activations, the R backward passes
  to the pre-activations (one batched reverse pass) and the factor Gram products aᵀa, δᵀδ.
* The damped KFAC solve (λ = 1e-3) of ∇L: ``split="pi"`` (floor: Cholesky of the damped factors and the
  triangular solves of ∇W̄ with them) and ``split="exact"`` (floor: the factors' eigendecompositions). The
  solves use float64 copies of the factors: fisherlab.linalg's singularity checks refuse these float32 factors.
* Exact NGD by conjugate gradients on the implicit true Fisher, (F + λI) x = ∇L, λ = 1e-3, to relative residual
  1e-4 (``fisherlab.linalg.cg``), one run each (minutes on a CPU). Floor: the iterations times one plain-torch
  F·v (jvp + output-space product + vjp of the functional model).

When curvlinops imports (the peers venv, see benchmarks/README.md), its ``KFACLinearOperator`` factor computation
(``compute_kronecker_factors``, weight and bias in one block per layer as here) for type-2, MC and empirical, and
the same CG driven by its ``GGNLinearOperator`` product (= the true Fisher for softmax cross-entropy) are timed
side by side.

    python benchmarks/bench_kfac.py [--device cpu|cuda] [--repeats 3] [--quick]
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, header, optional_import, parse_args, print_table, time_methods  # noqa: E402
from bench_dense import digits  # noqa: E402

from fisherlab import fisher  # noqa: E402
from fisherlab.engine import FisherEngine  # noqa: E402
from fisherlab.linalg import cg  # noqa: E402
from fisherlab.models import MLP  # noqa: E402
from fisherlab.structures.kfac import KFACFisher  # noqa: E402

N = 1024
WIDTHS = (1024, 1024)
DAMPING = 1e-3
CG_TOL = 1e-4
KINDS = {"true": 9, "mc": 1, "empirical": 1}  # kind → output rows R per sample
CURVLINOPS_KINDS = {"true": "type-2", "mc": "mc", "empirical": "empirical"}


def engine(model: nn.Module, X: Tensor, y: Tensor, kind: str) -> FisherEngine:
    """The float32 engine of ``kind`` (its construction is timed separately from the factor pass)."""
    return FisherEngine(model, (X, y), "categorical", kind=kind, dtype=torch.float32, device=X.device,
                        progress=False)


def float64_factors(K: KFACFisher) -> KFACFisher:
    """The same KFAC with float64 factors (the float32 factors are refused by the linalg singularity checks)."""
    factors = {p: dataclasses.replace(f, A=f.A.double(), S=f.S.double()) for p, f in K.factors.items()}
    return dataclasses.replace(K, factors=factors, dtype=torch.float64)


def factor_floor(model: nn.Module, X: Tensor, rows: int) -> Callable[[], list[Tensor]]:
    """Plain torch: forward keeping inputs/pre-activations, R backward passes (batched), factor Grams."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    M = torch.randn(rows, X.shape[0], 10, device=X.device)

    def run() -> list[Tensor]:
        a, inputs, pre = X, [], []
        for i, lin in enumerate(linears):
            w, b = lin.weight.detach().requires_grad_(), lin.bias.detach().requires_grad_()
            inputs.append(torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1))
            s = a @ w.T + b
            pre.append(s)
            a = torch.tanh(s) if i < len(linears) - 1 else s
        if rows == 1:
            grads = [g.unsqueeze(0) for g in torch.autograd.grad(a, pre, M[0])]
        else:
            grads = torch.autograd.grad(a, pre, M, is_grads_batched=True)
        out = [u.T @ u for u in inputs]
        out += [g.reshape(-1, g.shape[-1]).T @ g.reshape(-1, g.shape[-1]) for g in grads]
        return out

    return run


def fisher_vector_floor(model: nn.Module, X: Tensor) -> Callable[[], Tensor]:
    """Plain torch F·v: jvp, categorical output-space product diag(p) − p pᵀ, vjp."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}

    def run() -> Tensor:
        def f(p: dict[str, Tensor]) -> Tensor:
            return functional_call(model, p, (X,))

        z, jv = jvp(f, (params,), (tangents,))
        p = torch.softmax(z, dim=-1)
        w = (p * jv - p * (p * jv).sum(-1, keepdim=True)) / X.shape[0]
        _, pullback = vjp(f, params)
        return torch.cat([g.reshape(-1) for g in pullback(w)[0].values()])

    return run


def cholesky_floor(K: KFACFisher, g: Tensor) -> Callable[[], list[Tensor]]:
    """Plain torch: Cholesky of each damped factor and the two triangular solves per factor of ∇W̄ (out, width)."""
    blocks = [(f.A + DAMPING ** 0.5 * torch.eye(len(f.A), dtype=f.A.dtype, device=g.device),
               f.S + DAMPING ** 0.5 * torch.eye(len(f.S), dtype=f.S.dtype, device=g.device),
               torch.randn(f.out_features, f.width, dtype=g.dtype, device=g.device)) for f in K.factors.values()]

    def run() -> list[Tensor]:
        out = []
        for A, S, W in blocks:
            La, Ls = torch.linalg.cholesky(A), torch.linalg.cholesky(S)
            out.append(torch.cholesky_solve(torch.cholesky_solve(W, Ls).mT, La).mT)
        return out

    return run


def curvlinops_methods(model: nn.Module, X: Tensor, y: Tensor) -> dict[str, tuple[Callable, str]]:
    """curvlinops' KFAC factor computations (name → (call, floor)) when importable."""
    curvlinops = optional_import("curvlinops")
    if curvlinops is None:
        return {}
    params = [p for p in model.parameters() if p.requires_grad]
    methods: dict[str, tuple[Callable, str]] = {}
    for kind, ftype in CURVLINOPS_KINDS.items():
        op = curvlinops.KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)], fisher_type=ftype,
                                           check_deterministic=False, separate_weight_and_bias=False)
        methods[f"curvlinops KFAC factors, {kind} ({ftype})"] = (op.compute_kronecker_factors,
                                                                 factor_floor_name(KINDS[kind]))
    return methods


def curvlinops_ggn(model: nn.Module, X: Tensor, y: Tensor) -> Callable[[Tensor], Tensor] | None:
    """curvlinops' GGN product (= the true Fisher for softmax cross-entropy) when importable."""
    curvlinops = optional_import("curvlinops")
    if curvlinops is None:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    ggn = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)
    return lambda v: ggn @ v


def factor_floor_name(rows: int) -> str:
    return f"floor: fwd + {rows} bwd + Grams"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    args.repeats = min(args.repeats, 3) if args.quick else max(args.repeats, 3)
    device = args.device
    header(f"KFAC, damped solve and CG on MLP 64-{WIDTHS[0]}-{WIDTHS[1]}-10 tanh, N={N}, float32", device)
    torch.manual_seed(0)
    model = MLP(64, WIDTHS, 10, "tanh").to(device).eval()
    P = sum(p.numel() for p in model.parameters())
    X, y = digits(N, device)
    engines = {kind: engine(model, X, y, kind) for kind in KINDS}
    _, grad = engines["true"].loss_and_gradient()
    K64 = float64_factors(KFACFisher.from_engine(engines["true"]))
    grad64 = grad.double()

    # 1. factors and solves: name → (call, name of its floor); floors are timed like the methods, round-robin
    methods: dict[str, tuple[Callable, str | None]] = {}
    for kind, rows in KINDS.items():
        methods[factor_floor_name(rows)] = (factor_floor(model, X, rows), None)
        methods[f"fisherlab KFAC factors, {kind} (R={rows})"] = (
            lambda kind=kind: KFACFisher.from_engine(engines[kind]), factor_floor_name(rows))
        methods[f"fisherlab engine construction, {kind}"] = (lambda kind=kind: engine(model, X, y, kind), None)
    methods |= curvlinops_methods(model, X, y)
    methods["floor: Cholesky + triangular solves"] = (cholesky_floor(K64, grad64), None)
    methods["fisherlab KFAC solve, split=pi"] = (lambda: K64.solve(grad64, DAMPING, split="pi"),
                                                 "floor: Cholesky + triangular solves")
    methods["floor: eigh of the factors"] = (
        lambda: [torch.linalg.eigh(M) for f in K64.factors.values() for M in (f.A, f.S)], None)
    methods["fisherlab KFAC solve, split=exact"] = (lambda: K64.solve(grad64, DAMPING, split="exact"),
                                                    "floor: eigh of the factors")
    methods["floor: one plain-torch F·v"] = (fisher_vector_floor(model, X), None)
    times = time_methods({name: fn for name, (fn, _) in methods.items()}, device, args.repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    # 2. CG for exact NGD: minutes per solve on a CPU, so timed once each
    implicit = fisher(model, (X, y), "categorical", structure="implicit", dtype=torch.float32, device=device,
                      progress=False)
    implicit @ grad  # builds the per-chunk linearisation (timed in bench_implicit.py)
    solvers = {"fisherlab CG (ImplicitFisher @ v)": implicit.matvec}
    peer = curvlinops_ggn(model, X, y)
    if peer is not None:
        solvers["curvlinops CG (GGNLinearOperator @ v)"] = peer
    reports = {}
    for name, matvec in solvers.items():
        start = time.perf_counter()
        reports[name] = cg(matvec, grad, damping=DAMPING, tol=CG_TOL)
        med[name] = time.perf_counter() - start
        med[f"floor: {name}"] = reports[name].iterations * med["floor: one plain-torch F·v"]
        methods[name] = (matvec, f"floor: {name}")

    print(f"P = {P:,}; KFAC solves of ∇L with float64 factors, λ = {DAMPING}; CG: λ = {DAMPING}, relative "
          f"residual {CG_TOL}, 1 run each; floor of CG = iterations × one plain-torch F·v")
    table = []
    for name, (_, floor) in methods.items():
        if name.startswith("floor"):
            continue
        note = f"{floor} = {med[floor]:.4f} s" if floor else ""
        if name in reports:
            r = reports[name]
            note = f"{r.iterations} it, residual {float(r.residual):.1e}, converged={r.converged}; " + note
        table.append(Row(f"N={N}", name, med[name], med[name] / med[floor] if floor else None, note=note))
    print_table(table, "× floor")


if __name__ == "__main__":
    main()
