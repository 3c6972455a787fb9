"""Exact NGD for several dampings: separate CG solves vs one multi-shift CG vs KFAC-preconditioned CG (issue 13).

Case: the wide MLP 64-1024-1024-10 (tanh, P = 1,126,410) on the first N standardized digits training samples
(default N = 1024), categorical likelihood, true Fisher (implicit: matrix-free F·v with the cached
linearisation), float32, dampings {1e-4, 1e-3, 1e-2, 1e-1}, relative residual 1e-4 of the unpreconditioned
system ‖(F + λI)x − g‖/‖g‖ (every method checked against it with true products). Optionally (``--cnn``) the
same table for a CNN on the 8×8 digits, and (``--gpt``) for :class:`fisherlab.models.GPT` (``GPT_SIZES``
preset ``--gpt-size``, default "1M", ``output="sequence"``: a next-token loss at every position) on
``--gpt-n`` sequences of :func:`fisherlab.data.make_sort_lm` (length 2·``--gpt-length`` tokens, 64 values:
V = 65), as ``bench_transformer.py`` builds it. There m = N·T·(C − 1) rows (T = 64: 32,768 at N = 8, K alone
8.6 GB float64, each Cholesky m³/3 ≈ 12 TFLOP), so ``gram`` is left out, and the KFAC preconditioner is that of
the Monte-Carlo Fisher (one draw per token: the true Fisher's KFAC pulls T·(C − 1) = 4096 output rows per
sequence back through every layer, 368 s for N = 8 on 2 cores).

Methods (all through :func:`fisherlab.ngd.solve_ngd_all`):

* ``separate cg`` — one CG solve per damping (the reference, today's exact NGD);
* ``multishift`` — one multi-shift CG for all four dampings;
* ``gram`` — the sample-space solve (:mod:`fisherlab.gram`): K = UUᵀ from per-layer rows, one float64 Cholesky
  of K + λI per damping, one F·v product per damping for the residual check (what ``auto`` takes here);
* ``pcg-kfac`` — CG preconditioned by KFAC at each damping, summed over the dampings; the KFAC (built once, as
  the ``kfac`` rule of an evaluation builds it) is not in the solve time; its build time is printed in the note.
  Each damping's damped factors are factorised once (``KFACFisher.damped_factors``, in the solve time) and
  every preconditioner application only applies them.

Products are the F·v products (block columns counted) including the final residual checks; they are
deterministic. Seconds: medians over ``--repeats`` interleaved rounds after ``--warmup`` untimed rounds (default
1; ``_common.time_methods``), each case's first F·v product (which records the kept linearisation) made before;
ratios to ``separate cg`` are medians of the within-round ratios.

    python benchmarks/bench_exact_ngd.py [--device cpu|cuda] [--repeats 3] [--warmup 1] [--quick] [--n 1024]
        [--no-mlp] [--cnn] [--gpt [--gpt-size 1M] [--gpt-n 32] [--gpt-length 32]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, parse_args, time_methods  # noqa: E402

from fisherlab import structures  # noqa: E402
from fisherlab.data import load_digits, make_sort_lm  # noqa: E402
from fisherlab.engine import FisherEngine  # noqa: E402
from fisherlab.models import CNN, GPT, GPT_SIZES, MLP  # noqa: E402
from fisherlab.ngd import solve_ngd_all  # noqa: E402

DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)
TOL = 1e-4
MAX_ITER = 2000
BUDGET = 3 * 2**30
METHODS = (("separate cg", "cg"), ("multishift", "multishift"), ("pcg-kfac", "pcg-kfac"), ("gram", "gram"))


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=1024, help="samples of the batch (default 1024; quick: ≤ 256)")
    parser.add_argument("--mlp", action=argparse.BooleanOptionalAction, default=True,
                        help="the MLP case (default: on; --no-mlp for the other cases alone)")
    parser.add_argument("--cnn", action="store_true", help="also the CNN (32, 64) on the 8×8 digits")
    parser.add_argument("--gpt", action="store_true", help="also the GPT (output='sequence') on make_sort_lm")
    parser.add_argument("--gpt-size", default="1M", choices=sorted(GPT_SIZES), help="GPT_SIZES preset (default 1M)")
    parser.add_argument("--gpt-n", type=int, default=32, help="GPT sequences (default 32)")
    parser.add_argument("--gpt-length", type=int, default=32, help="half the GPT's tokens per sequence (default 32)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones (default 1)")


def bench_case(name: str, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
               repeats: int, warmup: int, *, budget: int | None = BUDGET, gram: bool = True,
               kfac_kind: str = "true") -> None:
    """Print the table of one case (``gram``: with the sample-space solve; ``kfac_kind``: the preconditioner's)."""
    engine = FisherEngine(model, batch, "categorical", dtype=torch.float32, device=device, memory_budget=budget,
                          progress=False)
    g = engine.loss_and_gradient()[1]
    implicit = structures.build("implicit", engine)
    implicit.matvec(g)  # records the kept linearisation, outside every method's time
    start = time.perf_counter()
    kfac = structures.build("kfac", engine if kfac_kind == "true" else FisherEngine(
        model, batch, "categorical", kind=kfac_kind, seed=0, dtype=torch.float32, device=device,
        memory_budget=budget, progress=False))
    kfac_seconds = time.perf_counter() - start
    last: dict[str, dict] = {}

    def method(solver: str, **kw):
        def run():
            last[solver] = solve_ngd_all(engine, g, DAMPINGS, solver=solver, fisher=implicit, cg_tol=TOL,
                                         cg_max_iter=MAX_ITER, **kw)
        return run

    chosen = [(label, solver) for label, solver in METHODS if gram or solver != "gram"]
    methods = {label: method(solver, preconditioner=kfac) if solver == "pcg-kfac" else method(solver)
               for label, solver in chosen}
    times = time_methods(methods, device, repeats, warmup)
    ref_products = sum(info.products for _, info in last["cg"].values())
    print(f"-- {name}: P = {engine.spec.dim:,}, N = {engine.num_samples}, dampings {list(DAMPINGS)}, "
          f"tol {TOL:g}, float32, {repeats} round(s)")
    head = ("method", "products", "x products", "median s", "x time", "max residual", "iterations per damping")
    rows = []
    for label, solver in chosen:
        infos = [info for _, info in last[solver].values()]
        products = infos[0].products if solver == "multishift" else sum(i.products for i in infos)
        ratio = statistics.median(t / r for t, r in zip(times[label], times["separate cg"], strict=True))
        note = " ".join(f"{i.iterations}" for i in infos)
        if not all(i.converged for i in infos):
            note += " (NOT converged)"
        rows.append((label, str(products), f"{products / ref_products:.2f}", f"{statistics.median(times[label]):.2f}",
                     f"{ratio:.2f}", f"{max(i.residual for i in infos):.1e}", note))
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
    for line in (head, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    print(f"   KFAC ({kfac_kind} Fisher) build (shared with the kfac rule, not in pcg-kfac's time): "
          f"{kfac_seconds:.2f} s"
          + ("" if gram else f"; gram left out (m = N·T·(C − 1) = {engine.num_samples * engine.rows_per_sample:,})")
          + "\n")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_repeats=3, add_arguments=_options)
    n, cnn, rounds = args.n, args.cnn, (args.repeats, args.warmup)
    header("exact NGD for 4 dampings: separate CG, multi-shift CG, KFAC-preconditioned CG", args.device)
    data = load_digits(dtype=torch.float32)
    if args.quick:
        n = min(n, 256)
    batch = (data.X_train[:n], data.y_train[:n])
    torch.manual_seed(0)
    if args.mlp:
        bench_case("MLP 64-1024-1024-10", MLP(64, [1024, 1024], 10, "tanh"), batch, args.device, *rounds)
    if cnn:
        torch.manual_seed(0)
        images = (batch[0].reshape(-1, 1, 8, 8), batch[1])
        bench_case("CNN (32, 64) on 8x8 digits", CNN((1, 8, 8), 10, channels=(32, 64)), images, args.device,
                   *rounds)
    if args.gpt:
        torch.manual_seed(0)
        lm = make_sort_lm(n_samples=2 * args.gpt_n, length=args.gpt_length, n_values=64, seed=0,
                          test_fraction=0.25)
        X = lm.X_train[: args.gpt_n]
        y = torch.cat([X[:, 1:], lm.y_train[: args.gpt_n, -1:]], dim=1)  # the next token at every position
        model = GPT(65, X.shape[1], output="sequence", **GPT_SIZES[args.gpt_size]).eval()
        bench_case(f"GPT {args.gpt_size} (output='sequence'), N = {args.gpt_n}, T = {X.shape[1]}", model, (X, y),
                   args.device, *rounds, budget=None, gram=False, kfac_kind="mc")


if __name__ == "__main__":
    main()
