"""Dense P×P Fisher, assembled from factor rows: F = Σ_chunks UᵀU (upper triangle only, then mirrored)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.checks import check_damping
from fisherlab.engine import FisherEngine
from fisherlab.structures.base import FisherMatrix, accumulate_gram, symmetrize_upper


@dataclass(repr=False)
class DenseFisher(FisherMatrix):
    """The full matrix. ``matrix`` has shape (P, P) and is symmetric."""

    structure = "dense"
    matrix: Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        #: λ → lower Cholesky factor of F + λI (:meth:`damped_factor`; ``matrix`` is never changed after
        #: construction, so a factor stays valid), oldest first.
        self._factors: dict[float, Tensor] = {}

    @classmethod
    def from_engine(cls, engine: FisherEngine) -> DenseFisher:
        """Assemble F from the engine's factor rows, chunk by chunk (peak memory: F plus one chunk).

        Only the upper triangle is accumulated (:func:`accumulate_gram`), then mirrored in place.
        """
        P = engine.spec.dim
        engine.check_dense(P, P, f"the dense {P}×{P} Fisher")
        F = torch.zeros(P, P, dtype=engine.dtype, device=engine.device)
        for U in engine.iter_factor_rows(desc=f"dense {engine.kind.value} Fisher"):
            accumulate_gram(F, U)
            del U  # not held while the next chunk's rows are computed
        engine.reduce_sum([F])  # data-parallel: the ranks' Gram sums
        return cls(engine.spec, engine.kind, engine.dtype, engine.device, engine.memory_budget,
                   engine_meta(engine), symmetrize_upper(F, inplace=True))

    def matmat(self, V: Tensor) -> Tensor:
        return self.matrix @ self._check_operand(V)

    def diag(self) -> Tensor:
        return self.matrix.diagonal().clone()

    def to_dense(self) -> Tensor:
        return self.matrix

    def damped_factor(self, damping: float = 0.0) -> Tensor:
        """The lower Cholesky factor L (P, P) of sym(F) + λI, factorised once per λ and kept.

        :func:`fisherlab.linalg.damped_cholesky` of F + λI as it is (``matrix`` is finite, checked at
        construction, and symmetric: sym(F) = F) and without the estimate-based singularity check (a failed
        factorisation raises SingularMatrixError; exact NGD records the residual of its solve instead), in its
        compute dtype (float16/bfloat16 in float32). Exact NGD's Cholesky solve, the dense and block roots of
        ``sqrt="cholesky"`` and the geometry's preconditioned matrix at this λ all use the same factor. The
        factors are kept while F and all of them fit ``memory_budget`` (the oldest is dropped first; the newest
        is always kept).

        Raises:
            SingularMatrixError: F + λI is not positive definite.
        """
        from fisherlab.linalg.solve import damped_cholesky

        damping = check_damping(damping)
        if damping not in self._factors:
            factor = damped_cholesky(self.matrix, damping, check_singular=False, checked=True)
            size = factor.numel() * factor.element_size()
            while self._factors and (len(self._factors) + 2) * size > self.memory_budget:
                del self._factors[next(iter(self._factors))]
            self._factors[damping] = factor
        return self._factors[damping]


def engine_meta(engine: FisherEngine) -> dict:
    """Provenance of a structure built from ``engine`` (JSON-serialisable)."""
    return {
        "likelihood": repr(engine.likelihood),
        "kind": engine.kind.value,
        "num_samples": engine.num_samples,
        "chunk_size": engine.chunk_size,
        "mc_samples": engine.mc_samples if engine.kind.value == "mc" else None,
        "seed": engine.seed,
        "params": list(engine.spec.names),
    }
