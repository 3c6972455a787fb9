"""Layer-wise Fisher structures: the base of KFAC, EKFAC and the unit-wise structure.

A :class:`LayerwiseFisher` holds, per supported layer (:mod:`fisherlab.layers`: Linear, Conv1d, Conv2d,
Embedding), the statistics of its structure (Kronecker factors, an eigenbasis with scalings, unit blocks) and, for
the parameters of modules without a layer rule, exact dense blocks (one per module, accumulated from the engine's
factor rows of those parameters only). Normalisation layers (:data:`NORM_MODULES`: ``nn.LayerNorm``,
``nn.RMSNorm``; a few affine scalars each, 2·d for LayerNorm) always get their exact block — the exact Fisher of
those parameters within the module; their paths are ``meta["norm_blocks"]``. A norm that the forward pass calls
once (:func:`~fisherlab.layers.captured_norms`) has its block accumulated in the structure's own pass of layer
rows, from the per-sample gradients Σ_l δ_l ⊙ x̂_l (weight) and Σ_l δ_l (bias) (:class:`NormBlocks`); any other
(called twice, or its parameters read without a call) from a pass of the engine's factor rows restricted to its
parameters. Any other module without a rule gets one with ``unsupported="block"``, or an
:class:`~fisherlab.errors.UnsupportedLayerError` naming it (``unsupported="error"``, the default). Products,
solves, diagonals and dense forms work block by block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from fisherlab.checks import check_damping, parse_enum
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError
from fisherlab.layers import ChunkRows, LayerLayout, captured_norms, layer_layouts, norm_gradients, unsupported_error
from fisherlab.linalg import damped_solve
from fisherlab.params import ParamSpec
from fisherlab.structures.base import FisherMatrix, accumulate_gram, eigvalsh, symmetrize_upper
from fisherlab.structures.dense import engine_meta
from fisherlab.vocabulary import Unsupported

#: Ways to treat parameters of modules without a layer rule.
UNSUPPORTED_MODES: tuple[str, ...] = tuple(m.value for m in Unsupported)

#: Normalisation modules whose affine parameters layer-wise structures cover by exact dense blocks unasked.
NORM_MODULES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)


class LayerIndex(Mapping[str, Tensor]):
    """Module path → flat parameter indices (LongTensor, ascending) of its block, formed by :meth:`form`.

    The spec's layer blocks (:meth:`~fisherlab.params.ParamSpec.blocks`) of ``paths``, on ``device``: P int64
    indices in all (a fresh engine has a fresh spec: 9 MB for the MLP 64-1024-1024-10, 0.4 ms), which a
    structure's pass does not need. :func:`prepare_layers` makes the mapping before the pass, the structure forms
    it when it is made, after the pass (:class:`LayerwiseFisher`): formed before the pass, a fresh engine's pass
    page-faults its working memory in anew (MLP KFAC-MC end to end, 1 thread, glibc's malloc: 6120 minor faults
    a call); never formed, every pass does (5092, also on a built engine); formed after it, none (1).
    ``path in index`` and the iteration read ``paths`` only.
    """

    def __init__(self, spec: ParamSpec, paths: Sequence[str], device: torch.device):
        self.spec, self.paths, self.device = spec, list(paths), device
        self._formed: dict[str, Tensor] | None = None

    def form(self) -> None:
        """Form the indices (once)."""
        if self._formed is None:
            blocks = self.spec.blocks("layer")
            self._formed = {p: blocks[p].to(self.device) for p in self.paths}

    def __getitem__(self, path: str) -> Tensor:
        self.form()
        return self._formed[path]

    def __contains__(self, path: object) -> bool:
        return path in self.paths

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(repr=False)
class LayerwiseFisher(FisherMatrix):
    """Block-diagonal across layers; each supported layer's block has a structured form on W̄ (out, width).

    Subclasses store per-layer factors (a :class:`~fisherlab.layers.LayerLayout` subclass) and say how one layer
    block acts on a batch of matrices X (k, out, width) in W̄ layout; the base class does the permutations to and
    from the flat parameter order, and handles the exact dense blocks kept for modules without a layer rule.

    Attributes:
        factors: Module path → that layer's factors.
        index: Module path → flat parameter indices (ascending) of every block, layers and exact blocks alike
            (from :func:`prepare_layers`: a :class:`LayerIndex`, formed here, after the structure's pass).
        exact_blocks: Module path → exact dense Fisher block, in flat order, of a module without a layer rule:
            every LayerNorm/RMSNorm (``meta["norm_blocks"]``) and, with ``unsupported="block"``, any other.
    """

    factors: dict[str, LayerLayout] = field(default_factory=dict)
    index: Mapping[str, Tensor] = field(default_factory=dict, metadata={"indices": True})
    exact_blocks: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.index, LayerIndex):
            self.index.form()  # now, after the structure's pass (LayerIndex)

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
        parts += [eigvalsh(B) for B in self.exact_blocks.values()]
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
        damping = check_damping(damping)
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
    """What every layer-wise structure needs before its own pass: layouts, flat indices and exact blocks.

    Attributes:
        layouts: Module path → layout of each supported layer.
        index: Module path → flat parameter indices (ascending) of every block (formed by the structure).
        exact_blocks: Module path → exact block, for the modules without a rule whose block is computed up front
            (from factor rows); the norms of ``norms`` are missing until the structure's pass (:meth:`blocks`).
        meta: The structure's metadata (``meta["exact_blocks"]``: every module with an exact block, in order).
        norms: Norm module path → selected parameter names, for the norms whose exact blocks the structure's pass
            of layer rows accumulates (:class:`NormBlocks`; ``iter_layer_rows(..., norms=setup.norms)``).
    """

    layouts: dict[str, LayerLayout]
    index: LayerIndex
    exact_blocks: dict[str, Tensor]
    meta: dict
    norms: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def blocks(self, norm_blocks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every exact block in ``meta["exact_blocks"]`` order: the precomputed ones and ``norm_blocks``."""
        return {p: self.exact_blocks[p] if p in self.exact_blocks else norm_blocks[p]
                for p in self.meta["exact_blocks"]}


def prepare_layers(engine: FisherEngine, structure: str, unsupported: str = "error", *,
                   capture_norms: bool = True) -> LayerSetup:
    """Layouts of the supported layers, exact blocks for norms and (``unsupported="block"``) the other modules.

    With ``capture_norms`` (for a structure whose pass has a backward pass) the norms that
    :func:`~fisherlab.layers.captured_norms` finds are left to that pass (``LayerSetup.norms``); every other exact
    block is computed here, from the engine's factor rows.

    Raises:
        UnsupportedLayerError: ``unsupported="error"`` and a selected parameter belongs to a module without rule
            that is not a norm (:data:`NORM_MODULES`); tied weights (:func:`~fisherlab.layers.layer_layouts`).
        InputError: Unknown ``unsupported`` mode.
    """
    unsupported = parse_enum(Unsupported, unsupported, "unsupported= mode").value
    layouts, others = layer_layouts(engine.model, engine.spec)
    norms = [p for p in others if isinstance(engine.model.get_submodule(p), NORM_MODULES)]
    rest = {p: names for p, names in others.items() if p not in norms}
    if rest and unsupported == "error":
        raise unsupported_error(engine.model, rest, structure)
    index = LayerIndex(engine.spec, [*layouts, *others], engine.device)
    captured = captured_norms(engine, {p: others[p] for p in norms}, layouts) if capture_norms else {}
    upfront = {p: names for p, names in others.items() if p not in captured}
    exact = exact_blocks(engine, upfront) if upfront else {}
    meta = {**engine_meta(engine), "unsupported": unsupported, "exact_blocks": list(others), "norm_blocks": norms}
    return LayerSetup(layouts, index, exact, meta, captured)


class NormBlocks:
    """Exact blocks (1/N) Σ_n Σ_r u_{n,r} u_{n,r}ᵀ of norm modules from the per-sample gradients u of a layer pass.

    u_{n,r} = :func:`~fisherlab.layers.norm_gradients` of the module's :attr:`ChunkRows.norms` rows (the engine's
    output factor rows pulled back to the module's output), in flat order — the same rows as the engine's factor
    rows restricted to the module's parameters, so the block is the exact Fisher block of the engine's kind.
    """

    def __init__(self, engine: FisherEngine, norms: Mapping[str, Sequence[str]]) -> None:
        self.engine = engine
        self.names = {p: [n.rpartition(".")[2] for n in names] for p, names in norms.items()}
        sizes = {p: len(engine.spec.indices(names)) for p, names in norms.items()}
        engine.check_dense(sum(k ** 2 for k in sizes.values()), 1, f"the exact blocks of {list(norms)}")
        #: The upper triangles of the sums, mirrored by :meth:`finish` (even a full product's two triangles of UᵀU
        #: need not agree to the last bit).
        self.sums = {p: torch.zeros(k, k, dtype=engine.dtype, device=engine.device) for p, k in sizes.items()}

    def add(self, rows: ChunkRows) -> None:
        """Add one chunk's Σ u uᵀ (upper triangles)."""
        for p, r in rows.norms.items():
            U = norm_gradients(r, self.names[p])
            accumulate_gram(self.sums[p], U.reshape(-1, U.shape[-1]))

    def finish(self) -> dict[str, Tensor]:
        """The blocks: summed over the ranks (data-parallel), symmetrised and divided by N."""
        self.engine.reduce_sum(list(self.sums.values()))
        return {p: symmetrize_upper(B, inplace=True).div_(self.engine.num_samples) for p, B in self.sums.items()}


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
    engine.reduce_sum([acc[p] for p in index])  # data-parallel: the ranks' Gram sums
    return {p: symmetrize_upper(B) for p, B in acc.items()}


def vars_of(f: LayerLayout) -> dict:
    """The :class:`LayerLayout` fields of ``f`` (a layout or any factor subclass), as keyword arguments."""
    return {fl.name: getattr(f, fl.name) for fl in fields(LayerLayout)}


__all__ = ["NORM_MODULES", "UNSUPPORTED_MODES", "LayerIndex", "LayerSetup", "LayerwiseFisher", "NormBlocks",
           "exact_blocks", "prepare_layers", "vars_of"]
