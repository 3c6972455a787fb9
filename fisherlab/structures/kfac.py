"""KFAC: per-layer Kronecker factors G_l ≈ S ⊗ A, block-diagonal across layers (docs/method.md).

For a supported layer (:mod:`fisherlab.layers`: Linear, Conv1d, Conv2d, Embedding, self-attention
MultiheadAttention's packed q/k/v projection and its out_proj) with combined weight W̄ (out, width) shared over L
positions (L = 1: a Linear layer on (N, in) inputs; the T₁·… positions of a Linear layer on (N, T₁, …, in) inputs
or of an attention projection; the output locations of a convolution; the tokens of an Embedding), expanded
input rows ā_{n,l} (width,) and output-gradient rows δ_{n,r,l} = J_{l,n}ᵀ M_{n,r} (out,) — the engine's output
factor rows pulled back to the layer output, so that the true, Monte-Carlo, empirical and GGN kinds all come
from the same code — the two approximations of Eschenhagen et al. (2023, "Kronecker-Factored Approximate
Curvature for Modern Neural Network Architectures"), ``approx=`` (:class:`~fisherlab.vocabulary.KFACApprox`):

``"expand"`` (default; the positions act as extra samples)
    A = (1/(N·L)) Σ_n Σ_l ā_{n,l} ā_{n,l}ᵀ,        S = (1/N) Σ_n Σ_r Σ_l δ_{n,r,l} δ_{n,r,l}ᵀ;

``"reduce"`` (the positions are pooled first: ā_n = (1/L) Σ_l ā_{n,l}, δ_{n,r} = Σ_l δ_{n,r,l})
    A = (1/N) Σ_n ā_n ā_nᵀ,                         S = (1/N) Σ_n Σ_r δ_{n,r} δ_{n,r}ᵀ.

Both are curvlinops' ``KFACLinearOperator(kfac_approx="expand" | "reduce")``, scaling included (for
convolutions "expand" is the KFC approximation of Grosse & Martens 2016). They coincide when L = 1. The exact
per-sample gradient is Σ_l δ_{n,r,l} ā_{n,l}ᵀ; "reduce" replaces it by δ_{n,r} ā_nᵀ (L times the product of
the means), which is exact when δ_{n,r,l} does not depend on l, and "expand" drops the cross terms l ≠ l'.
Hence (Eschenhagen et al., their Propositions on deep linear networks, Gaussian likelihood) "expand" is exact
in the *expand setting* — a loss term per position, the positions never mixed (language modelling, a per-token
output) — and "reduce" in the *reduce setting* — the positions pooled (summed or averaged) before the loss
(sequence classification) —, each for every layer of a deep linear network with weight sharing; and both are
exact for one sample with L = 1. "reduce" is cheaper (N rows per factor instead of N·L).

**Padding** (right padding of a causal model: tokens whose target is :data:`~fisherlab.vocabulary.IGNORE_INDEX`
after a sample's last counted token): a position (n, l) whose δ_{n,r,l} is zero for every row r in *every* layer
that is not a convolution and has the same L > 1 positions adds nothing to any exact block, so it is left out of A
and of A's normalisation: "expand" divides by M, the number of live (n, l) pairs, instead of N·L; "reduce" pools
each sample's live positions, ā_n = (1/L_n) Σ_{l live} ā_{n,l}, and divides by the number of samples with one. S is
unchanged (its rows there are zero). A position that feeds some counted token through attention (an ignored token
before the last counted one, every position of an ``output="last"`` model) is live in the layers below that
attention, so it stays in every layer; without padding the factors are curvlinops'. Convolutions keep every
location (KFC), and so does a layer with one position.

In fisherlab's row-major flat order of W̄ the layer block is S ⊗ A (``torch.kron(S, A)``), then permuted to the
flat parameter order (weight row-major, then bias; an Embedding's W̄ is its weight transposed). KFAC equals
the exact layer block when every sample has the same S-side (one sample; the output layer under a Gaussian
likelihood; every layer of a deep linear network under a Gaussian likelihood with the true Fisher, in the
setting that matches ``approx``).

**Embedding** (one-hot inputs): under "expand" A is diagonal, the token counts (1/(N·L)) Σ_{n,l} e_{x_{n,l}},
computed with ``bincount`` and stored as its diagonal (width,) — ``A.dim() == 1`` marks a diagonal factor, and
products, solves, spectra and roots then take O(out²·width) work, never a width × width matrix (``to_dense``
aside). Under "reduce" A = (1/(N·L²)) Σ_n c_n c_nᵀ from the per-sample count vectors c_n is dense.

**Norms** (``nn.LayerNorm``, ``nn.RMSNorm``): their affine parameters get an exact dense block per module
(:func:`~fisherlab.structures.layerwise.prepare_layers`, ``meta["norm_blocks"]``) without asking, accumulated in
the same pass as the factors (:class:`~fisherlab.structures.layerwise.NormBlocks`). Parameters of
other modules without a layer rule raise :class:`~fisherlab.errors.UnsupportedLayerError`, or, with
``unsupported="block"``, keep an exact dense block (one per module) accumulated from the engine's factor rows
(this costs a pass of P-wide per-sample rows, as ``structure="block"`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fisherlab.checks import check_damping, parse_enum
from fisherlab.engine import FisherEngine
from fisherlab.errors import SingularMatrixError
from fisherlab.layers import (
    ConvRule,
    LayerLayout,
    LayerRows,
    OneHotRows,
    display_path,
    iter_layer_rows,
    reduce_inputs,
    rule_for,
)
from fisherlab.linalg import (
    inv_sqrtm,
    kron_damping_split,
    kron_eig,
    kron_inv_sqrt,
    kron_matmul,
    kron_to_dense,
)
from fisherlab.linalg.kron import KronFactorization, kron_damped_factor, kron_factor_solve
from fisherlab.linalg.threads import concurrently, serial
from fisherlab.structures.base import accumulate_gram, eigvalsh, symmetrize_upper
from fisherlab.structures.layerwise import LayerwiseFisher, NormBlocks, prepare_layers, vars_of
from fisherlab.vocabulary import KFACApprox


def _gram_into(M: Tensor, U: Tensor, c: Tensor | None, fresh: bool, mirror: bool = False,
               scale: Tensor | float | None = None) -> None:
    """M += VᵀV for the rows V = [U, c] (m, d), upper triangle only (``fresh``: M is overwritten, β = 0).

    :func:`accumulate_gram` does about half the arithmetic of a full product; the bias's column Uᵀc and corner cᵀc
    are added without forming V (Uᵀc formed contiguous, then stored: 512 × 1024 rows, 1 thread, 0.05 ms; 0.54 ms as
    an addmv_ into the strided column). Only the upper triangle: even a full product's two triangles need not
    agree to the last bit (UᵀU by MKL on an AMD EPYC: 1 ulp apart), so every sum is mirrored.
    ``mirror``: the sum is complete after this product; mirror it in place (:func:`symmetrize_upper`) right away,
    multiplied by ``scale`` in the same pass if given.
    """
    accumulate_gram(M if c is None else M[:-1, :-1], U, fresh=fresh)
    if c is not None:
        column, corner = U.T @ c, c.dot(c)
        M[:-1, -1] = column if fresh else M[:-1, -1] + column
        M[-1, -1] = corner if fresh else M[-1, -1] + corner
    if mirror:
        symmetrize_upper(M, inplace=True, scale=scale)


class GramSums(dict[str, Tensor]):
    """key → Σ over chunks of VᵀV (d, d), a chunk's rows V = [U, c] (m, d), or a value summed by :func:`_add`.

    (c (m,): the bias's column; None: V = U. The values summed by :func:`_add`: an Embedding's diagonal A.)
    :meth:`add` does no arithmetic: it allocates a new key's sum uninitialised (its first chunk overwrites it, β = 0
    in every GEMM: no zero fill) and queues the chunk's product (:func:`_gram_into`, the upper triangle), which
    :func:`run_grams` runs with the chunk's other queued products; :meth:`finish` scales the finished sum. Each sum
    is mirrored (:func:`symmetrize_upper`, so the factors are exactly symmetric) by the task of its last
    product when ``early_mirror`` and the pass's rows are known (``pass_rows``), on the thread that formed it,
    while the sum is still in its cache (MLP 64-1024-1024-10, N = 512: no second round of tasks), and scaled in
    the same pass when ``scale`` says by what; otherwise by :meth:`finish`. Without ``early_mirror``
    (data-parallel: the ranks' sums are added first, and the all-reduce sums an entry and its mirror image in
    different orders) every sum is mirrored by :meth:`finish`.
    """

    def __init__(self, early_mirror: bool = True, scale: Callable[[str], Tensor | float] | None = None) -> None:
        super().__init__()
        self.early_mirror = early_mirror
        #: key → the factor its complete sum is multiplied by, read once the sum is complete (None: the factor
        #: :meth:`finish` is given).
        self.scale = scale
        #: key → its queued products (U, c, fresh, mirror), in order, run by :func:`run_grams`.
        self.pending: dict[str, list[tuple[Tensor, Tensor | None, bool, bool]]] = {}
        #: key → the rows it has still to get in the pass (None: not known).
        self.rows_left: dict[str, int | None] = {}
        #: The keys whose last product mirrors their sum (and scales it, with ``scale``).
        self.mirrored: set[str] = set()

    def add(self, key: str, U: Tensor, c: Tensor | None = None, *, pass_rows: int | None = None) -> None:
        """Queue self[key] += VᵀV (upper triangle) for the rows V = [U, c] (U (m, width), c (m,) or None).

        ``pass_rows``: the rows this key gets over the whole pass (default: many), read on its first chunk.
        """
        fresh = key not in self
        if fresh:
            d = U.shape[1] + (c is not None)
            self[key] = U.new_empty(d, d)
            self.rows_left[key] = pass_rows if self.early_mirror else None
        left = self.rows_left[key]
        self.rows_left[key] = None if left is None else left - U.shape[0]
        last = self.rows_left[key] == 0
        if last:
            self.mirrored.add(key)
        else:  # more rows than announced: the sum changes after its mirror, so finish mirrors it again
            self.mirrored.discard(key)
        self.pending.setdefault(key, []).append((U, c, fresh, last))

    def needs_mirror(self, key: str) -> bool:
        """Whether :meth:`finish` mirrors self[key] (a Gram sum not mirrored already)."""
        return self[key].dim() == 2 and key not in self.mirrored

    def final_scale(self, key: str) -> Tensor | float | None:
        """The factor self[key] is multiplied by once complete (``scale``; None without)."""
        return None if self.scale is None else self.scale(key)

    def finish(self, key: str, scale: Tensor | float | None = None) -> Callable[[], Tensor]:
        """A task that returns factor · self[key], mirrored in place if :meth:`needs_mirror` (in the same pass).

        The factor is ``scale``, by default :meth:`final_scale`; a sum its last product's task mirrored with
        ``self.scale`` is returned as it is.
        """
        M = self[key]
        if key in self.mirrored and self.scale is not None:
            return lambda: M
        factor = self.final_scale(key) if scale is None else scale
        mirror = self.needs_mirror(key)
        return lambda: symmetrize_upper(M, inplace=True, scale=factor) if mirror else M.mul_(factor)


#: Least rows of each part when :func:`run_grams` splits one product's rows over the CPU threads.
SPLIT_ROWS = 256
#: Least work (multiply-adds, Σ m·d²) of a chunk's queued products that :func:`run_grams` runs side by side: below
#: it a thread pool costs more than the parallel regions it saves (GPT 1M KFAC-reduce, 32 sequences, ~10⁸: 2-thread
#: wall minima 195 ms one after the other, 205 ms side by side; again at load 2 with the products on one thread,
#: 31 interleaved rounds: wall medians 193.9 / 200.0 ms, ratio 0.95, the same bits; the MLP's 2·10⁹ and the CNN's
#: 8·10⁸ gain), and the products run on one thread.
SIDE_BY_SIDE_WORK = 2**28


def run_grams(sums: Sequence[GramSums], device: torch.device) -> None:
    """Run the queued products of ``sums``, largest key first (a key's own in the order they were queued).

    On a CPU with several intra-op threads they run side by side, each on one thread
    (:func:`~fisherlab.linalg.threads.concurrently`), when none is more than 1/threads of the work: a triangular
    product on one thread takes narrow column blocks (:data:`~fisherlab.structures.base.GRAM_BLOCK_SERIAL`), none of
    them a parallel region with its barrier. Four 1,025² Grams of 512 rows (the MLP 64-1024-1024-10's), 2 threads on
    2 shared cores (load 6), wall minima of 25 rounds: zero-filled and triangular one after the other 199 ms, full
    products into uninitialised sums 127 ms, triangular side by side 95 ms (mirrors included; 1 thread, CPU time:
    43.3, 46.5, 41.6 ms). A single product over 1/threads of the work, queued once with at least
    :data:`SPLIT_ROWS` rows a thread, has its rows split over the threads (the parts after the first into scratch
    sums, added afterwards): the CNN's second convolution, 8,192 rows of width 289, 87% of its Grams. Otherwise the
    products run one after the other on every thread. Below :data:`SIDE_BY_SIDE_WORK` in all they run one after the
    other on one thread (:func:`~fisherlab.linalg.threads.serial`), as with one intra-op thread: each of the many
    small GEMMs would be a parallel region whose barrier waits for a descheduled thread on loaded cores (GPT 1M
    KFAC-reduce, 32 sequences, 2 threads on 2 cores shared with one busy process: 123 such GEMMs, HEAD's build wall
    medians of 21 rounds 103.6 / 115.8 ms, one thread 98.4 / 108.4 ms, the same bits); with the mirrors of its
    queued last products, no multi-thread OpenMP region is left in the call (counted: 0 of the build's 14,329,
    ``benchmarks/bench_gpt_ab.py``). A sum whose last product this is (:class:`GramSums`) is mirrored by that
    product's task, or after the scratch sums are added; when the products run one after the other on several
    threads, by :meth:`GramSums.finish` instead, which mirrors side by side.
    """
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if threads > 1 and sum(U.shape[0] * G[k].shape[0] ** 2
                           for G in sums for k, queue in G.pending.items() for U, *_ in queue) < SIDE_BY_SIDE_WORK:
        with serial(device):
            run_grams(sums, device)
        return
    jobs = sorted(((sum(U.shape[0] * G[k].shape[0] ** 2 for U, *_ in queue), G[k], queue, G, k)
                   for G in sums for k, queue in G.pending.items()), key=lambda job: -job[0])
    for G in sums:
        G.pending = {}
    pieces = [(work, lambda M=M, queue=queue, G=G, key=key: [
        _gram_into(M, *item, scale=G.final_scale(key) if item[3] else None) for item in queue])
        for work, M, queue, G, key in jobs]
    total = sum(job[0] for job in jobs)
    scratch: list[tuple[Tensor, Tensor]] = []
    split_mirror = False  # the split product is its sum's last: mirrored once the scratch sums are added
    if threads > 1 and jobs and jobs[0][0] * threads > total and len(jobs[0][2]) == 1 \
            and jobs[0][2][0][0].shape[0] >= SPLIT_ROWS * threads:
        work, M, [(U, c, fresh, split_mirror)], G, key = jobs[0]
        rows = [(U[a: a + step], None if c is None else c[a: a + step])
                for step in [-(-U.shape[0] // threads)] for a in range(0, U.shape[0], step)]
        scratch = [(M, torch.empty_like(M)) for _ in rows[1:]]
        pieces[:1] = [(work // len(rows), lambda: _gram_into(M, *rows[0], fresh))] + [
            (work // len(rows), lambda S=S, part=part: _gram_into(S, *part, True))
            for (_, S), part in zip(scratch, rows[1:], strict=True)]
        pieces.sort(key=lambda piece: -piece[0])
    side_by_side = threads > 1 and max(work for work, _ in pieces) * threads <= total
    if not side_by_side and device.type == "cpu" and torch.get_num_threads() > 1:
        split_mirror = False  # the mirrors are left to finish, side by side
        for *_, queue, G, key in jobs:
            if queue[-1][3]:
                queue[-1] = (*queue[-1][:3], False)
                G.mirrored.discard(key)
    if side_by_side:
        concurrently([task for _, task in pieces], device)
    else:
        for _, task in pieces:
            task()
    for M, S in scratch:
        M.add_(S)
    if split_mirror:
        symmetrize_upper(jobs[0][1], inplace=True, scale=jobs[0][3].final_scale(jobs[0][4]))


def _zeros(engine: FisherEngine, *shape: int) -> Tensor:
    return torch.zeros(shape, dtype=engine.dtype, device=engine.device)


def _add(acc: dict[str, Tensor], key: str, value: Tensor) -> None:
    """acc[key] += value (the first value is stored as it is)."""
    if key in acc:
        acc[key].add_(value)
    else:
        acc[key] = value


def _accumulate(A: GramSums, S: GramSums, count: dict[str, Tensor], path: str, rows: LayerRows,
                approx: KFACApprox, live: Tensor | None, samples: int) -> None:
    """Add one chunk's Σ ā āᵀ to A[path], Σ δ δᵀ to S[path] and A's count to count[path] (module docstring).

    ``live`` (n, L) (None: every position) restricts A: "expand" sums and counts the live (n, l) pairs, "reduce"
    averages each sample's live positions and counts the samples with one. ``samples``: this rank's samples in
    the pass (the Gram sums' rows in the pass are the chunk's per sample times these, :meth:`GramSums.add`).
    """
    inputs, out = rows.unfolded, rows.outputs  # out: (n, L, out), for the shapes and the dtype
    n, L = out.shape[:2]
    weight = None if live is None else live.to(out.dtype)  # (n, L)
    if approx is KFACApprox.REDUCE:
        if weight is None:
            ones = out.new_ones(n) if rows.bias else None  # the bias's pooled 1
            A.add(path, reduce_inputs(inputs, out.dtype), ones, pass_rows=samples)
            _add(count, path, out.new_tensor(float(n)))
        else:
            per_sample = weight.sum(1)  # L_n, the live positions of sample n
            if isinstance(inputs, OneHotRows):
                live_sum = out.new_zeros(n, inputs.width).scatter_add_(1, inputs.ids, weight)
            else:
                live_sum = torch.einsum("nl,nli->ni", weight, inputs)  # Σ_l live_{n,l} ā_{n,l} (n, width)
            scale = per_sample.clamp(min=1)
            A.add(path, live_sum / scale.unsqueeze(1), per_sample / scale if rows.bias else None, pass_rows=samples)
            _add(count, path, per_sample.gt(0).sum().to(out.dtype))
        sums = rows.grad_sums()  # (R, n, out): Σ_l δ, summed in the reverse pass when it pooled them
        S.add(path, sums.reshape(-1, sums.shape[-1]), pass_rows=sums.shape[0] * samples)
        return
    grads = rows.grads
    if isinstance(inputs, OneHotRows):  # diagonal: the token counts
        _add(A, path, inputs.counts(grads.dtype) if weight is None else torch.bincount(
            inputs.ids.reshape(-1), weights=weight.reshape(-1), minlength=inputs.width).to(grads.dtype))
    else:
        U = (inputs if weight is None else inputs * weight.unsqueeze(-1)).reshape(n * L, inputs.shape[-1])
        c = None if not rows.bias else grads.new_ones(n * L) if weight is None else weight.reshape(-1)
        A.add(path, U, c, pass_rows=L * samples)  # the bias's entries of ā·weight are the weights
    _add(count, path, grads.new_tensor(float(n * L)) if weight is None else weight.sum())
    S.add(path, grads.reshape(-1, grads.shape[-1]), pass_rows=grads.shape[0] * L * samples)


def diagonal_input(f: KroneckerFactors) -> bool:
    """Whether the layer's A is diagonal and stored as its diagonal (width,) (an Embedding under "expand")."""
    return f.A.dim() == 1


def _stand_in(a: Tensor) -> Tensor:
    """A 1 × 1 stand-in for a diagonal A (its mean), so that :func:`kron_eig` decomposes S alone."""
    return a.mean().reshape(1, 1)


@dataclass(frozen=True, eq=False)
class KroneckerFactors(LayerLayout):
    """KFAC factors of one layer: block = S ⊗ A in row-major W̄ order (see the module docstring).

    Attributes:
        A: Input factor (width, width), width = in_eff·[weight selected] + [bias selected]; for a one-hot layer
            under "expand" its diagonal (width,) (the matrix is diagonal, :func:`diagonal_input`).
        S: Output-gradient factor (out, out).
    """

    #: Fields that a running average (:mod:`fisherlab.structures.running`) averages.
    averaged: ClassVar[tuple[str, ...]] = ("A", "S")

    A: Tensor
    S: Tensor


@dataclass(repr=False)
class KFACFisher(LayerwiseFisher):
    """KFAC: per supported layer S ⊗ A (in W̄ order), block-diagonal across layers.

    ``factors`` maps each module path to its :class:`KroneckerFactors`. ``matmat``, ``diag`` (diag S ⊗ diag A),
    ``trace`` (tr A · tr S), ``eigvalsh`` (products of the factors' eigenvalues) and ``solve`` never form a
    Kronecker product; ``to_dense`` does (within the memory budget). ``meta["kfac_convention"]`` is the
    ``approx`` used.
    """

    structure = "kfac"
    factors: dict[str, KroneckerFactors] = field(default_factory=dict)
    #: How many damping settings (λ, split, method, dtype) :meth:`damped_factors` keeps factorised.
    damped_kept: ClassVar[int] = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        #: (λ, split, method, dtype) → layer path → (its factors, their damped factorisation), least recently used
        #: first, at most ``damped_kept`` settings (:meth:`damped_factors`).
        self._damped: dict[tuple[float, str, str, torch.dtype],
                           dict[str, tuple[KroneckerFactors, KronFactorization]]] = {}

    @classmethod
    def from_engine(cls, engine: FisherEngine, *, approx: str | KFACApprox = "expand", unsupported: str = "error",
                    chunk_size: int | None = None) -> KFACFisher:
        """Accumulate A, S and the norms' exact blocks in one pass (one forward, one batched R-row backward per chunk).

        Args:
            engine: Model, data, likelihood and Fisher kind (true: closed-form output factor, "exact type-2";
                mc; empirical; ggn).
            approx: ``"expand"`` (default) or ``"reduce"`` for layers shared over positions (module docstring;
                the same for L = 1).
            unsupported: ``"error"`` (default) or ``"block"`` (exact dense blocks for modules without a rule;
                LayerNorm/RMSNorm always get one).
            chunk_size: Samples per chunk (default: from the memory budget, see
                :func:`~fisherlab.layers.iter_layer_rows`).

        Raises:
            InputError: Unknown ``approx`` or ``unsupported``.
            UnsupportedLayerError: A module without a rule (``unsupported="error"``), tied weights, a layer called
                twice or on an input without the batch dimension.
        """
        return cls.factor_pass(engine, approx, unsupported, chunk_size, keep_bytes=0)[0]

    @classmethod
    def factor_pass(cls, engine: FisherEngine, approx: str | KFACApprox, unsupported: str, chunk_size: int | None,
                    keep_bytes: int) -> tuple[KFACFisher, list[dict[str, tuple[Tensor | OneHotRows, Tensor]]] | None]:
        """:meth:`from_engine`'s pass, which can also hand its layer rows on (EKFAC's scalings reuse them).

        Args:
            engine: As :meth:`from_engine`.
            approx: As :meth:`from_engine`.
            unsupported: As :meth:`from_engine`.
            chunk_size: As :meth:`from_engine`.
            keep_bytes: Keep every chunk's (ā rows (n, L, width), δ rows (R, n, L, out)) per layer if all of them
                together take at most this many bytes (ids of one-hot rows counted as δ's scalars; 0: keep none).

        Returns:
            The KFAC Fisher, and the chunks' rows in pass order (None when they did not fit in ``keep_bytes``).
        """
        approx = parse_enum(KFACApprox, approx, "KFAC approx=")
        setup = prepare_layers(engine, cls.structure, unsupported)
        N = engine.num_samples
        count: dict[str, Tensor] = {}
        # A / count, S / N (no live position at all: A = 0 and S = 0, the layer's exact block is zero)
        A = GramSums(engine.group is None, lambda p: count[p].clamp(min=1).reciprocal())
        S = GramSums(engine.group is None, lambda p: 1 / N)
        sequence = [p for p in setup.layouts
                    if not isinstance(rule_for(engine.model.get_submodule(p), p), ConvRule)]
        norms = NormBlocks(engine, setup.norms)
        kept: list[dict[str, tuple[Tensor | OneHotRows, Tensor]]] | None = [] if keep_bytes > 0 else None
        held = 0
        # KFAC-reduce needs only Σ_l δ: summed in the reverse pass (unless EKFAC keeps the rows)
        pool = approx is KFACApprox.REDUCE and kept is None
        for rows in iter_layer_rows(engine, setup.layouts, chunk_size=chunk_size, norms=setup.norms, pool=pool,
                                    masked=sequence, desc=f"KFAC-{approx.value} {engine.kind.value} factors"):
            norms.add(rows)
            for p, r in rows.items():
                live = rows.live.get(r.outputs.shape[1]) if p in sequence else None
                _accumulate(A, S, count, p, r, approx, live, engine.local_samples)
            run_grams((A, S), engine.device)
            if kept is not None:
                held += sum((r.inputs.numel() + r.grads.numel()) * r.grads.element_size() for r in rows.values())
                if held <= keep_bytes:
                    kept.append({p: (r.inputs, r.grads) for p, r in rows.items()})
                else:
                    kept = None  # recomputed by the caller's own pass
        for p, f in setup.layouts.items():
            if p not in S:  # a layer the forward pass never calls has zero factors
                diagonal = f.one_hot and approx is KFACApprox.EXPAND
                A[p] = _zeros(engine, f.width) if diagonal else _zeros(engine, f.width, f.width)
                S[p], count[p] = _zeros(engine, f.out_features, f.out_features), _zeros(engine)
        engine.reduce_sum([M for p in setup.layouts for M in (A[p], S[p], count[p])])  # data-parallel: the sums
        tasks = [task for p in setup.layouts for task in (A.finish(p), S.finish(p))]
        mirrors = any(G.needs_mirror(p) for p in setup.layouts for G in (A, S))  # else only scalings, each parallel
        finished = iter(concurrently(tasks, engine.device) if mirrors else [task() for task in tasks])
        factors = {p: KroneckerFactors(**vars_of(f), A=next(finished), S=next(finished))
                   for p, f in setup.layouts.items()}
        return cls(engine.spec, engine.kind, engine.dtype, engine.device, engine.memory_budget,
                   {**setup.meta, "kfac_convention": approx.value}, factors, setup.index,
                   setup.blocks(norms.finish())), kept

    def _layer_matmat(self, f: KroneckerFactors, X: Tensor) -> Tensor:
        return f.S @ X * f.A if diagonal_input(f) else kron_matmul(f.A, f.S, X)

    def _layer_diag(self, f: KroneckerFactors) -> Tensor:
        a = f.A if diagonal_input(f) else f.A.diagonal()
        return f.S.diagonal().unsqueeze(1) * a.unsqueeze(0)

    def _layer_trace(self, f: KroneckerFactors) -> Tensor:
        return self._layer_diag(f).sum() if diagonal_input(f) else f.A.diagonal().sum() * f.S.diagonal().sum()

    def _layer_dense(self, f: KroneckerFactors) -> Tensor:
        return kron_to_dense(torch.diag(f.A) if diagonal_input(f) else f.A, f.S)

    def _layer_eigvalsh(self, f: KroneckerFactors) -> Tensor:
        return torch.outer(eigvalsh(f.S), f.A if diagonal_input(f) else eigvalsh(f.A))

    def damped_factors(self, damping: float = 0.0, split: str = "pi", method: str = "cholesky",
                       dtype: torch.dtype | None = None) -> dict[str, KronFactorization]:
        """Layer path → its damped block factorised (:func:`~fisherlab.linalg.kron.kron_damped_factor`), kept.

        What :meth:`solve` solves with: the damped factors are symmetrised, damped and factorised once per
        (λ, split, method, dtype) and every later solve with that setting only applies them
        (:func:`~fisherlab.linalg.kron.kron_factor_solve`, O(out·width·(out + width)) a layer instead of the
        O(out³ + width³) of a factorisation) — CG preconditioned by this KFAC factorises once per damping. The
        :attr:`damped_kept` most recently used settings are kept (each about the size of the factors; the factors
        themselves never change after construction). A layer with a diagonal A (:func:`diagonal_input`) is
        factorised in S's eigenbasis (always eigh; ``method`` does not apply).

        Args:
            damping: λ ≥ 0.
            split: ``"pi"``, ``"sqrt"`` or ``"exact"`` (:meth:`solve`).
            method: ``"cholesky"`` or ``"eigh"`` for the factored splits.
            dtype: The right-hand sides' dtype (factorised in it promoted with the factors'; default the factors').

        Raises:
            InputError: Bad damping, split or method.
            SingularMatrixError: A damped factor (or S ⊗ A + λI) is not numerically positive definite.
        """
        damping = check_damping(damping)
        key = (damping, split, method, self.dtype if dtype is None else dtype)
        kept = dict(self._damped.get(key, {}))
        for p, f in self.factors.items():
            if p not in kept or kept[p][0] is not f:
                kept[p] = f, self._damped_factor(f, *key)
        self._damped.pop(key, None)  # kept only once every layer is factorised; most recently used last
        self._damped[key] = kept
        while len(self._damped) > self.damped_kept:
            del self._damped[next(iter(self._damped))]
        return {p: factor for p, (_, factor) in kept.items()}

    @staticmethod
    def _damped_factor(f: KroneckerFactors, damping: float, split: str, method: str,
                       dtype: torch.dtype) -> KronFactorization:
        """One layer's damped block factorised (a diagonal A: in the basis Q_S ⊗ I, where it is diagonal)."""
        if not diagonal_input(f):
            return kron_damped_factor(f.A, f.S, damping, split, method=method, dtype=dtype)
        eig = kron_eig(_stand_in(f.A), f.S)
        sigma, Q = eig.s_eigvals, eig.s_eigvecs
        if split == "exact":
            denom = sigma.unsqueeze(1) * f.A.unsqueeze(0) + damping
        else:
            a, s = kron_damping_split(f.A, f.S, damping, split)
            denom = (sigma + s).unsqueeze(1) * (f.A + a).unsqueeze(0)
        lo, hi = torch.stack([denom.min(), denom.abs().max()]).tolist()
        threshold = denom.numel() * torch.finfo(denom.dtype).eps * hi if damping == 0 else 0.0
        if not lo > threshold:
            advice = "pass damping > 0" if damping == 0 else f"increase the damping (now {damping:g})"
            raise SingularMatrixError(f"the KFAC block of layer {display_path(f.layer)} (split {split!r}) + damping "
                                      f"is not numerically positive definite (smallest eigenvalue {lo:.3e} ≤ "
                                      f"{threshold:.3e}; an id that never occurs has a zero input factor); {advice}")
        return KronFactorization(None, Q, denom, f.S.dtype)

    def _layer_solve(self, f: KroneckerFactors, X: Tensor, damping: float, split: str = "pi",
                     method: str = "cholesky") -> Tensor:
        return kron_factor_solve(self.damped_factors(damping, split, method, X.dtype)[f.layer], X)

    def solve(self, g: Tensor, damping: float = 0.0, split: str = "pi", method: str = "cholesky") -> Tensor:
        """Factor-wise damped solve, layer by layer (exact blocks by Cholesky of B + λI).

        Args:
            g: Right-hand side (P,) or (P, k).
            damping: λ ≥ 0.
            split: ``"pi"`` (default; Martens & Grosse's factored damping (S + √λ/π I) ⊗ (A + π√λ I), the KFAC
                step and the one a reconstructed network with :meth:`inv_sqrt_factors` takes), ``"sqrt"``
                ((S + √λ I) ⊗ (A + √λ I)) or ``"exact"`` ((S ⊗ A + λI)⁻¹ from the factors' eigendecompositions).
            method: ``"cholesky"`` or ``"eigh"`` for the factored splits.

        Returns:
            The solution, g's shape.

        Raises:
            SingularMatrixError: A damped factor (or S ⊗ A + λI) is not numerically positive definite.
        """
        return super().solve(g, damping, split=split, method=method)

    def inv_sqrt_factors(self, damping: float = 0.0, method: str = "eigh",
                         split: str = "pi") -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer ((A + aI)^{-1/2}, (S + sI)^{-1/2}), (a, s) the ``split`` of λ (:func:`kron_damping_split`).

        These are the input-whitening and output local Fisher layers of the reconstructed layer
        y = S^{-1/2} W' A^{-1/2} ā (docs/method.md).

        Exact blocks of unsupported modules are not included (use :func:`fisherlab.linalg.inv_sqrtm` on
        ``exact_blocks``). For a layer with a diagonal A (:func:`diagonal_input`) the first root is its diagonal
        (width,).

        Args:
            damping: λ ≥ 0.
            method: ``"eigh"``, ``"denman_beavers"`` or ``"newton_schulz"`` (:func:`fisherlab.linalg.sqrtm`).
            split: ``"pi"`` or ``"sqrt"``.
        """
        damping = check_damping(damping)
        return {p: _diagonal_inv_sqrt(f, damping, method, split) if diagonal_input(f)
                else kron_inv_sqrt(f.A, f.S, damping=damping, method=method, split=split)
                for p, f in self.factors.items()}


def _diagonal_inv_sqrt(f: KroneckerFactors, damping: float, method: str, split: str) -> tuple[Tensor, Tensor]:
    """((A + aI)^{-1/2} as its diagonal (width,), (S + sI)^{-1/2}) for a diagonal A."""
    a, s = kron_damping_split(f.A, f.S, damping, split)
    low = float((f.A + a).min())
    if not low > 0:
        raise SingularMatrixError(f"the input factor of layer {display_path(f.layer)} + {a:g}·I is singular (smallest "
                                  f"entry {low:.3e}: an id that never occurs); pass damping > 0")
    return (f.A + a).rsqrt(), inv_sqrtm(f.S, method=method, damping=s)


__all__ = ["KFACFisher", "KroneckerFactors", "diagonal_input"]
