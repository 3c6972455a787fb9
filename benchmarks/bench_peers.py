"""fisherlab side by side with curvlinops, BackPACK and nngeometry on every operation they share (issue 15).

Models (float32, digits, categorical likelihood, the first N standardized training samples):

* ``mlp``: MLP 64-1024-1024-10 tanh (P = 1,126,410); the dense row uses the reference MLP 64-32-32-10
  (P = 3,466), whose P×P matrix fits;
* ``cnn``: CNN Conv2d 1→32→64 (3×3, ReLU, average pooling) + Linear on the 8×8 images (P = 21,386); the dense
  row uses the default CNN (8, 16) channels (P = 1,898);
* ``gpt``: ``fisherlab.models.GPT`` preset "1M" (P = 1,016,513), ``output="sequence"``, 32 sequences × 64 tokens of
  ``make_sort_lm`` (vocabulary 65; quick: preset "10k", 8 × 16), against curvlinops only, on the rows of
  ``GPT_OPS``: ``grad`` (loss and gradient), ``fv``, ``kfac-emp`` / ``kfac-reduce`` (empirical KFAC factors,
  expand / reduce; compared on the Linear layers, the only ones curvlinops covers — fisherlab's also cover the
  Embedding and LayerNorm parameters), ``cg`` (10 iterations). curvlinops sees the logits as (N, C, T)
  (``bench_transformer.ClassesSecond``) and its GGN product runs on the math SDPA kernel (forward-mode AD).

Rows (``--ops``): ``dense`` (true Fisher, P×P), ``diag`` (exact diagonal of the true Fisher = GGN), ``diag-mc``
(1 sampled label per input), ``kfac``, ``kfac-mc``, ``kfac-emp`` (KFAC factors, "expand", weight and bias in one
block), ``ekfac``, ``ekfac-mc``, ``fv`` (one F·v on a built operator), ``fV`` (F·V, 16 columns), ``cg`` (10 CG
iterations on (F + λI) x = ∇L, λ = 1e-3, tolerance 1e-12: not reached; the peer's product in
fisherlab's CG), ``lanczos`` (top 5 eigenvalues from 20 Lanczos
steps, the peer's product in fisherlab's Lanczos), ``trace`` (Hutchinson, 16 Rademacher probes;
fisherlab's vᵀ F v by forward mode alone, ``quadratic_forms``, the peer's vᵀ(G v)).

Every call is end to end, as a user makes it: fisherlab's ``fisher(...)`` builds its engine (the options, model and
first samples checked) and then the structure, whose pass over the data also checks every sample and draws the MC
labels (the engine's first pass); a peer builds its operator and computes. For the matrix-free rows the operators
are built once, outside the timing (products reuse them). "fisherlab (engine built)" rows time the structure alone
on an engine built beforehand (its first pass made by the warm-up). Each row's methods are warmed up once, then
run round-robin ``--repeats`` times (``_common.time_methods``); the table gives medians, the ratio to the floor
(plain torch: see each floor's name) and ``fisherlab / best peer`` as the median over rounds of the ratio within a
round.

Checks, against fisherlab's result on the same inputs (relative Frobenius difference, float64 arithmetic):
dense matrices; diagonals; KFAC/EKFAC operators applied to one random vector; products; CG iterates;
eigenvalues; traces. Monte-Carlo rows are checked at the peer's own labels, reproduced from its seed (BackPACK:
torch's global generator; curvlinops: its seeded generator), against fisherlab's *empirical* Fisher at those
labels (the MC Fisher with labels ŷ is the empirical Fisher with targets ŷ). Hutchinson estimates are compared to
the exact trace (their probes differ). Conventions matched: BackPACK and curvlinops see the mean loss
(``CrossEntropyLoss()``), i.e. (1/N) Σ_n as fisherlab; curvlinops' type-2 KFAC is fisherlab's true-Fisher KFAC
(the 9 closed-form rows per sample span the same output Fisher as its 10 Hessian-root columns). Under each EKFAC
row a line repeats the comparison with both in float64 and gives each float32 result's error to that float64 EKFAC
(``ekfac_float64_check``), so the row's peer difference is split into its two sides. Both decompose the factors
in float32 (fisherlab's default ``eigh_dtype``): the ``eigh`` backward error, 3–5e-6·‖M‖ on the 1,025² factors,
puts each 6e-6–9e-5 away, correlated errors, so the two differ by less than either errs. The line also gives
fisherlab with ``eigh_dtype=torch.float64`` (~1e-6 from the float64 EKFAC, the factors' rounding;
benchmarks/README.md, "EKFAC in float32").

Without the peers (plain project venv) each row prints fisherlab against its floor. With them:

    /tmp/fisherlab-peers/bin/python benchmarks/bench_peers.py [--models mlp,cnn] [--ops diag,diag-mc] [--n 512]
        [--repeats 5] [--quick]
"""

