"""The Fisher engine: per-sample quantities of a model, a likelihood and data, with ``torch.func``.

METHOD.md §2. Every Fisher variant fisherlab computes has the form

    F = (1/N) Σ_n J_nᵀ M_nᵀ M_n J_n,

where J_n = ∂z_n/∂θ (C×P) and M_n (R×C) is an **output-space factor** that depends on the variant:

=========== ====================================================== =========
kind        rows of M_n                                            R
=========== ====================================================== =========
true        B_nᵀ with Λ(z_n) = B_n B_nᵀ (closed form)              ≤ C
mc          ∇_z ℓ(z_n, ŷ_{n,s})ᵀ / √S, ŷ_{n,s} ~ p(· | z_n)        S
empirical   ∇_z ℓ(z_n, y_n)ᵀ (observed labels)                     1
ggn         K_nᵀ with ∇²_z ℓ(z_n, y_n) = K_n K_nᵀ (autograd+eigh) C
=========== ====================================================== =========

(∇θ log p = −J_nᵀ ∇_z ℓ, and the sign cancels in the outer product; the likelihood builds M_n,
:meth:`~fisherlab.likelihoods.Likelihood.output_factor`.) The engine never holds J_n for the whole
dataset: it walks over chunks and yields the **factor rows** U_n = M_n J_n (R×P per sample, by one vmapped VJP
per row), or applies F to vectors matrix-free: J v by forward mode (``jvp``), M_nᵀ M_n in output space, Jᵀ w by
reverse mode (``vjp``).

**Per-sample differentiation.** The factor rows come from ``vmap`` over the samples of a chunk. A model that
cannot be vmapped over samples (fused ``nn.LSTM`` / ``nn.GRU`` kernels have no batching rule) is differentiated
by a Python loop over the samples instead — the same rows, one VJP per sample, slower — and the engine says so
once with a :class:`~fisherlab.errors.FallbackWarning` (``sample_loop`` is then True). vmap is probed on the first
samples when factor rows are first needed, and a later chunk on which it fails or returns per-sample gradients of
the wrong shape (``nn.PReLU``'s batching rule with several rows per sample) switches the engine to the loop too.
Matrix-free products and the layer-wise structures need no per-sample ``vmap`` (one ``jvp`` and one ``vjp`` per
chunk; one batched reverse pass) and are unaffected.

**Attention.** torch's fused attention kernels (the ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``
inference fast path, the flash and memory-efficient kernels of ``F.scaled_dot_product_attention``) have no
forward-mode derivative and no batching rule. Every evaluation of the model by the engine therefore runs inside
:func:`differentiable_attention` (MHA fast path off, SDPA on its math backend: the same function, in plain
differentiable operations), which restores the caller's settings afterwards; a pass that only one plain reverse pass
differentiates (the layer-wise structures' rows where the kind gives one row per sample,
:attr:`FisherEngine.reverse_only_rows`, :func:`fisherlab.layers.layer_rows`; and
the gradient, :meth:`FisherEngine.loss_and_gradient`) keeps the caller's SDPA backends, whose fused kernels have a
backward. An operation that still has no
forward-mode rule (a custom ``autograd.Function`` without ``jvp``) gets its J v by two reverse passes instead,
J v = ∂/∂u ⟨Jᵀu, v⟩ (the double-VJP trick, a :class:`~fisherlab.errors.FallbackWarning` once); one with neither
rule is an :class:`~fisherlab.errors.UnsupportedLayerError`.

**Sequence models** (docs/sequences.md). A model may return (N, T, C) — T tokens of C outputs, as in language
modelling — with targets (N, T) (class labels; labels equal to the likelihood's ``ignore_index``, −100 by default,
mark tokens that do not count, e.g. padding) or (N, T, C). The engine flattens the outputs to (N, T·C) (token-major)
and wraps the likelihood in a :class:`~fisherlab.likelihoods.TokenLikelihood` with c = N / N_tok (N_tok: the counted
tokens of all ranks): the loss is the mean over the counted tokens, L = (1/N_tok) Σ_n Σ_t m_nt ℓ(z_nt, y_nt), and
F = (1/N_tok) Σ_n Σ_t m_nt J_ntᵀ Λ(z_nt) J_nt; per-sample quantities are per sequence (the empirical Fisher's row of
sequence n is g_n = Σ_t m_nt ∇θ ℓ_nt). Every structure that divides its sums over samples by N so averages over
tokens, unchanged. The true Fisher costs T·(C−1) factor rows per sequence; the matrix-free products apply the
token blocks of M without forming the block-diagonal factor.

**The first pass.** Every sample's outputs are checked (finite; the model deterministic) and the Monte-Carlo labels
drawn once, with a generator seeded by ``seed``, on the first pass over the data that a computation makes — on
its own evaluation of the model, so as a rule no separate pass is made (BackPACK and curvlinops make one pass too;
:meth:`FisherEngine.chunks`). The labels are drawn per piece of ``chunk_size`` samples, in order, whatever chunks
that pass takes, so the MC Fisher does not depend on the chunking and the same seed gives the same matrix. A piece
is one ``sample`` call: torch's Bernoulli and multi-sample multinomial draws of a piece differ from those of its
parts, as a user's likelihood's may (fisherlab's Gaussian, uniforms laid out sample by sample, and one-sample
categorical draws would not, but are treated alike). So the exception: a consumer whose chunks split a piece (a
layer-wise chunk size below ``chunk_size``) has each piece evaluated once more, without grad, on its first chunk —
one extra no-grad forward over the data in all (tests/test_mc_label_pass.py).

**Data-parallel.** Under ``torch.distributed`` (initialized, world size > 1, or an explicit ``process_group``) each
rank passes its own shard of the data (:func:`fisherlab.distributed.shard`); N is the global sample count, and every
average over samples — loss, gradient, F V — is a sum all-reduced over the ranks before the division by N
(:meth:`FisherEngine.reduce_sum`; the structures reduce their accumulated sums the same way). The MC label of the
global sample n depends on (seed, n) only: a rank repeats the single process's draws chunk by chunk, with zeros for
the other ranks' outputs (the built-in likelihoods consume the stream by shape, not by value), so the MC Fisher is the
same for any number of ranks. docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Collection, Hashable, Iterator, Sequence
from functools import partial
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from fisherlab.checks import check_device, check_dtype, check_model, low_precision_advice, parse_enum
from fisherlab.datasource import DataSource
from fisherlab.distributed import active_group, all_reduce_sum, min_over_ranks, sample_offset
from fisherlab.errors import FallbackWarning, InputError, NonFiniteError, UnsupportedLayerError
from fisherlab.likelihoods import Likelihood, TokenLikelihood, get_likelihood
from fisherlab.memory import check_budget, dense_bytes, resolve_budget
from fisherlab.params import ParamSpec, all_finite
from fisherlab.progress import bar as progress_bar
from fisherlab.vocabulary import FisherKind

#: Upper bound on the bytes of one chunk's working set (two copies of its factor rows, or the activations of a
#: matrix-free product) when the caller gives no chunk size. Large chunks mean few, large kernels: on a CPU shared
#: with other jobs every parallel region waits for its slowest thread, so many small chunks cost far more than
#: their arithmetic (benchmarks/README.md). 1 GiB: at 256 MiB the three P-wide tensors of a 10M-parameter GPT took
#: half of it, so its products ran in chunks of 3 sequences and its gradient in chunks of 7 (32 × 64 tokens;
#: 1-thread CPU time of F·v 4.52 → 3.28 s and of the gradient 2.09 → 1.81 s with chunks of 16 and 32).
DEFAULT_CHUNK_BYTES = 2**30

T = TypeVar("T")

#: Upper bound on the bytes :meth:`FisherEngine.matmat` keeps between calls: the output-space state (outputs or
#: factors) and, when they fit too, the recorded graphs of the chunks' forward passes (:class:`Linearisation`).
#: 1 GiB: the graphs of a 10M-parameter GPT on 32 × 64 tokens (312 MB) are kept.
MATMAT_CACHE_BYTES = 2**30

#: Working bytes of one chunk of :meth:`FisherEngine.matmat` per sample, a + b·k activation bytes A
#: (:meth:`FisherEngine.activation_bytes`) for a block of k columns, by how the chunk runs:
#: ``"vjp of jvp"`` (the recorded graph holds the tangent operations of every column too), ``"recording"`` (the
#: primal graph recorded apart, to keep, and the tangents by ``jvp``; also J v by two VJPs, not measured) and
#: ``"kept"`` (a ``jvp`` and a reverse pass through a kept graph, which the cache's bytes count). Upper bounds of
#: the peak tensor bytes one chunk allocates (torch profiler, ``profile_memory``; 4 and 8 samples, 1 and 4 columns,
#: float32), per sample: vjp of jvp 0.70–1.24 + 1.6–2.4·k (GPT 1M: 1.06 + 1.75·k; GPT d = 16 × 3 layers:
#: 1.24 + 2.41·k; CNN: 0.70 + 1.61·k), recording 1.16–1.7 + 0.05–1.36·k (the CNN highest), kept 0.16–0.7 +
#: 0.06–1.37·k; beside them at most two P-wide tensors per column (the gradient and its flattening; the MLP's
#: activations are negligible). Models: fisherlab.models.MLP 784-256-256-10, CNN of 16 and 32 channels on 28 × 28,
#: GPTs on 64 tokens of 65 (d × layers 16 × 3, 64 × 2, 128 × 5 = "1M"); measured peaks against the estimate:
#: :meth:`FisherEngine.product_bytes`.
PRODUCT_WORKING: dict[str, tuple[float, float]] = {"vjp of jvp": (1.25, 2.5), "recording": (1.75, 1.5),
                                                    "kept": (0.75, 1.5)}

#: Dtypes with too little range or precision for some kinds (torch has no eigendecomposition in them).
LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def differentiable_attention(reverse_only: bool = False) -> Iterator[None]:
    """Run attention on differentiable paths inside the context; the caller's settings are restored on exit.

    Turns the ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast path off
    (``torch.backends.mha.set_fastpath_enabled(False)``: it calls fused inference kernels with neither a
    forward-mode derivative nor a vmap rule) and restricts ``F.scaled_dot_product_attention`` to its math backend
    (``sdpa_kernel(SDPBackend.MATH)``: softmax(QKᵀ/√d + mask) V in ordinary operations, which every torch.func
    transform differentiates). Both compute the same function as the fused kernels. Process-global while open, like
    every torch backend flag.

    Args:
        reverse_only: Whether the pass is differentiated by plain reverse-mode autograd only (at most one
            ``torch.autograd.grad`` without ``is_grads_batched``, no torch.func transform): then SDPA keeps the
            caller's backends (the flash / memory-efficient kernels have a backward and are faster).
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with contextlib.nullcontext() if reverse_only else sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def forward_hooks_suspended(model: nn.Module) -> Iterator[None]:
    """Evaluate ``model`` without its modules' forward hooks inside the context; they are restored on exit.

    For the evaluations that find the sample a failed evaluation of a chunk fails on (:meth:`FisherEngine.forward`):
    hooks that record one call per layer (:class:`fisherlab.layers.LayerCapture`, still registered while the
    failure propagates) must not see them. Forward pre-hooks stay.
    """
    saved = [(m, m._forward_hooks) for m in model.modules() if m._forward_hooks]
    try:
        for m, hooks in saved:
            m._forward_hooks = type(hooks)()
        yield
    finally:
        for m, hooks in saved:
            m._forward_hooks = hooks


