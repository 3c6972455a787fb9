"""One training loop for every optimiser fisherlab compares: SGD, momentum, Adam, exact NGD, KFAC-NGD and SNGD.

:func:`train` runs one rule from a copy of a model (the model itself is never modified) over a minibatch
stream fixed by ``seed`` (epoch e is :func:`fisherlab.data.iterate_minibatches` with seed ``seed + e``), so two
rules with the same model, data, ``batch_size`` and ``seed`` start from the same parameters and see the same
batches in the same order. Rules (λ = ``damping``, η = ``lr``, g = the batch gradient):

============  =====================================================================================================
``sgd``       θ ← θ − η g  (``torch.optim.SGD``)
``momentum``  heavy-ball SGD, momentum ``momentum`` (``torch.optim.SGD``)
``adam``      ``torch.optim.Adam`` with its defaults
``ngd``       exact NGD on the batch: θ ← θ − η (F_B + λI)⁻¹ g with the batch's dense true Fisher, solved exactly
              (``ngd_solver``: Woodbury with a Cholesky factorisation of the (N·R)² Gram matrix when N·R < P,
              else Cholesky of F_B + λI; ``"cg"``: conjugate gradients on the implicit F_B to ``cg_tol``)
``kfac-ngd``  θ ← θ − η (S + sI)⁻¹ ∇W̄ (A + aI)⁻¹ per layer, factors from the current batch every ``refresh_every``
              steps (their damped inverses, computed in float64, cached in between). ``kfac_precondition``:
              ``"dense"`` multiplies the inverses into the gradient matrix (out·n·(out + n) multiply-adds, as K-FAC
              implementations do); ``"factored"`` (Linear layers) uses ∇W̄ = Δᵀ Ā, the layer's output gradients
              Δ and inputs Ā (rows × out, rows × n), as (S⁻¹Δᵀ)(Ā A⁻¹) — rows·(out² + n² + out·n); ``"auto"``
              (default) takes the cheaper per layer and step. An Embedding's A is diagonal (token counts) and is
              inverted as one; the exact blocks B that KFAC keeps for LayerNorm/RMSNorm take (B + λI)⁻¹ g_B, so
              every parameter is updated
``sngd``      plain SGD on :func:`fisherlab.reconstruction.reconstruct` (``structure``), built on the first batch and
              refreshed on the current batch every ``refresh_every`` steps
============  =====================================================================================================

**Sequence models** (outputs (N, T, C), targets (N, T), e.g. :class:`fisherlab.models.GPT` with
``output="sequence"`` on :func:`fisherlab.data.make_sort_lm`): the loss is the mean over the counted tokens
(labels equal to the likelihood's ``ignore_index``, −100, left out), as
:class:`~fisherlab.likelihoods.TokenLikelihood` defines it, so g is the gradient of that token mean and every
curvature (``ngd``'s F_B, ``kfac-ngd``'s factors, ``sngd``'s reconstruction) is the batch's per-token Fisher;
losses and accuracies are per counted token.

Recorded per step s = 0 … steps (the parameters θ_s before update s): ``loss`` (mean loss on batch s), ``time``
(wall-clock seconds spent in updates 0 … s−1, refreshes included, evaluation excluded; CUDA is synchronised),
``cpu_time`` (the same span in CPU seconds of this process, all threads: on a shared CPU machine usually less
sensitive to other processes than wall time, though spinning threads still inflate it), ``refresh`` (1 where update
s recomputed curvature), and every ``eval_every`` steps and at the end ``train_loss``, ``train_accuracy``,
``test_loss``, ``test_accuracy`` on the full splits (NaN elsewhere). A run whose loss becomes non-finite, or whose
curvature breaks down (a SingularMatrixError or NonFiniteError in an update, e.g. every ReLU dead), stops: the rest
is NaN, the attribute ``diverged`` is 1 and ``stopped`` says why.

:func:`compare` runs several rules into one Dataset with dims (``rule``, ``step``); :func:`sweep_lr` tries
learning rates per rule and :func:`best_runs` picks, per rule, the one with the lowest final training loss.
Select a run with ``ds.sel(rule="sgd")``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from fisherlab.checks import (
    check_damping,
    check_device,
    check_dtype,
    check_lr,
    check_model,
    check_positive_int,
    parse_enum,
    renamed,
)
from fisherlab.data import SplitData, iterate_minibatches
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, NonFiniteError, SingularMatrixError
from fisherlab.fisher_matrix import fisher
from fisherlab.layers import LayerCapture, LayerLayout, expand_input
from fisherlab.likelihoods import Likelihood, TokenLikelihood, get_likelihood
from fisherlab.linalg import damped_solve, kron_damping_split
from fisherlab.ngd import NGDSolver, solve_ngd
from fisherlab.params import ParamSpec
from fisherlab.progress import bar as progress_bar
from fisherlab.results import NATS, annotate, new_dataset
from fisherlab.vocabulary import FisherKind, KFACPrecondition

__all__ = ["KFAC_PRECONDITION", "RULES", "best_runs", "compare", "sweep_lr", "train"]

#: Training rules.
RULES = ("sgd", "momentum", "adam", "ngd", "kfac-ngd", "sngd")
#: How ``kfac-ngd`` applies the factor inverses (module docstring).
KFAC_PRECONDITION: tuple[str, ...] = tuple(m.value for m in KFACPrecondition)

_VARIABLES = {
    "loss": ("mean loss on the step's minibatch (per counted token for a sequence model)", *NATS),
    "train_loss": ("mean loss on the training split (per counted token for a sequence model)", *NATS),
    "train_accuracy": ("accuracy on the training split (over the counted tokens for a sequence model)", "1"),
    "test_loss": ("mean loss on the test split (per counted token for a sequence model)", *NATS),
    "test_accuracy": ("accuracy on the test split (over the counted tokens for a sequence model)", "1"),
    "time": ("wall-clock time spent in updates before this step", "s"),
    "cpu_time": ("CPU time of this process (all threads) spent in updates before this step", "s"),
    "refresh": ("curvature recomputed during this step's update", "1"),
}


# ------------------------------------------------------------------------------------------------ helpers
def _batches(data: SplitData, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless minibatch stream: epoch e in the order of ``iterate_minibatches(..., seed + e)``."""
    epoch = 0
    while True:
        yield from iterate_minibatches(data.X_train, data.y_train, batch_size, seed + epoch)
        epoch += 1


