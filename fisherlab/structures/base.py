"""The interface every Fisher structure shares (dense, block-diagonal, diagonal, implicit, KFAC, ...).

A :class:`FisherMatrix` is a symmetric P×P operator over the flat parameter vector of a
:class:`~fisherlab.params.ParamSpec` (ordering: ``model.named_parameters()``, row-major per tensor). Every
structure answers the same questions: ``shape``, products with vectors (P,) and matrices (P, k), ``diag()``,
``trace()``, ``to_dense()``, ``to_scipy()``, damped solves (F + λI)⁻¹ g and its spectrum; a subclass states only
what is particular to it (at least :meth:`matmat` and :meth:`diag`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from fisherlab.checks import check_damping, low_precision_advice
from fisherlab.errors import InputError, NonFiniteError
from fisherlab.memory import check_budget, dense_bytes
from fisherlab.params import ParamSpec, all_finite
from fisherlab.vocabulary import FisherKind

#: Least columns per block of the triangular Gram products: wide enough for efficient GEMMs, and few of them
#: (each is a parallel region; see benchmarks/README.md).
GRAM_BLOCK = 384
#: The same on one intra-op CPU thread, where a block is no parallel region: narrower blocks skip more of the lower
#: triangle (1-thread CPU minima, (m, d) rows → d × d: (512, 1024) 10.6 ms in one block, 8.2 in 2, 5.4 in 8;
#: (2048, 512) 10.5, 5.9 in 4; (2048, 384) 6.1, 3.1 in 4).
GRAM_BLOCK_SERIAL = 96
#: Block widths of the triangular Gram products are multiples of this many columns, so that every block starts on a
#: 64-byte boundary of a float32 row (1-thread CPU minima, (m, d) = (512, 1024) float32 rows in ten blocks: 103
#: columns 9.3 ms, 112 columns 8.0 ms; (2048, 512) in five: 8.2 / 6.8 ms; the same sums bit for bit).
GRAM_ALIGN = 16
#: Most entries (P²) of a matrix that :func:`symmetrize_upper` mirrors whole on the CPU, in two operations: torch's
#: parallel grain (32,768 elements), so that neither is a parallel region on any thread count (P ≤ 181).
MIRROR_WHOLE = 2**15


@dataclass
class FisherMatrix:
    """Base class of all Fisher structures.

    Every structure is checked when it is constructed: a NaN or infinity anywhere in its stored tensors (a dense
    matrix, blocks, Kronecker factors, eigenvalues — whatever the dtype, float16 included) raises
    :class:`~fisherlab.errors.NonFiniteError` naming the field, so no Fisher with non-finite entries is returned.
    Every damping λ a method takes is checked by :func:`fisherlab.checks.check_damping` (finite, ≥ 0).

    Attributes:
        spec: The parameters the matrix is taken over (P = ``spec.dim``).
        kind: Which Fisher (true, mc, empirical, ggn).
        dtype: Dtype of products and stored factors.
        device: Device of products and stored factors.
        memory_budget: Bytes a dense object derived from this one (``to_dense``) may take.
        meta: Provenance of the computation (likelihood, N, chunk size, seed, ...), JSON-serialisable.
    """

    structure: ClassVar[str] = ""

    spec: ParamSpec
    kind: FisherKind
    dtype: torch.dtype
    device: torch.device
    memory_budget: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        stored = [(where, t) for where, t in _stored_tensors(self) if t.is_floating_point() and t.numel()]
        if all_finite(t for _, t in stored):  # one sum a tensor; the entries only where a sum is not finite
            return
        for where, t in stored:
            self.check_finite(t, where)

    def check_finite(self, t: Tensor, where: str) -> Tensor:
        """``t`` (a stored tensor, or a product of a structure that stores none); NonFiniteError if not finite."""
        # amax/amin propagate NaN and keep ±inf: two read-only passes, where isfinite(t).all() makes five
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(torch.stack([t.amax(), t.amin()])).all()):
            raise NonFiniteError(
                f"the {self.kind.value} {self.structure or type(self).__name__} Fisher has NaN or infinite "
                f"entries ({where}, computed in {self.dtype}){low_precision_advice(self.dtype)}"
            )
        return t

    # ------------------------------------------------------------------------------------- to implement
    def matmat(self, V: Tensor) -> Tensor:
        """F V for V of shape (P, k); returns (P, k)."""
        raise NotImplementedError

    def diag(self) -> Tensor:
        """The diagonal of F, shape (P,)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ derived
    @property
    def shape(self) -> tuple[int, int]:
        """(P, P)."""
        return (self.spec.dim, self.spec.dim)

    def _check_operand(self, V: Tensor) -> Tensor:
        if not isinstance(V, Tensor) or V.dim() not in (1, 2) or V.shape[0] != self.spec.dim:
            shape = tuple(V.shape) if isinstance(V, Tensor) else type(V)
            raise InputError(f"expected a tensor of shape (P,) or (P, k) with P = {self.spec.dim}; got {shape}")
        return V.to(self.device, self.dtype)

    def matvec(self, v: Tensor) -> Tensor:
        """F v for v of shape (P,)."""
        return self.matmat(self._check_operand(v).unsqueeze(1)).squeeze(1)

    def __matmul__(self, V: Tensor) -> Tensor:
        V = self._check_operand(V)
        return self.matvec(V) if V.dim() == 1 else self.matmat(V)

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """vᵢᵀ F vᵢ for the columns of V (P, k) → (k,); V of shape (P,) → a 0-dim tensor.

        Here the column sums of V ⊙ F V; the implicit Fisher computes them without F V (forward mode only).
        """
        V = self._check_operand(V)
        return (V * self.matmat(V if V.dim() == 2 else V.unsqueeze(1)).reshape(V.shape)).sum(0)

    def trace(self) -> Tensor:
        """Tr F (a 0-dim tensor)."""
        return self.diag().sum()

    def check_dense_budget(self) -> None:
        """Refuse (:class:`~fisherlab.errors.MemoryBudgetError`) if the P×P matrix exceeds the memory budget."""
        P = self.spec.dim
        check_budget(dense_bytes(P, P, self.dtype), f"the dense {P}×{P} matrix of this {self.structure} Fisher",
                     self.memory_budget)

    def to_dense(self) -> Tensor:
        """The P×P matrix (refused above the memory budget)."""
        self.check_dense_budget()
        return self.matmat(torch.eye(self.spec.dim, dtype=self.dtype, device=self.device))

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` of shape (P, P) in float64 (products round-trip via torch)."""

        def mv(v: np.ndarray) -> np.ndarray:
            V = torch.as_tensor(np.asarray(v), device=self.device).to(self.dtype)
            out = self.matvec(V) if V.dim() == 1 else self.matmat(V)
            return out.detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, matmat=mv, rmatvec=mv, dtype=np.float64)

    def eigvalsh(self) -> Tensor:
        """All eigenvalues, ascending, shape (P,) (from the dense matrix; structures override with cheaper forms)."""
        return eigvalsh(self.to_dense())

    def condition_number(self, damping: float = 0.0) -> float:
        """κ(F + λI) = (λ_max + λ)/(λ_min + λ) for λ ≥ 0; ``inf`` when F + λI is singular."""
        damping = check_damping(damping)
        ev = self.eigvalsh()
        lo = float(ev[0]) + damping
        return float(ev[-1] + damping) / lo if lo > 0 else float("inf")

    def solve(self, g: Tensor, damping: float = 0.0) -> Tensor:
        """(F + λI)⁻¹ g for g of shape (P,) or (P, k), by Cholesky of the dense matrix.

        Raises:
            SingularMatrixError: If F + λI is not positive definite (pass a positive damping).
        """
        from fisherlab.linalg import damped_solve

        damping = check_damping(damping)
        return damped_solve(self.to_dense(), self._check_operand(g), damping)

    def named(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat vector (P,) into named parameter-shaped tensors."""
        return self.spec.unflatten(vec)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind.value!r}, P={self.spec.dim}, dtype={self.dtype}, "
                f"device={self.device})")


def eigvalsh(M: Tensor) -> Tensor:
    """Eigenvalues of symmetric M (..., n, n), ascending, in M's dtype; float16 / bfloat16 are computed in float32.

    (torch has no eigendecomposition in half precision; the solves of :mod:`fisherlab.linalg` promote the same way.)
    On the CPU on one intra-op thread (:func:`fisherlab.linalg.threads.serial`: the reduction's per-column barriers
    stall the threads of shared cores 3–4×; :func:`fisherlab.linalg.threads.concurrently` runs independent
    spectra side by side).
    """
    from fisherlab.linalg.threads import serial

    with serial(M.device):
        if M.dtype in (torch.float16, torch.bfloat16):
            return torch.linalg.eigvalsh(M.float()).to(M.dtype)
        return torch.linalg.eigvalsh(M)


def _stored_tensors(struct: FisherMatrix) -> Iterator[tuple[str, Tensor]]:
    """(where, tensor) for every tensor a structure stores: its fields, their dict values and dataclass members.

    A field marked ``metadata={"indices": True}`` holds integer indices, which no check reads: it is not walked
    (:class:`~fisherlab.structures.layerwise.LayerIndex` is formed by its structure, after the walk).
    """

    def walk(where: str, value: Any) -> Iterator[tuple[str, Tensor]]:
        if isinstance(value, Tensor):
            yield where, value
        elif isinstance(value, Mapping):
            for k, v in value.items():
                yield from walk(f"{where}[{k!r}]", v)
        elif is_dataclass(value) and not isinstance(value, type):
            for f in fields(value):
                yield from walk(f"{where}.{f.name}", getattr(value, f.name))

    for f in fields(struct):
        if f.name not in ("spec", "meta") and not f.metadata.get("indices"):
            yield from walk(f.name, getattr(struct, f.name))


def accumulate_gram(out: Tensor, U: Tensor, num_splits: int | None = None, *, fresh: bool = False) -> None:
    """out[i, j] += (UᵀU)[i, j] for j ≥ i only (upper triangle, in column blocks): about half the arithmetic.

    Block row [a, b) gets U[:, a:b]ᵀ U[:, a:] added in place (one GEMM into a strided view of ``out``, no
    temporary). The diagonal blocks are computed in full, so the work is (s + 1)/(2s) of a full product.

    Args:
        out: (P, P) accumulator; only its upper triangle is meaningful until :func:`symmetrize_upper`.
        U: (m, P) rows.
        num_splits: Column blocks s (default: blocks of about :data:`GRAM_BLOCK` columns — :data:`GRAM_BLOCK_SERIAL`
            on one CPU thread —, at most 16; one block, a plain product, below two blocks' columns). The block
            width is rounded up to a multiple of :data:`GRAM_ALIGN` columns (so s blocks or fewer).
        fresh: Overwrite the upper triangle instead of adding to it (β = 0 in every GEMM: ``out`` may be
            uninitialised memory, ``torch.empty``, so no zero fill is needed).
    """
    P = U.shape[1]
    if num_splits is None:
        serial = U.device.type == "cpu" and torch.get_num_threads() == 1
        num_splits = min(16, max(1, P // (GRAM_BLOCK_SERIAL if serial else GRAM_BLOCK)))
    step = -(-max(1, -(-P // num_splits)) // GRAM_ALIGN) * GRAM_ALIGN
    for a in range(0, P, step):
        b = min(a + step, P)
        out[a:b, a:].addmm_(U[:, a:b].T, U[:, a:], beta=0 if fresh else 1)


def symmetrize_upper(M: Tensor, inplace: bool = False, scale: Tensor | float | None = None) -> Tensor:
    """The symmetric matrix whose upper triangle is M's: triu(M) + triu(M, 1)ᵀ (times ``scale`` if given).

    Args:
        M: (P, P); only its upper triangle is read.
        inplace: Write the mirror image into M's own lower triangle and return M (no second P×P matrix).
        scale: A factor the result is multiplied by: on one CPU thread in the same pass (each block row scaled
            before it is mirrored: four 1,025², 1-thread CPU minima, mirror then multiplication 8.6 ms, one pass
            7.2 ms, the same bits), otherwise afterwards.

    On CPU a matrix of at most :data:`MIRROR_WHOLE` entries (P ≤ 181) is mirrored whole, ``torch.where`` of the
    upper-triangle mask between M and Mᵀ and one copy (or multiplication) into the result: it stays in cache, and
    each operation is below torch's parallel grain, so one thread's. The tiles below cost ~10 operations for
    P = 129 (1-thread CPU minima, load 3–5, scaled in place: 64² 22 → 5.6 µs, 128² 31 → 15 µs, 129² 46 → 12 µs;
    GPT 1M KFAC-reduce, 34 of its 46 factors: ~1 ms of its ~150 ms build; the same bits). A larger one is copied in
    128×128 tiles: each tile and its mirror stay in cache (a whole-matrix transpose does not: 4× slower for
    P = 3,466; already 1.2× for 384²), and a tile is small enough (below the grain) to be copied by one thread,
    with no parallel region to synchronise. On one intra-op thread, where no copy is a parallel region, a block
    row's tiles right of the diagonal go as one copy, a 128-row slab (1-thread CPU minima, load 2: four 1,025² 8.2
    → 7.4 ms, one 3,466² 23.6 → 20.8 ms, the same bits; on 2 threads such slabs would be parallel copies, 4× slower
    for 3,466² on 2 loaded cores). GPUs transpose well in one kernel.
    """
    if M.device.type != "cpu":
        full = torch.triu(M) + torch.triu(M, 1).T
        full = full if scale is None else full.mul_(scale)
        return M.copy_(full) if inplace else full
    n, t = M.shape[0], 128
    if n * n <= MIRROR_WHOLE:
        idx = torch.arange(n, device=M.device)
        full = torch.where(idx[:, None] <= idx[None, :], M, M.T)  # (torch.triu itself is slow on small CPU tiles)
        if scale is None:
            return M.copy_(full) if inplace else full
        return torch.mul(full, scale, out=M) if inplace else full.mul_(scale)
    out = M if inplace else torch.empty_like(M)
    idx = torch.arange(t, device=M.device)
    upper = idx[:, None] <= idx[None, :]  # (torch.triu itself is slow on small CPU tiles)
    width = n if torch.get_num_threads() == 1 else t  # columns right of the diagonal copied at once
    by_rows = scale is not None and width == n  # each block row scaled into out, then mirrored from there
    src = out if by_rows else M
    for a in range(0, n, t):
        if by_rows:
            torch.mul(M[a: a + t, a:], scale, out=out[a: a + t, a:])
        diag = src[a: a + t, a: a + t]
        k = diag.shape[0]
        out[a: a + t, a: a + t] = torch.where(upper[:k, :k], diag, diag.T)
        for b in range(a + t, n, width):
            tile = src[a: a + t, b: b + width]
            if not inplace and not by_rows:
                out[a: a + t, b: b + width] = tile
            out[b: b + width, a: a + t] = tile.T
    return out if scale is None or by_rows else out.mul_(scale)
