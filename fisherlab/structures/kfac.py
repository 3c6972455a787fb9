"""KFAC: per-layer Kronecker factors G_l ≈ S ⊗ A, block-diagonal across layers (METHOD.md §2, §4).

For a supported layer (:mod:`fisherlab.layers`: Linear, Conv1d, Conv2d) with combined weight W̄ (out, width),
expanded input rows ā_{n,l} (width,) and output-gradient rows δ_{n,r,l} = J_{l,n}ᵀ M_{n,r} (out,) — the engine's
output factor rows pulled back to the layer output, so that the true, Monte-Carlo, empirical and GGN kinds all
come from the same code —

    A = (1/(N·L)) Σ_n Σ_l ā_{n,l} ā_{n,l}ᵀ,        S = (1/N) Σ_n Σ_r Σ_l δ_{n,r,l} δ_{n,r,l}ᵀ.

For convolutions this is the KFC approximation (Grosse & Martens 2016) in curvlinops' "expand" convention: the
L = ∏ output spatial sizes locations are averaged in A and summed in S (for L = 1 — every Linear layer — the
two conventions coincide). In fisherlab's row-major flat order of W̄ the layer block is S ⊗ A
(``torch.kron(S, A)``), then permuted to the flat parameter order (weight row-major, then bias). KFAC equals
the exact layer block when every sample has the same S-side (one sample; the output layer under a Gaussian
likelihood; every layer of a deep linear network under a Gaussian likelihood with the true Fisher).

Parameters of modules without a layer rule raise :class:`~fisherlab.errors.UnsupportedLayerError`, or, with
``unsupported="block"``, keep an exact dense block (one per module) accumulated from the engine's factor rows
(this costs a pass of P-wide per-sample rows, as ``structure="block"`` does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import Tensor

from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError
from fisherlab.layers import LayerLayout, iter_layer_rows, layer_layouts, unsupported_error
from fisherlab.linalg import damped_solve, kron_damped_solve, kron_inv_sqrt, kron_matmul, kron_to_dense
from fisherlab.structures.base import FisherMatrix, accumulate_gram, symmetrize_upper
from fisherlab.structures.dense import engine_meta

#: Ways to treat parameters of modules without a layer rule.
UNSUPPORTED_MODES = ("error", "block")


@dataclass(repr=False)
class LayerwiseFisher(FisherMatrix):
    """Block-diagonal across layers; each supported layer's block has a structured form on W̄ (out, width).

    Subclasses store per-layer factors (a :class:`~fisherlab.layers.LayerLayout` subclass) and say how one layer
    block acts on a batch of matrices X (k, out, width) in W̄ layout; the base class does the permutations to and
    from the flat parameter order, and handles the exact dense blocks kept for unsupported modules.

    Attributes:
        factors: Module path → that layer's factors.
        index: Module path → flat parameter indices (ascending) of every block, layers and exact blocks alike.
        exact_blocks: Module path → exact dense Fisher block of a module without a layer rule (only with
            ``unsupported="block"``), in flat order.
    """

    factors: dict[str, LayerLayout] = field(default_factory=dict)
    index: dict[str, Tensor] = field(default_factory=dict)
    exact_blocks: dict[str, Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------------------- per-layer hooks
    def _layer_matmat(self, f: LayerLayout, X: Tensor) -> Tensor:
        """The layer block applied to X (k, out, width); returns (k, out, width)."""
        raise NotImplementedError

    def _layer_diag(self, f: LayerLayout) -> Tensor:
        """The block's diagonal in W̄ layout (out, width)."""
        raise NotImplementedError

    def _layer_dense(self, f: LayerLayout) -> Tensor:
        """The block (P_l, P_l) in row-major W̄ order."""
        raise NotImplementedError

    def _layer_eigvalsh(self, f: LayerLayout) -> Tensor:
        """The block's eigenvalues (P_l,), any order."""
        raise NotImplementedError

    def _layer_solve(self, f: LayerLayout, X: Tensor, damping: float, **options: object) -> Tensor:
        """(block + λI)⁻¹ X for X (k, out, width) (or the structure's damped variant, see ``solve``)."""
        raise NotImplementedError

    def _layer_trace(self, f: LayerLayout) -> Tensor:
        return self._layer_diag(f).sum()

    # ----------------------------------------------------------------------------------- interface
    def _per_block(self, V: Tensor, layer_fn: Callable[[LayerLayout, Tensor], Tensor],
                   exact_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """Apply ``layer_fn`` (W̄ layout) to each layer's rows of V (P, k) and ``exact_fn`` to each exact block's."""
        out = torch.zeros_like(V)
        for path, f in self.factors.items():
            ix = self.index[path]
            out[ix] = f.scatter(layer_fn(f, f.gather(V[ix])))
        for path, B in self.exact_blocks.items():
            ix = self.index[path]
            out[ix] = exact_fn(B, V[ix])
        return out

    def matmat(self, V: Tensor) -> Tensor:
        return self._per_block(self._check_operand(V), self._layer_matmat, lambda B, X: B @ X)

    def diag(self) -> Tensor:
        out = torch.zeros(self.spec.dim, dtype=self.dtype, device=self.device)
        for path, f in self.factors.items():
            out[self.index[path]] = f.scatter(self._layer_diag(f).unsqueeze(0)).squeeze(1)
        for path, B in self.exact_blocks.items():
            out[self.index[path]] = B.diagonal()
        return out

    def trace(self) -> Tensor:
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for f in self.factors.values():
            total = total + self._layer_trace(f)
        for B in self.exact_blocks.values():
            total = total + B.diagonal().sum()
        return total

    def to_dense(self) -> Tensor:
        self.check_dense_budget()
        P = self.spec.dim
        out = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        blocks = [(path, f.permute_dense(self._layer_dense(f))) for path, f in self.factors.items()]
        for path, B in [*blocks, *self.exact_blocks.items()]:
            ix = self.index[path]
            out[ix.unsqueeze(1), ix.unsqueeze(0)] = B
        return out

    def eigvalsh(self) -> Tensor:
        """All P eigenvalues (the union of the blocks' spectra), ascending, without forming any dense block."""
        parts = [self._layer_eigvalsh(f).reshape(-1) for f in self.factors.values()]
        parts += [torch.linalg.eigvalsh(B) for B in self.exact_blocks.values()]
        return torch.sort(torch.cat(parts)).values

    def solve(self, g: Tensor, damping: float = 0.0, **options: object) -> Tensor:
        """Blockwise damped solve; layer blocks by the structure's rule (``options``), exact blocks by Cholesky.

        Args:
            g: Right-hand side (P,) or (P, k).
            damping: λ ≥ 0.
            **options: Passed to the structure's per-layer solve (e.g. KFAC's ``split``).

        Returns:
            The solution, g's shape.
        """
        g = self._check_operand(g)
        G = g if g.dim() == 2 else g.unsqueeze(1)
        out = self._per_block(G, lambda f, X: self._layer_solve(f, X, damping, **options),
                              lambda B, X: damped_solve(B, X, damping))
        return out if g.dim() == 2 else out.squeeze(1)

    def _check_compatible(self, other: LayerwiseFisher, what: str) -> None:
        """Raise InputError unless ``other`` has the same type, parameters and layers as ``self``."""
        if type(other) is not type(self) or other.spec != self.spec or list(other.factors) != list(self.factors) \
                or list(other.exact_blocks) != list(self.exact_blocks):
            raise InputError(f"{what}: the two Fishers must be of the same structure over the same parameters and "
                             f"layers; got {other!r} and {self!r}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind.value!r}, P={self.spec.dim}, layers={list(self.factors)}, "
                f"exact_blocks={list(self.exact_blocks)}, dtype={self.dtype})")


@dataclass(frozen=True)
class LayerSetup:
    """What every layer-wise structure needs before its own pass: layouts, flat indices and exact blocks."""

    layouts: dict[str, LayerLayout]
    index: dict[str, Tensor]
    exact_blocks: dict[str, Tensor]
    meta: dict


def prepare_layers(engine: FisherEngine, structure: str, unsupported: str = "error") -> LayerSetup:
    """Layouts of the supported layers and, with ``unsupported="block"``, exact blocks for the other modules.

    Raises:
        UnsupportedLayerError: ``unsupported="error"`` and a selected parameter belongs to a module without rule.
        InputError: Unknown ``unsupported`` mode.
    """
    if unsupported not in UNSUPPORTED_MODES:
        raise InputError(f"unknown unsupported={unsupported!r}; valid: {list(UNSUPPORTED_MODES)}")
    layouts, others = layer_layouts(engine.model, engine.spec)
    if others and unsupported == "error":
        raise unsupported_error(engine.model, others, structure)
    blocks = engine.spec.blocks("layer")
    index = {p: blocks[p].to(engine.device) for p in [*layouts, *others]}
    exact = exact_blocks(engine, others) if others else {}
    meta = {**engine_meta(engine), "unsupported": unsupported, "exact_blocks": list(others)}
    return LayerSetup(layouts, index, exact, meta)


def exact_blocks(engine: FisherEngine, groups: Mapping[str, Sequence[str]]) -> dict[str, Tensor]:
    """Exact dense Fisher blocks Σ Uᵀ_b U_b, one per group (module path → its parameter names, in spec order).

    The factor rows are those of the groups' parameters alone (their VJPs only, not all P columns).
    """
    names = [n for n in engine.spec.names if any(n in g for g in groups.values())]
    columns = engine.spec.indices(names)  # flat indices of the rows' columns, ascending
    index = {p: torch.searchsorted(columns, engine.spec.indices(g)).to(engine.device) for p, g in groups.items()}
    engine.check_dense(sum(len(ix) ** 2 for ix in index.values()), 1, f"the exact blocks of {list(index)}")
    acc = {p: torch.zeros(len(ix), len(ix), dtype=engine.dtype, device=engine.device) for p, ix in index.items()}
    for U in engine.iter_factor_rows(desc="exact blocks of unsupported modules", names=names):
        for p, ix in index.items():
            accumulate_gram(acc[p], U.index_select(1, ix))
    return {p: symmetrize_upper(B) for p, B in acc.items()}


def _add_gram(acc: dict[str, Tensor], key: str, U: Tensor) -> None:
    """acc[key] += UᵀU for rows U (m, d); the first chunk's product is stored without a zero accumulator.

    A blocked GEMM need not compute entries (i, j) and (j, i) of UᵀU in the same order (MKL on AVX-512 AMD CPUs does
    not), so the caller symmetrises the finished sum once (:func:`symmetrize_upper`).
    """
    if key in acc:
        acc[key].addmm_(U.T, U)
    else:
        acc[key] = U.T @ U


def _empty(size: int, engine: FisherEngine) -> Tensor:
    return torch.zeros(size, size, dtype=engine.dtype, device=engine.device)


@dataclass(frozen=True, eq=False)
class KroneckerFactors(LayerLayout):
    """KFAC factors of one layer: block = S ⊗ A in row-major W̄ order (see the module docstring).

    Attributes:
        A: Input factor (width, width), width = in_eff·[weight selected] + [bias selected].
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
    Kronecker product; ``to_dense`` does (within the memory budget).
    """

    structure = "kfac"
    factors: dict[str, KroneckerFactors] = field(default_factory=dict)

    @classmethod
    def from_engine(cls, engine: FisherEngine, *, unsupported: str = "error",
                    chunk_size: int | None = None) -> KFACFisher:
        """Accumulate A and S in one pass over the data (one forward, one batched R-row backward per chunk).

        Args:
            engine: Model, data, likelihood and Fisher kind (true: closed-form output factor, "exact type-2";
                mc; empirical; ggn).
            unsupported: ``"error"`` (default) or ``"block"`` (exact dense blocks for modules without a rule).
            chunk_size: Samples per chunk (default: from the memory budget, see
                :func:`~fisherlab.layers.iter_layer_rows`).
        """
        setup = prepare_layers(engine, cls.structure, unsupported)
        A: dict[str, Tensor] = {}
        S: dict[str, Tensor] = {}
        locations = dict.fromkeys(setup.layouts, 1)
        for rows in iter_layer_rows(engine, setup.layouts, chunk_size=chunk_size,
                                    desc=f"KFAC {engine.kind.value} factors"):
            for p, r in rows.items():
                locations[p] = r.inputs.shape[1]
                _add_gram(A, p, r.inputs.reshape(-1, r.inputs.shape[-1]))
                _add_gram(S, p, r.grads.reshape(-1, r.grads.shape[-1]))
        N = engine.num_samples
        factors = {}
        for p, f in setup.layouts.items():  # a layer the forward pass never calls has zero factors
            a = A[p] if p in A else _empty(f.width, engine)
            s = S[p] if p in S else _empty(f.out_features, engine)
            a, s = (symmetrize_upper(M, inplace=True) for M in (a, s))
            factors[p] = KroneckerFactors(**vars_of(f), A=a.mul_(1 / (N * locations[p])), S=s.mul_(1 / N))
        return cls(engine.spec, engine.kind, engine.dtype, engine.device, engine.memory_budget,
                   {**setup.meta, "kfac_convention": "expand"}, factors, setup.index, setup.exact_blocks)

    def _layer_matmat(self, f: KroneckerFactors, X: Tensor) -> Tensor:
        return kron_matmul(f.A, f.S, X)

    def _layer_diag(self, f: KroneckerFactors) -> Tensor:
        return f.S.diagonal().unsqueeze(1) * f.A.diagonal().unsqueeze(0)

    def _layer_trace(self, f: KroneckerFactors) -> Tensor:
        return f.A.diagonal().sum() * f.S.diagonal().sum()

    def _layer_dense(self, f: KroneckerFactors) -> Tensor:
        return kron_to_dense(f.A, f.S)

    def _layer_eigvalsh(self, f: KroneckerFactors) -> Tensor:
        return torch.outer(torch.linalg.eigvalsh(f.S), torch.linalg.eigvalsh(f.A))

    def _layer_solve(self, f: KroneckerFactors, X: Tensor, damping: float, split: str = "pi",
                     method: str = "cholesky") -> Tensor:
        return kron_damped_solve(f.A, f.S, X, damping, split, method=method)

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
        y = S^{-1/2} W' A^{-1/2} ā (METHOD.md §4).

        Exact blocks of unsupported modules are not included (use :func:`fisherlab.linalg.inv_sqrtm` on
        ``exact_blocks``).

        Args:
            damping: λ ≥ 0.
            method: ``"eigh"``, ``"denman_beavers"`` or ``"newton_schulz"`` (:func:`fisherlab.linalg.sqrtm`).
            split: ``"pi"`` or ``"sqrt"``.
        """
        return {p: kron_inv_sqrt(f.A, f.S, damping=damping, method=method, split=split)
                for p, f in self.factors.items()}


def vars_of(f: LayerLayout) -> dict:
    """The :class:`LayerLayout` fields of ``f`` (a layout or any factor subclass), as keyword arguments."""
    return {fl.name: getattr(f, fl.name) for fl in fields(LayerLayout)}


__all__ = ["KFACFisher", "KroneckerFactors", "LayerSetup", "LayerwiseFisher", "UNSUPPORTED_MODES",
           "exact_blocks", "prepare_layers", "vars_of"]
