"""EKFAC: the KFAC eigenbasis with a diagonal re-fitted from per-sample gradients (George et al. 2018).

For a layer with KFAC factors A = Q_A diag(α) Q_Aᵀ and S = Q_S diag(σ) Q_Sᵀ, KFAC's block S ⊗ A is diagonal in
the basis Q_S ⊗ Q_A with eigenvalues σ_i α_j. EKFAC keeps the basis and replaces those eigenvalues by the
second moments of the per-sample (per-row) gradients in it,

    s_ij = (1/N) Σ_n Σ_r [Q_Sᵀ G_{n,r} Q_A]_ij²,      G_{n,r} = Σ_l δ_{n,r,l} ā_{n,l}ᵀ  (out, width),

so the layer block is (Q_S ⊗ Q_A) diag(vec s) (Q_S ⊗ Q_A)ᵀ in row-major W̄ order. Since (1/N) Σ_{n,r}
vec(G_{n,r}) vec(G_{n,r})ᵀ is the exact layer block F_l of the same Fisher kind, s = diag((Q_S ⊗ Q_A)ᵀ F_l (Q_S ⊗
Q_A)): the Frobenius-optimal diagonal in that basis, hence never farther from F_l than KFAC (whose diagonal in
the same basis is σ ⊗ α), and equal to F_l wherever KFAC is.

Building it takes the KFAC factors' pass over the data, the eigendecompositions (all factors side by side, in the
Fisher's dtype unless ``eigh_dtype`` asks for more), then the scalings — from the first pass's layer rows when all
of them fit in min(DEFAULT_CHUNK_BYTES, memory budget / 4) (1 GiB at most), else from a second pass (for Linear
layers (L = 1) the square of the rank-one G_{n,r} in the basis is the outer product of squares, so no per-sample
gradient is formed).

``approx`` (``"expand"`` or ``"reduce"``, :mod:`fisherlab.structures.kfac`) chooses the KFAC factors whose
eigenbasis is used; the scalings always come from the exact per-sample gradients G_{n,r} above (as curvlinops'
``EKFACLinearOperator(kfac_approx=...)``), so both are the best diagonal in their basis. For an Embedding under
"expand" the input factor is diagonal and its eigenbasis the identity, stored as a 1-D ``Q_A`` of ones (width,):
the rotation on that side is skipped and the one-hot rows are never formed.

**Precision of the basis.** A float32 ``eigh`` of a 1,025² KFAC factor has a backward error of 3–5e-6·‖M‖, 20–35
times the factor's own float32 rounding, and the scalings in that basis inherit it: on bench_peers' float32 MLP
(64-1024-1024-10) EKFAC is 3.0e-5 (true) / 8.9e-5 (MC) from the float64 EKFAC, as far as curvlinops' (which
decomposes in float32 too). ``eigh_dtype=torch.float64`` decomposes in float64 and rounds the eigenvectors back:
1.5e-6 / 5.7e-7, the factors' own rounding, for +0.08 s of 1-thread CPU per 1,025² factor (the MLP's MC EKFAC
0.89 → 1.52 of curvlinops' time; benchmarks/README.md, "EKFAC in float32").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fisherlab.engine import DEFAULT_CHUNK_BYTES, FisherEngine
from fisherlab.errors import InputError, SingularMatrixError
from fisherlab.layers import OneHotRows, iter_layer_rows, squared_gradient_sum
from fisherlab.linalg.kron import kron_eigs
from fisherlab.structures.kfac import KFACFisher, KroneckerFactors, diagonal_input
from fisherlab.structures.layerwise import LayerwiseFisher, vars_of
from fisherlab.vocabulary import KFACApprox


@dataclass(frozen=True, eq=False)
class EKFACFactors(KroneckerFactors):
    """EKFAC factors of one layer: block = (Q_S ⊗ Q_A) diag(vec scaling) (Q_S ⊗ Q_A)ᵀ in row-major W̄ order.

    Attributes:
        Q_A: Eigenvectors of the basis's input factor (width, width), columns; for a diagonal input factor the
            identity, stored as its diagonal (width,) of ones.
        Q_S: Eigenvectors of the basis's output factor (out, out), columns.
        scaling: Re-fitted eigenvalues s (out, width).
        (A, S: the KFAC factors of the same data, kept for running averages and basis refreshes.)
    """

    averaged: ClassVar[tuple[str, ...]] = ("A", "S", "scaling")
    #: Fields two EKFACs must share for their scalings to be averaged.
    shared: ClassVar[tuple[str, ...]] = ("Q_A", "Q_S")

    Q_A: Tensor
    Q_S: Tensor
    scaling: Tensor


@dataclass(repr=False)
class EKFACFisher(LayerwiseFisher):
    """EKFAC: per supported layer the KFAC eigenbasis with re-fitted scalings; same interface as KFAC.

    ``solve`` is exact for the structure: (Q_S ⊗ Q_A) diag(1/(s + λ)) (Q_S ⊗ Q_A)ᵀ; ``eigvalsh`` returns the
    scalings (and the exact blocks' spectra).
    """

    structure = "ekfac"
    factors: dict[str, EKFACFactors] = field(default_factory=dict)

    @classmethod
    def from_engine(cls, engine: FisherEngine, *, approx: str | KFACApprox = "expand", unsupported: str = "error",
                    chunk_size: int | None = None, basis: LayerwiseFisher | None = None,
                    eigh_dtype: torch.dtype | None = None) -> EKFACFisher:
        """KFAC factors (first pass), their eigenbasis, then the scalings (first pass's rows, or a second pass).

        Args:
            engine: Model, data, likelihood and Fisher kind.
            approx: The KFAC factors whose eigenbasis is used, ``"expand"`` (default) or ``"reduce"``.
            unsupported: ``"error"`` or ``"block"`` (exact dense blocks for modules without a layer rule;
                LayerNorm/RMSNorm always get one).
            chunk_size: Samples per chunk (default from the memory budget).
            basis: Fit the scalings in this Fisher's eigenbasis instead of the new factors' — an
                :class:`EKFACFisher` (its Q_A, Q_S) or a :class:`KFACFisher` (its factors' eigenvectors) over the
                same parameters. Running averages of EKFAC scalings need a shared basis
                (:func:`fisherlab.structures.running.ema_update`).
            eigh_dtype: Eigendecompose the factors in at least this dtype, the eigenvectors then rounded to the
                Fisher's (None: the Fisher's dtype, as curvlinops). ``torch.float64`` for a float32 Fisher puts it
                within the factors' own rounding of the float64 EKFAC, 20–150 times closer (module docstring), for
                about twice the decomposition time.

        Raises:
            InputError: ``basis`` over other parameters or layers; ``eigh_dtype`` not a floating dtype.
        """
        if eigh_dtype is not None and not (isinstance(eigh_dtype, torch.dtype) and eigh_dtype.is_floating_point):
            raise InputError(f"eigh_dtype must be a floating torch.dtype or None; got {eigh_dtype!r}")
        working = min(DEFAULT_CHUNK_BYTES, engine.memory_budget // 4)
        kfac, kept = KFACFisher.factor_pass(engine, approx, unsupported, chunk_size, keep_bytes=working)
        source = kfac if basis is None else basis
        if basis is not None and (basis.spec != kfac.spec or list(basis.factors) != list(kfac.factors)):
            raise InputError(f"basis must cover the same parameters and layers as the engine; got {basis!r} for "
                             f"layers {list(kfac.factors)}")
        decomposed = torch.promote_types(engine.dtype, eigh_dtype or engine.dtype)  # the dtype the eigh runs in
        # KFAC's own factors are exactly symmetric
        Q = _eigenbases(source.factors, symmetric=basis is None, dtype=decomposed)
        s = {p: torch.zeros(f.out_features, f.width, dtype=engine.dtype, device=engine.device)
             for p, f in kfac.factors.items()}
        for rows in kept if kept is not None else _scaling_rows(engine, kfac, chunk_size):
            for p, (inputs, grads) in rows.items():
                s[p] += _rotated_square_sum(inputs, grads, *Q[p], working)
        engine.reduce_sum([s[p] for p in kfac.factors])  # data-parallel: the ranks' sums
        N = engine.num_samples
        factors = {p: EKFACFactors(**vars_of(f), A=f.A, S=f.S, Q_A=Q[p][0], Q_S=Q[p][1], scaling=s[p] / N)
                   for p, f in kfac.factors.items()}
        return cls(engine.spec, engine.kind, engine.dtype, engine.device, engine.memory_budget,
                   {**kfac.meta, "basis": "given" if basis is not None else "own",
                    "eigh_dtype": str(decomposed).removeprefix("torch.")}, factors, kfac.index, kfac.exact_blocks)

    @staticmethod
    def _rotate(f: EKFACFactors, X: Tensor) -> Tensor:
        """Coordinates of X (k, out, width) in the eigenbasis: Q_Sᵀ X Q_A (Q_A = I when stored 1-D)."""
        Y = f.Q_S.mT @ X
        return Y if f.Q_A.dim() == 1 else Y @ f.Q_A

    @staticmethod
    def _unrotate(f: EKFACFactors, Y: Tensor) -> Tensor:
        X = f.Q_S @ Y
        return X if f.Q_A.dim() == 1 else X @ f.Q_A.mT

    def _layer_matmat(self, f: EKFACFactors, X: Tensor) -> Tensor:
        return self._unrotate(f, f.scaling * self._rotate(f, X))

    def _layer_diag(self, f: EKFACFactors) -> Tensor:
        left = f.Q_S.square() @ f.scaling
        return left if f.Q_A.dim() == 1 else left @ f.Q_A.square().T

    def _layer_trace(self, f: EKFACFactors) -> Tensor:
        return f.scaling.sum()

    def _layer_dense(self, f: EKFACFactors) -> Tensor:
        Q_A = torch.diag(f.Q_A) if f.Q_A.dim() == 1 else f.Q_A
        Q = torch.kron(f.Q_S.contiguous(), Q_A.contiguous())  # torch.kron fails on mixed memory layouts
        return (Q * f.scaling.reshape(-1)) @ Q.T

    def _layer_eigvalsh(self, f: EKFACFactors) -> Tensor:
        return f.scaling.reshape(-1)

    def _layer_solve(self, f: EKFACFactors, X: Tensor, damping: float) -> Tensor:
        denom = f.scaling + damping
        lo, hi = torch.stack([denom.min(), denom.abs().max()]).tolist()
        # the block is diagonal here, so a damped solve is an exact division: refuse only a (numerically) zero
        # eigenvalue without damping, as damped_solve does — a relative threshold would refuse well-damped float32
        # blocks of a wide layer (n·eps·max > λ)
        threshold = denom.numel() * torch.finfo(denom.dtype).eps * hi if damping == 0 else 0.0
        if not lo > threshold:
            advice = "pass damping > 0" if damping == 0 else f"increase the damping (now {damping:g})"
            raise SingularMatrixError(f"the EKFAC block of layer {f.layer!r} + damping·I is not numerically "
                                      f"positive definite (smallest eigenvalue {lo:.3e} ≤ {threshold:.3e}); {advice}")
        return self._unrotate(f, self._rotate(f, X) / denom)

    def solve(self, g: Tensor, damping: float = 0.0) -> Tensor:
        """(EKFAC + λI)⁻¹ g, exact for the structure (layer blocks in their eigenbasis, exact blocks by Cholesky).

        Raises:
            SingularMatrixError: A block + λI is not numerically positive definite (pass damping > 0).
        """
        return super().solve(g, damping)


def _eigenbases(factors: Mapping[str, KroneckerFactors], symmetric: bool,
                dtype: torch.dtype | None) -> dict[str, tuple[Tensor, Tensor]]:
    """(Q_A, Q_S) per layer: a given EKFAC basis, or the eigenvectors of KFAC factors (a diagonal A: Q_A = ones).

    All layers' factors are decomposed side by side, in at least ``dtype`` (:func:`~fisherlab.linalg.kron.kron_eigs`;
    ``symmetric``: as it is, without (M + Mᵀ)/2, for exactly symmetric factors).
    """
    todo = [p for p, f in factors.items() if not isinstance(f, EKFACFactors)]
    pairs = [(factors[p].S[:1, :1] if diagonal_input(factors[p]) else factors[p].A, factors[p].S) for p in todo]
    eigs = dict(zip(todo, kron_eigs(pairs, symmetric=symmetric, dtype=dtype), strict=True))
    out = {}
    for p, f in factors.items():
        if isinstance(f, EKFACFactors):
            out[p] = f.Q_A, f.Q_S
        else:
            out[p] = torch.ones_like(f.A) if diagonal_input(f) else eigs[p].a_eigvecs, eigs[p].s_eigvecs
    return out


def _scaling_rows(engine: FisherEngine, kfac: KFACFisher,
                  chunk_size: int | None) -> Iterator[dict[str, tuple[Tensor | OneHotRows, Tensor]]]:
    """The second pass over the data: per chunk and layer (ā rows (n, L, width), δ rows (R, n, L, out))."""
    for rows in iter_layer_rows(engine, kfac.factors, chunk_size=chunk_size, per_sample_gradients=True,
                                desc=f"EKFAC {engine.kind.value} scalings"):
        yield {p: (r.inputs, r.grads) for p, r in rows.items()}


def _rotated_square_sum(inputs: Tensor | OneHotRows, grads: Tensor, Q_A: Tensor, Q_S: Tensor,
                        working: int) -> Tensor:
    """Σ_{r,n} [Q_Sᵀ G_{r,n} Q_A]² (out, width) over one chunk's rows (inputs (n, L, width), grads (R, n, L, out)).

    Dense rows at L > 1 locations form the rotated per-sample gradients (R·out·width scalars a sample), so they
    are taken in slices of samples whose gradients fit in ``working`` bytes (a chunk kept from the KFAC pass was
    sized without them).
    """
    R, n, L, out = grads.shape
    step = n
    if isinstance(inputs, Tensor) and L > 1:
        step = max(1, working // (R * out * inputs.shape[-1] * grads.element_size()))
    if step >= n:
        return squared_gradient_sum(grads @ Q_S, _rotate_inputs(inputs, Q_A))
    total = grads.new_zeros(out, inputs.shape[-1])
    for i in range(0, n, step):
        total += squared_gradient_sum(grads[:, i: i + step] @ Q_S, _rotate_inputs(inputs[i: i + step], Q_A))
    return total


def _rotate_inputs(inputs: Tensor | OneHotRows, Q_A: Tensor) -> Tensor | OneHotRows:
    """ā Q_A, the input rows in the eigenbasis (unchanged for Q_A = I stored 1-D; one-hot rows: rows of Q_A)."""
    if Q_A.dim() == 1:
        return inputs
    return Q_A[inputs.ids] if isinstance(inputs, OneHotRows) else inputs @ Q_A


__all__ = ["EKFACFactors", "EKFACFisher"]
