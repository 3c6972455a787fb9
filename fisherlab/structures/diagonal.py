"""Diagonal Fisher: diag(F)_i = (1/N) Σ_n Σ_r (M_n J_n)²_{r,i}, the squared per-sample gradients summed.

Two ways, one result:

* **layer-wise** (Linear, Conv1d, Conv2d: the layers of :data:`fisherlab.layers.LAYER_RULES`): a layer's
  per-sample gradients are Σ_l δ_l ā_lᵀ, so the squares come from the layer's inputs ā and output gradients δ
  (:func:`fisherlab.layers.squared_gradient_sum`, one (out × n)(n × width) product per chunk for a Linear
  layer) — as cheap as the KFAC factors, with no P-wide rows (BackPACK's DiagGGN-exact does the same);
* **factor rows** for every other parameter (norms, recurrent cells, user modules): the engine's rows of those
  parameters alone (:meth:`FisherEngine.iter_factor_rows` with ``names``), squared and summed. A model whose
  layers cannot be read layer-wise (a module called twice per forward pass) takes this way for all parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.checks import check_damping
from fisherlab.engine import FisherEngine
from fisherlab.errors import UnsupportedLayerError
from fisherlab.layers import LayerLayout, iter_layer_rows, layer_layouts, squared_gradient_sum
from fisherlab.structures.base import FisherMatrix
from fisherlab.structures.dense import engine_meta


@dataclass(repr=False)
class DiagonalFisher(FisherMatrix):
    """Only the diagonal of F, shape (P,)."""

    structure = "diag"
    diagonal: Tensor = None  # type: ignore[assignment]

    @classmethod
    def from_engine(cls, engine: FisherEngine) -> DiagonalFisher:
        """diag(F) (P,): layer-wise where a layer rule applies, from factor rows elsewhere (module docstring).

        Memory O(P) plus one chunk of layer rows (or of the other parameters' factor rows).
        """
        d = torch.zeros(engine.spec.dim, dtype=engine.dtype, device=engine.device)
        try:
            rest = _add_layerwise(engine, d)
        except UnsupportedLayerError:  # e.g. a module called twice per forward pass: no per-layer reading
            d.zero_()
            rest = list(engine.spec.names)
        if rest:
            rest = [n for n in engine.spec.names if n in set(rest)]  # the column order of the factor rows
            index = engine.spec.indices(rest).to(engine.device)
            for U in engine.iter_factor_rows(desc=f"diagonal {engine.kind.value} Fisher", names=rest):
                d.index_add_(0, index, (U * U).sum(0))
        engine.reduce_sum([d])  # data-parallel: the ranks' partial sums (each already over the global N)
        return cls(engine.spec, engine.kind, engine.dtype, engine.device, engine.memory_budget,
                   engine_meta(engine), d)

    def matmat(self, V: Tensor) -> Tensor:
        return self.diagonal.unsqueeze(1) * self._check_operand(V)

    def diag(self) -> Tensor:
        return self.diagonal.clone()

    def eigvalsh(self) -> Tensor:
        return torch.sort(self.diagonal).values

    def solve(self, g: Tensor, damping: float = 0.0) -> Tensor:
        """(diag(F) + λI)⁻¹ g; a zero entry with no damping raises SingularMatrixError."""
        from fisherlab.errors import SingularMatrixError

        damping = check_damping(damping)
        d = self.diagonal + damping
        if bool((d <= 0).any()):
            raise SingularMatrixError(
                f"{int((d <= 0).sum())} diagonal entries of F + λI are ≤ 0 at damping {damping}; pass damping > 0"
            )
        g = self._check_operand(g)
        return g / (d if g.dim() == 1 else d.unsqueeze(1))


def _add_layerwise(engine: FisherEngine, d: Tensor) -> list[str]:
    """Write the diagonal of every layer with a rule into d (P,); returns the names of the other parameters.

    One pass over the data in chunks of :func:`~fisherlab.layers.iter_layer_rows`, which counts the per-sample
    gradients only for layers at several locations (L > 1: a convolution, a Linear on sequences); with L = 1
    the squares need no more than the rows, so a chunk holds as many samples as the rows allow.
    """
    layouts, others = layer_layouts(engine.model, engine.spec)
    rest = [n for names in others.values() for n in names]
    if not layouts:
        return rest
    sums = {p: torch.zeros(f.out_features, f.width, dtype=engine.dtype, device=engine.device)
            for p, f in layouts.items()}
    for rows in iter_layer_rows(engine, layouts, per_sample_gradients=True,
                                desc=f"diagonal {engine.kind.value} Fisher (layers)"):
        for p, r in rows.items():
            sums[p] += squared_gradient_sum(r.grads, r.inputs)
    for p, f in layouts.items():
        _write_combined(engine, f, sums[p] / engine.num_samples, d)
    return rest


def _write_combined(engine: FisherEngine, layout: LayerLayout, W: Tensor, d: Tensor) -> None:
    """Copy a layer's values in W̄ layout (out, width) into the slices of its parameters in d (P,).

    The weight's slice holds W̄'s first in_eff columns row-major (their transpose for an Embedding, whose weight
    is W̄ᵀ), the bias's slice W̄'s last column.
    """
    for name in layout.param_names:
        if name.endswith("weight"):  # also in_proj_weight of nn.MultiheadAttention
            part = W[:, : layout.in_features]
            part = part.T if layout.weight_transposed else part
        else:
            part = W[:, -1]
        d[engine.spec.slice(name)] = part.reshape(-1)
