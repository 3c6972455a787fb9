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
K costs one pass over the data and no F·v product. K is accumulated in float64 (a float32 K
perturbs the solve by ≈ eps₃₂·‖K‖/λ, 1e-3 at λ = 1e-4); only its lower triangle is formed (half the products of
the 1-location layers), then mirrored. One Cholesky factorisation of K + λI per damping (one eigendecomposition
serving every damping was ≈ 120× one Cholesky at m = 2000 on 2 CPU cores, so never cheaper for the few dampings
of a study): in float64 below :data:`MIXED_MIN_ROWS` rows; from there in float32 (≈ 1.6× faster on the CPU),
its solution refined to float64 accuracy by CG on the float64 (K + λI) y = b preconditioned by that factor
(mixed-precision refinement: its error ≈ eps₃₂·‖K‖/λ shrinks by about that factor per step, a few K products of
2m² flops each), with the float64 factorisation taking over should the float32 one fail or the refinement not
reach :data:`REFINE_TOL` within :data:`REFINE_MAX_ITER` steps. One process only: K needs every pair of samples.
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

#: Rows m from which K + λI is factorised in float32 and the solve refined in float64 (module docstring); below,
#: the m³/3 flops saved do not pay the refinement's m² products (measured on 2 CPU cores).
MIXED_MIN_ROWS = 4096

#: ‖r‖ / ‖b‖ of the refinement's recursively updated residual r of (K + λI) y = b, in every column: below the
#: float64 rounding floor of the true residual, which then is that of a float64 Cholesky solve.
REFINE_TOL = 1e-16

#: Refinement steps (K products) before the float64 factorisation takes over.
REFINE_MAX_ITER = 30


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
        """Adds the part's G Gᵀ to K (m, m), all of it."""
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
        """ā_{n,l}·ā_{n',l'} for n in ``rows``, n' < rows.stop: (b, L, rows.stop, L)."""
        a, cols = self.inputs, slice(0, rows.stop)
        if isinstance(a, OneHotRows):
            return (a.ids[rows, :, None, None] == a.ids[None, cols]).to(GRAM_DTYPE)
        b, L = a[rows].shape[:2]
        return (a[rows].reshape(b * L, -1) @ a[cols].reshape(-1, a.shape[-1]).T).reshape(b, L, rows.stop, L)

    def gram_into(self, K: Tensor) -> None:
        """Adds the layer's K_layer to K (m, m): the rows of samples n, columns of samples n' ≤ the block's last.

        That is the lower triangle and the diagonal blocks, what :func:`_mirror` completes.
        """
        N, R, L, out = self.grads.shape
        K4 = K.view(N, R, N, R)
        D = self.grads.reshape(N * R * L, out)
        block = _block(N, R, L)
        for start in range(0, N, block):
            rows = slice(start, min(start + block, N))
            b, stop = rows.stop - rows.start, rows.stop
            DD = (self.grads[rows].reshape(b * R * L, out) @ D[: stop * R * L].T).reshape(b, R, L, stop, R, L)
            if L == 1:
                K4[rows, :, :stop] += DD.view(b, R, stop, R).mul_(self._input_gram(rows).view(b, 1, stop, 1))
            else:
                K4[rows, :, :stop] += torch.einsum("brlnsq,blnq->brns", DD, self._input_gram(rows))

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