# ruff: noqa: E402
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/README.md (spinning threads on a shared CPU)

import argparse
import copy
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, optional_import, rel_diff, synchronize, time_methods
from bench_dense import digits
from bench_kfac import fisher_vector_floor
from bench_transformer import Peer, fisherlab_linear_factors, lm_batch, stacked_factors, with_math_sdpa

from fisherlab import fisher
from fisherlab.data import load_digits
from fisherlab.engine import FisherEngine
from fisherlab.linalg import cg, hutchinson_trace, lanczos
from fisherlab.models import CNN, GPT, GPT_SIZES, MLP, reference_mlp
from fisherlab.structures import build
from fisherlab.structures.kfac import KFACFisher

OPS = ("dense", "diag", "diag-mc", "kfac", "kfac-mc", "kfac-emp", "ekfac", "ekfac-mc", "fv", "fV", "cg",
       "lanczos", "trace", "grad", "kfac-reduce")
MODELS = ("mlp", "cnn", "gpt")
#: The rows of the GPT (curvlinops is its only peer): gradient, F·v, KFAC factors (empirical, expand / reduce), CG.
GPT_OPS = ("grad", "fv", "kfac-emp", "kfac-reduce", "cg")
DAMPING = 1e-3
COLUMNS, CG_STEPS, TOP_K, LANCZOS_STEPS, PROBES = 16, 10, 5, 20, 16
CURVLINOPS_SEED = 2147483647  # curvlinops' default label seed
KFAC_TYPES = {"kfac": ("true", "type-2"), "kfac-mc": ("mc", "mc"), "kfac-emp": ("empirical", "empirical"),
              "ekfac": ("true", "type-2"), "ekfac-mc": ("mc", "mc")}


@dataclass
class Method:
    """A timed call and how to read its result as a tensor for the check (None: not checked)."""

    run: Callable[[], Any]
    read: Callable[[Any], Tensor] | None = None
    reference: Callable[[], Tensor] | None = None  # what this peer's result is compared with (default fisherlab's)


@dataclass
class Op:
    """One row of the table: fisherlab, its floor, the peers."""

    fisherlab: Method
    floor: tuple[str, Callable[[], Any]] | None = None
    built: Callable[[], Any] | None = None
    peers: dict[str, Method] = field(default_factory=dict)
    note: str = ""
    after: Callable[[], str] | None = None  # a line printed under the row (computed after its timing)


# ---------------------------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """A model with its data, its sequential twin for BackPACK, and the peers' modules."""

    name: str
    model: nn.Module
    X: Tensor
    y: Tensor
    dense_model: nn.Module
    dense_X: Tensor
    dense_y: Tensor

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def P(self) -> int:
        return sum(p.numel() for p in self.params)


