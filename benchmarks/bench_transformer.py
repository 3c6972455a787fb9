"""Gradient, F·v and KFAC factors on the GPT at ~1M and ~10M parameters, against curvlinops (issue 11, Performance).

Case: :class:`fisherlab.models.GPT` with ``GPT_SIZES["1M"]`` / ``["10M"]`` and ``output="sequence"`` (logits
(N, T, C) at every position, loss the mean over tokens), on N = 32 sequences of T = 64 tokens over V = 65 symbols
(:func:`fisherlab.data.make_sort_lm` with 32 values per prompt and 64 distinct values, so V = S = 64 + 1, 64 as
in the docstring of ``GPT_SIZES``), categorical likelihood, float32. The targets are the next token at *every*
position (the prompt's −100 replaced by its next tokens), so every token counts: curvlinops' KFAC divides by
N·T, not by the counted tokens. Timed, round-robin after one warm-up (:func:`_common.time_methods`, medians, and
the ratio of each method to its reference within each round):

* **gradient** — ``FisherEngine.loss_and_gradient`` (fisherlab), curvlinops' ``gradient_and_loss`` and plain
  torch (forward + ``torch.autograd.grad`` of the loss).
* **F·v** — the true Fisher (= the GGN for softmax cross-entropy) times a vector: ``ImplicitFisher @ v``
  (fisherlab; the engine's ``matmat`` on the linearization kept by the first product: the output states and, where
  they fit, the recorded forward graphs, so a product is one ``jvp`` and a reverse pass through the kept graph), the
  first product of a new operator (engine construction, and the graphs recorded apart from the ``jvp``: 6F), and
  curvlinops' ``GGNLinearOperator @ v`` (a ``jvp``, then a ``vjp`` with its own forward: 6F).
* **KFAC factors** — ``KFACFisher.from_engine`` with ``approx="expand"`` and ``"reduce"``, for the empirical
  and the Monte-Carlo (1 label per token) kinds, against ``KFACLinearOperator(kfac_approx=…, fisher_type=…)
  .compute_kronecker_factors()`` (weight and bias in one factor per layer, as fisherlab). curvlinops covers only
  the Linear layers (its KFAC refuses Embedding and LayerNorm parameters), fisherlab every parameter: the
  Embedding factors and the LayerNorms' exact blocks are included in its time. The true Fisher's KFAC needs
  T·(C − 1) = 4096 output rows per sequence here (docs/sequences.md), curvlinops' type-2 C = 65 with the class
  index shared across the tokens (a different matrix, docs/method.md): neither is timed at these sizes.

Attention kernels: the passes that one plain reverse pass differentiates — fisherlab's gradient and its KFAC layer
rows with one row per sample (empirical, mc with one label), plain torch, curvlinops' gradient and KFAC — run on
torch's default CPU kernel (flash attention); the products on the math SDPA backend (fisherlab's
``differentiable_attention``, and around curvlinops' GGN product: forward-mode AD, which the flash kernel lacks).

Checks in the same run, relative differences ‖a − b‖/‖b‖ (curvlinops as b): the gradient; F·v on the same v (and
once more with the −100 prompt mask, where only the GGN can be compared); the empirical KFAC factors A and S of
every Linear layer (stacked); the Monte-Carlo A (its S depends on the drawn labels).

Floors: the FLOPs of the arithmetic divided by the machine's GEMM rate, measured in the same rounds by a
``torch.matmul`` of the model's MLP shape (N·T × d) @ (d × 4d). With P_lin the weights of the Linear layers
(embeddings do no arithmetic), one forward costs F = 2·P_lin·N·T + 4·N·T²·d·L FLOPs (the matmuls, and QKᵀ and
A·V over all T² pairs, as the math SDPA backend computes them); a reverse pass 2F (input and weight gradients);
the tangent pass of a jvp 2F. So gradient ≥ 3F, F·v ≥ 4F (tangent + reverse; a jvp evaluates the primal too,
+F, in fisherlab's product on the kept graph as in curvlinops', which also records a forward of its own: +F),
KFAC factors ≥ 3F + the Gram products (2·N·T·(width² + out²) per
layer under "expand", 2·N·(…) under "reduce"). Softmax, GELU, LayerNorm and the loss are not counted.

``--parts fidelity`` (default: ``products,fidelity``): the fidelity evaluation of issue 13 on the first size —
one :func:`fisherlab.evaluate_fidelity` of the same GPT (``output="sequence"``, the same batch and targets), every
rule of the fidelity table (:data:`FIDELITY_RULES`) but those whose dense objects exceed the memory
(:func:`too_large`, printed), dampings {1e-4, 1e-3, 1e-2, 1e-1}, exact NGD to the relative residual 1e-4 (``auto``:
CG on the implicit true Fisher preconditioned per damping by the ``lowrank`` rule's Nyström sketch, built first
and shared with the rule; multi-shift CG for the four dampings without that rule), float32 — timed end to end (wall
and CPU seconds, load before and after), with the split by rule and phase from the Dataset's ``timings`` attribute, the
exact solve's products, and its iterations and relative residual per damping. The structures built from layer rows
(KFAC expand and reduce, EKFAC, the diagonal, unit-wise; their ``sngd-*``) are of the Monte-Carlo Fisher here
(``structure_kind="auto"``: the true Fisher has T·(C − 1) = 4096 output rows a sequence, docs/sequences.md; the
Dataset's ``rule_kinds`` says which, printed). Every further size of ``--sizes`` gets a projection
(:func:`project_fidelity`): one F·v product there, timed, beside its FLOP floor 4F, times the products the first
size's solve took.

When curvlinops imports (the peers venv, benchmarks/README.md) it runs in the same rounds; without it the
tables show fisherlab against plain torch and the floors.

    python benchmarks/bench_transformer.py [--sizes 1M,10M] [--device cpu|cuda] [--repeats 3] [--quick]
        [--parts products,fidelity] [--kfac-kinds empirical,mc]

``--quick``: the "10k" GPT on 8 sequences of 12 tokens (a smoke run: seconds for the products; the fidelity part takes
minutes, most of them the dense reconstruction of ``sngd-dense`` at P = 10,361: 385 s at load 4.5).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/README.md (spinning threads on a shared CPU)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, header, optional_import, parse_args, print_table, rel_diff, time_methods  # noqa: E402

from fisherlab import evaluate_fidelity, fisher  # noqa: E402
from fisherlab.data import make_sort_lm  # noqa: E402
from fisherlab.engine import FisherEngine, differentiable_attention  # noqa: E402
from fisherlab.memory import resolve_budget  # noqa: E402
from fisherlab.models import GPT, GPT_SIZES  # noqa: E402
from fisherlab.structures.kfac import KFACFisher  # noqa: E402

APPROXES = ("expand", "reduce")
KINDS = ("empirical", "mc")  # one output row per sequence (empirical) or per token draw (mc); see the docstring


# ------------------------------------------------------------------------------------------------ the case
def lm_batch(n: int, length: int, n_values: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids X (n, 2·length), next-token targets at every position, and the targets with the prompt masked.

    From :func:`make_sort_lm` (vocabulary n_values + 1): its targets carry −100 on the prompt; the unmasked
    targets put the prompt's own next tokens there.
    """
    data = make_sort_lm(n_samples=2 * n, length=length, n_values=n_values, seed=0, test_fraction=0.25)
    X, y_masked = data.X_train[:n].to(device), data.y_train[:n].to(device)
    y = torch.cat([X[:, 1:], y_masked[:, -1:]], dim=1)
    return X, y, y_masked


