"""Dry-run overhead of measuring an optimizer's update (copy, step, restore) against one optimizer step (issue 12).

Case: MLP 64-1024-1024-10 tanh (P = 1,126,410), float32, the gradient of a batch of 128 digits. For each optimizer
(state warmed by 3 real steps) the methods are:

* ``step``: one ``optimizer.step()`` with the gradient in ``.grad`` (what the training loop pays anyway);
* ``dry run``: :func:`fisherlab.fidelity.optimizers.dry_run` as :class:`~fisherlab.fidelity.optimizers.OptimizerRule`
  calls it — the parameters swapped for copies in one flat buffer, ``.grad`` set to views of the gradient, the
  state swapped for copies, one real step with the hooks off and the random generators saved, Δθ = θ_after −
  θ_before written to a new vector, the original parameters, gradients, state and generators put back; the
  copies go into buffers kept from one dry run to the next (:class:`~fisherlab.fidelity.optimizers.Scratch`);
* ``dry run, fresh buffers``: the same with new buffers each time and a copy of the gradient (what the scratch
  buffers save: the kernel's page faults and zeroing of each new multi-megabyte buffer, and one copy);
* ``rule``: :meth:`OptimizerRule.update` at a prepared :class:`~fisherlab.fidelity.rules.RuleContext` (the dry run
  plus the binding checks; the gradient already computed);
* ``train step``: ``zero_grad``, forward and backward on the batch, ``step`` — one iteration of a training loop.

Ratios: time / step (the issue's target for the dry run: ≤ 1.5) and dry run / train step, each the median over
rounds of the ratio within a round. A step streams a few P-vectors (SGD reads p and g and writes p; Adam reads p,
g, m, v and writes p, m, v, in several passes); the dry run adds a fixed amount of streaming whatever the
optimizer — θ into the buffer (read + write), Δθ = θ_after − θ_before (two reads, one write), one copy per state
tensor — so the ratio to ``step`` is largest for the cheapest step (plain SGD: about 3 P-vector passes for the step,
at least 5 more for the dry run).

On CPU the benchmark runs single-threaded (as ``bench_reconstruct.py``: on a shared machine spinning threads
drown short elementwise kernels).

    python benchmarks/bench_optimizer_rules.py [--device cpu|cuda] [--repeats 15] [--quick]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, header, parse_args, print_table, rows_from_times, time_methods  # noqa: E402

from fisherlab.data import load_digits  # noqa: E402
from fisherlab.fidelity.optimizers import OptimizerRule, Scratch, dry_run  # noqa: E402
from fisherlab.fidelity.rules import RuleContext  # noqa: E402
from fisherlab.models import MLP  # noqa: E402

BATCH = 128

#: Optimizer name → factory over the parameters (tiny learning rates: the timed steps barely move the model).
OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=1e-6),
    "SGD momentum": lambda p: torch.optim.SGD(p, lr=1e-6, momentum=0.9),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-6),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-6),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=1e-6),
}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_repeats=15)
    if args.device.type == "cpu":
        torch.set_num_threads(1)
    header(f"OptimizerRule dry run vs one optimizer step (MLP 64-1024-1024-10, batch {BATCH}, float32)", args.device)
    torch.manual_seed(0)
    model = MLP(64, [1024, 1024], 10, "tanh").eval().to(args.device)
    data = load_digits(seed=0).to(args.device)
    x, y = data.X_train[:BATCH], data.y_train[:BATCH]
    ctx = RuleContext(model, (x, y), device=args.device)
    grad = ctx.gradient
    spec = ctx.spec
    print(f"   P = {spec.dim:,}; repeats {args.repeats}")
    rows: list[Row] = []
    for name, factory in OPTIMIZERS.items():
        opt = factory(list(model.parameters()))
        for _ in range(3):  # real steps: the state exists
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        rule = OptimizerRule(None, opt)
        state = sum(v.numel() for s in opt.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor) and v.numel() > 1) / spec.dim

        def train_step(opt=opt):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        scratch = Scratch()
        methods = {
            "step": opt.step,
            "dry run": lambda opt=opt, scratch=scratch: dry_run(opt, model, spec, grad, None, scratch=scratch,
                                                                copy_grad=False),
            "dry run, fresh buffers": lambda opt=opt: dry_run(opt, model, spec, grad, None),
            "rule": lambda rule=rule: rule.update(ctx),
            "train step": train_step,
        }
        train_step()  # .grad holds a gradient for the timed plain steps
        times = time_methods(methods, args.device, args.repeats, warmup=2)
        by_step = rows_from_times(name, {k: times[k] for k in ("step", "dry run", "dry run, fresh buffers", "rule")},
                                  times["step"],
                                  notes={"step": f"state: {state:.0f} x P"})
        by_train = statistics.median(d / t for d, t in zip(times["dry run"], times["train step"], strict=True))
        train_row = rows_from_times(name, {"train step": times["train step"]}, times["step"])
        train_row[0].note = f"dry run / train step = {by_train:.2f}"
        rows += by_step + train_row
    print("ratio: time / the optimizer's step (median over rounds of the per-round ratio); target dry run <= 1.5")
    print_table(rows, "x step")


if __name__ == "__main__":
    main()