def images(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``n`` standardized 8×8 digit images (1, 8, 8) (repeated cyclically past the training set)."""
    data = load_digits(seed=0, layout="image")
    reps = -(-n // data.n_train)
    return (data.X_train.repeat(reps, 1, 1, 1)[:n].to(device), data.y_train.repeat(reps)[:n].to(device))


def problem(name: str, n: int, quick: bool, device: torch.device) -> Problem:
    torch.manual_seed(0)
    if name == "gpt":  # sequences: n_values + 1 = 65 tokens, 2·length positions
        seqs, length = (8, 8) if quick else (32, 32)
        X, y, _ = lm_batch(seqs, length, 64, device)
        model = GPT(65, X.shape[1], output="sequence", **GPT_SIZES["10k" if quick else "1M"]).to(device).eval()
        return Problem(name, model, X, y, model, X, y)
    if name == "mlp":
        widths = (256, 256) if quick else (1024, 1024)
        X, y = digits(n, device)
        return Problem(name, MLP(64, widths, 10, "tanh").to(device).eval(), X, y,
                       reference_mlp(seed=0, device=device).eval(), *digits(min(n, 1024), device))
    X, y = images(n, device)
    channels = (8, 16) if quick else (32, 64)
    return Problem(name, CNN((1, 8, 8), 10, channels=channels).to(device).eval(), X, y,
                   CNN((1, 8, 8), 10).to(device).eval(), X[:256], y[:256])


def sequential_twin(model: nn.Module) -> nn.Sequential:
    """A deep copy of the model as one nn.Sequential (BackPACK extends sequences of known modules)."""
    if isinstance(model, MLP):
        return copy.deepcopy(model.layers)
    return nn.Sequential(*copy.deepcopy(model.features), nn.Flatten(), copy.deepcopy(model.head))


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# ------------------------------------------------------------------------------------------------- floors
def rows_floor(model: nn.Module, X: Tensor, rows: int) -> Callable[[], Any]:
    """Plain torch: forward, then R cotangent rows pulled back to the parameters (one batched reverse pass)."""
    params = [p.detach().requires_grad_() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    M = torch.randn(rows, X.shape[0], 10, device=X.device)

    def run() -> Any:
        z = torch.func.functional_call(model, dict(zip(names, params, strict=True)), (X,))
        if rows == 1:
            return torch.autograd.grad(z, params, M[0])
        return torch.autograd.grad(z, params, M, is_grads_batched=True)

    return run


def product_floor(P: int, rows: int, device: torch.device) -> Callable[[], Tensor]:
    """The naive dense assembly's product (N·C × P)ᵀ(N·C × P)."""
    A = torch.randn(rows, P, device=device)
    return lambda: A.T @ A


# -------------------------------------------------------------------------------------------------- peers
def fisherlab_fisher(p: Problem, kind: str, structure: str, model: nn.Module | None = None,
                     X: Tensor | None = None, y: Tensor | None = None, dtype: torch.dtype = torch.float32,
                     **options: Any):
    model, X, y = model or p.model, X if X is not None else p.X, y if y is not None else p.y
    return fisher(model, (X, y), "categorical", kind=kind, structure=structure, dtype=dtype,
                  device=X.device, progress=False, **options)


def engine(p: Problem, kind: str) -> FisherEngine:
    return FisherEngine(p.model, (p.X, p.y), "categorical", kind=kind, dtype=torch.float32, device=p.X.device,
                        progress=False)


def backpack_diag(p: Problem, extension: str) -> tuple[Callable[[], Tensor], Callable[[], Tensor]] | None:
    """BackPACK's DiagGGNExact / DiagGGNMC (mean loss) and the labels its MC draw will take (global RNG)."""
    bp = optional_import("backpack")
    ext = optional_import("backpack.extensions")
    if bp is None or ext is None:
        return None
    twin = bp.extend(sequential_twin(p.model))
    loss_fn = bp.extend(nn.CrossEntropyLoss())
    attr = {"DiagGGNExact": "diag_ggn_exact", "DiagGGNMC": "diag_ggn_mc"}[extension]

    def run() -> Tensor:
        torch.manual_seed(1)
        loss = loss_fn(twin(p.X), p.y)
        with bp.backpack(getattr(ext, extension)()):
            loss.backward()
        out = flat([getattr(q, attr) for q in twin.parameters()])
        for q in twin.parameters():
            q.grad = None
        return out

    def labels() -> Tensor:  # BackPACK's CrossEntropyLoss draws Categorical(softmax(z)).sample((1,)) after seeding
        torch.manual_seed(1)
        with torch.no_grad():
            return torch.distributions.Categorical(torch.softmax(twin(p.X), 1)).sample(torch.Size([1]))[0]

    return run, labels


def curvlinops_labels(p: Problem) -> Tensor:
    """The labels curvlinops' MC KFAC draws: probs.multinomial(1) by a generator seeded with its seed."""
    gen = torch.Generator(device=p.X.device).manual_seed(CURVLINOPS_SEED)
    with torch.no_grad():
        return p.model(p.X).softmax(1).multinomial(num_samples=1, generator=gen).squeeze(-1)


def kfac_ops(p: Problem, op: str, v: Tensor) -> Op:
    kind, ftype = KFAC_TYPES[op]
    structure = "ekfac" if op.startswith("ekfac") else "kfac"
    eng = engine(p, kind)
    ours = Method(lambda: fisherlab_fisher(p, kind, structure), lambda F: F @ v)
    out = Op(ours, (f"floor: fwd + {eng.rows_per_sample} bwd", rows_floor(p.model, p.X, eng.rows_per_sample)),
             built=lambda: build(structure, eng))
    curvlinops = optional_import("curvlinops")
    if curvlinops is None:
        return out
    cls = curvlinops.EKFACLinearOperator if structure == "ekfac" else curvlinops.KFACLinearOperator

    def run() -> Any:
        K = cls(p.model, nn.CrossEntropyLoss(), p.params, [(p.X, p.y)], fisher_type=ftype, check_deterministic=False,
                separate_weight_and_bias=False, seed=CURVLINOPS_SEED)
        K.compute_kronecker_factors()
        if structure == "ekfac":
            K.compute_eigenvalue_correction()
        return K

    reference = None
    if kind == "mc":  # at curvlinops' labels: fisherlab's empirical-Fisher (E)KFAC with those targets
        reference = lambda: fisherlab_fisher(p, "empirical", structure, y=curvlinops_labels(p)) @ v  # noqa: E731
    out.peers[f"curvlinops {cls.__name__} ({ftype})"] = Method(run, lambda K: K @ v, reference)
    if structure == "ekfac":
        out.after = lambda: ekfac_float64_check(p, kind, ftype, v)
    return out


def ekfac_float64_check(p: Problem, kind: str, ftype: str, v: Tensor) -> str:
    """An EKFAC row's check repeated in float64, and each float32 result's error to the float64 EKFAC.

    The float64 EKFAC is fisherlab's (the line also gives its difference to curvlinops' float64 one). MC rows at
    curvlinops' labels: fisherlab's and curvlinops' empirical EKFAC with those targets, in both precisions. The
    line ends with the side whose float32 error makes the peer difference (at least 3 times the other's), and gives
    fisherlab's float32 EKFAC with its factors decomposed in float64 (``eigh_dtype``; not timed in the row).
    """
    curvlinops = optional_import("curvlinops")
    y = curvlinops_labels(p) if kind == "mc" else p.y
    kind, ftype = ("empirical", "empirical") if kind == "mc" else (kind, ftype)
    model64 = copy.deepcopy(p.model).double()
    X64, v64 = p.X.double(), v.double()

    def peer(model: nn.Module, X: Tensor) -> Tensor:
        params = [q for q in model.parameters() if q.requires_grad]
        K = curvlinops.EKFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)], fisher_type=ftype,
                                           check_deterministic=False, separate_weight_and_bias=False,
                                           seed=CURVLINOPS_SEED)
        K.compute_kronecker_factors()
        K.compute_eigenvalue_correction()
        return K @ v.to(X.dtype)

    ours64 = fisherlab_fisher(p, kind, "ekfac", model64, X64, y, dtype=torch.float64) @ v64
    errors = {"fisherlab": rel_diff(fisherlab_fisher(p, kind, "ekfac", y=y) @ v, ours64),
              "curvlinops": rel_diff(peer(p.model, p.X), ours64)}
    high = max(errors, key=errors.__getitem__)
    verdict = f": the peer difference is the float32 error of {high}" if errors[high] >= 3 * min(errors.values()) \
        else ""
    accurate = rel_diff(fisherlab_fisher(p, kind, "ekfac", y=y, eigh_dtype=torch.float64) @ v, ours64)
    return (f"float32 error to the float64 EKFAC (fisherlab's; curvlinops' {rel_diff(peer(model64, X64), ours64):.1e} "
            f"from it): fisherlab {errors['fisherlab']:.1e}, curvlinops {errors['curvlinops']:.1e}{verdict}; "
            f"fisherlab with eigh_dtype=float64 {accurate:.1e}")