def _loss_sum(lik: Likelihood, z: Tensor, y: Tensor) -> tuple[Tensor, Tensor | int, Tensor]:
    """(Σ of the losses, their count, the counted targets' mask) of outputs z and targets y.

    Outputs (n, C): the n per-sample losses, all counted. Sequence outputs (n, T, C): the per-token losses of the
    tokens whose label is not the likelihood's ``ignore_index`` (:class:`TokenLikelihood` with c = 1), the mask
    (n, T).
    """
    if z.dim() != 3:
        return lik.nll(z, y).sum(), z.shape[0], torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    n, T, C = z.shape
    tokens = TokenLikelihood(lik, T, C, num_sequences=n, num_tokens=n)  # c = 1: per-sequence sums
    mask = tokens.token_mask(y)
    return tokens.nll(z.reshape(n, -1), y).sum(), mask.sum(), mask


def _mean_loss(lik: Likelihood, z: Tensor, y: Tensor) -> Tensor:
    """The training objective: the mean loss per sample, or per counted token of sequence outputs (n, T, C)."""
    total, count, _ = _loss_sum(lik, z, y)
    return total / count


def _check_targets(lik: Likelihood, output_shape: torch.Size, y: Tensor, dtype: torch.dtype) -> None:
    """The targets as :func:`fisherlab.fisher` checks them, for outputs of ``output_shape`` (C,) or (T, C)."""
    if len(output_shape) == 2:
        T, C = output_shape
        lik = TokenLikelihood(lik, T, C, num_sequences=len(y))
    width = math.prod(output_shape)  # only the outputs' shape is read: a zero-stride stand-in, no N×T×C buffer
    lik.check_targets(torch.empty(1, width, dtype=dtype, device=y.device).expand(len(y), width), y)


