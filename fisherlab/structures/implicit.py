"""Implicit (matrix-free) Fisher: products F V by forward-mode then reverse-mode autodiff, never forming F."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.checks import check_damping
from fisherlab.engine import FisherEngine
from fisherlab.structures.base import FisherMatrix
from fisherlab.structures.dense import engine_meta


@dataclass(repr=False)
class ImplicitFisher(FisherMatrix):
    """F as an operator: ``F @ v`` costs one pass over the data (jvp, output-space product, vjp per chunk).

    ``diag()`` and ``trace()`` are exact but cost one pass over the factor rows; for estimates use
    :func:`fisherlab.linalg.hutchinson_diag` on :meth:`matvec`, and ``hutchinson_trace`` with
    ``quadratic_forms=F.quadratic_forms`` (vᵀ F v by forward mode alone, about 3/5 of a product). ``solve`` runs
    conjugate gradients (the report of the last solve is kept in ``last_cg``).
    """

    structure = "implicit"
    engine: FisherEngine = None  # type: ignore[assignment]
    last_cg: object = None

    @classmethod
    def from_engine(cls, engine: FisherEngine) -> ImplicitFisher:
        return cls(engine.spec, engine.kind, engine.dtype, engine.device, engine.memory_budget,
                   engine_meta(engine), engine)

    def matmat(self, V: Tensor) -> Tensor:
        return self.check_finite(self.engine.matmat(self._check_operand(V)), "a product F V")

    def quadratic_forms(self, V: Tensor) -> Tensor:
        """vᵢᵀ F vᵢ (k,) for V (P, k) by forward mode only (:meth:`FisherEngine.quadratic_forms`): no F V formed."""
        return self.check_finite(self.engine.quadratic_forms(self._check_operand(V)), "quadratic forms vᵀ F v")

    def diag(self) -> Tensor:
        d = None
        for U in self.engine.iter_factor_rows():
            d = (U * U).sum(0) if d is None else d + (U * U).sum(0)
        self.engine.reduce_sum([d])  # data-parallel: the ranks' partial sums
        return self.check_finite(d, "diagonal")

    def solve(self, g: Tensor, damping: float = 0.0, *, tol: float = 1e-6, max_iter: int | None = None) -> Tensor:
        """(F + λI)⁻¹ g by conjugate gradients to relative residual ``tol``; see ``last_cg`` for the report.

        In float16 / bfloat16 the iteration runs in float32 (the products F v stay in the Fisher's dtype).
        """
        from fisherlab.linalg import cg

        damping = check_damping(damping)
        g = self._check_operand(g)
        work = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        result = cg(lambda v: self.matvec(v).to(work), g.to(work), damping=damping, tol=tol, max_iter=max_iter)
        self.last_cg = result
        return result.x.to(self.dtype)