def curvlinops_ggn(p: Problem) -> Any:
    curvlinops = optional_import("curvlinops")
    if curvlinops is None:
        return None
    return curvlinops.GGNLinearOperator(p.model, nn.CrossEntropyLoss(), p.params, [(p.X, p.y)],
                                        check_deterministic=False)


def make_op(p: Problem, op: str) -> Op:
    """The methods of row ``op`` on problem ``p``."""
    if p.name == "gpt":
        return make_gpt_op(p, op)
    device = p.X.device
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(p.P, generator=gen).to(device)
    if op == "dense":
        Pd = sum(q.numel() for q in p.dense_model.parameters())
        ours = Method(lambda: fisherlab_fisher(p, "true", "dense", p.dense_model, p.dense_X, p.dense_y).to_dense(),
                      lambda D: D)
        out = Op(ours, (f"floor: (N·C×P)ᵀ(N·C×P), P = {Pd}", product_floor(Pd, 10 * len(p.dense_X), device)),
                 note=f"P = {Pd}, N = {len(p.dense_X)}")
        curvlinops = optional_import("curvlinops")
        if curvlinops is not None:
            params = list(p.dense_model.parameters())

            def cl_dense() -> Tensor:
                G = curvlinops.GGNLinearOperator(p.dense_model, nn.CrossEntropyLoss(), params,
                                                 [(p.dense_X, p.dense_y)], check_deterministic=False)
                return G @ torch.eye(Pd, device=device)

            out.peers["curvlinops GGN @ I"] = Method(cl_dense, lambda D: D)
        metrics, pspace = optional_import("nngeometry.metrics"), optional_import("nngeometry.object")
        if metrics is not None and pspace is not None:
            loader = DataLoader(TensorDataset(p.dense_X, p.dense_y), batch_size=len(p.dense_X))
            out.peers["nngeometry FIM PMatDense"] = Method(
                lambda: metrics.FIM(p.dense_model, loader, pspace.PMatDense, variant="classif_logits",
                                    device=device).to_torch(), lambda D: D)
        return out
    if op in ("diag", "diag-mc"):
        kind = "true" if op == "diag" else "mc"
        eng = engine(p, kind)
        ours = Method(lambda: fisherlab_fisher(p, kind, "diag"), lambda F: F.diag())
        out = Op(ours, (f"floor: fwd + {eng.rows_per_sample} bwd", rows_floor(p.model, p.X, eng.rows_per_sample)),
                 built=lambda: build("diag", eng))
        bp = backpack_diag(p, "DiagGGNExact" if kind == "true" else "DiagGGNMC")
        if bp is not None:
            run, labels = bp
            reference = None
            if kind == "mc":
                reference = lambda: fisherlab_fisher(p, "empirical", "diag", y=labels()).diag()  # noqa: E731
            out.peers["BackPACK " + ("DiagGGNExact" if kind == "true" else "DiagGGNMC")] = Method(run, lambda d: d,
                                                                                                   reference)
        metrics, pspace = optional_import("nngeometry.metrics"), optional_import("nngeometry.object")
        if kind == "true" and metrics is not None and pspace is not None:
            loader = DataLoader(TensorDataset(p.X, p.y), batch_size=len(p.X))
            out.peers["nngeometry FIM PMatDiag"] = Method(
                lambda: metrics.FIM(p.model, loader, pspace.PMatDiag, variant="classif_logits", device=device),
                lambda F: F.get_diag())
        return out
    if op in KFAC_TYPES:
        return kfac_ops(p, op, v)

    # matrix-free rows: operators built once (fisherlab's linearisation cached by a first product)
    F = fisherlab_fisher(p, "true", "implicit")
    F @ v
    G = curvlinops_ggn(p)
    fv_floor = fisher_vector_floor(p.model, p.X)
    peers: dict[str, Method] = {}
    if op == "fv":
        if G is not None:
            peers["curvlinops GGN @ v"] = Method(lambda: G @ v, lambda r: r)
        return Op(Method(lambda: F @ v, lambda r: r), ("floor: plain-torch F·v (jvp, Λ, vjp)", fv_floor),
                  peers=peers)
    if op == "fV":
        V = torch.randn(p.P, COLUMNS, generator=gen).to(device)
        if G is not None:
            peers[f"curvlinops GGN @ V ({COLUMNS})"] = Method(lambda: G @ V, lambda r: r)
        return Op(Method(lambda: F @ V, lambda r: r),
                  (f"floor: {COLUMNS} × plain-torch F·v", lambda: [fv_floor() for _ in range(COLUMNS)]), peers=peers)
    steps = {"cg": CG_STEPS, "lanczos": LANCZOS_STEPS, "trace": PROBES}[op]
    floor = (f"floor: {steps} × plain-torch F·v", lambda: [fv_floor() for _ in range(steps)])
    _, grad = engine(p, "true").loss_and_gradient()
    if op == "cg":
        def solve(matvec: Callable[[Tensor], Tensor]) -> Method:
            return Method(lambda: cg(matvec, grad, damping=DAMPING, tol=1e-12, max_iter=steps).x, lambda x: x)

        if G is not None:
            peers[f"curvlinops GGN @ v in the same CG ({steps} it)"] = solve(lambda x: G @ x)
        return Op(solve(F.matvec), floor, peers=peers, note=f"{steps} iterations, λ = {DAMPING}")
    if op == "lanczos":
        def top(matvec: Callable[[Tensor], Tensor]) -> Method:
            return Method(lambda: lanczos(matvec, p.P, TOP_K, num_iter=steps, device=device)[0],
                          lambda e: e.sort().values)

        if G is not None:
            peers[f"curvlinops GGN @ v in the same Lanczos ({steps} steps)"] = top(lambda x: G @ x)
        ours = top(F.matvec)
        return Op(ours, floor, peers=peers, note=f"top {TOP_K} of {steps} steps")
    exact = lambda: fisherlab_fisher(p, "true", "diag").trace().reshape(1)  # noqa: E731
    ours = Method(lambda: hutchinson_trace(F.matmat, p.P, num_probes=steps, device=device,
                                                     quadratic_forms=F.quadratic_forms)[0],
                  lambda t: t.reshape(1), exact)
    curvlinops = optional_import("curvlinops")
    if G is not None and curvlinops is not None:
        peers[f"curvlinops hutchinson_trace ({steps} probes)"] = Method(
            lambda: curvlinops.hutchinson_trace(G, steps), lambda t: t.reshape(1), exact)
    return Op(ours, floor, peers=peers, note="estimates vs the exact trace")