Calls = TypeVar("Calls", bound="ModuleCalls")


class ModuleCalls:
    """Forward hooks on the modules at ``paths`` that record their calls in a forward pass (a context manager).

    ``records[path]`` = (input, output) of the module's first call that takes a tensor and returns one, ``calls``
    counts those calls, ``repeated`` lists the paths called more than once in the order of their second call, and
    ``opaque`` holds the paths called on anything else (no positional tensor input, or not a tensor output).
    ``versions[path]`` is the recorded output's version counter when it was recorded, so :meth:`modified` tells
    whether an in-place operation has altered it since. Every output is left as it is (:meth:`_output`). The engine
    records its first evaluation so (:attr:`FisherEngine.first_calls`); :class:`fisherlab.layers.LayerCapture`
    extends it.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        self.model, self.paths = model, list(paths)
        self.records: dict[str, tuple[Tensor, Tensor]] = {}
        self.calls: dict[str, int] = {}
        self.versions: dict[str, int] = {}
        self.repeated: list[str] = []
        self.opaque: set[str] = set()
        self.handles: list = []

    def __enter__(self: Calls) -> Calls:
        """Register the hooks (:meth:`_register`); where that fails, the model is left as it was.

        A registration can fail partway (a ``torch.jit.script`` submodule takes no hook); the hooks already
        registered are then removed before the error propagates, as no ``__exit__`` follows a failed ``__enter__``.
        """
        try:
            self._register()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _register(self) -> None:
        """Register the hooks, each handle in :attr:`handles` as soon as it is made.

        The modules are looked up in one walk of the model (``get_submodule`` a path: GPT 1M, 34 paths, 0.3 ms);
        a path the walk does not name (not a module's) raises ``get_submodule``'s own error.
        """
        modules = dict(self.model.named_modules(remove_duplicate=False))
        for path in self.paths:
            module = modules[path] if path in modules else self.model.get_submodule(path)
            self.handles.append(module.register_forward_hook(self._hook(path)))

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _record(self, path: str, module: nn.Module, inputs: tuple, out: object) -> None:
        if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(out, Tensor):
            self.opaque.add(path)
        elif path in self.records:
            if self.calls[path] == 1:
                self.repeated.append(path)
            self.calls[path] += 1
        else:
            self.records[path] = (inputs[0], out)
            self.calls[path] = 1
            self.versions[path] = out._version

    def _output(self, output: Tensor) -> Tensor:
        """What the forward pass continues from after a recorded call: the output itself."""
        return output

    def _hook(self, path: str) -> Callable[[nn.Module, tuple, Any], Any]:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            self._record(path, module, inputs, output)
            return self._output(output) if isinstance(output, Tensor) else output

        return hook

    def modified(self, paths: Collection[str] | None = None) -> list[str]:
        """The paths (of ``paths``; default all) whose recorded output an in-place operation has altered since."""
        return [p for p, (_, out) in self.records.items()
                if (paths is None or p in paths) and out._version != self.versions[p]]

    def detach(self) -> None:
        """Keep the records without their autograd graph (the version counters stay shared with the outputs)."""
        self.records = {p: (a.detach(), out.detach()) for p, (a, out) in self.records.items()}


def _no_forward_rule(exc: BaseException) -> bool:
    """Whether ``exc`` says an operation has no forward-mode derivative (torch words it several ways)."""
    text = str(exc).lower()
    return isinstance(exc, (NotImplementedError, RuntimeError)) and (
        "forward ad" in text or "forward-mode" in text or "jvp" in text
    )


class UncheckedChunk(NamedTuple):
    """A chunk of the engine's first pass over the data whose outputs are not checked yet (:meth:`FisherEngine.chunks`).

    Yielded in place of the chunk's MC labels; :meth:`FisherEngine.output_factor` checks the outputs and uses the
    labels. The chunk is samples [start + offset, start + offset + size) of this rank, within its block of the
    first pass, samples [start, start + len(inputs)).
    """

    start: int
    inputs: Tensor
    offset: int
    size: int


class Linearisation(NamedTuple):
    """What :meth:`FisherEngine.matmat` keeps of one chunk between products (at the parameters of its state key).

    ``state``: what the output-space product needs (:meth:`FisherEngine._output_state`: the outputs z, (n, C), or
    the factor M); ``vjp_fn``: the VJP of the chunk's forward pass (its recorded graph, ``torch.func.vjp``), or
    None where the graphs of all chunks did not fit the cache.
    """

    state: Tensor
    vjp_fn: Callable[[Tensor], tuple[dict[str, Tensor]]] | None


class FisherEngine:
    """Per-sample factor rows, matrix-free products and gradients for one model, likelihood, data and kind.

    Everything the computations rely on is checked once. Construction checks the options, the model
    (:func:`fisherlab.checks.check_model`: parameters *and* buffers are finite), the data and the first samples'
    outputs and targets (a sequence model's targets all: its tokens are counted); that evaluation of the first
    samples also measures :meth:`activation_bytes` and records the calls the layer-row probe reads
    (:attr:`first_calls`). The first pass over the data that
    a computation makes checks the rest on its own evaluation of the model, with no pass of its own (:meth:`chunks`):
    every sample evaluates, so a sample the model cannot take (an ``nn.Embedding`` index out of range) or whose
    outputs are NaN or infinite is named; every chunk's targets are valid; the model is deterministic (the first
    samples' outputs equal their first evaluation, so dropout left active — also ``F.dropout(x, p, self.training)``
    — is refused); and the Monte-Carlo labels are drawn. (Data-parallel with ``kind="mc"`` that pass is made at
    construction, without grad: the labels of a rank are drawn from all its outputs, :meth:`_draw_as_one_process`.)

    Args:
        model: Any ``nn.Module`` mapping (B, *input_shape) → (B, C), or → (B, T, C) for a sequence model (see the
            module docstring). It is not modified: parameters and buffers are
            passed through ``torch.func.functional_call`` as detached copies in ``dtype`` on ``device``.
        data: See :class:`fisherlab.datasource.DataSource`.
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or a :class:`Likelihood`.
        kind: ``"true"``, ``"mc"``, ``"empirical"`` or ``"ggn"``.
        params: Names of the parameters the Fisher is taken over (default: all trainable, in model order).
        mc_samples: S, labels drawn per input for ``kind="mc"``.
        seed: Seed of the Monte-Carlo label draws.
        dtype: Compute dtype, a floating ``torch.dtype`` or its name (``"float32"``, ``"float64"``; default: the
            model's parameter dtype). ``kind="ggn"`` needs float32 or float64.
        device: Compute device (default: the model's parameter device).
        chunk_size: Samples per chunk (default: as many as fit in ``min(DEFAULT_CHUNK_BYTES, budget/4)`` of factor
            rows, 1 GiB at most; the matrix-free products then size their own chunks by activations, see
            :meth:`matmat_chunk_size`).
        memory_budget: Bytes any single dense object may take (default: half the available memory).
        progress: Show progress bars (``None``: only on a terminal).
        process_group: The ``torch.distributed`` group to reduce over (default: the world group when
            ``torch.distributed`` is initialized with more than one process; see the module docstring). ``data``
            is then this rank's shard; every rank needs at least one sample.

    Raises:
        InputError: Bad options, model or data (the message names the tensor, option or sample). A sample the model
            cannot be evaluated on, invalid targets of a later chunk and a random model are found by the first pass
            over the data, so raised by the computation that makes it (a structure, a product, the gradient).
        NonFiniteError: NaN or infinite values in a parameter, buffer, the data, or the outputs of a sample (those of
            a later sample raised by the first pass, as above).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        likelihood: str | Likelihood = "categorical",
        *,
        kind: str | FisherKind = FisherKind.TRUE,
        params: list[str] | None = None,
        mc_samples: int = 1,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
        memory_budget: int | None = None,
        progress: bool | None = None,
        process_group: Any = None,
    ):
        check_model(model)
        self.kind = parse_enum(FisherKind, kind, "Fisher kind")
        self.likelihood = get_likelihood(likelihood)
        if self.kind is FisherKind.MC and (not isinstance(mc_samples, int) or mc_samples < 1):
            raise InputError(f"mc_samples must be a positive integer; got {mc_samples}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise InputError(f"chunk_size must be a positive integer; got {chunk_size}")
        dtype = check_dtype(dtype)
        self.model = model
        self.spec = ParamSpec.from_model(model, params)
        first = next(iter(model.parameters()))
        self.dtype = dtype or first.dtype
        self.device = check_device(device) if device is not None else first.device
        if self.kind is FisherKind.GGN and self.dtype in LOW_PRECISION:
            raise InputError(f"kind='ggn' factors the loss Hessian by an eigendecomposition, which torch does not "
                             f"compute in {self.dtype}: compute in float32 (dtype=torch.float32)")
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.progress = progress
        self.memory_budget = resolve_budget(memory_budget, self.device)
        #: The model's outputs per sample, (C,) or (T, C) (set by the first evaluation, on the first samples).
        self.output_shape: tuple[int, ...] | None = None
        self._sample_loop: bool | None = None  # probed when first needed (sample_loop)

        named = dict(model.named_parameters(remove_duplicate=False))
        self.params = {n: named[n].detach().to(self.device, self.dtype) for n in self.spec.names}
        selected = {id(named[n]): n for n in self.spec.names}  # a tied tensor is converted once, under this name
        tensors = [*named.items(), *model.named_buffers(remove_duplicate=False)]
        self._frozen = {
            n: t.detach().to(self.device, self.dtype if t.is_floating_point() else None)
            for n, t in tensors if n not in self.params and id(t) not in selected
        }
        #: The model's other names of a selected tensor (tied weights) → its selected name: every evaluation passes
        #: it under each (functional_call without tie_weights, which would find the ties again on every call).
        self._aliases = {n: selected[id(t)] for n, t in tensors if n not in self.params and id(t) in selected}
        self._check_converted(named)
        self.data = DataSource(data, device=self.device, dtype=self.dtype)
        self._activation_bytes: dict[bool, int] = {}
        #: Whether the kind alone gives one row per sample (``empirical``; ``mc`` with S = 1), so that the passes
        #: with one reverse pass per chunk (the layer rows', :func:`fisherlab.layers.layer_rows`) keep the caller's
        #: attention kernels (``reverse_only`` of :func:`differentiable_attention`): the first evaluation measures
        #: :meth:`activation_bytes` for the same kernels. ``true`` and ``ggn`` with R = 1 (a one-column factor, C = 1)
        #: are False too: R is known only after that evaluation.
        self.reverse_only_rows = self.kind is FisherKind.EMPIRICAL or (self.kind is FisherKind.MC
                                                                      and self.mc_samples == 1)
        #: The first evaluation's calls of the modules that own the selected parameters (:meth:`_first_evaluation`),
        #: which the layer-row probe takes (:meth:`take_first_calls`) in place of a forward pass of its own
        #: (:func:`fisherlab.layers`' ``_probe_layers``); None: not recorded, or taken. Kept after the first pass
        #: over the data (the probe may come after it).
        self.first_calls: ModuleCalls | None = None
        self._check_data()
        self.group = active_group(process_group)
        #: This rank's samples, the global index of its first one, and N, the samples of all ranks.
        self.local_samples = len(self.data)
        self.sample_offset, self.num_samples = sample_offset(self.local_samples, self.group, self.device)
        self.rows_per_sample = self._rows_per_sample()
        row_bytes = dense_bytes(self.rows_per_sample, self.spec.dim, self.dtype)
        self._working_bytes = min(DEFAULT_CHUNK_BYTES, self.memory_budget // 4)
        self._chunk_size_given = chunk_size is not None
        if chunk_size is None:
            chunk_size = max(1, self._working_bytes // (2 * row_bytes))
        self.chunk_size = int(chunk_size)
        if self.group is not None:  # one chunk size on every rank (the MC draws follow it), the smallest
            self.chunk_size = min_over_ranks(self.chunk_size, self.group, self.device)
        self._probes: dict[Hashable, Any] = {}  # what probed() found, by key
        self._jvp_by_vjp = False  # set when an operation of the model has no forward-mode rule (see jv)
        self._output_cache: tuple[tuple, list[Linearisation]] | None = None  # matmat's (state key, per chunk)
        # The first pass over the data checks every sample's outputs and draws the MC labels (see _check_block).
        self._generator = (torch.Generator(device=self.device).manual_seed(self.seed)
                           if self.kind is FisherKind.MC else None)
        self._checked = 0  # this rank's leading samples whose outputs are checked (and MC labels drawn)
        self._draws: list[Tensor] = []  # the MC labels of those samples, per checked block, in order
        self._unchecked: tuple[Tensor, int] | None = None  # inputs of the chunk being checked, its global start
        if self._generator is not None and self.group is not None:
            self._scan_as_one_process()
        #: N_tok, the counted tokens of all ranks (a sequence model), else N.
        self.num_tokens = self._count_tokens()

    # ----------------------------------------------------------------------------------------------- checks
    def _check_converted(self, named: dict[str, Tensor]) -> None:
        """Parameters and buffers finite in the compute dtype where they are in the model's.

        :func:`~fisherlab.checks.check_model` lets a buffer hold ±inf (an additive attention mask); the conversion
        to the compute dtype must not add any.
        """
        buffers = dict(self.model.named_buffers(remove_duplicate=False))
        for n, t in [*self.params.items(), *self._frozen.items()]:
            source = named.get(n, buffers.get(n))
            if not t.is_floating_point() or (source is not None and t.data_ptr() == source.data_ptr()
                                             and t.dtype == source.dtype):
                continue  # unconverted: check_model has checked these very values
            finite = torch.isfinite(t)
            if n in buffers and n not in named:
                finite = finite | (torch.isinf(t) & torch.isinf(buffers[n].to(t.device)))
            if not bool(finite.all()):
                what = "buffer" if n not in named else "parameter" if named[n].requires_grad else "frozen parameter"
                raise NonFiniteError(f"{what} {n!r} contains NaN or infinite values in the compute dtype "
                                     f"{self.dtype}{low_precision_advice(self.dtype)}")

    def _check_data(self) -> None:
        x, y = self.data.first()
        if not x.is_floating_point() and not any(isinstance(m, nn.Embedding) for m in self.model.modules()):
            raise InputError(
                f"inputs have integer dtype {x.dtype} but the model has no nn.Embedding to take them; convert the "
                "inputs to floats (e.g. X.float())"
            )
        try:
            z = self._first_evaluation(x)
        except InputError:
            raise
        except Exception as exc:  # the message of the model's own failure is the useful part
            raise InputError(f"the model could not be evaluated on inputs of shape {tuple(x.shape)}: {exc}") from exc
        self.output_shape = tuple(z.shape[1:])
        if z.dim() == 3:  # c = 1 until the tokens are counted (_count_tokens)
            self.likelihood = TokenLikelihood(self.likelihood, z.shape[1], z.shape[2])
        z = z.reshape(z.shape[0], -1)
        self._check_outputs(z, 0)
        self._first_outputs = z.detach()  # the first pass evaluates these samples again (_check_deterministic)
        self.likelihood.check_targets(z, y)
        self.num_outputs = int(z.shape[1])

    def _first_evaluation(self, x: Tensor) -> Tensor:
        """The first samples' outputs f_θ(x), (n, C) or (n, T, C), detached; what else the pass finds is kept.

        The pass is the one :meth:`first_forward` makes (it measures :meth:`activation_bytes`, with the attention
        kernels :attr:`reverse_only_rows` gives), with :class:`ModuleCalls` on the modules that own the selected
        parameters, kept detached as :attr:`first_calls`. Where that pass fails (a model that cannot take
        gradients, or hooks), the outputs are those of a plain evaluation, which raises the model's own error, and
        nothing is kept.
        """
        try:
            with ModuleCalls(self.model, list(self.spec.layers())) as calls:
                z = self._measured_evaluation(x, self.reverse_only_rows)
        except InputError:
            raise
        except Exception:  # evaluated again as it is: its own error, or its failure left to a computation
            self._activation_bytes.clear()
            return self._evaluate(self.params, x)
        calls.detach()
        self.first_calls = calls
        return z.detach()

    def take_first_calls(self) -> ModuleCalls | None:
        """:attr:`first_calls`, which the engine then drops (None from then on).

        The layer-row probe reads it once (what it finds is kept, :meth:`probed`); a later probe makes a pass of its
        own.
        """
        calls, self.first_calls = self.first_calls, None
        return calls

    def _check_deterministic(self, again: Tensor) -> None:
        """Refuse a random model: ``again``, a second evaluation of the first samples (leading rows), must agree.

        The first pass's first chunk is that second evaluation (no extra forward pass unless it holds fewer samples);
        tolerance √eps, relative.
        """
        z, self._first_outputs = self._first_outputs, None
        if again.shape[0] < z.shape[0]:  # a first chunk smaller than the first samples: evaluate them again
            with torch.no_grad():
                again = self.forward(self.params, self.data.first(z.shape[0])[0])
        again = again[: z.shape[0]]
        tol = math.sqrt(torch.finfo(self.dtype).eps)
        if not bool(torch.allclose(again, z, rtol=tol, atol=tol * float(z.abs().max()))):
            raise InputError(
                f"two evaluations of the model on the same inputs differ (by up to {float((again - z).abs().max()):.3g}"
                f"): its outputs are random — dropout or another random operation is active (model.training is "
                f"{self.model.training}; e.g. F.dropout(x, p, self.training) in training mode). Per-sample Fishers "
                "of a random function are undefined: call model.eval(), or remove the randomness"
            )

    @property
    def sample_loop(self) -> bool:
        """Whether per-sample differentiation loops over the samples (the model cannot be vmapped over them).

        Probed on the first samples when first needed — by the factor rows (:meth:`_rows`), not by the layer-wise
        structures, which never vmap over samples — so an engine that never differentiates per sample skips it.

        Raises:
            InputError: The model calls a random operation (seen by vmap).
            UnsupportedLayerError: Neither vmap nor the per-sample loop can differentiate the model.
        """
        if self._sample_loop is None:
            self._probe_rows()
        return self._sample_loop

    def _probe_rows(self) -> None:
        """Set :attr:`sample_loop` by differentiating the first samples per sample under vmap, else in a loop."""
        x, _ = self.data.first()
        self._sample_loop = False
        M = torch.ones(x.shape[0], 1, self.num_outputs, dtype=self.dtype, device=self.device)
        try:  # the engines differentiate the model per sample under vmap; probe that on these few samples
            self._rows(x, M)
        except RuntimeError as exc:
            reason = str(exc).rstrip(".")
            if "random" in reason.lower():
                raise InputError(f"the model calls a random operation ({reason}): dropout or another random "
                                 f"operation is active (model.training is {self.model.training}). Per-sample "
                                 "Fishers of a random function are undefined: call model.eval(), or remove the "
                                 "randomness") from exc
            self._sample_loop = True
            try:
                self._rows(x, M)
            except RuntimeError as loop_exc:
                raise UnsupportedLayerError(
                    f"the model cannot be differentiated per sample, neither under torch.func.vmap ({reason}) nor "
                    f"one sample at a time ({str(loop_exc).rstrip('.')}); avoid in-place updates of inputs, .item() "
                    "and operations without a derivative"
                ) from loop_exc
            self._warn_sample_loop(reason)

    def _rows_per_sample(self) -> int:
        """R, the rows of M_n (module docstring); for ``true``, the width of the likelihood's factor at z = 0.

        A sequence model's factor is block-diagonal over its T tokens: T times one token's width (the (T·C × T·R)
        factor itself is not formed).
        """
        if self.kind is not FisherKind.TRUE:
            other = {FisherKind.MC: self.mc_samples, FisherKind.EMPIRICAL: 1, FisherKind.GGN: self.num_outputs}
            return other[self.kind]
        lik = self.likelihood
        if isinstance(lik, TokenLikelihood):
            z = torch.zeros(1, lik.num_classes, dtype=self.dtype, device=self.device)
            return lik.seq_len * int(lik.base.fisher_factor(z).shape[-1])
        z = torch.zeros(1, self.num_outputs, dtype=self.dtype, device=self.device)
        return int(lik.fisher_factor(z).shape[-1])

    # ------------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, params: dict[str, Tensor], x: Tensor, reverse_only: bool = False) -> Tensor:
        """The model's own outputs f_θ(x), (n, C) or (n, T, C), for inputs (n, *input_shape).

        ``reverse_only``: of :func:`differentiable_attention`.

        Raises:
            InputError: Outputs of another rank, another sample count, or (after the first evaluation) another shape
                per sample than the first samples' (sequences of one length T: pad them).
        """
        tensors = {**self._frozen, **params, **{a: params[n] for a, n in self._aliases.items() if n in params}}
        with differentiable_attention(reverse_only):
            z = functional_call(self.model, tensors, (x,), tie_weights=False)
        if not isinstance(z, Tensor) or z.dim() not in (2, 3) or z.shape[0] != x.shape[0]:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z)
            raise InputError(f"the model must return outputs of shape (N, C), or (N, T, C) for a sequence model; got "
                             f"{shape} for N = {x.shape[0]}")
        if self.output_shape is not None and tuple(z.shape[1:]) != self.output_shape:
            raise InputError(f"the model returned outputs of shape {tuple(z.shape)} for these inputs but "
                             f"{self.output_shape} per sample for the first ones; sequences must share one length T "
                             "(pad them, and give the padded positions the label ignore_index)")
        return z

    def forward(self, params: dict[str, Tensor], x: Tensor, *, reverse_only: bool = False) -> Tensor:
        """Z = f_θ(x), shape (n, C), for parameters ``params`` (names of the spec) and inputs (n, *input_shape).

        A sequence model's outputs (n, T, C) are flattened to (n, T·C), token-major (z[:, t·C:(t+1)·C] is token t).
        ``reverse_only``: the caller differentiates Z by one plain reverse pass at most (no torch.func transform, no
        batched gradients), so attention may run on fused SDPA kernels (:func:`differentiable_attention`).

        Raises:
            InputError: x is the inputs of a chunk of the first pass (:meth:`chunks`) and the model fails on one of
                its samples alone (named by its global index); other failures propagate as they are.
        """
        try:
            z = self._evaluate(params, x, reverse_only)
        except InputError:
            raise
        except Exception:
            if self._unchecked is not None and x is self._unchecked[0]:
                self._name_failing_sample(self._unchecked[1], x)
            raise
        return z.reshape(z.shape[0], -1)

    def _check_outputs(self, z: Tensor, start: int) -> None:
        """Refuse NaN / inf outputs, naming the first such sample (``start``: global index of z's first row)."""
        if all_finite([z.detach()]):  # one sum; the rows only where it cannot vouch for them
            return
        bad = ~torch.isfinite(z).all(dim=1)
        if bool(bad.any()):
            i = start + int(bad.nonzero()[0, 0])
            raise NonFiniteError(f"the model's outputs for sample {i} contain NaN or infinite values (parameters, "
                                 f"buffers and inputs are finite){low_precision_advice(self.dtype)}")

    # ------------------------------------------------------------------------------------------- first pass
    def _check_block(self, start: int, z: Tensor) -> None:
        """Check the outputs z (n, C) of this rank's samples [start, start + n), at the engine's parameters.

        Only the rows of samples not checked before (blocks come in order: those from ``_checked`` on) are checked:
        finite, and the first samples' equal to their first evaluation (:meth:`_check_deterministic`). For kind
        ``mc`` (one process) their labels are drawn on the way, piece by piece of ``chunk_size`` samples, by the
        generator seeded with ``seed``: every block of the first pass starts at a piece (:meth:`_first_pass`), so
        the labels depend on (seed, chunk_size) only, not on which pass or chunking checks them.
        """
        new = self._checked - start
        if new >= z.shape[0]:
            return
        fresh = z[new:]
        if self._checked == 0:
            self._check_deterministic(z)
        self._check_outputs(fresh, self.sample_offset + self._checked)
        if self._generator is not None and self.group is None:
            self._draws.append(self.likelihood.sample_pieces(fresh, self.chunk_size, self.mc_samples, self._generator))
        self._checked = start + z.shape[0]
        if self._checked == self.local_samples and len(self._draws) > 1:
            self._draws = [torch.cat(self._draws)]

    def _label_range(self, start: int, n: int) -> Tensor | None:
        """The MC labels of this rank's checked samples [start, start + n) (kind ``mc``; else None)."""
        if self._generator is None:
            return None
        labels = self._draws[0] if len(self._draws) == 1 else torch.cat(self._draws)
        return labels[start: start + n]

    @property
    def _labels(self) -> Tensor | None:
        """The MC labels of this rank's samples, (N_rank, S) or (N_rank, S, C) (kind ``mc``; else None).

        Drawn by the first pass over the data; before one has covered every sample, a no-grad pass over the
        rest draws them now (and checks their outputs).
        """
        if self._generator is None:
            return None
        if self._checked < self.local_samples:
            for _ in self.chunks(chunk_size=self._scan_chunk_size()):
                pass
        return self._draws[0]

    def _scan_as_one_process(self) -> None:
        """The first pass of kind ``mc`` under ``torch.distributed``, made at construction (no grad).

        Every sample is checked (:meth:`_check_block`) and the labels are drawn as one process draws them
        (:meth:`_draw_as_one_process`), which needs all of this rank's outputs at once.
        """
        outputs = []
        for start, x, _ in self.data.chunks(self._scan_chunk_size()):
            z = self._evaluate_unchecked(self.sample_offset + start, x)
            self._check_block(start, z)
            outputs.append(z)
        self._draws = [self._draw_as_one_process(torch.cat(outputs), self._generator)]  # type: ignore[arg-type]

    def _scan_chunk_size(self) -> int:
        """Samples per chunk of a no-grad pass: the largest multiple of ``chunk_size`` in :meth:`matmat_chunk_size`.

        ``chunk_size`` is sized for P-wide factor rows (3 samples of a 1.1M-parameter MLP with R = 9: 171 forward
        passes over 512 samples); a no-grad forward holds at most its activations.
        """
        return self.chunk_size * max(1, self.matmat_chunk_size() // self.chunk_size)

    def _count_tokens(self) -> int:
        """N_tok over all ranks (a sequence model's counted tokens; else N); the likelihood then gets c = N / N_tok.

        One pass over the targets (the model is not evaluated), in chunks of as many samples as the working bytes
        hold (nothing else is held: no forward pass sizes them, GPT 1M, 32 × 64 tokens: 18 ms of its engine's
        construction measured the products' activations for the chunk size). Bad targets in a chunk are checked
        again in no-grad pass chunks with the model evaluated on each first (its own error, a sample it cannot
        take, is the clearer one).

        Raises:
            InputError: Every token of every sequence is ignored; bad targets.
        """
        lik = self.likelihood
        if not isinstance(lik, TokenLikelihood):
            return self.num_samples
        x1, y1 = self.data.first(1)
        sample_bytes = x1.numel() * x1.element_size() + y1.numel() * y1.element_size()
        local = 0
        for start, x, y in self.data.chunks(max(1, self._working_bytes // max(sample_bytes, 1))):
            try:
                targets = self._canonical_targets(x, y)
            except InputError:
                step = self._scan_chunk_size()
                for offset in range(0, x.shape[0], step):
                    self._canonical_targets(x[offset: offset + step], y[offset: offset + step], start + offset)
                raise
            local += int(lik.token_mask(targets).sum())
        counts = torch.tensor([local], dtype=torch.int64, device=self.device)
        self.reduce_sum([counts])
        self.likelihood = TokenLikelihood(lik.base, lik.seq_len, lik.num_classes, num_sequences=self.num_samples,
                                          num_tokens=int(counts))
        return self.likelihood.num_tokens

    def _draw_as_one_process(self, z: Tensor, gen: torch.Generator) -> Tensor:
        """The MC labels (N_rank, S, ...) of this rank's outputs z (N_rank, C), as one process draws them.

        The rank repeats the single process's draws call by call — global chunks [k·c, (k+1)·c) of ``chunk_size``
        c up to its last sample — with zeros in place of the other ranks' outputs, and keeps its own rows. A
        likelihood whose ``sample`` consumes the random stream by the shape of its outputs, not their values (every
        built-in one), so gives each global sample n the labels it gets in one process: they depend on (seed, n,
        chunk size) only, whatever the number of ranks.
        """
        lo, hi = self.sample_offset, self.sample_offset + self.local_samples
        mine = []
        for a in range(0, hi, self.chunk_size):
            b = min(a + self.chunk_size, self.num_samples)
            full = z.new_zeros(b - a, z.shape[1])
            s, e = max(a, lo), min(b, hi)
            if e > s:
                full[s - a: e - a] = z[s - lo: e - lo]
            labels = self.likelihood.sample(full, self.mc_samples, gen)
            if e > s:
                mine.append(labels[s - a: e - a])
        return torch.cat(mine)

    def _name_failing_sample(self, start: int, x: Tensor) -> None:
        """Raise InputError naming the first sample of x (global index ``start`` + i) the model fails on, if any.

        Nothing is raised when the chunk itself evaluates (no grad): then the failure was the caller's transform's
        (e.g. an operation without a forward-mode rule, which :meth:`_with_jvp_fallback` handles). These
        evaluations run without the model's forward hooks (:func:`forward_hooks_suspended`).
        """
        with torch.no_grad(), forward_hooks_suspended(self.model):
            try:
                self._evaluate(self.params, x)
                return
            except Exception:  # the chunk fails in plain evaluation too: find the sample below
                pass
            for i in range(x.shape[0]):
                try:
                    self._evaluate(self.params, x[i: i + 1])
                except Exception as one:  # e.g. an nn.Embedding index out of range
                    raise InputError(f"the model could not be evaluated on sample {start + i} (inputs of shape "
                                     f"{tuple(x[i].shape)}): {type(one).__name__}: {one}") from one

    def _evaluate_unchecked(self, start: int, x: Tensor) -> Tensor:
        """f_θ(x) without gradients for a chunk not yet checked (global index ``start``); a failure names the sample."""
        try:
            with torch.no_grad():
                return self.forward(self.params, x)
        except InputError:
            raise
        except Exception as exc:  # the message of the model's own failure is the useful part
            self._name_failing_sample(start, x)
            raise InputError(f"the model could not be evaluated on samples {start}–{start + x.shape[0] - 1}: "
                             f"{type(exc).__name__}: {exc}") from exc

    def _canonical_targets(self, x: Tensor, y: Tensor, start: int | None = None) -> Tensor:
        """A chunk's targets checked (label range, 0/1, shape) and in canonical shape.

        Only the outputs' shape is read, so the stand-in outputs are one zero-stride scalar. With ``start`` (the
        chunk's first sample, not yet evaluated) bad targets have the model evaluated on the chunk first, whose
        own error (a sample it cannot take, sequences of another length) is the clearer one.
        """
        stand_in = torch.zeros((), dtype=self.dtype, device=x.device).expand(x.shape[0], self.num_outputs)
        try:
            return self.likelihood.check_targets(stand_in, y)
        except InputError:
            if start is not None:
                self._evaluate_unchecked(self.sample_offset + start, x)
            raise

    def chunks(
        self, desc: str | None = None, chunk_size: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor, Tensor | UncheckedChunk | None]]:
        """Yield ``(x, y, labels)`` per chunk; ``labels`` are the MC draws of these samples (else None).

        ``chunk_size`` overrides the engine's (which is sized for P-wide factor rows) for consumers that hold
        less per sample, e.g. the layer-wise KFAC statistics; the MC labels do not depend on it. Every chunk's
        targets are checked.

        **The first pass** over the data checks every sample's outputs (finite; the first samples' those of their
        first evaluation, so a random model is refused) and draws the MC labels on the consumer's own evaluation,
        without a pass of its own: until a chunk is checked, ``labels`` is an :class:`UncheckedChunk`, which
        :meth:`output_factor` takes with the chunk's outputs at the engine's parameters (it checks them and uses
        the labels), and a failure of the model on the chunk names its sample (:meth:`forward`). A chunk its
        consumer did not check so is checked by a no-grad evaluation before the next one is yielded; an
        interrupted pass leaves the next to go on from its first unchecked sample. Kind ``mc`` draws labels per
        piece of ``chunk_size`` samples, so its first pass takes chunks of a multiple of it (a smaller
        ``chunk_size`` splits each piece further, and the consumer's first chunk of a piece has the whole piece
        evaluated again, without grad).
        """
        chunk_size = chunk_size or self.chunk_size
        passing = self._first_pass(chunk_size) if self._checked < self.local_samples else self._later_pass(chunk_size)
        total = math.ceil(self.local_samples / chunk_size)
        bar = progress_bar(total=total, desc=desc, progress=False if desc is None else self.progress, inner=True)
        for chunk in passing:
            yield chunk
            bar.update(1)
        bar.close()

    def _later_pass(self, chunk_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """The chunks of a pass once every sample is checked (:meth:`chunks`)."""
        for start, x, y in self.data.chunks(chunk_size):
            yield x, self._canonical_targets(x, y), self._label_range(start, x.shape[0])

    def _first_pass(self, chunk_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor | UncheckedChunk | None]]:
        """The chunks of a pass while samples are unchecked (:meth:`chunks`), in blocks of whole label pieces."""
        block = chunk_size
        if self._generator is not None and chunk_size < self.local_samples:
            block = self.chunk_size * max(1, chunk_size // self.chunk_size)
        for start, xb, yb in self.data.chunks(block):
            yb = self._canonical_targets(xb, yb, start if self._checked < start + xb.shape[0] else None)
            for offset in range(0, xb.shape[0], chunk_size):
                x, y = xb[offset: offset + chunk_size], yb[offset: offset + chunk_size]
                if self._checked >= start + xb.shape[0]:  # checked (by an earlier pass, or on this block's first chunk)
                    yield x, y, self._label_range(start + offset, x.shape[0])
                    continue
                chunk = UncheckedChunk(start, xb, offset, x.shape[0])
                self._unchecked = (x, self.sample_offset + start + offset)
                try:
                    yield x, y, chunk
                finally:
                    self._unchecked = None
                self._check_chunk(chunk)

    def _check_chunk(self, chunk: UncheckedChunk, z: Tensor | None = None) -> Tensor | None:
        """Check a chunk's block of the first pass (once: :meth:`_check_block`) and return the chunk's MC labels.

        z: the chunk's outputs at the engine's parameters, which serve when the chunk is its whole block;
        otherwise (or without z) the block is evaluated here, without grad.
        """
        size = chunk.inputs.shape[0]
        if self._checked < chunk.start + size:
            if z is None or chunk.size < size:
                z = self._evaluate_unchecked(self.sample_offset + chunk.start, chunk.inputs)
            self._check_block(chunk.start, z.detach())
        return self._label_range(chunk.start + chunk.offset, chunk.size)

    def output_factor(self, z: Tensor, y: Tensor, labels: Tensor | UncheckedChunk | None) -> Tensor:
        """The output-space factors M_n of this kind for a chunk; shape (n, R, C) (C = T·C for a sequence model).

        ``labels``: the chunk's, from :meth:`chunks`. On the first pass an :class:`UncheckedChunk`: z must then be
        the chunk's outputs at the engine's parameters; they are checked here and its MC labels drawn.

        Raises:
            NonFiniteError: On the first pass, NaN or infinite outputs of a sample (named).
            InputError: On the first pass, outputs that differ from the first evaluation (a random model).
        """
        if isinstance(labels, UncheckedChunk):
            labels = self._check_chunk(labels, z)
        return self.likelihood.output_factor(self.kind, z, y, labels)

    def _product_factor(self, z: Tensor, y: Tensor, labels: Tensor | None) -> Tensor:
        """The factor :meth:`matmat` applies: M (n, R, C), or token blocks (n, T, R_token, C) where M is block-diagonal.

        A sequence model's M is block-diagonal over the tokens for ``true`` and ``ggn``; its blocks cost T times less.
        """
        lik = self.likelihood
        if isinstance(lik, TokenLikelihood) and self.kind in TokenLikelihood.BLOCK_KINDS:
            return lik.token_factor(self.kind, z, y, labels)
        return self.output_factor(z, y, labels)

    def _closed_form(self) -> bool:
        """Whether :meth:`matmat` applies Λ(z) by the likelihood's ``fisher_apply`` rather than by the factor M.

        So for kind ``true`` when the likelihood (a sequence model's: the base likelihood of one token) has one.
        """
        lik = self.likelihood.base if isinstance(self.likelihood, TokenLikelihood) else self.likelihood
        return self.kind is FisherKind.TRUE and type(lik).fisher_apply is not Likelihood.fisher_apply

    def _output_state(self, z: Tensor, y: Tensor, labels: Tensor | UncheckedChunk | None) -> Tensor:
        """What :meth:`matmat` keeps of a chunk's outputs z (detached), for :meth:`_output_product`.

        z itself where Λ(z) is applied in closed form (:meth:`_closed_form`), else the factor of
        :meth:`_product_factor` scaled by 1/√N. On the first pass z is checked here (:meth:`output_factor`).
        """
        if isinstance(labels, UncheckedChunk):
            labels = self._check_chunk(labels, z)
        if self._closed_form():
            return z
        return self._product_factor(z, y, labels) / math.sqrt(self.num_samples)

    def _output_product(self, S: Tensor, y: Tensor, jv: Tensor) -> Tensor:
        """(1/N) M_nᵀ M_n (J v)_n per column and sample: jv (k, n, C) → (k, n, C), S from :meth:`_output_state`.

        In closed form Λ(z_n) w costs O(C) per sample (categorical: p ⊙ w − p (pᵀw); a sequence model's tokens
        weighted by c m_nt), where the token blocks of M cost O(T·C²) per sequence.
        """
        if not self._closed_form():
            return self._gram(S, jv)
        lik = self.likelihood

        def apply(w: Tensor) -> Tensor:
            return lik.fisher_apply(S, w, y) if isinstance(lik, TokenLikelihood) else lik.fisher_apply(S, w)

        return (apply(jv[0]).unsqueeze(0) if jv.shape[0] == 1 else vmap(apply)(jv)) / self.num_samples

    @staticmethod
    def _gram(M: Tensor, jv: Tensor) -> Tensor:
        """Mᵀ M (J v) per column and sample for a factor of :meth:`_product_factor` and J v of shape (k, n, C).

        Returns (k, n, C).
        """
        if M.dim() == 4:  # token blocks (n, T, R, C): Σ_r per token
            tokens = jv.reshape(jv.shape[0], M.shape[0], M.shape[1], M.shape[3])
            return torch.einsum("ntrc,kntr->kntc", M, torch.einsum("ntrc,kntc->kntr", M, tokens)).reshape(jv.shape)
        return torch.einsum("nrc,knr->knc", M, torch.einsum("nrc,knc->knr", M, jv))

    def factor_rows(self, x: Tensor, y: Tensor, labels: Tensor | None) -> Tensor:
        """U_n = M_n J_n for the samples of a chunk, shape (n, R, P), by one vmapped VJP per row."""
        self._check_rows_budget(self.spec.dim, x.shape[0])
        with torch.no_grad():
            M = self.output_factor(self.forward(self.params, x), y, labels)
        return self._rows(x, M)

    def _rows(self, x: Tensor, M: Tensor, names: Sequence[str] | None = None) -> Tensor:
        """M_n J_n for inputs x (n, *input_shape) and output-space factors M (n, R, C); shape (n, R, P).

        One VJP per sample, vmapped over the samples (or looped, when ``sample_loop``), each vmapped over the R rows.
        With ``names`` (a subset of the spec's names, in spec order) only those parameters are differentiated and
        the rows have their columns only.
        """
        keys = self.spec.names if names is None else list(names)
        fixed = {k: v for k, v in self.params.items() if k not in keys}

        def per_sample(xi: Tensor, Mi: Tensor) -> Tensor:
            _, vjp_fn = vjp(lambda p: self.forward({**fixed, **p}, xi.unsqueeze(0)).squeeze(0),
                            {k: self.params[k] for k in keys})
            (rows,) = vmap(vjp_fn)(Mi)
            return torch.cat([rows[k].reshape(Mi.shape[0], -1) for k in keys], dim=-1)

        def loop() -> Tensor:
            return torch.stack([per_sample(xi, Mi) for xi, Mi in zip(x, M, strict=True)])

        looped = self.sample_loop  # the probe, if not yet made, says its fallback outside the filter below
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            if looped:
                return loop()
            expected = (x.shape[0], M.shape[1], sum(self.params[k].numel() for k in keys))
            try:
                rows = vmap(per_sample)(x, M)
                if tuple(rows.shape) == expected:
                    return rows
                reason = f"its per-sample gradients came out of shape {tuple(rows.shape)}, not {expected}"
            except RuntimeError as exc:  # past the probe: e.g. nn.PReLU's batching rule with R > 1 rows
                if "random" in str(exc).lower():
                    raise
                reason = str(exc).rstrip(".")
            self._sample_loop = True
        self._warn_sample_loop(reason)
        return loop()

    def _warn_sample_loop(self, reason: str) -> None:
        """Say once (a FallbackWarning) that the engine now loops over the samples, and why."""
        warnings.warn(
            f"the model cannot be differentiated per sample under torch.func.vmap ({reason}); fisherlab loops "
            "over the samples instead (the same results, one VJP per sample: slower). Fused kernels such as "
            "nn.LSTM / nn.GRU have no batching rule; an unrolled recurrence (nn.LSTMCell, or "
            "fisherlab.models.LSTMClassifier) is vmapped", FallbackWarning, stacklevel=4)

    def _check_rows_budget(self, width: int, n: int | None = None) -> None:
        """Refuse a chunk of n samples' factor rows (default: :attr:`chunk_size`), R·width each, above the budget.

        Checked where rows are formed, not when the engine is built: the matrix-free products, the gradient and the
        layer-row structures (KFAC, EKFAC, ...) never form P-wide rows, so an engine whose rows could not fit (a
        GPT's T·(C − 1) = 4096 rows a sequence of the true Fisher) serves them under the default budget.
        """
        n = min(self.chunk_size, self.local_samples) if n is None else n
        check_budget(2 * n * dense_bytes(self.rows_per_sample, width, self.dtype), "a chunk of factor rows",
                     self.memory_budget, "a smaller chunk_size")

    def iter_factor_rows(self, desc: str | None = None, names: Sequence[str] | None = None) -> Iterator[Tensor]:
        """Yield factor rows scaled so that F = Σ_chunks UᵀU; each U has shape (n·R, P).

        The 1/√N scale is applied to the small output-space factors M, before the VJPs, so the P-wide rows are
        written once (a view of the vmapped VJP's output, no copy). With ``names`` (parameter names of the spec)
        the rows hold only those parameters' columns, in spec order, (n·R, P_names): the rows of the Fisher's
        sub-matrix over them, at the cost of their VJPs alone. Data-parallel, each rank yields its shard's rows
        (scaled by the global 1/√N): F = Σ_ranks Σ_chunks UᵀU, so a consumer passes what it accumulated
        to :meth:`reduce_sum`.
        """
        if names is not None:
            unknown = [n for n in names if n not in self.spec.names]
            if unknown:
                raise InputError(f"unknown parameter names {unknown}; the engine has {list(self.spec.names)}")
            names = [n for n in self.spec.names if n in set(names)]
        width = self.spec.dim if names is None else len(self.spec.indices(names))
        self._check_rows_budget(width)
        scale = 1.0 / math.sqrt(self.num_samples)
        for x, y, labels in self.chunks(desc):
            with torch.no_grad():
                M = self.output_factor(self.forward(self.params, x), y, labels)
            yield self._rows(x, M * scale, names).reshape(-1, width)

    def matmat(self, V: Tensor) -> Tensor:
        """F V without forming F: V of shape (P,) or (P, k) → same shape.

        Per chunk and block of columns, one pass (:meth:`_chunk_product`): the tangents J v by forward mode, the
        output-space product Mᵀ M J v, and one reverse pass through the recorded graph of the chunk's outputs. The
        chunks hold activations, not P-wide rows, so unless ``chunk_size`` was given they are sized by the
        activation bytes per sample (:meth:`matmat_chunk_size`). The first product's pass over the data keeps its
        **linearisation** for later calls (:class:`Linearisation`, keyed as in :meth:`_state_key`) when it fits in
        ``min(MATMAT_CACHE_BYTES, memory_budget/4)``: what the output-space product needs of each chunk
        (:meth:`_output_state`: its outputs z for the true Fisher's Λ(z) in closed form, else the factor M), and,
        when the graphs of all chunks fit too (:meth:`activation_bytes` per sample), the VJP of each chunk's
        forward. A product on a kept graph is one ``jvp`` (primal and tangents, nothing recorded) and a reverse
        pass through the kept graph; without it, a ``vjp`` of a ``jvp`` (one primal evaluation serving both, the
        tangent operations recorded too). Both are about five forward passes of arithmetic per column (primal 1,
        tangents 2, reverse 2); not recording the tangents saves about a tenth of a product's time (GPT 1M, 32 × 64
        tokens: median per-round ratios 0.87–0.92, benchmarks/README.md). The product that records the graphs to
        keep runs the forward pass twice (the recorded primal, and the ``jvp``). Data-parallel, the ranks' partial
        products are all-reduced (every rank gets F V).
        """
        if V.shape[0] != self.spec.dim or V.dim() > 2:
            raise InputError(f"expected a vector (P,) or matrix (P, k) with P = {self.spec.dim}; got {tuple(V.shape)}")
        V = V.to(self.device, self.dtype)
        cols = V if V.dim() == 2 else V.unsqueeze(1)
        key = self._state_key()
        if self._output_cache is not None and self._output_cache[0] != key:
            self._output_cache = None  # stale: its graphs are released before the new ones are recorded
        cached = None if self._output_cache is None else self._output_cache[1]
        limit = min(MATMAT_CACHE_BYTES, self.memory_budget // 4)
        keep = cached is None and self.activation_bytes() * self.local_samples <= limit
        kept: list[Linearisation] = []
        out = None
        for i, (x, y, labels) in enumerate(self.chunks(chunk_size=self.matmat_chunk_size())):
            lin = None if cached is None else cached[i]
            path = ("kept" if lin is not None and lin.vjp_fn is not None
                    else "recording" if keep or self._jvp_by_vjp else "vjp of jvp")
            parts = []
            for block in cols.split(self._column_block(x.shape[0], path), dim=1):
                part, lin = self._with_jvp_fallback(partial(self._chunk_product, x, y, labels, lin, block, keep), x)
                parts.append(part)
            kept.append(lin)
            part = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            out = part if out is None else out.add_(part)
        if cached is None:
            state_bytes = sum(lin.state.numel() * lin.state.element_size() for lin in kept)
            if keep and state_bytes + self.activation_bytes() * self.local_samples > limit:
                kept = [lin._replace(vjp_fn=None) for lin in kept]
            if state_bytes <= limit:
                self._output_cache = (key, kept)
        self.reduce_sum([out])
        return out if V.dim() == 2 else out.squeeze(1)

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """vᵢᵀ F vᵢ for the columns of V (P, k) → (k,) (V of shape (P,) → a 0-dim tensor), without F V.

        vᵀ F v = (1/N) Σ_n (J_n v)ᵀ Λ_n (J_n v) needs the tangents J v only: per chunk one vmapped ``jvp`` (primal
        and tangents, nothing recorded) and the output-space product, no reverse pass — about three forward passes
        of arithmetic per column against five for :meth:`matmat` (e.g. Hutchinson's trace estimator,
        :func:`fisherlab.linalg.hutchinson_trace`). The output state of :meth:`matmat`'s kept linearisation is
        reused when current. Where an operation has no forward-mode rule (:meth:`jv` by two VJPs), it is
        ``(V ⊙ F V)`` summed over P instead. Data-parallel, the ranks' partial sums are all-reduced.
        """
        if V.shape[0] != self.spec.dim or V.dim() > 2:
            raise InputError(f"expected a vector (P,) or matrix (P, k) with P = {self.spec.dim}; got {tuple(V.shape)}")
        V = V.to(self.device, self.dtype)
        cols = V if V.dim() == 2 else V.unsqueeze(1)
        cached = None
        if self._output_cache is not None and self._output_cache[0] == self._state_key():
            cached = self._output_cache[1]
        out = torch.zeros(cols.shape[1], dtype=self.dtype, device=self.device)
        for i, (x, y, labels) in enumerate(self.chunks(chunk_size=self.matmat_chunk_size())):
            if self._jvp_by_vjp:
                break
            state = None if cached is None else cached[i].state
            step = self._column_block(x.shape[0], "kept")  # the kept path's jvp, without its reverse pass
            for a in range(0, cols.shape[1], step):
                part = self._with_jvp_fallback(
                    partial(self._chunk_quadratic, x, y, labels, state, cols[:, a:a + step]), x)
                if part is not None:
                    out[a:a + step] += part
        if self._jvp_by_vjp:
            return (cols * self.matmat(cols)).sum(0) if V.dim() == 2 else (V * self.matmat(V)).sum()
        self.reduce_sum([out])
        return out if V.dim() == 2 else out[0]

    def _chunk_quadratic(self, x: Tensor, y: Tensor, labels: Tensor | None, state: Tensor | None,
                         block: Tensor) -> Tensor | None:
        """Σ over the chunk's samples of (J_n v)ᵀ Λ_n (J_n v) / N for the k columns of block (P, k): (k,).

        None once :meth:`jv` has switched to two VJPs (the caller then uses products).
        """
        if self._jvp_by_vjp:
            return None

        def f(p: dict[str, Tensor]) -> Tensor:
            return self.forward(p, x)

        def one(v: Tensor) -> tuple[Tensor, Tensor]:
            return jvp(f, (self.params,), (self.spec.unflatten(v),))

        with torch.no_grad():
            z, jv = vmap(one, in_dims=1, out_dims=(None, 0))(block)
            S = state if state is not None else self._output_state(z, y, labels)
            return (jv * self._output_product(S, y, jv)).flatten(1).sum(1)

    def _chunk_product(self, x: Tensor, y: Tensor, labels: Tensor | None, lin: Linearisation | None,
                       block: Tensor, keep: bool) -> tuple[Tensor, Linearisation]:
        """F_chunk V for the chunk's inputs x and a block V of k columns (P, k): (P, k), and a :class:`Linearisation`.

        ``lin``: the chunk's kept linearisation (None: none yet; its state S is then computed from this pass's
        outputs). ``keep``: record the chunk's graph apart from the tangents, to keep it (returned in ``lin``). On a
        kept or kept-to-be graph, or once an operation turned out to have no forward-mode rule (:meth:`jv` by two
        reverse passes through that graph), the tangents J v come from :meth:`jv`, vmapped over the k columns;
        otherwise the forward pass runs once, recording the graph of the outputs z for the reverse pass while
        forward mode carries the k tangents (vmapped over the columns; the primal is not batched).
        """
        def f(p: dict[str, Tensor]) -> Tensor:
            return self.forward(p, x)

        k = block.shape[1]
        out_shape = torch.Size((x.shape[0], self.num_outputs))
        z = jv = None
        if lin is not None and lin.vjp_fn is not None:
            vjp_fn = lin.vjp_fn
        elif keep or self._jvp_by_vjp:
            z, vjp_fn = vjp(f, self.params)
        else:
            def primal_and_tangents(p: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
                def one(v: Tensor) -> tuple[Tensor, Tensor]:
                    return jvp(f, (p,), (self.spec.unflatten(v),))

                if k == 1:
                    z, jv = one(block[:, 0])
                    return z, jv.unsqueeze(0)
                return vmap(one, in_dims=1, out_dims=(None, 0))(block)

            z, vjp_fn, jv = vjp(primal_and_tangents, self.params, has_aux=True)
        if jv is None:  # on a graph recorded apart: the tangents by jvp alone (or two VJPs)
            def tangent(v: Tensor) -> Tensor:
                return self.jv(f, vjp_fn, out_shape, self.spec.unflatten(v))

            jv = tangent(block[:, 0]).unsqueeze(0) if k == 1 else vmap(tangent, in_dims=1)(block)
        S = lin.state if lin is not None else self._output_state(z.detach(), y, labels)
        W = self._output_product(S, y, jv)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            grads = vjp_fn(W[0]) if k == 1 else vmap(vjp_fn)(W)
        kept = keep or (lin is not None and lin.vjp_fn is not None)
        return self.spec.flatten(grads[0]).reshape(k, -1).T, Linearisation(S, vjp_fn if kept else None)

    def jv(self, f: Callable[[dict[str, Tensor]], Tensor], vjp_fn: Any, out_shape: torch.Size,
           tangent: dict[str, Tensor]) -> Tensor:
        """J v of f at the engine's parameters for a tangent v (a dict like ``params``); shape ``out_shape``.

        By forward mode (``jvp``), or, once an operation of the model turned out to have no forward-mode rule, by
        two reverse passes through ``vjp_fn`` (the VJP of f at the engine's parameters): u ↦ Jᵀu is linear, so its
        own VJP with cotangent v is J v, at any u (zero here). Costs about one more backward pass than ``jvp``.
        """
        if not self._jvp_by_vjp:
            return jvp(f, (self.params,), (tangent,))[1]
        zero = torch.zeros(out_shape, dtype=self.dtype, device=self.device)
        _, transpose_fn = vjp(lambda u: vjp_fn(u)[0], zero)
        return transpose_fn(tangent)[0]

    def _with_jvp_fallback(self, compute: Callable[[], Any], x: Tensor) -> Any:
        """``compute()``; if an operation has no forward-mode rule, switch :meth:`jv` to two VJPs and retry.

        The switch is checked once, on the chunk with inputs x, by the adjoint identity ⟨u, J v⟩ = ⟨Jᵀu, v⟩ for
        random u and v: a backward that is not differentiable in its cotangent (``@once_differentiable``, a
        detached gradient) makes the second VJP silently wrong, not fail.

        Raises:
            UnsupportedLayerError: An operation has neither a forward-mode rule nor a backward that torch can
                differentiate (the message gives both reasons).
        """
        try:
            return compute()
        except (NotImplementedError, RuntimeError) as exc:
            if self._jvp_by_vjp or not _no_forward_rule(exc):
                raise
            reason = str(exc).strip().rstrip(".")
        self._jvp_by_vjp = True
        try:
            self._check_adjoint(x)
            result = compute()
        except (NotImplementedError, RuntimeError, UnsupportedLayerError) as exc:
            self._jvp_by_vjp = False
            raise UnsupportedLayerError(
                f"the matrix-free product F·v is unavailable, because an operation of the model has no forward-mode "
                f"derivative ({reason}) and its backward cannot be differentiated either ({str(exc).strip()}), so "
                "J v can be computed neither by jvp nor by two VJPs; give the operation a jvp "
                "(torch.autograd.Function.jvp) or a differentiable backward, or use a structure that needs only "
                "per-sample gradients (dense, block, diag)"
            ) from exc
        warnings.warn(f"an operation of the model has no forward-mode derivative ({reason}); fisherlab computes "
                      "J v by two reverse passes instead (the same products, about one more backward pass each)",
                      FallbackWarning, stacklevel=4)
        return result

    def _check_adjoint(self, x: Tensor) -> None:
        """Refuse a :meth:`jv` that breaks ⟨u, J v⟩ = ⟨Jᵀu, v⟩ on inputs x (random u, v; tolerance √eps, relative)."""
        def f(p: dict[str, Tensor]) -> Tensor:
            return self.forward(p, x)

        z, vjp_fn = vjp(f, self.params)
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        u = torch.randn(z.shape, generator=gen, dtype=self.dtype, device=self.device)
        v = torch.randn(self.spec.dim, generator=gen, dtype=self.dtype, device=self.device)
        jv = self.jv(f, vjp_fn, z.shape, self.spec.unflatten(v))
        jtu = self.spec.flatten(vjp_fn(u)[0])
        lhs, rhs = float((u * jv).sum()), float((jtu * v).sum())
        scale = float(u.norm() * jv.norm() + jtu.norm() * v.norm())
        if not abs(lhs - rhs) <= math.sqrt(torch.finfo(self.dtype).eps) * scale:
            raise UnsupportedLayerError(f"J v by two VJPs fails the adjoint check: ⟨u, J v⟩ = {lhs:.6g} but "
                                        f"⟨Jᵀu, v⟩ = {rhs:.6g} (a backward marked @once_differentiable, or one "
                                        "that detaches its incoming gradient)")

    def matmat_chunk_size(self) -> int:
        """Samples per chunk of :meth:`matmat`.

        ``chunk_size`` if it was given, else as many as fit the working bytes of one column on the costliest path
        (:meth:`product_bytes` with k = 1: 3.75 activations a sample, the ``vjp`` of a ``jvp``) in
        ``min(DEFAULT_CHUNK_BYTES, memory_budget/4)``, balanced (:meth:`_fitting_chunk`). One rule for every path,
        so the chunks of a product on the kept linearisation are those that recorded it. 32 × 64 tokens: one chunk
        of 32 on the GPT 1M (measured peak of a chunk of 16: 134 MiB of tensors for one column, against 186 MiB
        budgeted), two of 16 on the GPT 10M.
        """
        costliest = max(PRODUCT_WORKING, key=lambda path: sum(PRODUCT_WORKING[path]))
        return self._fitting_chunk(lambda n: self.product_bytes(n, 1, costliest))

    def product_bytes(self, n: int, k: int, path: str) -> int:
        """Bytes one chunk of :meth:`matmat` works in: n samples, a block of k columns, run as ``path``.

        n·A·(a + b·k) (:data:`PRODUCT_WORKING`, A = :meth:`activation_bytes`) and three P-wide tensors per column
        (the gradient, its flattening, the block's share of the sum). An upper bound: the measured peak of a chunk
        (torch profiler, 16 samples, 1 and 4 columns, float32) is, of it, for the vjp of a jvp 0.68–0.72 on the 1M
        GPT, 0.80–0.97 on GPTs of d = 64 × 2 and 16 × 3 layers, 0.61–0.62 on a CNN and an MLP (P-wide tensors
        only); recording 0.25–0.54 on the GPTs, 0.88–0.91 on the CNN, 0.62–0.64 on the MLP; kept 0.15–0.35 on the
        GPTs, 0.87–0.89 on the CNN, 0.63–0.64 on the MLP (the coefficients per column are the CNN's: a GPT's
        tangents cost it far less).
        """
        a, b = PRODUCT_WORKING[path]
        return math.ceil(n * self.activation_bytes() * (a + b * k)) + k * self._p_wide(3)

    def gradient_chunk_size(self) -> int:
        """Samples per chunk of :meth:`loss_and_gradient`.

        ``chunk_size`` if it was given, else as many as fit :meth:`gradient_bytes` in
        ``min(DEFAULT_CHUNK_BYTES, memory_budget/4)``, balanced as in :meth:`matmat_chunk_size`. No tangents:
        one chunk of 32 on the GPT 10M, 32 × 64 tokens, where a product's take two of 16. Fewer chunks are not slower:
        on the 1M GPT (32 × 64 tokens, float32) two chunks of 16 took 0.99–1.06× the time of one of 32 and four of
        8 1.07–1.09× (medians of per-round ratios, 1 and 2 threads, ``benchmarks/bench_gradient.py``): each chunk
        pays a pass's fixed costs, in smaller GEMMs.
        """
        return self._fitting_chunk(self.gradient_bytes)

    def gradient_bytes(self, n: int) -> int:
        """Bytes one chunk of n samples of :meth:`loss_and_gradient` works in.

        Twice the graph of a forward on the caller's attention kernels (:meth:`activation_bytes` with
        ``reverse_only``: the saved graph, and the activations' gradients of the one reverse pass) per sample, and
        three P-wide tensors (the parameters' gradients, their flattening, the sum). An upper bound: measured peaks
        (torch profiler, 16 samples, float32) 1.04–1.53 graphs a sample (GPT 1M lowest, the CNN highest), of it
        0.55 on the 1M GPT, 0.58–0.68 on smaller GPTs, 0.82 on a CNN, 0.95 on an MLP.
        """
        return 2 * n * self.activation_bytes(reverse_only=True) + self._p_wide(3)

    def _p_wide(self, count: int) -> int:
        """Bytes of ``count`` P-wide tensors of the compute dtype."""
        return dense_bytes(count, self.spec.dim, self.dtype)

    def _fitting_chunk(self, bytes_of: Callable[[int], int]) -> int:
        """``chunk_size`` if given, else the most samples whose ``bytes_of(n)`` fit the working bytes, balanced.

        ``bytes_of`` is affine in n (:meth:`product_bytes`, :meth:`gradient_bytes`); at least one sample. Balanced:
        the N samples of this rank in ⌈N / fit⌉ chunks of nearly equal size (no small last chunk).
        """
        if self._chunk_size_given:
            return self.chunk_size
        fixed = bytes_of(0)
        fit = int(max(1, min(self.local_samples, (self._working_bytes - fixed) // (bytes_of(1) - fixed))))
        return math.ceil(self.local_samples / math.ceil(self.local_samples / fit))

    def probed(self, key: Hashable, find: Callable[[], T]) -> T:
        """``find()``, run once per engine and ``key``: what a probe of the model on its first samples found.

        Kept like :meth:`activation_bytes` (the model's structure is the engine's from its first pass on), so a
        later computation of the same engine runs no probe: the layer-row passes of :mod:`fisherlab.layers` keep so
        the norms a pass can carry (``captured_norms``) and each probe's chunk size and cloning (``iter_layer_rows``),
        all found by one forward pass (``find`` may keep findings under other keys too).
        """
        if key not in self._probes:
            self._probes[key] = find()
        return self._probes[key]

    def activation_bytes(self, reverse_only: bool = False) -> int:
        """Bytes the autograd graph of one forward saves per sample (parameters and buffers excluded).

        Measured once per ``reverse_only`` (the attention kernels, :func:`differentiable_attention`), with
        gradients enabled whatever the caller's mode (the no-grad passes ask for it): for
        :attr:`reverse_only_rows`'s kernels by the first evaluation (:meth:`_first_evaluation`, unless it fell back
        to a plain one), else by :meth:`first_forward` when first asked for.
        """
        if reverse_only not in self._activation_bytes:
            self.first_forward(reverse_only)
        return self._activation_bytes[reverse_only]

    def first_forward(self, reverse_only: bool = False) -> None:
        """Measure :meth:`activation_bytes` by a forward pass Z = f_θ(x) of the first (up to) two samples.

        The graph's saved tensors (each stored tensor counted once, parameters and buffers not) and Z, per sample,
        are kept as ``activation_bytes(reverse_only)``. Gradients are enabled whatever the caller's mode, the
        parameters are leaves that require them. A probe's forward hooks that leave the outputs as they are see the
        pass as it is (the layer-row probe, :mod:`fisherlab.layers`, measures this way on its own pass).
        """
        self._measured_evaluation(self.data.first(2)[0], reverse_only)

    def _measured_evaluation(self, x: Tensor, reverse_only: bool) -> Tensor:
        """:meth:`first_forward`'s pass over x: the outputs (n, C) or (n, T, C), with their graph."""
        own = {t.untyped_storage().data_ptr() for t in [*self.params.values(), *self._frozen.values()]}
        seen: dict[tuple[int, int], int] = {}

        def pack(t: Tensor) -> Tensor:
            size, offset = t.element_size(), t.storage_offset()
            key = (t.data_ptr() - offset * size, offset)  # (the storage's address, without forming the storage)
            if key[0] not in own:
                seen[key] = max(seen.get(key, 0), t.numel() * size)
            # kept without its grad_fn: a saved output kept as itself would hold its own node (a reference cycle),
            # and the graph be freed by the garbage collector only, so each pass's memory new (GPT 1M, 2 samples:
            # 1300 page faults, 6.2 ms where it is 3.9 ms so)
            return t.detach()

        leaves = {n: p.detach().requires_grad_() for n, p in self.params.items()}
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z = self._evaluate(leaves, x, reverse_only)
        total = sum(seen.values()) + z.numel() * z.element_size()
        self._activation_bytes[reverse_only] = max(1, math.ceil(total / x.shape[0]))
        return z

    def _column_block(self, n: int, path: str) -> int:
        """Columns per vmapped product for a chunk of n samples run as ``path``.

        As many as :meth:`product_bytes` fits in the working bytes, at least one.
        """
        base = self.product_bytes(n, 0, path)
        return int(max(1, (self._working_bytes - base) // (self.product_bytes(n, 1, path) - base)))

    def _state_key(self) -> tuple:
        """The identity and version counter of every parameter and buffer tensor.

        Replacing or modifying one in place changes it (the cache of :meth:`matmat` is then rebuilt).
        """
        return tuple((id(t), t._version) for t in [*self.params.values(), *self._frozen.values()])

    def loss_and_gradient(self, params: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """L(θ) = (1/N) Σ ℓ_n and ∇L(θ) of shape (P,), at ``params`` (default: the engine's parameters).

        Per chunk (:meth:`gradient_chunk_size`) one forward and one plain reverse pass (``torch.autograd.grad``,
        no torch.func transform), so attention runs on the caller's SDPA kernels (``reverse_only``,
        :func:`differentiable_attention`). Data-parallel, the sums are all-reduced before the division by the
        global N (every rank gets both).
        """
        params = self.params if params is None else params
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        sums: list[Tensor] | None = None  # per parameter, flattened once at the end (no P-wide zeros, adds, copies)
        for x, y, labels in self.chunks(chunk_size=self.gradient_chunk_size()):
            leaves = {n: params[n].detach().requires_grad_() for n in self.spec.names}
            with torch.enable_grad():
                z = self.forward(leaves, x, reverse_only=True)
            if isinstance(labels, UncheckedChunk) and params is self.params:  # the first pass checks these outputs
                self._check_chunk(labels, z)
            total += self.likelihood.nll(z.detach(), y).sum()
            grads = torch.autograd.grad(z, list(leaves.values()), self.likelihood.grad_z(z.detach(), y),
                                        allow_unused=True, materialize_grads=True)  # unused: ∂L/∂θ = 0
            if sums is None:
                sums = list(grads)
            else:
                for s, chunk_grad in zip(sums, grads, strict=True):
                    s.add_(chunk_grad)
        g = self.spec.flatten(sums)
        self.reduce_sum([total, g])
        return total / self.num_samples, g.div_(self.num_samples)

    def outputs(self, params: dict[str, Tensor] | None = None) -> Tensor:
        """Model outputs on the whole dataset, shape (N, C) (data-parallel: this rank's shard, (N_rank, C)).

        A sequence model's are flattened as by :meth:`forward`, (N, T·C).
        """
        params = self.params if params is None else params
        outputs = []
        with torch.no_grad():
            for x, _, labels in self.chunks(chunk_size=self.matmat_chunk_size()):
                outputs.append(self.forward(params, x))
                if isinstance(labels, UncheckedChunk) and params is self.params:  # the first pass checks them
                    self._check_chunk(labels, outputs[-1])
        return torch.cat(outputs)

    def reduce_sum(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over the ranks, in place (no-op in a single process): for accumulated sample sums.

        Call it on the sums before normalising them; every rank must call it with tensors of the same shapes, in
        the same order (:func:`fisherlab.distributed.all_reduce_sum`).
        """
        all_reduce_sum(tensors, self.group)

    def check_dense(self, rows: int, cols: int, what: str) -> None:
        """Refuse (with the number and the alternatives) a dense rows×cols object above the memory budget."""
        check_budget(dense_bytes(rows, cols, self.dtype), what, self.memory_budget)
