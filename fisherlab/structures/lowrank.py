"""Low-rank Fisher: the Nyström approximation F ≈ F Ω (Ωᵀ F Ω)⁺ Ωᵀ F, kept in eigen-form U diag(Λ) Uᵀ.

Ω (P, k) is either k distinct coordinate columns drawn at random (``method="columns"``: the classical Nyström
method, F Ω = k columns of F) or an orthonormalised Gaussian sketch (``method="sketch"``); both are seeded. The
products F Ω come from the engine's matrix-free products (F is never formed). The pseudo-inverse is computed
stably as in Tropp, Yurtsever, Udell & Cevher (2017, Alg. 3): a tiny shift ν = √P · eps · ‖F Ω‖_F is added
before the core is factorised and removed from the eigenvalues afterwards, and numerically null directions of
the core are dropped. When k ≥ rank(F) (and, for columns, the chosen columns span F's range) the approximation
is F itself up to round-off; the error to F shrinks as k grows.

The damped matrix UΛUᵀ + λI has every power in closed form (U has orthonormal columns):

    (UΛUᵀ + λI)^p = U ((Λ + λ)^p − λ^p) Uᵀ + λ^p I,

so :meth:`LowRankFisher.solve` (p = −1) is the Woodbury identity and :meth:`LowRankFisher.damped_power` with
p = ±1/2 gives the square roots a reconstructed network with a Nyström local Fisher layer needs (docs/method.md).

As a preconditioner of CG on the exact F + λI (the ``pcg-nystrom`` NGD solver, :mod:`fisherlab.ngd`),
:meth:`LowRankFisher.precondition` applies the randomized Nyström preconditioner of Frangella, Tropp & Udell
("Randomized Nyström preconditioning", SIAM J. Matrix Anal. Appl. 2023; arXiv:2110.02820):

    P_λ⁻¹ = (λ_m + λ) U (Λ + λI)⁻¹ Uᵀ + (I − UUᵀ),

λ_m the smallest kept eigenvalue: on span U it whitens UΛUᵀ + λI to λ_m + λ, and leaves the complement, where
F's remaining eigenvalues are at most about λ_m, as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fisherlab.checks import check_damping, low_precision_advice
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, NonFiniteError, SingularMatrixError
from fisherlab.structures.base import FisherMatrix
from fisherlab.structures.dense import engine_meta

#: Ways to choose the Nyström test matrix Ω.
METHODS = ("columns", "sketch")

#: Default cap on the rank when the caller gives none.
DEFAULT_MAX_RANK = 256


def nystrom(
    matmat: Callable[[Tensor], Tensor], dim: int, rank: int, *, method: str = "sketch", seed: int = 0,
    dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu", block_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Nyström approximation of a symmetric PSD operator in eigen-form.

    Args:
        matmat: V (dim, b) ↦ F V.
        dim: P, the operator's size.
        rank: k, the number of columns of Ω (1 ≤ k ≤ P).
        method: ``"columns"`` (k random distinct coordinates) or ``"sketch"`` (orthonormalised Gaussian).
        seed: Seed of the draw.
        dtype: Dtype of Ω and the result.
        device: Device of Ω and the result.
        block_size: Columns per call of ``matmat``.

    Returns:
        (U (P, m), Λ (m,)): orthonormal columns and eigenvalues ≥ 0, descending; m ≤ k (numerically null
        directions of Ωᵀ F Ω are dropped).

    Raises:
        InputError: Bad rank or method.
    """
    if method not in METHODS:
        raise InputError(f"unknown Nyström method {method!r}; valid: {list(METHODS)}")
    _check_rank(rank, dim)
    gen = torch.Generator(device=device).manual_seed(seed)
    if method == "columns":
        idx = torch.randperm(dim, generator=gen, device=device)[:rank]
        omega = torch.zeros(dim, rank, dtype=dtype, device=device)
        omega[idx, torch.arange(rank, device=device)] = 1
    else:
        omega = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=dtype, device=device)).Q
    Y = torch.cat([matmat(omega[:, i: i + block_size]) for i in range(0, rank, block_size)], dim=1)
    nu = math.sqrt(dim) * torch.finfo(dtype).eps * float(torch.linalg.matrix_norm(Y))
    Y = Y + nu * omega
    core = omega.T @ Y
    w, V = torch.linalg.eigh(0.5 * (core + core.T))
    keep = w > rank * torch.finfo(dtype).eps * w.abs().max()
    E = (Y @ V[:, keep]) / w[keep].sqrt()
    U, sigma, _ = torch.linalg.svd(E, full_matrices=False)
    return U, (sigma.square() - nu).clamp_min(0)


