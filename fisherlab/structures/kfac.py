"""KFAC: per-layer Kronecker factors G_l ≈ S ⊗ A, block-diagonal across layers (docs/method.md).

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

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from fisherlab.checks import check_damping
from fisherlab.engine import FisherEngine
from fisherlab.layers import LayerLayout, iter_layer_rows
from fisherlab.linalg import kron_damped_solve, kron_inv_sqrt, kron_matmul, kron_to_dense
from fisherlab.structures.base import eigvalsh, symmetrize_upper
from fisherlab.structures.layerwise import LayerwiseFisher, prepare_layers, vars_of


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
        for p, f in setup.layouts.items():  # a layer the forward pass never calls has zero factors
            A.setdefault(p, _empty(f.width, engine))
            S.setdefault(p, _empty(f.out_features, engine))
        engine.reduce_sum([M for p in setup.layouts for M in (A[p], S[p])])  # data-parallel: the ranks' sums
        factors = {}
        for p, f in setup.layouts.items():
            a, s = (symmetrize_upper(M, inplace=True) for M in (A[p], S[p]))
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
        return torch.outer(eigvalsh(f.S), eigvalsh(f.A))

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
        y = S^{-1/2} W' A^{-1/2} ā (docs/method.md).

        Exact blocks of unsupported modules are not included (use :func:`fisherlab.linalg.inv_sqrtm` on
        ``exact_blocks``).

        Args:
            damping: λ ≥ 0.
            method: ``"eigh"``, ``"denman_beavers"`` or ``"newton_schulz"`` (:func:`fisherlab.linalg.sqrtm`).
            split: ``"pi"`` or ``"sqrt"``.
        """
        damping = check_damping(damping)
        return {p: kron_inv_sqrt(f.A, f.S, damping=damping, method=method, split=split)
                for p, f in self.factors.items()}


__all__ = ["KFACFisher", "KroneckerFactors"]