def make_gpt_op(p: Problem, op: str) -> Op:
    """The methods of row ``op`` (one of ``GPT_OPS``) on the GPT; curvlinops through ``bench_transformer.Peer``."""
    device = p.X.device
    v = torch.randn(p.P, generator=torch.Generator().manual_seed(0)).to(device)
    peer = Peer(p.model, p.X, p.y, p.y)
    peers: dict[str, Method] = {}
    if op == "grad":
        eng = engine(p, "empirical")
        if peer.available:
            G = peer.ggn(p.y)
            peers["curvlinops gradient_and_loss"] = Method(G.gradient_and_loss, lambda r: flat(list(r[0])))
        return Op(Method(eng.loss_and_gradient, lambda r: r[1]), peers=peers, note="engine built")
    if op in ("kfac-emp", "kfac-reduce"):
        approx = "expand" if op == "kfac-emp" else "reduce"

        def linear(K: KFACFisher) -> Tensor:
            factors = fisherlab_linear_factors(K, p.model)
            return torch.cat([stacked_factors(factors, 0), stacked_factors(factors, 1)])

        eng = engine(p, "empirical")
        ours = Method(lambda: fisherlab_fisher(p, "empirical", "kfac", approx=approx), linear)
        if peer.available:
            def run() -> Any:
                K = peer.kfac("empirical", approx)
                K.compute_kronecker_factors()
                return K

            peers[f"curvlinops KFAC {approx} (empirical, Linear layers)"] = Method(
                run, lambda K: torch.cat([stacked_factors(Peer.factors(K), 0), stacked_factors(Peer.factors(K), 1)]))
        return Op(ours, built=lambda: KFACFisher.from_engine(eng, approx=approx), peers=peers)
    F = fisher(p.model, (p.X, p.y), "categorical", kind="true", structure="implicit", dtype=torch.float32,
               device=device, progress=False)
    F @ v  # the linearisation cached, as curvlinops' operator is built
    G = peer.ggn(p.y) if peer.available else None
    if op == "fv":
        if G is not None:
            peers["curvlinops GGN @ v (math SDPA)"] = Method(with_math_sdpa(lambda: G @ v), lambda r: r)
        return Op(Method(lambda: F @ v, lambda r: r), peers=peers)
    _, grad = engine(p, "empirical").loss_and_gradient()  # (the true Fisher's rows would not fit the budget)

    def solve(matvec: Callable[[Tensor], Tensor]) -> Method:
        return Method(lambda: cg(matvec, grad, damping=DAMPING, tol=1e-12, max_iter=CG_STEPS).x, lambda x: x)

    if G is not None:
        peers[f"curvlinops GGN @ v in the same CG ({CG_STEPS} it)"] = solve(lambda x: with_math_sdpa(lambda: G @ x)())
    return Op(solve(F.matvec), peers=peers, note=f"{CG_STEPS} iterations, λ = {DAMPING}")


