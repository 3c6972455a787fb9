"""Unit-wise Fisher: one dense block per output unit (row i of W̄: the unit's weights and bias).

For a supported layer (Linear, Conv1d, Conv2d, Embedding — whose unit i is embedding coordinate i, coupling
its num_embeddings entries; LayerNorm/RMSNorm get exact blocks, :mod:`fisherlab.structures.layerwise`) with
combined weight W̄ (out, width), the block of unit i couples the width parameters of row i only (Sun & Nielsen's
relative Fisher of a neuron; Liu & Liu's SNGD, docs/method.md):

``variant="exact"``
    B_i = (1/N) Σ_n Σ_r g_{n,r,i} g_{n,r,i}ᵀ with g_{n,r} = Σ_l δ_{n,r,l,i} ā_{n,l} the row i of the per-sample
    gradient of W̄ — exactly the (width × width) sub-block of the layer's Fisher (of the engine's kind) on
    row i of W̄.

``variant="sngd"``
    The metric of the released SNGD code (Liu & Liu, arXiv:2109.10100; github.com/Chaochao-Lin/SNGD, ``MLP.py``,
    ``__metric``), for MLPs of ``nn.Linear`` layers. With x̃ = [x; 1] the layer input (the 1 when its bias is
    selected) and z = W̄ x̃ its pre-activation:

    * the first and the last Linear layer of the forward pass: B_i = E[x̃ x̃ᵀ] for every unit i (the input
      second moment, shared by all units);
    * every other Linear layer: B_i = E[sigmoid(z_i)² x̃ x̃ᵀ] (their "RFIM of ReLU", sigmoid as a smooth ReLU
      derivative).

    The expectation is the mean over the N samples (the released code keeps an exponential moving average with
    decay 0.995 over minibatches — :mod:`fisherlab.structures.running` — and inverts (B + ε tr(B) I + ε₀ I) with
    ε = 1e-4, ε₀ = 0 by default: pass ``relative_damping=ε`` to build B + ε tr(B) I, and ``damping=ε₀`` to
    :meth:`UnitwiseFisher.solve` or :func:`fisherlab.reconstruction.reconstruct`). It uses neither
    labels nor output gradients, so the Fisher kind is ignored. Convolutions have no SNGD metric and raise
    :class:`~fisherlab.errors.UnsupportedLayerError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fisherlab.checks import check_damping
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, SingularMatrixError, UnsupportedLayerError
from fisherlab.layers import LayerLayout, LayerRows, display_path, iter_layer_rows, per_sample_gradients
from fisherlab.structures.base import eigvalsh
from fisherlab.structures.layerwise import LayerwiseFisher, NormBlocks, prepare_layers, vars_of

#: Unit-wise variants.
VARIANTS = ("exact", "sngd")


@dataclass(frozen=True, eq=False)
class UnitBlocks(LayerLayout):
    """The unit blocks of one layer.

    Attributes:
        blocks: (out, width, width); blocks[i] couples the parameters of row i of W̄ (weights then bias).
    """

    averaged: ClassVar[tuple[str, ...]] = ("blocks",)

    blocks: Tensor


@dataclass(repr=False)
class UnitwiseFisher(LayerwiseFisher):
    """One (width × width) block per output unit of each supported layer; ``meta["variant"]`` says which metric."""

    structure = "unit"
    factors: dict[str, UnitBlocks] = field(default_factory=dict)
    #: How many dampings :meth:`damped_factors` keeps factorised at most (fewer when they exceed the budget).
    damped_kept: ClassVar[int] = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        #: λ → layer path → (its blocks, their lower Cholesky factors of B_i + λI), least recently used first
        #: (:meth:`damped_factors`).
        self._damped: dict[float, dict[str, tuple[UnitBlocks, Tensor]]] = {}

    @classmethod
    def from_engine(cls, engine: FisherEngine, *, variant: str = "exact", unsupported: str = "error",
                    chunk_size: int | None = None, relative_damping: float = 0.0) -> UnitwiseFisher:
        """One pass over the data (see the module docstring for the two variants).

        Args:
            engine: Model, data, likelihood and Fisher kind (the kind is ignored by ``variant="sngd"``).
            variant: ``"exact"`` or ``"sngd"``.
            unsupported: ``"error"`` or ``"block"`` (exact dense blocks for modules without a layer rule).
            chunk_size: Samples per chunk (default from the memory budget).
            relative_damping: ε ≥ 0: each block becomes B_i + ε tr(B_i) I (the released SNGD code's relative
                damping; a property of the metric, so running averages and reconstructions keep it).

        Raises:
            MemoryBudgetError: The blocks (Σ_layers out·width² numbers) exceed the memory budget.
            UnsupportedLayerError: A module without a rule, or (``"sngd"``) a supported layer that is not Linear.
        """
        if variant not in VARIANTS:
            raise InputError(f"unknown unit-wise variant {variant!r}; valid: {list(VARIANTS)}")
        relative_damping = check_damping(relative_damping, "relative_damping")
        setup = prepare_layers(engine, cls.structure, unsupported, capture_norms=variant == "exact")
        layouts = setup.layouts
        sizes = sum(f.out_features * f.width ** 2 for f in layouts.values())
        engine.check_dense(sizes, 1, f"the unit-wise blocks of {len(layouts)} layer(s)")
        blocks = {p: torch.zeros(f.out_features, f.width, f.width, dtype=engine.dtype, device=engine.device)
                  for p, f in layouts.items()}
        norms = NormBlocks(engine, setup.norms)
        if variant == "exact":
            for rows in iter_layer_rows(engine, layouts, chunk_size=chunk_size, per_sample_gradients=True,
                                        norms=setup.norms, desc=f"unit-wise {engine.kind.value} blocks"):
                norms.add(rows)
                for p, r in rows.items():
                    if isinstance(r.inputs, Tensor) and r.inputs.shape[1] == 1:  # rank one δ āᵀ: row i is δ_i ā
                        x = r.inputs[:, 0]
                        blocks[p] += torch.einsum("no,ni,nj->oij", r.grads[:, :, 0].square().sum(0), x, x)
                    else:
                        G = per_sample_gradients(r.grads, r.inputs)  # (R, n, out, width)
                        blocks[p] += torch.einsum("rnoi,rnoj->oij", G, G)
        else:
            _sngd_accumulate(engine, layouts, blocks, chunk_size)
        engine.reduce_sum([blocks[p] for p in layouts])  # data-parallel: the ranks' sums
        N = engine.num_samples
        for B in blocks.values():
            B /= N
            if relative_damping:  # B_i + ε tr(B_i) I
                B.diagonal(dim1=-2, dim2=-1).add_(relative_damping * B.diagonal(dim1=-2, dim2=-1).sum(-1, True))
        factors = {p: UnitBlocks(**vars_of(f), blocks=blocks[p]) for p, f in layouts.items()}
        return cls(engine.spec, engine.kind, engine.dtype, engine.device, engine.memory_budget,
                   {**setup.meta, "variant": variant, "relative_damping": float(relative_damping)}, factors,
                   setup.index, setup.blocks(norms.finish()))

    def _layer_matmat(self, f: UnitBlocks, X: Tensor) -> Tensor:
        return torch.einsum("oij,koj->koi", f.blocks, X)

    def _layer_diag(self, f: UnitBlocks) -> Tensor:
        return f.blocks.diagonal(dim1=-2, dim2=-1)

    def _layer_dense(self, f: UnitBlocks) -> Tensor:
        return torch.block_diag(*f.blocks)

    def _layer_eigvalsh(self, f: UnitBlocks) -> Tensor:
        return eigvalsh(f.blocks)

    def damped_factors(self, damping: float = 0.0) -> dict[str, Tensor]:
        """Layer path → the lower Cholesky factors (out, width, width) of its unit blocks B_i + λI, kept per λ.

        What :meth:`solve` solves with: factorised once per λ (batched Cholesky, in float32 for half-precision
        blocks), so that every later solve at that λ (a preconditioner inside CG, the geometry's per-layer solves)
        costs two triangular solves per unit. At most :attr:`damped_kept` dampings are kept, and only while the
        blocks and all kept factors (each setting the size of the blocks) fit ``memory_budget``; the least
        recently used is dropped first and the newest always kept. The blocks never change after construction.

        Raises:
            InputError: A bad damping.
            SingularMatrixError: A unit block + λI is not positive definite (pass damping > 0).
        """
        damping = check_damping(damping)
        kept = dict(self._damped.get(damping, {}))
        for p, f in self.factors.items():
            if p not in kept or kept[p][0] is not f:
                kept[p] = f, _unit_cholesky(f, damping)
        self._damped.pop(damping, None)  # kept only once every layer is factorised; most recently used last
        self._damped[damping] = kept
        size = sum(L.numel() * L.element_size() for _, L in kept.values())
        while len(self._damped) > 1 and (len(self._damped) > self.damped_kept
                                         or (len(self._damped) + 1) * size > self.memory_budget):
            del self._damped[next(iter(self._damped))]
        return {p: L for p, (_, L) in kept.items()}

    def _layer_solve(self, f: UnitBlocks, X: Tensor, damping: float) -> Tensor:
        L = self.damped_factors(damping)[f.layer]
        Y = torch.cholesky_solve(X.permute(1, 2, 0).to(L.dtype), L)  # (out, width, k)
        return Y.permute(2, 0, 1).to(X.dtype)

    def solve(self, g: Tensor, damping: float = 0.0) -> Tensor:
        """(B + λI)⁻¹ g unit block by unit block (batched Cholesky), exact blocks by Cholesky.

        Raises:
            SingularMatrixError: A unit block + λI is not positive definite (pass damping > 0).
        """
        return super().solve(g, damping)


def _unit_cholesky(f: UnitBlocks, damping: float) -> Tensor:
    """Lower Cholesky factors (out, width, width) of the layer's B_i + λI (float32 for half-precision blocks)."""
    low = f.blocks.dtype in (torch.float16, torch.bfloat16)  # no Cholesky in half precision: float32
    blocks = f.blocks.float() if low else f.blocks
    B = blocks + damping * torch.eye(f.width, dtype=blocks.dtype, device=blocks.device)
    L, info = torch.linalg.cholesky_ex(B)
    bad = torch.nonzero(info).reshape(-1)
    if bad.numel():
        advice = "pass damping > 0" if damping == 0 else f"increase the damping (now {damping:g})"
        raise SingularMatrixError(
            f"{bad.numel()} unit block(s) of layer {display_path(f.layer)} (first: unit {int(bad[0])}) + "
            f"damping·I are not positive definite; {advice}"
        )
    return L


def _sngd_accumulate(engine: FisherEngine, layouts: dict[str, LayerLayout], blocks: dict[str, Tensor],
                     chunk_size: int | None) -> None:
    """Add Σ_n of the SNGD metric's summands to ``blocks`` (see the module docstring)."""
    for path, f in layouts.items():
        if f.module_type != "Linear":
            raise UnsupportedLayerError(
                f"the SNGD unit-wise metric is defined for nn.Linear layers only; module {display_path(path)} is "
                f"{f.module_type}. Use variant='exact', or leave its parameters out with params=[...]."
            )
    order: list[str] = []
    for rows in iter_layer_rows(engine, layouts, backward=False, chunk_size=chunk_size, desc="SNGD unit blocks"):
        order = order or list(rows)  # forward call order
        for p, r in rows.items():
            _check_single_location(p, r)
            x = r.inputs[:, 0]
            if p in (order[0], order[-1]):
                blocks[p] += (x.T @ x).unsqueeze(0)
            else:
                weights = torch.sigmoid(r.outputs[:, 0]).square()  # (n, out)
                blocks[p] += torch.einsum("no,ni,nj->oij", weights, x, x)


def _check_single_location(path: str, rows: LayerRows) -> None:
    if rows.inputs.shape[1] != 1:
        raise UnsupportedLayerError(
            f"the SNGD metric needs (N, features) inputs; layer {display_path(path)} shares its weight over "
            f"{rows.inputs.shape[1]} positions"
        )


__all__ = ["VARIANTS", "UnitBlocks", "UnitwiseFisher"]