class ClassesSecond(nn.Module):
    """The model with logits (N, C, T): the layout ``nn.CrossEntropyLoss`` and curvlinops take (same parameters)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).transpose(1, 2)


def linear_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's Linear layers (curvlinops' KFAC refuses the others)."""
    return [p for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()]


# ------------------------------------------------------------------------------------------------ floors
def forward_flops(model: GPT, n: int, t: int) -> float:
    """F = 2·P_lin·N·T + 4·N·T²·d·L (module docstring)."""
    p_lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    d, layers = model.embed.embedding_dim, len(model.blocks)
    return 2.0 * p_lin * n * t + 4.0 * n * t * t * d * layers


def gram_flops(model: GPT, n: int, t: int, approx: str) -> float:
    """2·rows·(width² + out²) summed over the Linear layers (width with the bias column); rows N·T or N."""
    rows = n * t if approx == "expand" else n
    return sum(2.0 * rows * ((m.in_features + 1) ** 2 + m.out_features ** 2)
               for m in model.modules() if isinstance(m, nn.Linear))


def gemm_probe(model: GPT, n: int, t: int, device: torch.device) -> tuple[Callable[[], Tensor], float]:
    """A matmul of the MLP's shape (N·T × d) @ (d × 4d) and its FLOPs."""
    fc = model.blocks[0].mlp.fc
    a = torch.randn(n * t, fc.in_features, device=device)
    b = torch.randn(fc.in_features, fc.out_features, device=device)
    return (lambda: a @ b), 2.0 * a.shape[0] * a.shape[1] * b.shape[1]