# ---------------------------------------------------------------------------------------------------- table
def run_op(p: Problem, name: str, op: Op, repeats: int, device: torch.device) -> list[list[str]]:
    methods: dict[str, Callable[[], Any]] = {"fisherlab": op.fisherlab.run}
    if op.built is not None:
        methods["fisherlab (engine built)"] = op.built
    if op.floor is not None:
        methods[op.floor[0]] = op.floor[1]
    methods |= {peer: m.run for peer, m in op.peers.items()}
    times = time_methods(methods, device, repeats)
    ours = times["fisherlab"]
    mine = op.fisherlab.read(op.fisherlab.run()) if op.fisherlab.read else None
    floor = times[op.floor[0]] if op.floor else None
    best = None
    if op.peers:  # per round, the fastest peer of that round
        best = [min(times[peer][i] for peer in op.peers) for i in range(repeats)]
    rows = []
    for label, ts in times.items():
        med = statistics.median(ts)
        to_floor = "" if floor is None or label == op.floor[0] else \
            f"{statistics.median(t / f for t, f in zip(ts, floor, strict=True)):.2f}"
        to_peer, check = "", ""
        if best is not None and label.startswith("fisherlab"):
            to_peer = f"{statistics.median(t / b for t, b in zip(ts, best, strict=True)):.2f}"
        if label in op.peers:
            m = op.peers[label]
            to_peer = f"{statistics.median(t / o for t, o in zip(ts, ours, strict=True)):.2f}× fisherlab"
            if m.read is not None:
                expected = m.reference() if m.reference is not None else mine
                check = f"{rel_diff(m.read(m.run()), expected):.1e}"
        elif label == "fisherlab" and op.fisherlab.reference is not None:
            check = f"{rel_diff(mine, op.fisherlab.reference()):.1e} (to exact)"
        rows.append([p.name, name, label, f"{med:.4f}", to_floor, to_peer, check])
    if op.note:
        rows[0][2] += f"  [{op.note}]"
    return rows


