"""Diagonal Fisher: diag(F)_i = Σ_chunks Σ_rows U[:, i]²."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.engine import FisherEngine
from fisherlab.structures.base import FisherMatrix
from fisherlab.structures.dense import engine_meta


@dataclass(repr=False)
class DiagonalFisher(FisherMatrix):
    """Only the diagonal of F, shape (P,)."""

    structure = "diag"
    diagonal: Tensor = None  # type: ignore[assignment]

    @classmethod
    def from_engine(cls, engine: FisherEngine) -> DiagonalFisher:
        """Sum the squared factor rows (one pass over the data; memory O(P) plus one chunk)."""
        d = torch.zeros(engine.spec.dim, dtype=engine.dtype, device=engine.device)
        for U in engine.iter_factor_rows(desc=f"diagonal {engine.kind.value} Fisher"):
            d += (U * U).sum(0)
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

        d = self.diagonal + damping
        if bool((d <= 0).any()):
            raise SingularMatrixError(
                f"{int((d <= 0).sum())} diagonal entries of F + λI are ≤ 0 at damping {damping}; pass damping > 0"
            )
        g = self._check_operand(g)
        return g / (d if g.dim() == 1 else d.unsqueeze(1))