def plain_gradient(model: nn.Module, X: Tensor, y: Tensor) -> Callable[[], tuple[Tensor, ...]]:
    """Plain torch: the token-mean cross-entropy and its gradient (forward + one reverse pass)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def run() -> tuple[Tensor, ...]:
        z = model(X)
        return torch.autograd.grad(nn.functional.cross_entropy(z.flatten(0, 1), y.flatten()), params)

    return run


# ------------------------------------------------------------------------------------------------ fisherlab
def engine(model: nn.Module, X: Tensor, y: Tensor, kind: str) -> FisherEngine:
    return FisherEngine(model, (X, y), "categorical", kind=kind, dtype=torch.float32, device=X.device,
                        progress=False)


def implicit(model: nn.Module, X: Tensor, y: Tensor) -> Any:
    return fisher(model, (X, y), "categorical", kind="true", structure="implicit", dtype=torch.float32,
                  device=X.device, progress=False)


def stacked_factors(factors: dict[str, tuple[Tensor, Tensor]], which: int) -> Tensor:
    """Factor ``which`` (0: A, 1: S) of every layer, flattened and concatenated (layers in sorted order)."""
    return torch.cat([factors[k][which].reshape(-1) for k in sorted(factors)])


def fisherlab_linear_factors(K: KFACFisher, model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """fisherlab's (A, S) of the model's Linear layers, keyed by module path."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {n: (K.factors[n].A, K.factors[n].S) for n in names}


# ------------------------------------------------------------------------------------------------ curvlinops
class Peer:
    """curvlinops' operators on the same model and batch (None members when curvlinops does not import)."""

    def __init__(self, model: nn.Module, X: Tensor, y: Tensor, y_masked: Tensor):
        self.lib = optional_import("curvlinops")
        self.wrapped = ClassesSecond(model)
        self.X, self.y, self.y_masked = X, y, y_masked

    @property
    def available(self) -> bool:
        return self.lib is not None

    def ggn(self, y: Tensor) -> Any:
        params = [p for p in self.wrapped.parameters() if p.requires_grad]
        return self.lib.GGNLinearOperator(self.wrapped, nn.CrossEntropyLoss(), params, [(self.X, y)],
                                          check_deterministic=False)

    def kfac(self, kind: str, approx: str) -> Any:
        return self.lib.KFACLinearOperator(self.wrapped, nn.CrossEntropyLoss(), linear_params(self.wrapped),
                                           [(self.X, self.y)], fisher_type=kind, kfac_approx=approx,
                                           check_deterministic=False, separate_weight_and_bias=False)

    @staticmethod
    def factors(op: Any) -> dict[str, tuple[Tensor, Tensor]]:
        """curvlinops' (A, S) per Linear layer, keyed by the path in the unwrapped model."""
        return {k.removeprefix("model."): (op._input_covariances[k], op._gradient_covariances[k])
                for k in op._input_covariances}