def _mirror(K: Tensor) -> None:
    """Copies K's (m, m) strictly lower triangle onto its upper one in place, a block of BLOCK_BYTES at a time."""
    m = K.shape[0]
    step = max(1, BLOCK_BYTES // dense_bytes(m, 1, K.dtype))
    for start in range(0, m, step):
        stop = min(start + step, m)
        K[start:stop, stop:] = K[stop:, start:stop].T
        D = K[start:stop, start:stop]
        D.copy_(D.tril() + D.tril(-1).T)


def _gram(parts: Sequence, m: int, device: torch.device) -> Tensor:
    """Σ over ``parts`` of their K (m, m), float64, exactly symmetric."""
    K = torch.zeros(m, m, dtype=GRAM_DTYPE, device=device)
    for part in parts:
        part.gram_into(K)
    _mirror(K)
    return K


def _cholesky_apply(factor: Tensor, B: Tensor) -> Tensor:
    """(L Lᵀ)⁻¹ B for the lower factor L (m, m) and B (m, k), in L's dtype (two triangular solves)."""
    B = B.to(factor.dtype)
    return torch.linalg.solve_triangular(factor.mT, torch.linalg.solve_triangular(factor, B, upper=False),
                                         upper=True)


@dataclass
class SampleGram:
    """K = UUᵀ of an engine's Fisher and the maps v ↦ U v, y ↦ Uᵀ y (module docstring).

    Attributes:
        K: The Gram matrix (m, m), float64, rows and columns sample-major (n, r).
        parts: Per layer (or group of parameters outside the rules) what U v and Uᵀ y are computed from.
        dim: P, the length of the parameter vector.
        refined: Per damping, the refinement steps (K products) of its latest :meth:`sample_solve` when K + λI
            was factorised in float32 (m ≥ :data:`MIXED_MIN_ROWS`); no entry for a float64 factorisation.
    """

    K: Tensor
    parts: list
    dim: int
    refined: dict[float, int] = field(default_factory=dict)
    _factor: tuple[tuple[float, torch.dtype], Tensor] | None = field(default=None, repr=False)

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
                return _gram([part], self.rows_count, self.K.device)
        return None

    def cholesky(self, damping: float, dtype: torch.dtype = GRAM_DTYPE) -> Tensor | None:
        """The lower Cholesky factor of K + λI (m, m) in ``dtype``, λ > 0; the latest one is kept for the next call.

        Returns None where a float32 factorisation fails (the float64 one raises).

        Raises:
            InputError: λ ≤ 0.
            SingularMatrixError: K + λI is not numerically positive definite in float64.
        """
        if not damping > 0:
            raise InputError(f"the sample-space ('gram') NGD solve needs damping > 0, got {damping}; use solver "
                             "'cholesky' or 'cg'")
        if self._factor is None or self._factor[0] != (damping, dtype):
            self._factor = None
            A = self.K.to(dtype, copy=True)
            A.diagonal().add_(damping)
            factor, info = torch.linalg.cholesky_ex(A)  # reads the lower triangle of A only
            del A
            if int(info) != 0:
                if dtype != GRAM_DTYPE:
                    return None
                raise SingularMatrixError(f"K + λI is not numerically positive definite at λ = {damping:g} "
                                          f"(‖K‖ ≈ {float(self.K.diagonal().max()):.3g}); use a larger damping")
            self._factor = ((damping, dtype), factor)
        return self._factor[1]

    def _refine(self, B: Tensor, damping: float, factor: Tensor) -> tuple[Tensor, int] | None:
        """(K + λI)⁻¹ B for B (m, k), float64, by CG preconditioned by a float32 ``factor`` of K + λI; or None.

        Stops once every column's recursive residual is ≤ REFINE_TOL relative to its b (then returns the solution
        and the steps), None if that takes more than REFINE_MAX_ITER steps. Each step is one float64 product with
        K, k columns.
        """
        def apply(Y: Tensor) -> Tensor:
            return torch.addmm(Y, self.K, Y, beta=damping)

        def precondition(Rs: Tensor) -> Tensor:
            return _cholesky_apply(factor, Rs).to(GRAM_DTYPE)

        b = torch.linalg.vector_norm(B, dim=0)
        Y = precondition(B)
        Rs = B - apply(Y)
        Z = precondition(Rs)
        Pd, rz = Z, (Rs * Z).sum(0)
        for step in range(1, REFINE_MAX_ITER + 1):
            Q = apply(Pd)
            pq = (Pd * Q).sum(0)
            alpha = torch.where(pq > 0, rz / pq, 0.0)
            Y = Y + alpha * Pd
            Rs = Rs - alpha * Q
            if bool((torch.linalg.vector_norm(Rs, dim=0) <= REFINE_TOL * b).all()):
                return Y, step
            Z = precondition(Rs)
            rz_next = (Rs * Z).sum(0)
            Pd = Z + torch.where(rz > 0, rz_next / rz, 0.0) * Pd
            rz = rz_next
        return None

    def sample_solve(self, B: Tensor, damping: float) -> Tensor:
        """(K + λI)⁻¹ B for B (m, k), λ > 0, float64 (module docstring: float32 factor and refinement at large m).

        Records the refinement's steps in :attr:`refined` (and drops the damping's entry for a float64 factor).
        """
        B = B.to(GRAM_DTYPE)
        self.refined.pop(damping, None)
        if self.rows_count >= MIXED_MIN_ROWS:
            factor = self.cholesky(damping, torch.float32)
            solved = None if factor is None else self._refine(B, damping, factor)
            if solved is not None:
                self.refined[damping] = solved[1]
                return solved[0]
        return _cholesky_apply(self.cholesky(damping), B)

    def solve(self, G: Tensor, damping: float) -> Tensor:
        """(UᵀU + λI)⁻¹ G for G (P, k) or (P,), λ > 0, by Woodbury in sample space; G's shape, float64."""
        V = G.to(GRAM_DTYPE).reshape(G.shape[0], -1)
        W = self.sample_solve(self.rows(V), damping)
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
    return SampleGram(_gram(parts, m, engine.device), parts, P)