def _check_rank(rank: object, dim: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= dim:
        raise InputError(f"rank must be an integer in [1, P = {dim}]; got {rank!r}")


@dataclass(repr=False)
class LowRankFisher(FisherMatrix):
    """F ≈ U diag(Λ) Uᵀ (Nyström).

    Attributes:
        U: (P, m) orthonormal columns.
        eigenvalues: Λ (m,), ≥ 0, descending.
    """

    structure = "lowrank"
    U: Tensor = None  # type: ignore[assignment]
    eigenvalues: Tensor = None  # type: ignore[assignment]

    @classmethod
    def from_engine(cls, engine: FisherEngine, *, rank: int | None = None, method: str = "sketch",
                    seed: int | None = None) -> LowRankFisher:
        """Nyström from k matrix-free products F Ω.

        Args:
            engine: Model, data, likelihood and Fisher kind.
            rank: k (default min(P, N·R, 256): F has rank at most N·R).
            method: ``"columns"`` or ``"sketch"``.
            seed: Seed of Ω (default: the engine's seed).

        Raises:
            MemoryBudgetError: The (P, k) matrices exceed the memory budget.
        """
        P = engine.spec.dim
        if rank is None:
            rank = min(P, engine.num_samples * engine.rows_per_sample, DEFAULT_MAX_RANK)
        _check_rank(rank, P)
        engine.check_dense(P, 3 * rank, f"the rank-{rank} Nyström sketch")
        seed = engine.seed if seed is None else seed
        dtype = torch.float32 if engine.dtype in (torch.float16, torch.bfloat16) else engine.dtype  # no QR in half
        def products(V: Tensor) -> Tensor:
            FV = engine.matmat(V)
            if not bool(torch.isfinite(FV).all()):
                raise NonFiniteError(f"the {engine.kind.value} lowrank Fisher's sketch F Ω has NaN or infinite "
                                     f"entries (computed in {engine.dtype}){low_precision_advice(engine.dtype)}")
            return FV.to(dtype)

        U, lam = nystrom(products, P, rank, method=method, seed=seed, dtype=dtype, device=engine.device)
        U, lam = U.to(engine.dtype), lam.to(engine.dtype)
        return cls(engine.spec, engine.kind, engine.dtype, engine.device, engine.memory_budget,
                   {**engine_meta(engine), "rank": rank, "method": method, "sketch_seed": seed}, U, lam)

    def matmat(self, V: Tensor) -> Tensor:
        return self.U @ (self.eigenvalues.unsqueeze(1) * (self.U.T @ self._check_operand(V)))

    def diag(self) -> Tensor:
        return self.U.square() @ self.eigenvalues

    def trace(self) -> Tensor:
        return self.eigenvalues.sum()

    def to_dense(self) -> Tensor:
        self.check_dense_budget()
        return (self.U * self.eigenvalues) @ self.U.T

    def eigvalsh(self) -> Tensor:
        """All P eigenvalues, ascending (P − m zeros and Λ)."""
        zeros = self.eigenvalues.new_zeros(self.spec.dim - self.eigenvalues.numel())
        return torch.sort(torch.cat([zeros, self.eigenvalues])).values

    def damped_power(self, V: Tensor, damping: float, power: float) -> Tensor:
        """(UΛUᵀ + λI)^p V = U ((Λ + λ)^p − λ^p) Uᵀ V + λ^p V, for V (P,) or (P, k).

        Raises:
            SingularMatrixError: p < 0 with a singular UΛUᵀ + λI (λ = 0 and m < P, or a zero eigenvalue).
        """
        V = self._check_operand(V)
        damping = check_damping(damping)
        shifted = self.eigenvalues + damping
        if power < 0 and (bool((shifted <= 0).any()) or (damping == 0 and self.U.shape[1] < self.spec.dim)):
            raise SingularMatrixError(
                f"the rank-{self.U.shape[1]} Nyström Fisher of size P = {self.spec.dim} + {damping:g}·I is singular; "
                "pass damping > 0"
            )
        scale = damping ** power if damping > 0 else 0.0
        coef = shifted.pow(power) - scale
        W = V if V.dim() == 2 else V.unsqueeze(1)
        out = self.U @ (coef.unsqueeze(1) * (self.U.T @ W)) + scale * W
        return out if V.dim() == 2 else out.squeeze(1)

    def solve(self, g: Tensor, damping: float = 0.0) -> Tensor:
        """(UΛUᵀ + λI)⁻¹ g by the Woodbury identity (needs λ > 0 unless the rank is full)."""
        return self.damped_power(g, damping, -1.0)

    def precondition(self, R: Tensor, damping: float) -> Tensor:
        """The Nyström preconditioner P_λ⁻¹ R = (λ_m + λ) U (Λ + λI)⁻¹ Uᵀ R + (R − U Uᵀ R) (module docstring).

        For R (P,) or (P, k), same shape out; λ_m = min Λ. P_λ is symmetric positive definite whenever Λ + λ > 0.

        Raises:
            SingularMatrixError: λ_m + λ ≤ 0 (λ = 0 with a zero kept eigenvalue).
        """
        R = self._check_operand(R)
        damping = check_damping(damping)
        shifted = self.eigenvalues + damping
        if shifted.numel() == 0 or not bool((shifted > 0).all()):
            raise SingularMatrixError(
                f"the Nyström preconditioner of the rank-{self.U.shape[1]} Fisher needs Λ + λ > 0 "
                f"(damping {damping:g}); pass damping > 0")
        W = R if R.dim() == 2 else R.unsqueeze(1)
        C = self.U.T @ W
        out = self.U @ (((shifted[-1] / shifted) - 1).unsqueeze(1) * C) + W
        return out if R.dim() == 2 else out.squeeze(1)


__all__ = ["DEFAULT_MAX_RANK", "METHODS", "LowRankFisher", "nystrom"]