def print_rows(rows: list[list[str]]) -> None:
    head = ["model", "op", "method", "median s", "× floor", "fisherlab / best peer", "rel. diff"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.flush()


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per row (default 5, quick 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: MLP 64-256-256-10, CNN (8, 16), N = 128")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument("--n", type=int, default=None, help="samples N (default 512, quick 128)")
    args = parser.parse_args()
    args.models, args.ops = args.models.split(","), args.ops.split(",")
    for given, valid in ((args.models, MODELS), (args.ops, OPS)):
        bad = [x for x in given if x not in valid]
        if bad:
            parser.error(f"unknown {bad}; valid: {', '.join(valid)}")
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.n = args.n or (128 if args.quick else 512)
    args.device = torch.device(args.device)
    return args


def main() -> None:
    args = parse()
    peers = [name for name in ("curvlinops", "backpack", "nngeometry") if optional_import(name) is not None]
    header(f"fisherlab and its peers ({', '.join(peers) or 'none importable: fisherlab against its floors'}), "
           f"N = {args.n}, float32", args.device)
    for model_name in args.models:
        p = problem(model_name, args.n, args.quick, args.device)
        print(f"\n{model_name}: {type(p.model).__name__}, P = {p.P:,}, N = {len(p.X)}")
        rows: list[list[str]] = []
        for op_name in args.ops:
            if (model_name == "gpt") != (op_name in GPT_OPS) and op_name not in ("fv", "cg", "kfac-emp"):
                continue  # the GPT's rows are GPT_OPS; grad and kfac-reduce are GPT rows only
            op = make_op(p, op_name)
            rows += run_op(p, op_name, op, args.repeats, args.device)
            synchronize(args.device)
            print_rows(rows)
            if op.after is not None and op.peers:
                print(f"   {op.after()}")
            print(f"   load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
            rows = []


if __name__ == "__main__":
    main()
