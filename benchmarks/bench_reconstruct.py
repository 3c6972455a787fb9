"""Time per training step of SNGD (GD on a reconstructed network) against SGD and KFAC-NGD (issue 4, Performance).

Cases (float32, batch 128, the true Fisher, λ = 1e-3):

* MLP 64-1024-1024-10 tanh (P = 1,126,410) on the flat digits;
* CNN Conv2d 1→32→64 (3×3, average pooling) + Linear on the 8×8 digit images (P = 21,386).

Each method runs ``fisherlab.train.train`` for ``steps`` updates (evaluation excluded from the clock), and the
per-step wall times come from its ``time`` record. Methods: ``sgd``; ``sngd`` (structure ``kfac``, layer form,
``fold="auto"``) refreshed every 10 and every 100 steps — its step 0 builds the reconstructed network, which
counts as a refresh; ``kfac-ngd`` with factors (and their damped inverses) recomputed every 10 and every 100
steps, preconditioning each Linear layer from its output-gradient and input rows when that is cheaper
(``kfac_precondition="auto"``, the ratio column) or always from the gradient matrix (``"dense"``, the usual K-FAC
form, the last column); and ``sngd`` with ``fold="never"`` (the paper's form: every root applied to activations).
Reported for the wall clock and for the process's CPU time (all threads; on a shared machine the wall clock mostly
measures the other processes), median over ``--repeats`` round-robin repetitions after one warm-up run of each:

* ``step``: median wall time of the steps without a refresh;
* ``amortised``: total time / steps, refreshes included;
* ratios: SNGD between refreshes / SGD (target ≤ 1.5) and SNGD amortised / KFAC-NGD amortised at the same
  refresh period (target ≤ 1).

On CPU the benchmark runs single-threaded: on a shared machine two intra-op threads spin against the other
processes and single steps slow down by up to 100×, whatever the method, which drowns every ratio.

    python benchmarks/bench_reconstruct.py [--device cpu|cuda] [--repeats 3] [--quick]
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, parse_args  # noqa: E402

from fisherlab.data import SplitData, load_digits  # noqa: E402
from fisherlab.models import CNN, MLP  # noqa: E402
from fisherlab.reconstruction import reconstruct  # noqa: E402
from fisherlab.train import train  # noqa: E402

BATCH = 128
DAMPING = 1e-3
ROOT_RANK = 64  # reconstruct's default

#: Run name → keyword arguments of fisherlab.train.
CONFIGS: dict[str, dict[str, Any]] = {
    "sgd": {"rule": "sgd"},
    "sngd/10": {"rule": "sngd", "structure": "kfac", "refresh_every": 10},
    "sngd/100": {"rule": "sngd", "structure": "kfac", "refresh_every": 100},
    "kfac-ngd/10": {"rule": "kfac-ngd", "refresh_every": 10},
    "kfac-ngd/100": {"rule": "kfac-ngd", "refresh_every": 100},
    "kfac-ngd/10 dense": {"rule": "kfac-ngd", "refresh_every": 10, "kfac_precondition": "dense"},
    "kfac-ngd/100 dense": {"rule": "kfac-ngd", "refresh_every": 100, "kfac_precondition": "dense"},
    "sngd/10 cholesky": {"rule": "sngd", "structure": "kfac", "refresh_every": 10, "sqrt": "cholesky"},
    "sngd/100 cholesky": {"rule": "sngd", "structure": "kfac", "refresh_every": 100, "sqrt": "cholesky"},
    "sngd/10 lowrank": {"rule": "sngd", "structure": "kfac", "refresh_every": 10, "sqrt": "lowrank"},
    "sngd/100 lowrank": {"rule": "sngd", "structure": "kfac", "refresh_every": 100, "sqrt": "lowrank"},
    "sngd/100 fold=never": {"rule": "sngd", "structure": "kfac", "refresh_every": 100, "fold": "never"},
}


@dataclass
class Case:
    """A model and its data."""

    name: str
    model: torch.nn.Module
    data: SplitData
    stats: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)


def cases(device: torch.device) -> list[Case]:
    torch.manual_seed(0)
    mlp = MLP(64, [1024, 1024], 10, "tanh").eval()
    cnn = CNN((1, 8, 8), 10, channels=(32, 64)).eval()
    return [Case("MLP 64-1024-1024-10", mlp, load_digits(seed=0).to(device)),
            Case("CNN 1-32-64 (8x8)", cnn, load_digits(seed=0, layout="image").to(device))]


def run(case: Case, name: str, steps: int, device: torch.device) -> Any:
    """``fisherlab.train`` of one configuration (evaluation only at the start and the end)."""
    return train(case.model, case.data, lr=1e-4, steps=steps, batch_size=BATCH, eval_every=steps, damping=DAMPING,
                 device=device, **CONFIGS[name])


def step_flops(case: Case, name: str, device: torch.device) -> float:
    """Floating-point operations of one step without a refresh (torch's FlopCounterMode: matmuls, convolutions).

    The difference between runs of 2 and 1 steps: both build (or refresh) at step 0 and evaluate twice.
    """
    counts = []
    for steps in (1, 2):
        with FlopCounterMode(display=False) as counter:
            run(case, name, steps, device)
        counts.append(counter.get_total_flops())
    return float(counts[1] - counts[0])


def step_agreement(case: Case, device: torch.device) -> list[tuple[str, float, float]]:
    """(sqrt, cosine, relative error) of the mapped-back GD step of each root method against eigh's, on one batch."""
    batch = (case.data.X_train[:BATCH], case.data.y_train[:BATCH])
    model = case.model.to(device)
    reference = reconstruct(model, batch, damping=DAMPING).gd_update(batch, 1.0).double()
    out = []
    for sqrt in ("cholesky", "lowrank"):
        step = reconstruct(model, batch, damping=DAMPING, sqrt=sqrt, root_rank=ROOT_RANK).gd_update(batch, 1.0).double()
        cos = float(step @ reference / (step.norm() * reference.norm()))
        out.append((sqrt, cos, float((step - reference).norm() / reference.norm())))
    return out


def measure(case: Case, name: str, steps: int, device: torch.device) -> dict[str, float]:
    """One run: median step without refresh and total time per step, in wall-clock and in CPU seconds."""
    ds = run(case, name, steps, device)
    plain = ds.refresh.values[:-1] == 0
    out = {}
    for var, label in (("time", "wall"), ("cpu_time", "cpu")):
        dt = np.diff(ds[var].values)
        out[f"{label} step"] = float(np.median(dt[plain])) if plain.any() else float("nan")
        out[f"{label} amortised"] = float(ds[var][-1]) / steps
    return out


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    if args.device.type == "cpu":
        torch.set_num_threads(1)  # see the module docstring
    steps = 20 if args.quick else 100
    header(f"SNGD step time vs SGD and KFAC-NGD (batch {BATCH}, {steps} steps per run, float32)", args.device)
    all_cases = cases(args.device)
    for case in all_cases:
        print(f"   {case.name}: P = {sum(p.numel() for p in case.model.parameters()):,}")
        for name in CONFIGS:  # warm-up, and the arithmetic of a step
            measure(case, name, 11, args.device)
            case.flops[name] = step_flops(case, name, args.device)
    for _ in range(args.repeats):
        for case in all_cases:
            for name in CONFIGS:
                for key, value in measure(case, name, steps, args.device).items():
                    case.stats.setdefault(name, {}).setdefault(key, []).append(value)
    print("ms per step, median over repeats. step: steps without a refresh; amortised: refreshes included.")
    print("targets: SNGD step / SGD step ≤ 1.5; SNGD amortised / KFAC-NGD amortised (same period) ≤ 1.")
    print("FLOP/SGD: floating-point operations of a step without refresh (torch FlopCounterMode) / SGD's.")
    for clock in ("wall", "cpu"):
        print(f"-- {clock} clock")
        print(f"{'case':<20} {'run':<20} {'step ms':>9} {'amortised ms':>13} {'step/SGD':>9} {'FLOP/SGD':>9} "
              f"{'amort./KFAC-NGD':>16} {'(dense form)':>13}")
        for case in all_cases:
            med = {n: {k: statistics.median(v) for k, v in st.items()} for n, st in case.stats.items()}
            sgd = med["sgd"][f"{clock} step"]
            for name in CONFIGS:
                step, amortised = med[name][f"{clock} step"], med[name][f"{clock} amortised"]
                vs_kfac = vs_dense = ""
                if name.startswith("sngd") and "fold" not in name:
                    period = name.split("/")[1].split()[0]
                    vs_kfac = f"{amortised / med['kfac-ngd/' + period][f'{clock} amortised']:.2f}"
                    vs_dense = f"{amortised / med[f'kfac-ngd/{period} dense'][f'{clock} amortised']:.2f}"
                print(f"{case.name:<20} {name:<20} {1e3 * step:>9.2f} {1e3 * amortised:>13.2f} {step / sgd:>9.2f} "
                      f"{case.flops[name] / case.flops['sgd']:>9.2f} {vs_kfac:>16} {vs_dense:>13}")
        print()
    print("The step each root method takes at initialisation against the KFAC step with exact (eigh) roots, on one")
    print(f"batch of {BATCH} (lowrank: rank {ROOT_RANK}):")
    print(f"{'case':<20} {'sqrt':<10} {'cosine':>8} {'rel. error':>11}")
    for case in all_cases:
        for sqrt, cos, err in step_agreement(case, args.device):
            print(f"{case.name:<20} {sqrt:<10} {cos:>8.4f} {err:>11.2e}")


if __name__ == "__main__":
    main()
