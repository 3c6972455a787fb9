"""Dense P×P Fisher, assembled from factor rows: F = Σ_chunks UᵀU (upper triangle only, then mirrored)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.engine import FisherEngine
from fisherlab.structures.base import FisherMatrix, accumulate_gram, symmetrize_upper


@dataclass(repr=False)
class DenseFisher(FisherMatrix):
    """The full matrix. ``matrix`` has shape (P, P) and is symmetric."""

    structure = "dense"
    matrix: Tensor = None  # type: ignore[assignment]

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
