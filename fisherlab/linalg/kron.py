"""Kronecker-factored curvature helpers (KFAC): products, damped solves and roots without forming A ⊗ S.

**Convention.** A linear layer y = W ā has weight W of shape (out, in) (bias folded into ā). KFAC approximates
its Fisher block by the two symmetric factors

    A = E[ā āᵀ]  (in, in),        S = E[δ δᵀ]  (out, out),   δ = ∂ℓ/∂y.

In the textbook column-major convention vec_c(W) = W.T.reshape(-1) the block is A ⊗ S and
(A ⊗ S) vec_c(W) = vec_c(S W A). fisherlab flattens parameters in torch's **row-major** order
(vec(W) = W.reshape(-1), see :mod:`fisherlab.params`), and in that order the same block is

    G = S ⊗ A  (= torch.kron(S, A)),        (S ⊗ A) W.reshape(-1) = (S W A).reshape(-1).

Every function here takes the factors in the order (A, S) = (input factor, output factor) and works with
matrices of W's shape; the dense matrix is formed only by :func:`kron_to_dense`. For a non-symmetric A the
identities hold with Aᵀ in place of A (:func:`kron_matmul` computes S W Aᵀ so that it always equals
``kron_to_dense(A, S) @ W.reshape(-1)``).

**Damping.** The damped Fisher G + λI is not Kronecker-factored. KFAC damps the factors instead,

    (S + sI) ⊗ (A + aI) = S ⊗ A + a (S ⊗ I) + s (I ⊗ A) + λ I,   a·s = λ,

which differs from S ⊗ A + λI by the cross terms a (S ⊗ I) + s (I ⊗ A). Two splits of λ are offered
(:func:`kron_damping_split`): ``"sqrt"`` a = s = √λ, and ``"pi"`` (Martens & Grosse 2015, §6.3)
a = π√λ, s = √λ/π with π = sqrt((tr A / dim A) / (tr S / dim S)), which balances the two cross terms
(it minimises a bound on their norm). :func:`kron_damped_solve` also offers ``split="exact"``, the true
(S ⊗ A + λI)⁻¹ via the eigendecompositions of both factors.

**Repeated solves.** :func:`kron_damped_solve` is :func:`kron_damped_factor` (symmetrise, damp and factorise both
factors: O(in³ + out³)) followed by :func:`kron_factor_solve` (O(out·in·(out + in)) per right-hand side); a
caller that solves with the same damped block many times (a preconditioner inside CG) keeps the
:class:`KronFactorization` and calls :func:`kron_factor_solve` alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from fisherlab.errors import InputError, MemoryBudgetError, SingularMatrixError
from fisherlab.linalg.solve import (
    _add_damping,
    _check_damping,
    _check_finite,
    _check_float,
    _check_option,
    _check_square,
    _compute_dtype,
    _eps,
    _spd_cholesky,
    _symmetrize,
)
from fisherlab.linalg.sqrtm import SQRT_METHODS, inv_sqrtm
from fisherlab.linalg.threads import concurrently

__all__ = [
    "KRON_DENSE_ORDERS",
    "KRON_SOLVE_METHODS",
    "KRON_SPLITS",
    "KronEig",
    "KronFactorization",
    "kron_damped_factor",
    "kron_damped_solve",
    "kron_damping_split",
    "kron_eig",
    "kron_eigs",
    "kron_factor_solve",
    "kron_inv_sqrt",
    "kron_matmul",
    "kron_to_dense",
]

KRON_SPLITS: tuple[str, ...] = ("pi", "sqrt")
KRON_DENSE_ORDERS: tuple[str, ...] = ("row_major", "column_major")
KRON_SOLVE_METHODS: tuple[str, ...] = ("cholesky", "eigh")


class KronEig(NamedTuple):
    """Eigendecompositions of the two Kronecker factors (ascending eigenvalues, as ``torch.linalg.eigh``).

    A = Q_A diag(a_eigvals) Q_Aᵀ, S = Q_S diag(s_eigvals) Q_Sᵀ, and the eigenbasis of S ⊗ A is Q_S ⊗ Q_A, in
    which a weight W (out, in) has coordinates Q_Sᵀ W Q_A with eigenvalues
    s_eigvals[:, None] * a_eigvals[None, :].
    """

    a_eigvals: Tensor
    a_eigvecs: Tensor
    s_eigvals: Tensor
    s_eigvecs: Tensor


def _check_factors(A: Tensor, S: Tensor) -> tuple[int, int]:
    din = _check_square(A, "A")
    dout = _check_square(S, "S")
    return din, dout


def _check_weight(W: Tensor, din: int, dout: int) -> None:
    _check_float(W, "W")
    if W.ndim < 2 or W.shape[-2] != dout or W.shape[-1] != din:
        raise InputError(f"W must have shape (..., out={dout}, in={din}) to match S {(dout, dout)} and "
                         f"A {(din, din)}, got {tuple(W.shape)}")


def kron_matmul(A: Tensor, S: Tensor, W: Tensor) -> Tensor:
    """(S ⊗ A) applied to W in row-major order: returns S W Aᵀ (= S W A for the symmetric KFAC factors).

    Equals ``(kron_to_dense(A, S) @ W.reshape(-1)).reshape(W.shape)`` at O(out·in·(out + in)) cost instead of
    O((out·in)²).

    Args:
        A: Input factor (in, in).
        S: Output factor (out, out).
        W: Matrix (out, in) or a batch (..., out, in).

    Returns:
        S W Aᵀ with W's shape.

    Raises:
        InputError: Mismatched shapes.
    """
    din, dout = _check_factors(A, S)
    _check_weight(W, din, dout)
    return S @ W @ A.mT


def kron_to_dense(
    A: Tensor, S: Tensor, order: str = "row_major", *, max_elements: int | None = None
) -> Tensor:
    """Form the dense Kronecker matrix, in the ordering of the flattened weight.

    ``"row_major"`` (fisherlab's ordering, W.reshape(-1)): S ⊗ A = ``torch.kron(S, A)``.
    ``"column_major"`` (vec_c(W) = W.T.reshape(-1)): A ⊗ S = ``torch.kron(A, S)``.
    Both act on the flattened W as W ↦ S W Aᵀ.

    Args:
        A: Input factor (in, in).
        S: Output factor (out, out).
        order: ``"row_major"`` or ``"column_major"``.
        max_elements: Refuse to form a matrix with more than this many entries.

    Returns:
        The (out·in, out·in) matrix.

    Raises:
        InputError: Bad shapes or order.
        MemoryBudgetError: (out·in)² > max_elements.
    """
    din, dout = _check_factors(A, S)
    _check_option(order, KRON_DENSE_ORDERS, "order")
    numel = (din * dout) ** 2
    if max_elements is not None and numel > max_elements:
        raise MemoryBudgetError(
            f"kron_to_dense would form a ({dout * din}, {dout * din}) matrix ({numel} entries) > "
            f"max_elements={max_elements}"
        )
    return torch.kron(S, A) if order == "row_major" else torch.kron(A, S)


def kron_damping_split(A: Tensor, S: Tensor, damping: float, split: str = "pi") -> tuple[float, float]:
    """Split the damping λ between the factors: returns (a, s) with a·s = λ, to be added as A + aI, S + sI.

    ``"sqrt"``: a = s = √λ. ``"pi"``: a = π√λ, s = √λ/π, π = sqrt((tr A/dim A)/(tr S/dim S)) (Martens & Grosse
    2015, §6.3). λ = 0 gives (0, 0) for both splits.

    Args:
        A: Input factor (in, in), or a diagonal one as its diagonal (in,) (an Embedding's token counts).
        S: Output factor (out, out).
        damping: λ ≥ 0.
        split: ``"pi"`` or ``"sqrt"``.

    Returns:
        (a, s) as Python floats (one device sync for ``"pi"``).

    Raises:
        InputError: Bad shapes, split or damping.
        SingularMatrixError: ``"pi"`` with a factor of non-positive trace (π undefined; use ``"sqrt"``).
    """
    diagonal = A.dim() == 1
    if diagonal:
        _check_float(A, "A")
        din, dout = A.shape[0], _check_square(S, "S")
    else:
        din, dout = _check_factors(A, S)
    _check_option(split, KRON_SPLITS, "split")
    lam = _check_damping(damping)
    if lam == 0.0:
        return 0.0, 0.0
    root = math.sqrt(lam)
    if split == "sqrt":
        return root, root
    trace_a = A.sum() if diagonal else torch.diagonal(A).sum()
    ta, ts = torch.stack([trace_a / din, torch.diagonal(S).sum().to(A.dtype) / dout]).tolist()
    if not (math.isfinite(ta) and math.isfinite(ts) and ta > 0 and ts > 0):
        raise SingularMatrixError(
            f"pi-damping needs factors with positive finite traces, got tr(A)/dim(A)={ta:.3e}, "
            f"tr(S)/dim(S)={ts:.3e}; use split='sqrt'"
        )
    pi = math.sqrt(ta / ts)
    return pi * root, root / pi


def kron_inv_sqrt(
    A: Tensor,
    S: Tensor,
    *,
    damping: float = 0.0,
    method: str = "eigh",
    split: str = "pi",
) -> tuple[Tensor, Tensor]:
    """Inverse square roots of the damped factors: ((A + aI)^{-1/2}, (S + sI)^{-1/2}), (a, s) from ``split``.

    These are the input-whitening and output local-Fisher layers of the reconstructed linear layer
    y = S^{-1/2} W' A^{-1/2} ā (docs/method.md), and (S + sI)^{-1/2} ⊗ (A + aI)^{-1/2} is the inverse square
    root of (S + sI) ⊗ (A + aI) — *not* of S ⊗ A + λI (see the module docstring).

    Args:
        A: Input factor (in, in), symmetric PSD.
        S: Output factor (out, out), symmetric PSD.
        damping: λ ≥ 0, split between the factors by :func:`kron_damping_split`.
        method: Square-root method of :func:`fisherlab.linalg.sqrtm`: ``"eigh"``, ``"denman_beavers"``,
            ``"newton_schulz"``.
        split: ``"pi"`` or ``"sqrt"``.

    Returns:
        (A_inv_sqrt (in, in), S_inv_sqrt (out, out)).

    Raises:
        InputError: Bad shapes or options.
        NonFiniteError: NaN/inf in a factor.
        SingularMatrixError: A damped factor is not numerically SPD (e.g. λ = 0 and a singular factor).
        ConvergenceError: An iterative method did not converge.
    """
    _check_factors(A, S)
    _check_option(method, SQRT_METHODS, "method")
    _check_finite(A, "A")
    _check_finite(S, "S")
    a, s = kron_damping_split(A, S, damping, split)
    return inv_sqrtm(A, method=method, damping=a), inv_sqrtm(S, method=method, damping=s)


class KronFactorization(NamedTuple):
    """A damped Kronecker block factorised once for many solves (:func:`kron_damped_factor`, :func:`kron_factor_solve`).

    ``denom`` None (``method="cholesky"``): ``a_factor``, ``s_factor`` are the lower Cholesky factors L_A of
    A + aI (in, in) and L_S of S + sI (out, out). Otherwise (``method="eigh"``, ``split="exact"``) they are the
    eigenvectors Q_A (in, in), Q_S (out, out) and ``denom`` (out, in) the damped block's eigenvalues in the basis
    Q_S ⊗ Q_A: (σ_i + s)(α_j + a), or σ_i α_j + λ for ``"exact"``; ``a_factor`` None there means Q_A = I (a
    diagonal A, whose entries are in ``denom``). The tensors are in the compute dtype; ``out_dtype`` is the
    factors' own (promoted with the right-hand side's, the solution's dtype).
    """

    a_factor: Tensor | None
    s_factor: Tensor
    denom: Tensor | None
    out_dtype: torch.dtype


def kron_damped_factor(
    A: Tensor,
    S: Tensor,
    damping: float = 0.0,
    split: str = "pi",
    *,
    method: str = "cholesky",
    dtype: torch.dtype | None = None,
) -> KronFactorization:
    """Factorise the damped Kronecker block once: what :func:`kron_damped_solve` solves with, for many solves.

    ``split`` ``"pi"`` / ``"sqrt"``: (S + sI) ⊗ (A + aI) by the Cholesky factors (``method="cholesky"``) or the
    eigendecompositions (``"eigh"``) of both damped factors; ``"exact"``: S ⊗ A + λI by the eigendecompositions
    of S and A (always eigh). The factors are symmetrised ((M + Mᵀ)/2) first. Costs O(in³ + out³); each
    :func:`kron_factor_solve` then costs O(out·in·(out + in)).

    Args:
        A: Input factor (in, in), symmetric PSD.
        S: Output factor (out, out), symmetric PSD.
        damping: λ ≥ 0.
        split: ``"pi"``, ``"sqrt"`` (factor damping, see :func:`kron_damping_split`) or ``"exact"``.
        method: ``"cholesky"`` (default) or ``"eigh"`` for the factor-damped splits.
        dtype: Factorise in at least this dtype (promoted with the factors'; e.g. the right-hand sides' dtype).
            float16/bfloat16 are computed in float32.

    Returns:
        The :class:`KronFactorization`.

    Raises:
        InputError: Bad shapes or options.
        NonFiniteError: NaN/inf in a factor.
        SingularMatrixError: A damped factor (or S ⊗ A + λI) is not numerically SPD.
    """
    din, dout = _check_factors(A, S)
    _check_option(split, (*KRON_SPLITS, "exact"), "split")
    _check_option(method, KRON_SOLVE_METHODS, "method")
    lam = _check_damping(damping)
    out_dtype = torch.promote_types(A.dtype, S.dtype)
    dtype = _compute_dtype(out_dtype if dtype is None else torch.promote_types(out_dtype, dtype))
    Ac, Sc = A.to(dtype), S.to(dtype)
    _check_finite(Ac, "A")
    _check_finite(Sc, "S")
    As, Ss = _symmetrize(Ac), _symmetrize(Sc)

    if split == "exact":
        ea, Qa = torch.linalg.eigh(As)
        es, Qs = torch.linalg.eigh(Ss)
        denom = es[:, None] * ea[None, :] + lam
        lo, hi = torch.stack([denom.min(), denom.abs().max()]).tolist()
        thr = din * dout * _eps(dtype) * hi if lam == 0.0 else 0.0  # damped: positivity is enough
        if not lo > thr:
            raise SingularMatrixError(
                f"S ⊗ A + damping·I (damping={lam:g}) is not numerically positive definite: smallest "
                f"eigenvalue {lo:.3e} ≤ {thr:.3e}; "
                + ("pass damping > 0" if lam == 0.0 else "increase the damping")
            )
        return KronFactorization(Qa, Qs, denom, out_dtype)
    a, s = kron_damping_split(Ac, Sc, lam, split)
    Ad, Sd = _add_damping(As, a), _add_damping(Ss, s)
    if method == "cholesky":
        La = _spd_cholesky(Ad, damping=a, name="A")
        Ls = _spd_cholesky(Sd, damping=s, name="S")
        return KronFactorization(La, Ls, None, out_dtype)
    ea, Qa = torch.linalg.eigh(Ad)
    es, Qs = torch.linalg.eigh(Sd)
    for name, ev, d in (("A", ea, a), ("S", es, s)):
        lo, hi = torch.stack([ev.min(), ev.abs().max()]).tolist()
        thr = ev.numel() * _eps(dtype) * hi if d == 0.0 else 0.0
        if not lo > thr:
            raise SingularMatrixError(
                f"{name} + {d:g}·I is not numerically positive definite: smallest eigenvalue "
                f"{lo:.3e} ≤ {thr:.3e}; "
                + ("pass damping > 0" if lam == 0.0 else "increase the damping")
            )
    return KronFactorization(Qa, Qs, es[:, None] * ea[None, :], out_dtype)


def kron_factor_solve(factor: KronFactorization, W: Tensor) -> Tensor:
    """Solve with a factorised damped Kronecker block: the block's inverse applied to W in row-major order.

    Cholesky factors: (S + sI)⁻¹ W (A + aI)⁻¹ by two triangular solves per side; eigendecompositions:
    Q_S [(Q_Sᵀ W Q_A) / denom] Q_Aᵀ (Q_A = I when ``a_factor`` is None).

    Args:
        factor: From :func:`kron_damped_factor` (or a structure's own, e.g. KFAC's for a diagonal A).
        W: Right-hand side (out, in) or a batch (..., out, in); computed in the factor's dtype.

    Returns:
        The solution, W's shape, in W's dtype promoted with ``factor.out_dtype``.

    Raises:
        InputError: W's shape does not match the factors.
        NonFiniteError: NaN/inf in W or the solution.
    """
    dout = factor.s_factor.shape[0]
    din = factor.denom.shape[1] if factor.a_factor is None else factor.a_factor.shape[0]
    _check_weight(W, din, dout)
    out_dtype = torch.promote_types(factor.out_dtype, W.dtype)
    Wc = W.to(factor.s_factor.dtype)
    _check_finite(Wc, "W")
    Fa, Fs = factor.a_factor, factor.s_factor  # Cholesky factors, or eigenvectors
    if factor.denom is None:
        Y = torch.cholesky_solve(Wc, Fs)  # (S + sI)⁻¹ W
        X = torch.cholesky_solve(Y.mT, Fa).mT  # · (A + aI)⁻¹
    else:
        Y = Fs.mT @ Wc
        X = Fs @ ((Y if Fa is None else Y @ Fa) / factor.denom)
        X = X if Fa is None else X @ Fa.mT
    _check_finite(X, "the Kronecker solve result")
    return X.to(out_dtype)


def kron_damped_solve(
    A: Tensor,
    S: Tensor,
    W: Tensor,
    damping: float = 0.0,
    split: str = "pi",
    *,
    method: str = "cholesky",
) -> Tensor:
    """Solve with damped Kronecker factors: (S + sI)⁻¹ W (A + aI)⁻¹ (the KFAC step direction for ∇W = W).

    In row-major flattening this is ((S + sI) ⊗ (A + aI))⁻¹ W.reshape(-1). With ``split="exact"`` it is
    instead the exact (S ⊗ A + λI)⁻¹ W.reshape(-1) = Q_S [(Q_Sᵀ W Q_A) / (σ_i α_j + λ)] Q_Aᵀ from the factor
    eigendecompositions (σ, α the eigenvalues of S, A; always eigh). One :func:`kron_damped_factor` (in the
    dtype of A, S and W promoted) and one :func:`kron_factor_solve`: to solve with the same block many times,
    keep the factorisation and call :func:`kron_factor_solve` instead.

    Args:
        A: Input factor (in, in), symmetric PSD.
        S: Output factor (out, out), symmetric PSD.
        W: Right-hand side (out, in) or a batch (..., out, in).
        damping: λ ≥ 0.
        split: ``"pi"``, ``"sqrt"`` (factor damping, see :func:`kron_damping_split`) or ``"exact"``.
        method: ``"cholesky"`` (default) or ``"eigh"`` for the factor-damped splits.

    Returns:
        The solution, W's shape.

    Raises:
        InputError: Bad shapes or options.
        NonFiniteError: NaN/inf in the inputs or the solution.
        SingularMatrixError: A damped factor (or S ⊗ A + λI) is not numerically SPD.
    """
    din, dout = _check_factors(A, S)
    _check_weight(W, din, dout)
    factor = kron_damped_factor(A, S, damping, split, method=method, dtype=W.dtype)
    return kron_factor_solve(factor, W)


def kron_eig(A: Tensor, S: Tensor) -> KronEig:
    """Eigendecompositions of both (symmetrised) Kronecker factors, for EKFAC-style eigenbases.

    Args:
        A: Input factor (in, in).
        S: Output factor (out, out).

    Returns:
        :class:`KronEig` (a_eigvals (in,), a_eigvecs (in, in), s_eigvals (out,), s_eigvecs (out, out)),
        eigenvalues ascending, in the factors' dtypes (float16/bfloat16 computed in float32).

    Raises:
        InputError: Bad shapes.
        NonFiniteError: NaN/inf in a factor.
    """
    return kron_eigs([(A, S)])[0]


def kron_eigs(factors: Sequence[tuple[Tensor, Tensor]], *, symmetric: bool = False,
              dtype: torch.dtype | None = None) -> list[KronEig]:
    """:func:`kron_eig` of several layers' factors (A, S), the eigendecompositions side by side.

    On the CPU every ``torch.linalg.eigh`` runs on one intra-op thread, as many at once as torch has threads
    (:func:`fisherlab.linalg.threads.concurrently`, largest first): its tridiagonal reduction synchronises the
    threads once per column, which stalls on shared cores (2 cores, load ≈ 3: two 1,025² and two 1,024² float32
    decompositions 2.6–3.1 s one after the other on 2 threads, 0.97–1.16 s side by side on one thread each).

    Args:
        factors: Pairs (A (in, in), S (out, out)).
        symmetric: The factors are exactly symmetric (KFAC's, mirrored by
            :func:`~fisherlab.structures.base.symmetrize_upper`): skip (M + Mᵀ)/2, which leaves such a matrix
            unchanged bit for bit ((m + m)/2 = m), and decompose M as it is.
        dtype: Decompose in at least this dtype (promoted with each factor's; float64 on an MPS device: on the
            CPU), the eigenpairs then rounded to the factor's dtype (EKFAC's ``eigh_dtype``): a float32 ``eigh`` of a
            1,025² KFAC factor has a backward error ‖QΛQᵀ − M‖ of 3–5e-6·‖M‖ (‖QᵀQ − I‖_F ≈ 4e-5), 20–35 times the
            factor's own float32 rounding, and EKFAC's scalings in that basis inherit it (benchmarks/README.md,
            "EKFAC in float32").

    Returns:
        One :class:`KronEig` per pair, in order.

    Raises:
        InputError: Bad shapes.
        NonFiniteError: NaN/inf in a factor.
    """
    matrices: list[tuple[Tensor, str]] = []
    for A, S in factors:
        _check_factors(A, S)
        matrices.extend(((A, "A"), (S, "S")))

    def decompose(M: Tensor, name: str) -> tuple[Tensor, Tensor]:
        work = _compute_dtype(M.dtype if dtype is None else torch.promote_types(M.dtype, dtype))
        # MPS has no float64: such a factor is decomposed on the CPU
        Mc = (M.cpu() if work == torch.float64 and M.device.type == "mps" else M).to(work)
        _check_finite(Mc, name)
        w, Q = torch.linalg.eigh(Mc if symmetric else _symmetrize(Mc))
        return w.to(M.device, M.dtype), Q.to(M.device, M.dtype)

    if not matrices:
        return []
    order = sorted(range(len(matrices)), key=lambda i: -matrices[i][0].shape[0])
    done = dict(zip(order, concurrently([partial(decompose, *matrices[i]) for i in order], matrices[0][0].device),
                    strict=True))
    return [KronEig(*done[2 * k], *done[2 * k + 1]) for k in range(len(factors))]
