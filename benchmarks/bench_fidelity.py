"""One fidelity evaluation (every update rule at one state) and the share of it spent in exact NGD (issue 5).

Cases (digits, the first N = 1024 standardized training samples, categorical likelihood, true Fisher, float32,
damping 1e-2, lr 0.1):

* the reference MLP 64-32-32-10 (P = 3,466): exact NGD by the dense Fisher and Cholesky;
* the MLP 64-1024-1024-10 (P = 1,126,410): exact NGD by CG on the implicit Fisher (relative residual 1e-4 in
  float32), memory budget 3 GiB. Rules whose structure does not fit the budget (dense blocks of a 1M-parameter
  layer, unit-wise blocks, the dense reconstruction) are reported as unavailable, as ``evaluate_fidelity`` records
  them.

"exact NGD" is the assembly of the true Fisher (dense) plus the solve (Cholesky or CG) for the reference update;
the share is that time over the whole evaluation. The per-phase timings come from the Dataset's ``timings``
attribute. The small case is timed ``--repeats`` times (median); the large one once.

    python benchmarks/bench_fidelity.py [--device cpu|cuda] [--repeats 3] [--quick] [--skip-large]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, parse_args  # noqa: E402

from fisherlab.data import load_digits  # noqa: E402
from fisherlab.fidelity import RULES, evaluate_fidelity  # noqa: E402
from fisherlab.models import MLP, reference_mlp  # noqa: E402

N = 1024
DAMPING = 1e-2
EXACT_PHASES = ("exact true Fisher", "exact true solve")
#: Memory budget of the large case (3 GiB): unit-wise blocks of the 1024-wide layer (4.3 GB) are refused.
LARGE_BUDGET = 3 * 2**30


def run(model: torch.nn.Module, batch, rules: list[str], device: torch.device, **kwargs):
    """One evaluation; returns (seconds, Dataset)."""
    start = time.perf_counter()
    ds = evaluate_fidelity(model, batch, rules=rules, damping=DAMPING, lr=0.1, dtype=torch.float32, device=device,
                           progress=False, **kwargs)
    return time.perf_counter() - start, ds


def report(case: str, seconds: list[float], ds) -> dict:
    """One table row, and the phase breakdown printed below the table."""
    timings = json.loads(ds.attrs["timings"])
    exact = sum(timings.get(k, 0.0) for k in EXACT_PHASES)
    total = statistics.median(seconds)
    unavailable = [str(m) for m, a in zip(ds["rule"].values, ds["available"].values, strict=True) if not a]
    solve = "cholesky" if ds.attrs["ngd_solver"] == "cholesky" else f"cg ({int(ds['ngd_iterations'][0])} it)"
    return {"case": case, "P": int(ds.attrs["num_params"]), "rules": f"{int(ds['available'].sum())}/"
            f"{ds.sizes['rule']}", "solver": solve, "total s": f"{total:.2f}", "exact NGD s": f"{exact:.2f}",
            "share": f"{100 * exact / ds.attrs['total_seconds']:.0f}%", "unavailable": ", ".join(unavailable) or "-",
            "_timings": timings}


def print_rows(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if not k.startswith("_")]
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    for line in (keys, *[[str(r[k]) for k in keys] for r in rows]):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    for r in rows:
        phases = sorted(r["_timings"].items(), key=lambda kv: -kv[1])
        print(f"\n   {r['case']}, seconds per rule (shared structures counted where first built):\n     "
              + ", ".join(f"{k.removeprefix('rule ')} {v:.2f}" for k, v in phases if k.startswith("rule ")))
        print("   other phases: " + ", ".join(f"{k} {v:.2f}" for k, v in phases if not k.startswith(("rule ",
                                                                                                     "structure ",
                                                                                                     "reconstruct "))))
    print()


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], add_arguments=lambda parser: parser.add_argument(
        "--skip-large", action="store_true", help="leave out the large case (timed once)"))
    skip_large = args.skip_large
    header("fidelity evaluation: all rules at one state, share of exact NGD", args.device)
    data = load_digits(dtype=torch.float32)
    batch = (data.X_train[:N], data.y_train[:N]) if not args.quick else (data.X_train[:256], data.y_train[:256])
    rules = sorted(RULES)
    print(f"   rules: {', '.join(rules)}\n   N = {len(batch[1])}, damping {DAMPING}, float32\n")
    rows = []
    model = reference_mlp(0)
    run(model, batch, rules, args.device)  # warm-up
    times, ds = [], None
    for _ in range(args.repeats):
        seconds, ds = run(model, batch, rules, args.device)
        times.append(seconds)
    rows.append(report("digits MLP 64-32-32-10", times, ds))
    if not skip_large:
        torch.manual_seed(0)
        large = MLP(64, [1024, 1024], 10, "tanh")
        seconds, ds = run(large, batch, rules, args.device, cg_tol=1e-4, cg_max_iter=500, memory_budget=LARGE_BUDGET)
        rows.append(report("MLP 64-1024-1024-10 (CG)", [seconds], ds))
    print_rows(rows)


if __name__ == "__main__":
    main()