def with_math_sdpa(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` under fisherlab's differentiable attention (math SDPA): curvlinops' GGN product needs it (forward-mode
    AD; the default CPU flash kernel has none). Its gradient and KFAC run on torch's default backend."""
    def run() -> Any:
        with differentiable_attention():
            return fn()

    return run


# ------------------------------------------------------------------------------------------------ one size
def bench_size(size: str, n: int, length: int, n_values: int, args: argparse.Namespace) -> tuple[list[Row], dict]:
    device = args.device
    torch.manual_seed(0)
    X, y, y_masked = lm_batch(n, length, n_values, device)
    T, V = X.shape[1], n_values + 1
    model = GPT(V, T, output="sequence", **GPT_SIZES[size]).to(device).eval()
    P = sum(p.numel() for p in model.parameters())
    case = f"GPT {size} P={P:,} N={n} T={T}"
    engines = {kind: engine(model, X, y, kind) for kind in ("true", *args.kfac_kinds)}
    F = implicit(model, X, y)
    v = torch.randn(P, device=device)
    fv = F @ v
    _, grad = engines["true"].loss_and_gradient()
    peer = Peer(model, X, y, y_masked)

    gemm, gemm_flops = gemm_probe(model, n, T, device)
    methods: dict[str, Callable[[], Any]] = {
        "GEMM probe (N·T × d) @ (d × 4d)": gemm,
        "plain torch forward (no_grad)": lambda: _no_grad(model, X),
        "plain torch gradient": plain_gradient(model, X, y),
        "fisherlab gradient (engine.loss_and_gradient)": engines["true"].loss_and_gradient,
        "fisherlab F @ v (implicit, cached linearization)": lambda: F @ v,
        "fisherlab first F @ v (build + @ v)": lambda: implicit(model, X, y) @ v,
    }
    for approx in APPROXES:
        for kind in args.kfac_kinds:
            methods[f"fisherlab KFAC {approx} {kind}"] = (
                lambda approx=approx, kind=kind: KFACFisher.from_engine(engines[kind], approx=approx))
    checks: dict[str, str] = {}
    if peer.available:
        ggn = peer.ggn(y)
        methods["curvlinops gradient_and_loss"] = ggn.gradient_and_loss
        methods["curvlinops GGN @ v"] = with_math_sdpa(lambda: ggn @ v)
        g_peer = torch.cat([g.reshape(-1) for g in ggn.gradient_and_loss()[0]])
        checks["curvlinops gradient_and_loss"] = f"rel. diff of ∇L to fisherlab {rel_diff(grad, g_peer):.1e}"
        checks["curvlinops GGN @ v"] = f"rel. diff of F·v {rel_diff(fv, with_math_sdpa(lambda: ggn @ v)()):.1e}"
        masked = peer.ggn(y_masked)
        fv_masked = implicit(model, X, y_masked) @ v
        checks["curvlinops GGN @ v"] += (f"; with the prompt masked (−100) "
                                         f"{rel_diff(fv_masked, with_math_sdpa(lambda: masked @ v)()):.1e}")
        for approx in APPROXES:
            for kind in args.kfac_kinds:
                op = peer.kfac(kind, approx)
                name = f"curvlinops KFAC {approx} {kind}"
                methods[name] = op.compute_kronecker_factors
                methods[name]()
                theirs = Peer.factors(op)
                mine = fisherlab_linear_factors(KFACFisher.from_engine(engines[kind], approx=approx), model)
                diff = f"A {rel_diff(stacked_factors(mine, 0), stacked_factors(theirs, 0)):.1e}"
                if kind == "empirical":
                    diff += f", S {rel_diff(stacked_factors(mine, 1), stacked_factors(theirs, 1)):.1e}"
                checks[name] = f"rel. diff of {diff} ({len(theirs)} Linear layers)"

    times = time_methods(methods, device, args.repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rate = gemm_flops / med["GEMM probe (N·T × d) @ (d × 4d)"]
    fwd = forward_flops(model, n, T)
    floors = {"gradient": 3 * fwd, "F·v": 4 * fwd,
              **{f"KFAC {a}": 3 * fwd + gram_flops(model, n, T, a) for a in APPROXES}}
    info = {"P": P, "rate": rate, "forward_flops": fwd, "floors": {k: f / rate for k, f in floors.items()}}

    def row(group: str, name: str, reference: str | None, floor: str | None) -> Row:
        ratio, notes = None, []
        if reference is not None and reference in times:
            rounds = [a / b for a, b in zip(times[name], times[reference], strict=True)]
            ratio = statistics.median(rounds)
            notes.append(f"rounds {min(rounds):.2f}–{max(rounds):.2f}")
        if floor is not None:
            notes.append(f"{med[name] / info['floors'][floor]:.1f}× FLOP floor")
        if name in checks:
            notes.append(checks[name])
        return Row(f"{case} {group}", name, med[name], ratio, note="; ".join(notes))

    peer_ref = "curvlinops gradient_and_loss" if peer.available else "plain torch gradient"
    rows = [row("gradient", "plain torch gradient", peer_ref if peer.available else None, "gradient"),
            row("gradient", "fisherlab gradient (engine.loss_and_gradient)", peer_ref, "gradient")]
    if peer.available:
        rows.append(row("gradient", "curvlinops gradient_and_loss", None, "gradient"))
    fv_ref = "curvlinops GGN @ v" if peer.available else None
    rows += [row("F·v", "fisherlab F @ v (implicit, cached linearization)", fv_ref, "F·v"),
             row("F·v", "fisherlab first F @ v (build + @ v)", fv_ref, "F·v")]
    if peer.available:
        rows.append(row("F·v", "curvlinops GGN @ v", None, "F·v"))
    for approx in APPROXES:
        for kind in args.kfac_kinds:
            ref = f"curvlinops KFAC {approx} {kind}"
            rows.append(row(f"KFAC {approx}", f"fisherlab KFAC {approx} {kind}", ref if peer.available else None,
                            f"KFAC {approx}"))
            if peer.available:
                rows.append(row(f"KFAC {approx}", ref, None, f"KFAC {approx}"))
    rows.append(row("probe", "plain torch forward (no_grad)", None, None))
    rows[-1].note = f"{fwd / med['plain torch forward (no_grad)'] / 1e9:.1f} GFLOP/s on F"
    rows.append(row("probe", "GEMM probe (N·T × d) @ (d × 4d)", None, None))
    rows[-1].note = f"{rate / 1e9:.1f} GFLOP/s"
    return rows, info


def _no_grad(model: nn.Module, X: Tensor) -> Tensor:
    with torch.no_grad():
        return model(X)


# ------------------------------------------------------------------------------------------------ fidelity
#: The fidelity part's rules: every rule of the fidelity table (docs/fidelity.md; the optimizers aside), ``kfac`` by
#: its name ``kfac-expand`` (one structure). :func:`too_large` leaves out those whose objects exceed the memory.
FIDELITY_RULES = ("gd", "adam", "ngd", "block-ngd", "kfac-expand", "kfac-reduce", "ekfac", "ekfac-reduce", "unit",
                  "diag", "lowrank", "empirical-ngd", "mc-ngd", "sngd-dense", "sngd-block", "sngd-diag", "sngd-kfac",
                  "sngd-input", "sngd-ekfac", "sngd-unit", "sngd-kfac-lowrank")
FIDELITY_DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)
FIDELITY_TOL = 1e-4


def too_large(model: nn.Module, P: int, budget: int) -> dict[str, str]:
    """Rules whose dense objects exceed ``budget`` bytes (float32), with the bytes: their structures' own checks.

    Left out before the evaluation, so that the table says what each would need: the dense F (``sngd-dense``: 4 P×P
    copies of a Cholesky solve), the layer blocks Σ_l P_l² (``block-ngd``, ``sngd-block``), the unit-wise blocks Σ
    out·width² (``unit``, ``sngd-unit``) and the rank-256 Nyström sketch 3·P·256 (``lowrank``).
    """
    def fmt(n: float) -> str:
        return f"{n / 2**30:.1f} GiB"

    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    block = sum(sum(p.numel() for p in m.parameters()) ** 2 for m in layers)
    unit = sum(m.out_features * (m.in_features + 1) ** 2 if isinstance(m, nn.Linear)
               else m.embedding_dim * m.num_embeddings ** 2 for m in layers)
    need = {"sngd-dense": 4 * P * P, "block-ngd": block, "sngd-block": block, "unit": unit, "sngd-unit": unit,
            "lowrank": 3 * P * 256}
    return {rule: f"needs {fmt(4 * n)} > budget {fmt(budget)}" for rule, n in need.items() if 4 * n > budget}


def bench_fidelity(size: str, n: int, length: int, n_values: int, args: argparse.Namespace) -> dict[str, float]:
    """One evaluate_fidelity in the issue-13 setting (module docstring), timed; returns its product counts."""
    torch.manual_seed(0)
    X, y, _ = lm_batch(n, length, n_values, args.device)
    T, V = X.shape[1], n_values + 1
    model = GPT(V, T, output="sequence", **GPT_SIZES[size]).to(args.device).eval()
    P = sum(p.numel() for p in model.parameters())
    left = too_large(model, P, resolve_budget(None, args.device))
    rules = [r for r in FIDELITY_RULES if r not in left]
    load = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    ds = evaluate_fidelity(model, (X, y), "categorical", rules=rules, damping=FIDELITY_DAMPINGS, dtype=torch.float32,
                           device=args.device, cg_tol=FIDELITY_TOL, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    timings = json.loads(ds.attrs["timings"])
    kinds = json.loads(ds.attrs["rule_kinds"])
    print(f"== evaluate_fidelity on GPT {size} (output='sequence'), P = {P:,}, N = {n}, T = {T}, V = {V}, float32, "
          f"dampings {list(FIDELITY_DAMPINGS)}, exact NGD to {FIDELITY_TOL:g}")
    print(f"   {wall:.1f} s wall, {cpu:.1f} s CPU (total_seconds {ds.attrs['total_seconds']:.1f}); load "
          f"{' '.join(f'{x:.1f}' for x in load)} → {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"   structure_kind {ds.attrs['structure_kind']}: " + ", ".join(
        f"{r} {k}" for r, k in kinds.items() if k))
    print("   left out (memory): " + ("; ".join(f"{r} {why}" for r, why in left.items()) or "none"))
    solve = timings.get("exact true solve", float("nan"))
    products = int(ds.ngd_products.values.max() if ds.attrs["ngd_solver"] == "multishift"
                   else ds.ngd_products.values.sum())  # one shared solve, or one solve per damping
    per = f" ({solve / products:.2f} s a product)" if products else ""
    print(f"   exact NGD: {ds.attrs['ngd_solver']}, {products} F·v products, {solve:.1f} s{per}; per damping λ: "
          "iterations / relative residual / solver")
    for j, lam in enumerate(FIDELITY_DAMPINGS):
        print(f"     λ = {lam:g}: {int(ds.ngd_iterations[j])} / {float(ds.ngd_residual[j]):.1e} / "
              f"{str(ds.ngd_solver.values[j])} (preconditioner {str(ds.ngd_preconditioner.values[j])})")
    print("   split (Dataset attribute 'timings', s; a rule includes the structures it builds first): "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(timings.items(), key=lambda kv: -kv[1])))
    print("   cosine to exact NGD at λ = 1e-2 / 1e-4: " + ", ".join(
        f"{r} {float(ds.cosine.sel(rule=r)[2]):.3f} / {float(ds.cosine.sel(rule=r)[0]):.3f}" if int(a)
        else f"{r} unavailable ({reason[:60]})"
        for r, a, reason in zip(ds.rule.values, ds.available.values, ds.unavailable_reason.values, strict=True)))
    print()
    return {"products": products, "solve": solve, "wall": wall, "P": P}


def project_fidelity(size: str, n: int, length: int, n_values: int, measured: dict[str, float],
                     args: argparse.Namespace) -> None:
    """The exact-NGD time of ``size`` in the same setting: the products the measured size needed × one product here.

    One F·v on the kept linearisation, after the one that records it (2 products, timed), beside its FLOP floor
    4F at the GEMM rate of the MLP shape; exact NGD alone takes products × that (its Krylov iterations grow with
    the conditioning, not the size: the measured size's count is a lower-end guess).
    """
    torch.manual_seed(0)
    X, y, _ = lm_batch(n, length, n_values, args.device)
    T, V = X.shape[1], n_values + 1
    model = GPT(V, T, output="sequence", **GPT_SIZES[size]).to(args.device).eval()
    F = implicit(model, X, y)
    v = torch.randn(F.spec.dim, device=args.device)
    F @ v
    start = time.perf_counter()
    F @ v
    product = time.perf_counter() - start
    gemm, gemm_flops = gemm_probe(model, n, T, args.device)
    rate = gemm_flops / min(_timed(gemm) for _ in range(3))
    fwd = forward_flops(model, n, T)
    need = measured["products"] * product
    print(f"== projection: exact NGD on GPT {size} (P = {F.spec.dim:,}, N = {n}, T = {T}) in the same setting")
    print(f"   forward F = {fwd / 1e9:.1f} GFLOP; F·v floor 4F = {4 * fwd / 1e9:.1f} GFLOP = {4 * fwd / rate:.2f} s at "
          f"{rate / 1e9:.1f} GFLOP/s (GEMM probe); measured F·v {product:.2f} s (load "
          f"{os.getloadavg()[0]:.1f})")
    print(f"   × {measured['products']} products (GPT {args.sizes[0]}'s exact solve) = {need:.0f} s "
          f"({need / 60:.1f} min) for exact NGD alone; floor {measured['products'] * 4 * fwd / rate:.0f} s; "
          f"a 10-minute evaluation allows {600 / product:.0f} products of this size")
    print()


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------------------ main
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--sizes``, ``--parts`` and ``--kfac-kinds`` to ``parser`` (so ``--help`` lists them)."""
    parser.add_argument("--sizes", default="1M,10M", help="comma-separated GPT_SIZES keys (default 1M,10M)")
    parser.add_argument("--parts", default="products,fidelity",
                        help="products (gradient, F·v, KFAC) and/or fidelity (default both)")
    parser.add_argument("--kfac-kinds", default=",".join(KINDS), help="Fisher kinds of the KFAC rows (default "
                        "empirical,mc)")


def parse() -> argparse.Namespace:
    """This benchmark's options (:func:`add_arguments`) and ``--device``, ``--repeats``, ``--quick`` (_common)."""
    args = parse_args(__doc__.splitlines()[0], default_repeats=3, add_arguments=add_arguments)
    args.sizes = ["10k"] if args.quick else [s for s in args.sizes.split(",") if s]
    for s in args.sizes:
        if s not in GPT_SIZES:
            raise SystemExit(f"--sizes: unknown size {s!r}; valid: {sorted(GPT_SIZES)}")
    args.parts = set(args.parts.split(","))
    args.kfac_kinds = [k for k in args.kfac_kinds.split(",") if k]
    if not args.parts <= {"products", "fidelity"} or not set(args.kfac_kinds) <= set(KINDS):
        raise SystemExit(f"--parts: products, fidelity; --kfac-kinds: {', '.join(KINDS)}")
    return args


def main() -> None:
    args = parse()
    n, length, n_values = (8, 6, 8) if args.quick else (32, 32, 64)
    header(f"GPT (output='sequence', token-mean cross-entropy): gradient, F·v, KFAC factors vs curvlinops, "
           f"N={n} T={2 * length} V={n_values + 1}, float32", args.device)
    for size in args.sizes if "products" in args.parts else ():
        rows, info = bench_size(size, n, length, n_values, args)
        print(f"GPT {size}: P = {info['P']:,}; forward F = {info['forward_flops'] / 1e9:.2f} GFLOP; GEMM rate "
              f"{info['rate'] / 1e9:.1f} GFLOP/s; FLOP floors (s): "
              + ", ".join(f"{k} {v:.4f}" for k, v in info["floors"].items()))
        print_table(rows, "× curvlinops" if optional_import("curvlinops") else "× ref")
    if "fidelity" in args.parts:
        measured = bench_fidelity(args.sizes[0], n, length, n_values, args)
        for size in args.sizes[1:]:
            project_fidelity(size, n, length, n_values, measured, args)


if __name__ == "__main__":
    main()