def _batch_loss_grad(model: nn.Module, spec: ParamSpec, lik: Likelihood, x: Tensor,
                     y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean batch loss (:func:`_mean_loss`) and its gradient (P,) in ParamSpec order."""
    params = dict(model.named_parameters())
    loss = _mean_loss(lik, model(x), y)
    grads = torch.autograd.grad(loss, [params[n] for n in spec.names])
    return loss.detach(), spec.flatten(grads)


@torch.no_grad()
def _add_(model: nn.Module, spec: ParamSpec, delta: Tensor) -> None:
    params = dict(model.named_parameters())
    for name, d in spec.unflatten(delta).items():
        params[name].add_(d)


@torch.no_grad()
def _evaluate(model: nn.Module, lik: Likelihood, X: Tensor, y: Tensor, task: str,
              chunk: int = 4096) -> tuple[float, float]:
    """(mean loss, accuracy) on (X, y); accuracy is NaN for regression.

    Per sample, or for sequence outputs (n, T, C) per counted token (labels ≠ ``ignore_index``): the token-mean
    loss and the fraction of counted tokens predicted right.
    """
    total, count, correct = 0.0, 0, 0.0
    for i in range(0, X.shape[0], chunk):
        z = model(X[i: i + chunk])
        yi = y[i: i + chunk]
        loss, n, mask = _loss_sum(lik, z, yi)
        total, count = total + float(loss), count + int(n)
        if task == "multiclass":
            correct += float(((z.argmax(-1) == yi) & mask).sum())
        elif task == "binary":  # every token counts (the Bernoulli likelihood ignores none)
            correct += float(((z > 0).to(yi.dtype) == yi.reshape(z.shape)).sum())
    return total / count, (correct / count if task != "regression" else math.nan)


def _damped_inverse(M: Tensor, damping: float) -> Tensor:
    """(M + λI)⁻¹ by Cholesky in float64 (as the reconstructed network's roots), returned in M's dtype.

    A diagonal M given as its diagonal (n,) gives the diagonal of the inverse (n,).

    Raises:
        SingularMatrixError: M + λI is not (numerically) positive definite.
    """
    if M.dim() == 1:
        shifted = M.double() + damping
        low = float(shifted.min())
        if not low > 0:
            raise SingularMatrixError(f"a diagonal KFAC factor + {damping:g}·I is singular (smallest entry {low:.3e}: "
                                      "an Embedding id that never occurs in the batch); pass damping > 0")
        return shifted.reciprocal().to(M.dtype)
    eye = torch.eye(M.shape[0], dtype=torch.float64, device=M.device)
    return damped_solve(M.double(), eye, damping).to(M.dtype)


# ---------------------------------------------------------------------------------------------- steppers
class _Stepper:
    """One method's update rule; ``model`` is what is evaluated (the same function as the original)."""

    model: nn.Module

    def step(self, x: Tensor, y: Tensor, refresh: bool) -> tuple[Tensor, bool]:
        """Apply one update on the batch; returns (batch loss before the update, whether curvature was recomputed)."""
        raise NotImplementedError


class _OptimizerStepper(_Stepper):
    def __init__(self, model: nn.Module, lik: Likelihood, optimizer: torch.optim.Optimizer):
        self.model, self.lik, self.optimizer = model, lik, optimizer

    def step(self, x: Tensor, y: Tensor, refresh: bool) -> tuple[Tensor, bool]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = _mean_loss(self.lik, self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), False


class _NGDStepper(_Stepper):
    def __init__(self, model: nn.Module, lik: Likelihood, lr: float, damping: float, kind: str, solver: str,
                 cg_tol: float):
        self.model, self.lik, self.lr, self.damping = model, lik, lr, damping
        self.kind, self.solver, self.cg_tol = kind, solver, cg_tol
        self.spec = ParamSpec.from_model(model)

    def step(self, x: Tensor, y: Tensor, refresh: bool) -> tuple[Tensor, bool]:
        loss, g = _batch_loss_grad(self.model, self.spec, self.lik, x, y)
        engine = FisherEngine(self.model, (x, y), self.lik, kind=self.kind)
        x, _ = solve_ngd(engine, g, self.damping, solver=self.solver, cg_tol=self.cg_tol)
        _add_(self.model, self.spec, -self.lr * x)
        return loss, True


class _LayerInverses(NamedTuple):
    """A KFAC layer, its flat indices (P_l,) and damped factor inverses.

    ``A_inv`` is (A + aI)⁻¹ (width, width), or for a diagonal A (an Embedding's token counts, stored as its
    diagonal) the diagonal of (A + aI)⁻¹ (width,); ``S_inv`` is (S + sI)⁻¹ (out, out).
    """

    module: nn.Module
    layout: LayerLayout
    index: Tensor
    A_inv: Tensor
    S_inv: Tensor


def _times_A_inv(M: Tensor, A_inv: Tensor) -> Tensor:
    """M (rows, width) times (A + aI)⁻¹, given as a matrix (width, width) or as its diagonal (width,)."""
    return M * A_inv if A_inv.dim() == 1 else M @ A_inv


class _KFACStepper(_Stepper):
    """KFAC-NGD with the damped inverses cached between refreshes; every parameter of the model is updated.

    Layers with Kronecker factors take (S + sI)⁻¹ ∇W̄ (A + aI)⁻¹; the exact blocks B that KFAC keeps for
    LayerNorm/RMSNorm parameters take (B + λI)⁻¹ g_B. ``precondition`` (:data:`KFAC_PRECONDITION`) says how
    S⁻¹ ∇W̄ A⁻¹ is formed: from the gradient matrix (``"dense"``), or for Linear layers from the output-gradient
    and input rows (``"factored"``), or the cheaper of the two per layer (``"auto"``); all give the same step.
    """

    def __init__(self, model: nn.Module, lik: Likelihood, lr: float, damping: float, kind: str, split: str,
                 seed: int, precondition: str = "auto"):
        self.model, self.lik, self.lr, self.damping, self.kind, self.split = model, lik, lr, damping, kind, split
        self.seed, self.refreshes, self.precondition = seed, 0, precondition
        self.spec = ParamSpec.from_model(model)
        self.inverses: dict[str, _LayerInverses] = {}
        self.exact: dict[str, tuple[Tensor, Tensor]] = {}  # path → (flat indices, (B + λI)⁻¹)

    def _refresh(self, x: Tensor, y: Tensor) -> None:
        """Factors on the batch (MC labels of refresh k seeded with seed + k, as a reconstructed network's)."""
        kfac = fisher(self.model, (x, y), self.lik, kind=self.kind, structure="kfac", seed=self.seed + self.refreshes)
        self.refreshes += 1
        self.inverses = {}
        for path, f in kfac.factors.items():
            a, s = kron_damping_split(f.A, f.S, self.damping, self.split)  # A dense or diagonal (Embedding)
            self.inverses[path] = _LayerInverses(self.model.get_submodule(path), f, kfac.index[path],
                                                 _damped_inverse(f.A, a), _damped_inverse(f.S, s))
        self.exact = {path: (kfac.index[path], _damped_inverse(B, self.damping))
                      for path, B in kfac.exact_blocks.items()}

    def _factored(self, inputs: Tensor, layer: _LayerInverses) -> bool:
        """Whether (S⁻¹Δᵀ)(ĀA⁻¹) is used for a Linear layer with these input rows (cheaper, or forced)."""
        if self.precondition != "auto":
            return self.precondition == "factored"
        rows, m, n = inputs.numel() // inputs.shape[-1], layer.S_inv.shape[0], layer.A_inv.shape[0]
        return rows * (m * m + n * n + m * n) < m * n * (m + n)

    def step(self, x: Tensor, y: Tensor, refresh: bool) -> tuple[Tensor, bool]:
        if refresh or self.refreshes == 0:
            self._refresh(x, y)
            refresh = True
        spec = self.spec
        linear = [p for p, layer in self.inverses.items()
                  if type(layer.module) is nn.Linear and layer.layout.has_weight]
        with LayerCapture(self.model, [] if self.precondition == "dense" else linear) as cap:
            loss = _mean_loss(self.lik, self.model(x), y)
        factored = [p for p, (inputs, _) in cap.records.items() if self._factored(inputs, self.inverses[p])]
        skip = {n for p in factored for n in self.inverses[p].layout.param_names}
        rest = [n for n in spec.names if n not in skip]
        params = dict(self.model.named_parameters())
        grads = torch.autograd.grad(loss, [cap.records[p][1] for p in factored] + [params[n] for n in rest])
        with torch.no_grad():
            g = loss.new_zeros(spec.dim)  # the parameter gradient, zero in the factored layers
            for name, grad in zip(rest, grads[len(factored):], strict=True):
                g[spec.slice(name)] = grad.reshape(-1)
            steps = {}
            for p, delta in zip(factored, grads, strict=False):  # ∇W̄ = Δᵀ Ā over the rows (samples × leading dims)
                layer = self.inverses[p]
                delta = delta.reshape(-1, layer.S_inv.shape[0])
                a_bar = expand_input(layer.module, cap.records[p][0].detach(), bias=layer.layout.has_bias)
                # S⁻¹ is symmetric: (Δ S⁻¹)ᵀ = S⁻¹ Δᵀ
                steps[p] = (delta @ layer.S_inv).T @ (a_bar.reshape(-1, layer.A_inv.shape[0]) @ layer.A_inv)
            for p in [p for p in self.inverses if p not in factored]:
                layer = self.inverses[p]
                steps[p] = _times_A_inv(layer.S_inv @ layer.layout.gather(g[layer.index].unsqueeze(1))[0],
                                        layer.A_inv)
            update = torch.zeros_like(g)
            for p, step in steps.items():
                update[self.inverses[p].index] = self.inverses[p].layout.scatter(step.unsqueeze(0)).squeeze(1)
            for index, B_inv in self.exact.values():
                update[index] = B_inv @ g[index]
        _add_(self.model, spec, -self.lr * update)
        return loss.detach(), refresh


class _SNGDStepper(_Stepper):
    """Plain SGD on the reconstructed network, built on the first batch (in place: ``model`` is train's copy)."""

    def __init__(self, model: nn.Module, lik: Likelihood, lr: float, options: dict[str, Any]):
        self.model, self.lik, self.lr, self.options = model, lik, lr, options
        self.sgd: _OptimizerStepper | None = None

    def step(self, x: Tensor, y: Tensor, refresh: bool) -> tuple[Tensor, bool]:
        from fisherlab.reconstruction import reconstruct

        if self.sgd is None:
            net = reconstruct(self.model, (x, y), likelihood=self.lik, inplace=True, **self.options)
            self.sgd = _OptimizerStepper(net, self.lik, torch.optim.SGD(net.parameters(), lr=self.lr))
            net.attach(self.sgd.optimizer)
            self.model, refresh = net, True
        elif refresh:
            self.model.refresh((x, y))
        return self.sgd.step(x, y, False)[0], refresh


def _stepper(rule: str, model: nn.Module, lik: Likelihood, lr: float, *, damping: float, momentum: float,
             kind: str, ngd_solver: str, cg_tol: float, split: str, structure: str, kfac_precondition: str,
             reconstruct_options: dict[str, Any]) -> _Stepper:
    if rule == "sgd":
        return _OptimizerStepper(model, lik, torch.optim.SGD(model.parameters(), lr=lr))
    if rule == "momentum":
        return _OptimizerStepper(model, lik, torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum))
    if rule == "adam":
        return _OptimizerStepper(model, lik, torch.optim.Adam(model.parameters(), lr=lr))
    if rule == "ngd":
        parse_enum(NGDSolver, ngd_solver, "ngd_solver")
        return _NGDStepper(model, lik, lr, damping, kind, ngd_solver, cg_tol)
    if rule == "kfac-ngd":
        kfac_precondition = parse_enum(KFACPrecondition, kfac_precondition, "kfac_precondition").value
        return _KFACStepper(model, lik, lr, damping, kind, split, reconstruct_options["seed"],
                            kfac_precondition)
    options = {"structure": structure, "damping": damping, "kind": kind, "split": split,
               **reconstruct_options}
    return _SNGDStepper(model, lik, lr, options)


# ------------------------------------------------------------------------------------------------- train
def train(
    model: nn.Module,
    data: SplitData,
    likelihood: str | Likelihood | None = None,
    *,
    rule: str | None = None,
    lr: float,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    refresh_every: int = 10,
    damping: float = 1e-3,
    structure: str = "kfac",
    eval_every: int = 10,
    momentum: float = 0.9,
    kind: str = "true",
    ngd_solver: str = "auto",
    cg_tol: float = 1e-6,
    split: str = "pi",
    kfac_precondition: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
    **reconstruct_options: Any,
) -> xr.Dataset:
    """Train a copy of ``model`` with one rule and record its trajectory (module docstring).

    Args:
        model: The initial network (not modified), in eval mode if it has dropout or batch norm.
        data: Train/test split.
        likelihood: Default by task: categorical (multiclass), bernoulli (binary), gaussian (regression).
        rule: The training rule, one of :data:`RULES` (``method=`` is its deprecated spelling).
        lr: Learning rate η.
        steps: Number of updates.
        batch_size: Minibatch size.
        seed: Seed of the minibatch order (and of Monte-Carlo labels in reconstruction).
        refresh_every: Curvature refresh period in steps (``kfac-ngd``, ``sngd``).
        damping: λ of ``ngd``, ``kfac-ngd`` and ``sngd``.
        structure: Reconstruction structure of ``sngd``.
        eval_every: Evaluate on the full splits every this many steps (and at the end).
        momentum: Momentum of ``momentum``.
        kind: Fisher kind of the curvature (``true``, ``mc``, ``empirical``, ``ggn``; ``fisher_kind=`` is its
            deprecated spelling).
        ngd_solver: ``auto``, ``cholesky``, ``woodbury`` or ``cg`` (``ngd``).
        cg_tol: CG tolerance of ``ngd_solver="cg"``.
        split: KFAC damping split (``kfac-ngd``, ``sngd``).
        kfac_precondition: ``auto``, ``dense`` or ``factored``: how ``kfac-ngd`` forms S⁻¹ ∇W̄ A⁻¹ (module docstring).
        device: Device (default: the model's).
        dtype: Dtype (default: the model's).
        progress: Progress bar (None: only on a terminal).
        **reconstruct_options: Further options of :func:`fisherlab.reconstruction.reconstruct` (``sngd``).

    Returns:
        A ``"training"`` Dataset with dim ``step`` (steps + 1 entries) and the variables of the module docstring;
        attrs: provenance (config, seed, versions), ``rule``, ``diverged``, ``stopped``.

    Raises:
        InputError: Unknown rule or option, bad sizes, or a model in training mode with dropout/batch norm.
    """
    rule = renamed(reconstruct_options, "method", "rule", rule, None, "train")
    kind = renamed(reconstruct_options, "fisher_kind", "kind", kind, "true", "train")
    if rule not in RULES:
        raise InputError(f"unknown training rule {rule!r}; valid: {list(RULES)} (train needs rule=)")
    kind = parse_enum(FisherKind, kind, "Fisher kind").value
    for value, what in ((steps, "steps"), (batch_size, "batch_size"), (refresh_every, "refresh_every"),
                        (eval_every, "eval_every")):
        check_positive_int(value, what)
    lr = check_lr(lr)
    damping = check_damping(damping)
    if not isinstance(data, SplitData):
        raise InputError(f"data must be a fisherlab.data.SplitData; got {type(data)}")
    check_model(model)
    first = next(iter(model.parameters()))
    device = check_device(device) if device is not None else first.device
    dtype = check_dtype(dtype) or first.dtype
    lik = get_likelihood(likelihood or {"multiclass": "categorical", "binary": "bernoulli",
                                        "regression": "gaussian"}[data.task])
    data = data.to(device=device, dtype=dtype)
    work = copy.deepcopy(model).to(device=device, dtype=dtype)
    with torch.no_grad():  # the targets as fisher checks them (shape, label range, C ≥ 2 for categorical)
        output_shape = work(data.X_train[:1]).shape[1:]
    _check_targets(lik, output_shape, data.y_train, dtype)
    stepper = _stepper(rule, work, lik, lr, damping=damping, momentum=momentum, kind=kind,
                       ngd_solver=ngd_solver, cg_tol=cg_tol, split=split, structure=structure,
                       kfac_precondition=kfac_precondition, reconstruct_options={"seed": seed, **reconstruct_options})

    n = steps + 1
    rec = {k: np.full(n, np.nan) for k in _VARIABLES}
    rec["time"][0], rec["cpu_time"][0], rec["refresh"][:] = 0.0, 0.0, 0.0
    batches = _batches(data, batch_size, seed)
    elapsed, cpu, stopped = 0.0, 0.0, ""
    for s in progress_bar(range(n), desc=rule, progress=progress):
        if s % eval_every == 0 or s == steps:
            rec["train_loss"][s], rec["train_accuracy"][s] = _evaluate(stepper.model, lik, data.X_train,
                                                                       data.y_train, data.task)
            rec["test_loss"][s], rec["test_accuracy"][s] = _evaluate(stepper.model, lik, data.X_test,
                                                                     data.y_test, data.task)
        if s == steps:
            break
        x, y = next(batches)
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            loss, refreshed = stepper.step(x, y, s % refresh_every == 0)
        except (NonFiniteError, SingularMatrixError) as exc:  # the curvature broke down (e.g. all units dead)
            stopped = f"step {s}: {type(exc).__name__}: {exc}"
            break
        _sync(device)
        elapsed += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        rec["loss"][s], rec["refresh"][s] = float(loss), float(refreshed)
        rec["time"][s + 1], rec["cpu_time"][s + 1] = elapsed, cpu
        if not (math.isfinite(rec["loss"][s]) and math.isfinite(np.nan_to_num(rec["train_loss"][s], nan=0.0))):
            stopped = f"step {s}: non-finite loss"
            break
    config = {"rule": rule, "lr": lr, "steps": steps, "batch_size": batch_size, "refresh_every": refresh_every,
              "damping": damping, "structure": structure if rule == "sngd" else None,
              "kind": kind, "momentum": momentum if rule == "momentum" else None,
              "ngd_solver": ngd_solver if rule == "ngd" else None, "split": split, "eval_every": eval_every,
              "kfac_precondition": kfac_precondition if rule == "kfac-ngd" else None,
              "likelihood": repr(lik), "dataset": data.name, "data_meta": data.meta,
              "model": type(model).__name__, "num_params": sum(p.numel() for p in model.parameters()),
              "reconstruct_options": reconstruct_options}
    ds = new_dataset("training", {k: ("step", v) for k, v in rec.items()}, {"step": np.arange(n)}, config=config,
                     seed=seed, device=device, dtype=dtype, attrs={"rule": rule, "diverged": int(bool(stopped)),
                                                          "stopped": stopped or "no"})
    return annotate(ds, {**_VARIABLES, "step": ("update index", "1")})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ comparisons
def compare(model: nn.Module, data: SplitData, configs: Mapping[str, Mapping[str, Any]],
            **common: Any) -> xr.Dataset:
    """Run several rules from the same model and minibatch order; one Dataset with dims (``rule``, ``step``).

    Args:
        model: The initial network (not modified).
        data: Train/test split.
        configs: Run name → keyword arguments of :func:`train` for that run (``rule`` defaults to the name).
        **common: Keyword arguments shared by every run (``steps``, ``seed``, ``batch_size``, ...).

    Returns:
        The runs concatenated along ``rule`` (coordinate: the run names), with per-run variables ``lr`` and
        ``diverged``; the ``config`` attribute holds the shared and per-run arguments and each run's config.
    """
    if not configs:
        raise InputError("compare needs at least one run")
    runs = [train(model, data, **{"rule": name, **common, **dict(kw)}) for name, kw in configs.items()]
    stacked = xr.concat([_scalars(r) for r in runs], dim="rule", combine_attrs="drop")
    return _finish(stacked.assign_coords(rule=list(configs)), runs,
                   {"common": common, "runs": {k: dict(v) for k, v in configs.items()}})


def _scalars(run: xr.Dataset) -> xr.Dataset:
    """A training run with its learning rate and divergence flag as scalar variables, attributes dropped."""
    return run.assign(lr=json.loads(run.attrs["config"])["lr"], diverged=int(run.attrs["diverged"])).drop_attrs()


def _finish(stacked: xr.Dataset, runs: Sequence[xr.Dataset], config: Mapping[str, Any]) -> xr.Dataset:
    """A stacked set of runs as a provenance-stamped ``training`` Dataset (seed, device, dtype of the first run)."""
    first = runs[0].attrs
    ds = new_dataset("training", dict(stacked.data_vars), dict(stacked.coords),
                     config={**config, "run_configs": [json.loads(r.attrs["config"]) for r in runs]},
                     seed=first["seed"] if isinstance(first["seed"], int) else None, device=first["device"],
                     dtype=first["dtype"])
    return annotate(ds, {**_VARIABLES, "step": ("update index", "1"), "lr": ("learning rate", "1"),
                         "diverged": ("run diverged", "1")})


def sweep_lr(model: nn.Module, data: SplitData, configs: Mapping[str, Mapping[str, Any]],
             lrs: Mapping[str, Sequence[float]] | Sequence[float], **common: Any) -> xr.Dataset:
    """Train every run with every learning rate of its list.

    Args:
        model: The initial network (not modified).
        data: Train/test split.
        configs: Run name → keyword arguments of :func:`train` (without ``lr``).
        lrs: One list of learning rates for all runs, or run name → list.
        **common: Shared keyword arguments.

    Returns:
        Dims (``rule``, ``candidate``, ``step``); ``lr`` (rule, candidate) holds the learning rates (NaN pads
        shorter lists, whose runs are all-NaN and count as diverged), and ``best`` (rule) the candidate with
        the lowest final ``train_loss`` (diverged runs count as +inf). :func:`best_runs` selects them.
    """
    per = {name: list(lrs[name] if isinstance(lrs, Mapping) else lrs) for name in configs}
    if any(not v for v in per.values()):
        raise InputError("every run needs at least one learning rate")
    width = max(len(v) for v in per.values())
    rows, raw = [], []
    for name, kw in configs.items():
        runs = [train(model, data, **{"rule": name, **common, **dict(kw), "lr": lr}) for lr in per[name]]
        raw += runs
        mine = [_scalars(r) for r in runs]
        pad = xr.full_like(mine[0].drop_vars("diverged"), np.nan).assign(diverged=1)
        rows.append(xr.concat(mine + [pad] * (width - len(mine)), dim="candidate"))
    stacked = xr.concat(rows, dim="rule").assign_coords(rule=list(configs), candidate=np.arange(width))
    ds = _finish(stacked, raw, {"common": common, "runs": {k: dict(v) for k, v in configs.items()}, "lrs": per})
    final = ds["train_loss"].isel(step=-1).where(ds["diverged"] == 0).fillna(np.inf)
    ds["best"] = ("rule", final.argmin("candidate").values)
    return annotate(ds, {"best": ("candidate with the lowest final train loss", "1")})


def best_runs(sweep: xr.Dataset) -> xr.Dataset:
    """The best candidate of each rule of a :func:`sweep_lr` Dataset: dims (``rule``, ``step``)."""
    return sweep.isel(candidate=sweep["best"]).drop_vars(["best", "candidate"])
