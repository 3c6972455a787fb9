"""The sample-space Gram matrix K = UUᵀ of a Fisher F = UᵀU, built layer by layer (the ``gram`` NGD solver).

F = UᵀU with the engine's factor rows U (m, P), m = N·R (R = ``engine.rows_per_sample``), scaled as
:meth:`~fisherlab.engine.FisherEngine.iter_factor_rows` scales them (1/√N on the output factor M, whose sequence
form already carries the token-mean weights), rows ordered sample-major (n, r). When m < P exact NGD is cheaper in
sample space, by the Woodbury identity

    (UᵀU + λI)⁻¹ g = (g − Uᵀ (K + λI)⁻¹ U g) / λ,   K = UUᵀ (m × m),   λ > 0,

and K, U g and Uᵀ y never need the P-wide rows U: for a layer with a rule (:mod:`fisherlab.layers`) the row (n, r)
restricted to the layer is G_{r,n} = Σ_l δ_{r,n,l} ā_{n,l}ᵀ (output-gradient rows δ, inputs ā), so

* one location (L = 1): K_layer = (δδᵀ) ∘ (āāᵀ) — the input Gram of the samples broadcast over the rows r, r';
  (U g)_{n,r} = δ_{r,n}ᵀ W_g ā_n with W_g the layer's block of g as W̄; Uᵀ y = Σ y_{n,r} δ_{r,n} ā_nᵀ;
* L > 1 locations (convolutions, sequences): either the closed form K_layer = Σ_{l,l'} (δ_l·δ_{l'})(ā_l·ā_{l'})
  (cost ≈ 2(mL)²·out + 2(NL)²·width) or the explicit per-sample gradients G (m × P_layer, cost ≈
  2 m L·out·width + 2 m²·P_layer), whichever the FLOP count says is cheaper; one-hot rows (Embedding) take the
  closed form with ā_l·ā_{l'} = [id_l = id_{l'}];
* parameters outside layers with rules (norm layers, ...): their explicit factor rows
  (:meth:`~fisherlab.engine.FisherEngine.iter_factor_rows` with ``names``), m × P_rest.

Every layer's rows of all N samples are kept (in float64, with K; :func:`gram_bytes` counts them, and
:func:`build_gram` refuses with :class:`~fisherlab.errors.MemoryBudgetError` above ``engine.memory_budget``), so
K costs one pass over the data and no F·v product. K is accumulated and factorised in float64 (a float32 K
perturbs the solve by ≈ eps₃₂·‖K‖/λ, 1e-3 at λ = 1e-4). One Cholesky factorisation of K + λI per damping (one
eigendecomposition serving every damping was ≈ 120× one Cholesky at m = 2000 on 2 CPU cores, so never cheaper
for the few dampings of a study). One process only: K needs every pair of samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, SingularMatrixError, UnsupportedLayerError
from fisherlab.layers import (
    LayerLayout,
    LayerRows,
    OneHotRows,
    iter_layer_rows,
    layer_layouts,
    layer_rows,
    per_sample_gradients,
)
from fisherlab.memory import check_budget, dense_bytes

__all__ = ["SampleGram", "build_gram", "gram_bytes"]

#: K and the kept rows are float64 whatever the engine's dtype (module docstring).
GRAM_DTYPE = torch.float64

#: Upper bound on the bytes of one block of K's rows formed at a time (the closed forms' temporaries).
BLOCK_BYTES = 64 * 2**20


def _block(N: int, R: int, L: int) -> int:
    """Samples per block of K's rows in a closed form: its (b·R·L) × (N·R·L) temporary within BLOCK_BYTES."""
    return min(N, max(1, BLOCK_BYTES // dense_bytes(R * L, N * R * L, GRAM_DTYPE)))


def _explicit(N: int, R: int, L: int, out: int, width: int) -> bool:
    """Whether a layer's K comes cheaper from explicit per-sample gradients than from the closed form (FLOPs)."""
    if L == 1:
        return False
    m = N * R
    closed = 2 * (m * L) ** 2 * out + 2 * (N * L) ** 2 * width
    explicit = 2 * m * L * out * width + 2 * m * m * out * width
    return explicit < closed


class _Explicit:
    """Explicit rows G (m, P_part) of the parameters at flat ``indices`` (P_part,)."""

    def __init__(self, indices: Tensor, G: Tensor) -> None:
        self.indices, self.G = indices, G

    def gram_into(self, K: Tensor) -> None:
        K.addmm_(self.G, self.G.T)

    def rows(self, V: Tensor) -> Tensor:
        return self.G @ V[self.indices]

    def rows_t(self, Y: Tensor, out: Tensor) -> None:
        out[self.indices] += self.G.T @ Y


class _Layer:
    """A layer's inputs ā (N, L, width) (or :class:`OneHotRows`) and scaled output-gradient rows δ (N, R, L, out)."""

    def __init__(self, layout: LayerLayout, indices: Tensor, inputs: Tensor | OneHotRows, grads: Tensor) -> None:
        self.layout, self.indices, self.inputs, self.grads = layout, indices, inputs, grads

    def _input_gram(self, rows: slice) -> Tensor:
        """ā_{n,l}·ā_{n',l'} for n in ``rows``, all n': (b, L, N, L)."""
        a = self.inputs
        if isinstance(a, OneHotRows):
            return (a.ids[rows, :, None, None] == a.ids[None, None]).to(GRAM_DTYPE)
        b, L = a[rows].shape[:2]
        return (a[rows].reshape(b * L, -1) @ a.reshape(-1, a.shape[-1]).T).reshape(b, L, a.shape[0], L)

    def gram_into(self, K: Tensor) -> None:
        N, R, L, out = self.grads.shape
        K4 = K.view(N, R, N, R)
        D = self.grads.reshape(N * R * L, out)
        block = _block(N, R, L)
        for start in range(0, N, block):
            rows = slice(start, min(start + block, N))
            b = rows.stop - rows.start
            DD = (self.grads[rows].reshape(b * R * L, out) @ D.T).reshape(b, R, L, N, R, L)
            K4[rows] += torch.einsum("brlnsq,blnq->brns", DD, self._input_gram(rows))

    def _weights(self, V: Tensor) -> Tensor:
        """The layer's block of V (P, k) as W̄ (k, out, width)."""
        return self.layout.gather(V[self.indices])

    def rows(self, V: Tensor) -> Tensor:
        W = self._weights(V)
        a = self.inputs
        if isinstance(a, OneHotRows):
            Wa = W[:, :, a.ids].permute(0, 2, 3, 1)  # (k, N, L, out)
        else:
            Wa = torch.einsum("nli,koi->knlo", a, W)
        N, R = self.grads.shape[:2]
        return torch.einsum("nrlo,knlo->nrk", self.grads, Wa).reshape(N * R, -1)

    def rows_t(self, Y: Tensor, out: Tensor) -> None:
        N, R, L, o = self.grads.shape
        E = torch.einsum("nrk,nrlo->knlo", Y.reshape(N, R, -1), self.grads)  # (k, N, L, out)
        a = self.inputs
        if isinstance(a, OneHotRows):
            X = E.new_zeros(E.shape[0], a.width, o).index_add_(1, a.ids.reshape(-1), E.reshape(E.shape[0], N * L, o))
            X = X.mT
        else:
            X = torch.einsum("knlo,nli->koi", E, a)
        out[self.indices] += self.layout.scatter(X)


@dataclass
class SampleGram:
    """K = UUᵀ of an engine's Fisher and the maps v ↦ U v, y ↦ Uᵀ y (module docstring).

    Attributes:
        K: The Gram matrix (m, m), float64, rows and columns sample-major (n, r).
        parts: Per layer (or group of parameters outside the rules) what U v and Uᵀ y are computed from.
        dim: P, the length of the parameter vector.
    """

    K: Tensor
    parts: list
    dim: int
    _factor: tuple[float, Tensor] | None = field(default=None, repr=False)

    @property
    def rows_count(self) -> int:
        """The number of factor rows, m = N·R."""
        return int(self.K.shape[0])

    def rows(self, V: Tensor) -> Tensor:
        """U V for V (P, k) → (m, k), float64."""
        V = V.to(GRAM_DTYPE)
        return sum((p.rows(V) for p in self.parts), V.new_zeros(self.rows_count, V.shape[1]))

    def rows_t(self, Y: Tensor) -> Tensor:
        """Uᵀ Y for Y (m, k) → (P, k), float64."""
        out = Y.new_zeros(self.dim, Y.shape[1], dtype=GRAM_DTYPE)
        for p in self.parts:
            p.rows_t(Y.to(GRAM_DTYPE), out)
        return out

    def block_gram(self, indices: Tensor) -> Tensor | None:
        """K_b = U_b U_bᵀ (m, m), float64, of the parameters at flat ``indices`` (ascending), or None.

        Only when the indices are exactly one part's (a layer with a rule, or the group of parameters outside the
        rules); then F_bb = U_bᵀ U_b has K_b's nonzero eigenvalues and P_b − m zeros more when m < P_b. None
        for any other set (a block that cuts across parts).
        """
        for part in self.parts:
            if part.indices.shape == indices.shape and torch.equal(part.indices.sort().values,
                                                                   indices.to(part.indices.device)):
                K = torch.zeros_like(self.K)
                part.gram_into(K)
                return K
        return None

    def cholesky(self, damping: float) -> Tensor:
        """The lower Cholesky factor of K + λI (m, m), λ > 0; the latest damping's is kept for the next call."""
        if not damping > 0:
            raise InputError(f"the sample-space ('gram') NGD solve needs damping > 0, got {damping}; use solver "
                             "'cholesky' or 'cg'")
        if self._factor is None or self._factor[0] != damping:
            self._factor = None
            A = self.K.clone()
            A.diagonal().add_(damping)
            factor, info = torch.linalg.cholesky_ex(A)  # reads the lower triangle of A only
            del A
            if int(info) != 0:
                raise SingularMatrixError(f"K + λI is not numerically positive definite at λ = {damping:g} "
                                          f"(‖K‖ ≈ {float(self.K.diagonal().max()):.3g}); use a larger damping")
            self._factor = (damping, factor)
        return self._factor[1]

    def solve(self, G: Tensor, damping: float) -> Tensor:
        """(UᵀU + λI)⁻¹ G for G (P, k) or (P,), λ > 0, by Woodbury in sample space; G's shape, float64."""
        factor = self.cholesky(damping)
        V = G.to(GRAM_DTYPE).reshape(G.shape[0], -1)
        W = torch.cholesky_solve(self.rows(V), factor)
        return ((V - self.rows_t(W)) / damping).reshape(G.shape)


def _probe(engine: FisherEngine) -> tuple[dict[str, LayerLayout], dict[str, list[str]], dict[str, LayerRows]]:
    """Layouts, parameters outside the rules, and one sample's layer rows (no backward pass)."""
    if engine.group is not None:
        raise InputError("the sample-space ('gram') NGD solve needs every sample on one process; under "
                         "torch.distributed use solver 'cholesky' or 'cg'")
    layouts, unsupported = layer_layouts(engine.model, engine.spec)
    x, y = engine.data.first(1)
    return layouts, unsupported, layer_rows(engine, layouts, x, y, None, backward=False)


def _bytes(engine: FisherEngine, layouts: Mapping[str, LayerLayout], unsupported: Mapping[str, Sequence[str]],
           probe: Mapping[str, LayerRows]) -> int:
    N, R = engine.num_samples, engine.rows_per_sample
    m = N * R
    scalars = 3 * m * m + sum(len(engine.spec.indices(names)) for names in unsupported.values()) * m
    block = 0
    for path, r in probe.items():
        L, out = r.outputs.shape[1], r.outputs.shape[2]
        width = layouts[path].width
        held = N * (r.inputs.numel() + R * L * out)  # ā (or its ids) and δ of every sample
        if _explicit(N, R, L, out, width):
            held += 3 * m * out * width  # G and two copies while it is formed
        else:  # a block's products, input Gram and einsum result
            block = max(block, _block(N, R, L) * (R * L * N * R * L + L * N * L + R * N * R))
        scalars += held
    return dense_bytes(scalars + block, 1, GRAM_DTYPE)


def gram_bytes(engine: FisherEngine) -> int:
    """Bytes :func:`build_gram` holds (K, K + λI and its factor, the kept rows, one block), from a one-sample probe.

    Raises:
        UnsupportedLayerError: The layer rows cannot be read (a layer called twice per pass, tied weights, ...).
        InputError: Under torch.distributed (``engine.group`` set).
    """
    return _bytes(engine, *_probe(engine))


def build_gram(engine: FisherEngine) -> SampleGram:
    """K = UUᵀ of the engine's Fisher (its kind, data and scaling), from one pass of per-layer rows.

    Raises:
        MemoryBudgetError: K and the kept rows (:func:`gram_bytes`) exceed ``engine.memory_budget``.
        UnsupportedLayerError: The layer rows cannot be read; a layer the forward pass calls in some chunks only.
        InputError: Under torch.distributed.
    """
    layouts, unsupported, probe = _probe(engine)
    N, R, P = engine.num_samples, engine.rows_per_sample, engine.spec.dim
    m = N * R
    check_budget(_bytes(engine, layouts, unsupported, probe), f"the sample-space Gram matrix ({m}×{m}) and the "
                 "per-layer rows of every sample", engine.memory_budget,
                 "solver 'cg' or 'multishift' (auto falls back to them)")
    collected: dict[str, list[LayerRows]] = {}
    chunks = 0
    for rows in iter_layer_rows(engine, layouts):
        chunks += 1
        for path, r in rows.items():
            collected.setdefault(path, []).append(r)
    partial = [p for p, rs in collected.items() if len(rs) != chunks]
    if partial:
        raise UnsupportedLayerError(f"layers {partial} are called by the forward pass on some chunks only; the "
                                    "sample-space Gram needs every layer's rows of every sample (solver 'cg')")
    scale = 1.0 / math.sqrt(N)
    parts: list = []
    for path, rs in collected.items():
        lay = layouts[path]
        indices = engine.spec.indices(lay.param_names)
        grads = torch.cat([r.grads for r in rs], dim=1).to(GRAM_DTYPE).mul_(scale)  # (R, N, L, out)
        if isinstance(rs[0].inputs, OneHotRows):
            inputs: Tensor | OneHotRows = OneHotRows(torch.cat([r.inputs.ids for r in rs]), rs[0].inputs.width)
        else:
            inputs = torch.cat([r.inputs for r in rs]).to(GRAM_DTYPE)
        L, out = grads.shape[2], grads.shape[3]
        if _explicit(N, R, L, out, lay.width):
            G = per_sample_gradients(grads, inputs).transpose(0, 1).reshape(m, lay.numel)
            parts.append(_Explicit(indices, G[:, lay.permutation.to(G.device)]))
        else:
            parts.append(_Layer(lay, indices, inputs, grads.transpose(0, 1).contiguous()))
    rest = [n for names in unsupported.values() for n in names]
    if rest:
        names = [n for n in engine.spec.names if n in set(rest)]
        G = torch.cat([U.to(GRAM_DTYPE) for U in engine.iter_factor_rows(names=names)])
        parts.append(_Explicit(engine.spec.indices(names), G))
    K = torch.zeros(m, m, dtype=GRAM_DTYPE, device=engine.device)
    for part in parts:
        part.gram_into(K)
    return SampleGram(K, parts, P)  # blocks of rows are formed apart: the Cholesky reads K's lower triangle only
