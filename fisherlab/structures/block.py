"""Block-diagonal Fisher: one dense block per layer (``by="layer"``, the default) or per tensor (``by="tensor"``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fisherlab.checks import check_damping, parse_enum
from fisherlab.engine import FisherEngine
from fisherlab.structures.base import FisherMatrix, accumulate_gram, eigvalsh, symmetrize_upper
from fisherlab.structures.dense import engine_meta
from fisherlab.vocabulary import BlockBy


@dataclass(repr=False)
class BlockDiagonalFisher(FisherMatrix):
    """Dense diagonal blocks of F; everything off the blocks is zero.

    Attributes:
        index: Block name → flat parameter indices (LongTensor, ascending, on ``device``).
        blocks: Block name → symmetric block of shape (P_b, P_b).
    """

    structure = "block"
    index: dict[str, Tensor] = field(default_factory=dict)
    blocks: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_engine(cls, engine: FisherEngine, by: str = "layer") -> BlockDiagonalFisher:
        """Accumulate each block Uᵀ_b U_b from the engine's factor rows (one pass over the data).

        ``by``: ``"layer"`` (one block per module, all its tensors together) or ``"tensor"`` (:class:`BlockBy`).
        """
        by = parse_enum(BlockBy, by, "block grouping").value
        index = {k: v.to(engine.device) for k, v in engine.spec.blocks(by).items()}
        total = sum(len(ix) ** 2 for ix in index.values())
        engine.check_dense(total, 1, f"the {len(index)} dense blocks")
        acc = {k: torch.zeros(len(ix), len(ix), dtype=engine.dtype, device=engine.device) for k, ix in index.items()}
        for U in engine.iter_factor_rows(desc=f"block {engine.kind.value} Fisher"):
            for k, ix in index.items():
                accumulate_gram(acc[k], U.index_select(1, ix), num_splits=4)
        engine.reduce_sum(list(acc.values()))  # data-parallel: the ranks' Gram sums
        meta = {**engine_meta(engine), "blocks_by": by}
        return cls(engine.spec, engine.kind, engine.dtype, engine.device, engine.memory_budget, meta, index,
                   {k: symmetrize_upper(B) for k, B in acc.items()})

    @classmethod
    def from_dense(cls, dense: FisherMatrix, by: str = "layer") -> BlockDiagonalFisher:
        """The diagonal blocks of a dense Fisher already built, with no pass over the data.

        The same blocks as :meth:`from_engine` on its engine, to round-off (the sums are only ordered differently).

        Args:
            dense: A :class:`~fisherlab.structures.dense.DenseFisher` (any structure whose ``to_dense`` is cheap).
            by: ``"layer"`` or ``"tensor"`` (:class:`BlockBy`).
        """
        by = parse_enum(BlockBy, by, "block grouping").value
        F = dense.to_dense()
        index = {k: v.to(dense.device) for k, v in dense.spec.blocks(by).items()}
        blocks = {k: F.index_select(0, ix).index_select(1, ix) for k, ix in index.items()}
        return cls(dense.spec, dense.kind, dense.dtype, dense.device, dense.memory_budget,
                   {**dense.meta, "blocks_by": by}, index, blocks)

    def matmat(self, V: Tensor) -> Tensor:
        V = self._check_operand(V)
        out = torch.zeros_like(V)
        for k, ix in self.index.items():
            out[ix] = self.blocks[k] @ V[ix]
        return out

    def diag(self) -> Tensor:
        out = torch.zeros(self.spec.dim, dtype=self.dtype, device=self.device)
        for k, ix in self.index.items():
            out[ix] = self.blocks[k].diagonal()
        return out

    def to_dense(self) -> Tensor:
        self.check_dense_budget()
        P = self.spec.dim
        out = torch.zeros(P, P, dtype=self.dtype, device=self.device)
        for k, ix in self.index.items():
            out[ix.unsqueeze(1), ix.unsqueeze(0)] = self.blocks[k]
        return out

    def eigvalsh(self) -> Tensor:
        """All eigenvalues (the union of the blocks' spectra), ascending."""
        return torch.sort(torch.cat([eigvalsh(B) for B in self.blocks.values()])).values

    def block_eigvalsh(self) -> dict[str, Tensor]:
        """Eigenvalues of each block, ascending."""
        return {k: eigvalsh(B) for k, B in self.blocks.items()}

    def solve(self, g: Tensor, damping: float = 0.0) -> Tensor:
        """(F + λI)⁻¹ g block by block (Cholesky of each block)."""
        from fisherlab.linalg import damped_solve

        damping = check_damping(damping)
        g = self._check_operand(g)
        out = torch.empty_like(g)
        for k, ix in self.index.items():
            out[ix] = damped_solve(self.blocks[k], g[ix], damping)
        return out
