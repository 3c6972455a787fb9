"""The geometry a reconstructed network sees: spectra of F + λI and of G^{-1/2} (F + λI) G^{-1/2} (docs/fidelity.md).

For a structure s, G_λ is the damped matrix whose inverse the structure applies, G_λ⁻¹ g = ``s.solve(g, λ)``
(so each structure's own damping convention counts, e.g. KFAC's split of λ between its factors). The
reconstructed network with local Fisher layers G_λ^{-1/2} sees the Fisher G_λ^{-1/2} (F + λI) G_λ^{-1/2}: the
identity when G_λ = F + λI, and the better conditioned the closer G_λ is to F + λI. Its eigenvalues are those of
the generalised problem (F + λI) x = μ G_λ x, computed stably as the eigenvalues of L⁻¹ (F + λI) L⁻ᵀ with
G_λ = L Lᵀ (Cholesky). The row ``structure="original"`` is F + λI itself (G = I).

A dense, block (by layer) or diagonal structure gives its own Cholesky factor of G_λ (:func:`kept_factors`: the
one its solves, exact NGD and the Cholesky roots use at that λ), so G_λ is neither recovered from solves nor
factorised again; so does KFAC, whose layer block (S + sI) ⊗ (A + aI) has the factor L_S ⊗ L_A of its damped
factors' Cholesky factors (:func:`kron_layers`), applied to L⁻¹ (F + λI) L⁻ᵀ by reshaped triangular solves
(:func:`kron_factor_transform`: O(P·out·width·(out + width)) a layer instead of the O(P·P_l²) of a dense factor).
For the other structures, G_λ⁻¹ is read off their solve; when it is block-diagonal by layer its blocks' Cholesky
factors K_l (K_l K_lᵀ = G_l⁻¹) give the similar matrix Kᵀ (F + λI) K by products alone (:func:`block_congruence`),
else G_λ is inverted (:func:`damped_matrix`).

Per layer, A_l = F_ll + λI and G_l = (G_λ)_ll, the layer's diagonal blocks (what the layer's local Fisher layer
would see if the rebuild were local to it). Under the ``block`` structure read off the same F, G_l = A_l: the
layer's spectrum is P_l ones in closed form (:func:`own_blocks`), not an eigendecomposition of the identity, and
L⁻¹ (F + λI) L⁻ᵀ is formed from its blocks off the diagonal alone (:func:`own_blocks_transform`; the diagonal
blocks are the identity).

When the dense P×P matrices fit the memory budget everything is exact (``eigvalsh``). Otherwise the spectra are
computed matrix-free by Lanczos (:func:`fisherlab.linalg.lanczos`): the top ``num_eigs`` eigenvalues and the
condition number from the top and the smallest eigenvalue. For the original coordinates the operator is F + λI,
and its smallest eigenvalue is exactly λ when F has rank ≤ N·R < P (N samples, R rows of the output factor per
sample), else Lanczos on σI − F. For a structure, the operator is the one the reconstructed network sees,
B = G_λ^{-1/2} (F + λI) G_λ^{-1/2}, applied as v ↦ R⁻¹((F + λI)(R⁻¹v)) with the symmetric roots R = G_λ^{1/2} of
the network :func:`fisherlab.reconstruction.reconstruct` builds for it (by the structure's
own name; its G_λ is the one ``structure.solve`` inverts), and the smallest eigenvalue always by Lanczos on σI − B.
A structure whose reconstruction does not fit the budget (dense or per-layer P_l × P_l roots) is recorded as
unavailable. Per-layer spectra are only computed on the dense path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from fisherlab import results
from fisherlab.checks import check_dampings
from fisherlab.errors import InputError, SingularMatrixError, UnsupportedLayerError
from fisherlab.fidelity.evaluate import UNAVAILABLE
from fisherlab.fidelity.rules import RuleContext
from fisherlab.likelihoods import Likelihood
from fisherlab.linalg.threads import concurrently
from fisherlab.structures.base import FisherMatrix, eigvalsh
from fisherlab.structures.block import BlockDiagonalFisher
from fisherlab.structures.dense import DenseFisher
from fisherlab.structures.diagonal import DiagonalFisher
from fisherlab.structures.kfac import KFACFisher, KroneckerFactors
from fisherlab.vocabulary import RECONSTRUCTIBLE, BlockBy, RootMethod, Structure

#: Structures measured by default (each the true Fisher in that structure).
DEFAULT_STRUCTURES = ("dense", "block", "kfac", "ekfac", "unit", "diag")

#: Lanczos steps for the smallest eigenvalue of F on the matrix-free path (it converges slowly).
LOW_END_ITERATIONS = 200

ANNOTATIONS = {
    "eigenvalue": ("eigenvalue of G^-1/2 (F + lambda I) G^-1/2 (G = I for 'original')", "1"),
    "condition_number": ("condition number of G^-1/2 (F + lambda I) G^-1/2", "1"),
    "layer_eigenvalue": ("eigenvalue of the layer block G_l^-1/2 (F_ll + lambda I) G_l^-1/2", "1"),
    "layer_condition_number": ("condition number of the layer block", "1"),
    "available": ("structure could be measured (1) or not (0)", "1"),
    "unavailable_reason": ("why the structure could not be measured", None),
}


def _factor(G: Tensor, block: str | None = None) -> Tensor:
    """The lower Cholesky factor of sym(G), or SingularMatrixError naming ``block``."""
    L, info = torch.linalg.cholesky_ex(0.5 * (G + G.T))
    if int(info) != 0:
        which = "" if block is None else f" of block {block!r}"
        raise SingularMatrixError(f"the damped structure G is not positive definite (Cholesky{which} failed at pivot "
                                  f"{int(info)} of {G.shape[0]}); increase the damping")
    return L


def factor_transform(A: Tensor, L: Tensor) -> Tensor:
    """The symmetric L⁻¹ A L⁻ᵀ (n, n) for symmetric A (n, n) and a lower triangular L (n, n)."""
    X = torch.linalg.solve_triangular(L, 0.5 * (A + A.T), upper=False)
    M = torch.linalg.solve_triangular(L, X.T, upper=False)
    return 0.5 * (M + M.T)


def preconditioned_matrix(A: Tensor, G: Tensor | None) -> Tensor:
    """The symmetric L⁻¹ A L⁻ᵀ (n, n) with G = L Lᵀ (Cholesky), similar to G^{-1/2} A G^{-1/2}; A itself when G is None.

    Args:
        A: Symmetric (n, n).
        G: SPD (n, n), or None for the identity.

    Raises:
        SingularMatrixError: If G is not positive definite.
    """
    if G is None:
        return 0.5 * (A + A.T)
    return factor_transform(A, _factor(G))


def preconditioned_eigvalsh(A: Tensor, G: Tensor | None) -> Tensor:
    """Eigenvalues (ascending) of G^{-1/2} A G^{-1/2} for SPD G (or of A when G is None), via Cholesky of G.

    Args:
        A: Symmetric (n, n).
        G: SPD (n, n), or None for the identity.

    Raises:
        SingularMatrixError: If G is not positive definite.
    """
    return eigvalsh(preconditioned_matrix(A, G))


def condition(ev: Tensor) -> float:
    """λ_max/λ_min of ascending eigenvalues (inf when λ_min ≤ 0)."""
    lo, hi = float(ev[0]), float(ev[-1])
    return hi / lo if lo > 0 else math.inf


def preconditioned_block_matrix(A: Tensor, G: dict[str, Tensor], index: dict[str, Tensor]) -> Tensor:
    """L⁻¹ A L⁻ᵀ (n, n) for a block-diagonal SPD G = L Lᵀ, from the Cholesky factor of each block.

    The matrix of :func:`preconditioned_matrix`, with the triangular solves done block row by block row and no
    n×n factorisation (:func:`block_factor_transform`).

    Args:
        A: Symmetric (n, n).
        G: Block name → SPD block (n_b, n_b).
        index: Block name → indices of the block in A (together: every index once).

    Raises:
        SingularMatrixError: If a block of G is not positive definite.
    """
    return block_factor_transform(A, {k: _factor(B, k) for k, B in G.items()}, index)


def block_factor_transform(A: Tensor, factors: dict[str, Tensor], index: dict[str, Tensor]) -> Tensor:
    """L⁻¹ A L⁻ᵀ (n, n) for symmetric A and a block-diagonal lower triangular L with blocks ``factors``.

    Its diagonal block of ``index[k]`` is L_k⁻¹ A_kk L_k⁻ᵀ, the block's own preconditioned matrix.

    Args:
        A: Symmetric (n, n).
        factors: Block name → lower triangular L_k (n_b, n_b).
        index: Block name → indices of the block in A (together: every index once).
    """
    def solve_rows(X: Tensor) -> Tensor:  # L⁻¹ X, one block row at a time
        out = torch.empty_like(X)
        for k, ix in index.items():
            out[ix] = torch.linalg.solve_triangular(factors[k], X[ix], upper=False)
        return out

    M = solve_rows(solve_rows(0.5 * (A + A.T)).T)
    return 0.5 * (M + M.T)


def own_blocks_transform(A: Tensor, factors: dict[str, Tensor], index: dict[str, Tensor]) -> Tensor:
    """L⁻¹ A L⁻ᵀ (n, n) for a block-diagonal L whose blocks are the Cholesky factors of A's own diagonal blocks.

    Its diagonal blocks L_k⁻¹ A_kk L_k⁻ᵀ are the identity (exactly, not to round-off); each block above the
    diagonal is L_j⁻¹ A_jk L_k⁻ᵀ, by two triangular solves of its own (about a quarter of the arithmetic of
    :func:`block_factor_transform` for the main job's three layers), and the one below it its transpose.

    Args:
        A: Symmetric (n, n), e.g. F + λI.
        factors: Block name → lower triangular L_k (n_b, n_b) with L_k L_kᵀ = A_kk.
        index: Block name → indices of the block in A (together: every index once).
    """
    M = torch.zeros_like(A)
    M.diagonal().fill_(1.0)
    names = list(index)
    for j, a in enumerate(names):
        for b in names[j + 1:]:
            ia, ib = index[a], index[b]
            X = torch.linalg.solve_triangular(factors[a], 0.5 * (A[ia][:, ib] + A[ib][:, ia].T), upper=False)
            block = torch.linalg.solve_triangular(factors[b].T, X, upper=True, left=False)  # X L_b⁻ᵀ
            M[ia.unsqueeze(1), ib.unsqueeze(0)] = block
            M[ib.unsqueeze(1), ia.unsqueeze(0)] = block.T
    return M


#: One KFAC layer for :func:`kron_factor_transform`: its flat indices, its layout, and the lower Cholesky factors
#: L_S (out, out) and L_A (width, width) of its damped factors.
KronLayer = tuple[Tensor, KroneckerFactors, Tensor, Tensor]


def kron_layers(G: FisherMatrix, damping: float) -> list[KronLayer] | None:
    """Each layer's Cholesky factors of KFAC's damped block, as its solve uses them at λ, or None.

    The factors of :meth:`~fisherlab.structures.KFACFisher.damped_factors` (split ``"pi"``, Cholesky: the
    default of ``solve``, kept from the ``kfac`` rule's solves): layer l's block of G_λ is
    (S + sI) ⊗ (A + aI) = (L_S ⊗ L_A)(L_S ⊗ L_A)ᵀ in row-major W̄ order. None unless G is a KFAC structure of
    layers only (no exact blocks) whose every layer has a full input factor (not a diagonal one).
    """
    if not isinstance(G, KFACFisher) or type(G)._layer_solve is not KFACFisher._layer_solve or G.exact_blocks:
        return None
    if any(f.A.ndim != 2 for f in G.factors.values()):
        return None
    damped = G.damped_factors(damping)
    if any(k.denom is not None or k.a_factor is None for k in damped.values()):
        return None
    return [(G.index[p], f, damped[p].s_factor, damped[p].a_factor) for p, f in G.factors.items()]


def kron_factor_transform(A: Tensor, layers: list[KronLayer]) -> Tensor:
    """L⁻¹ A L⁻ᵀ (P, P) for symmetric A (P, P) and the block-diagonal L of KFAC layers (:func:`kron_layers`).

    Layer l's rows of X are mapped as (L_S ⊗ L_A)⁻¹ vec(W) = vec(L_S⁻¹ W L_A⁻ᵀ), W (out, width) in W̄ layout, for
    all P columns at once: one triangular solve with L_S on the (out, P·width) matrix and one with L_Aᵀ from the
    right on the (P·out, width) one.

    Raises:
        InputError: The layers do not cover A's indices exactly once.
    """
    P = A.shape[0]
    covered = torch.zeros(P, dtype=torch.int64, device=A.device)
    for ix, *_ in layers:
        covered[ix.to(A.device)] += 1
    if not bool((covered == 1).all()):
        raise InputError("kron_factor_transform needs layers that cover every index once")

    def solve_rows(X: Tensor) -> Tensor:  # L⁻¹ X, layer by layer
        out = torch.empty_like(X)
        for ix, f, L_S, L_A in layers:
            ix = ix.to(X.device)
            W = f.gather(X[ix])  # (k, out, width)
            k, o, w = W.shape
            Y = torch.linalg.solve_triangular(L_S, W.transpose(0, 1).reshape(o, k * w), upper=False)
            Y = Y.reshape(o, k, w).transpose(0, 1).reshape(k * o, w)
            Z = torch.linalg.solve_triangular(L_A.T, Y, upper=True, left=False)  # Y L_A⁻ᵀ
            out[ix] = f.scatter(Z.reshape(k, o, w))
        return out

    M = solve_rows(solve_rows(0.5 * (A + A.T)).T)
    return 0.5 * (M + M.T)


def preconditioned_block_eigvalsh(A: Tensor, G: dict[str, Tensor], index: dict[str, Tensor]) -> Tensor:
    """Eigenvalues (ascending) of G^{-1/2} A G^{-1/2} for a block-diagonal SPD G (:func:`preconditioned_block_matrix`).

    Raises:
        SingularMatrixError: If a block of G is not positive definite.
    """
    return eigvalsh(preconditioned_block_matrix(A, G, index))


def kept_factors(ctx: RuleContext, structure: str, damping: float
                 ) -> Tensor | dict[str, Tensor] | list[KronLayer] | None:
    """The Cholesky factors of G_λ that the structure itself solves with (factorised once per λ), or None.

    A dense Fisher: its lower factor L (P, P) of F + λI (:meth:`~fisherlab.structures.DenseFisher.damped_factor`,
    the one exact NGD and the Cholesky roots use); a block Fisher by layer: layer → its factor of F_ll + λI
    (:meth:`~fisherlab.structures.BlockDiagonalFisher.damped_factors`, ``block-ngd``'s); a diagonal Fisher: the
    (P,) vector (diag F + λ)^{1/2}, the factor of a diagonal G_λ; KFAC of layers with full input factors: each
    layer's Cholesky factors of its damped factors (:func:`kron_layers`, the ``kfac`` rule's). Any other
    structure: None (G_λ then comes from its solve, :func:`inverse_blocks` / :func:`damped_matrix`).

    Raises:
        SingularMatrixError: G_λ is not positive definite.
    """
    G = ctx.structure(structure)
    kron = kron_layers(G, damping)
    if kron is not None:
        return kron
    if isinstance(G, DenseFisher):
        return G.damped_factor(damping)
    if isinstance(G, BlockDiagonalFisher) and G.meta.get("blocks_by") == BlockBy.LAYER.value:
        return G.damped_factors(damping)
    if isinstance(G, DiagonalFisher):
        d = G.diagonal + damping
        if not bool((d > 0).all()):
            raise SingularMatrixError(f"{int((d <= 0).sum())} diagonal entries of F + λI are ≤ 0 at damping "
                                      f"{damping}; pass damping > 0")
        return d.sqrt()
    return None


def own_blocks(F: Tensor, G: FisherMatrix, blocks: list[Tensor]) -> bool:
    """Whether G is block-diagonal by layer with exactly F's diagonal blocks (``blocks``: ``spec.blocks("layer")``).

    Then each layer's preconditioned block L_l⁻¹ (F_ll + λI) L_l⁻ᵀ, L_l L_lᵀ = F_ll + λI, is the identity: its
    spectrum is P_l ones in closed form (an eigendecomposition would give 1 to round-off).
    """
    if not isinstance(G, BlockDiagonalFisher) or G.meta.get("blocks_by") != BlockBy.LAYER.value:
        return False
    return all(torch.equal(B, F[ix][:, ix]) for B, ix in zip(G.blocks.values(), blocks, strict=True))


def kept_preconditioned(A: Tensor, factors: Tensor | dict[str, Tensor] | list[KronLayer], blocks: list[Tensor],
                        G: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """L⁻¹ A L⁻ᵀ (P, P) for the factors of :func:`kept_factors`, and each layer's preconditioned block.

    A layer's matrix is that of its own block G_ll of G_λ = L Lᵀ: the diagonal block of the whole one when L is
    block-diagonal (block, diagonal, KFAC), else :func:`preconditioned_matrix` of A_ll and G_ll.

    Args:
        A: F + λI (P, P).
        factors: The (P, P) factor, the layers' factors (in ``blocks`` order), KFAC's layers (:func:`kron_layers`)
            or the (P,) diagonal factor.
        blocks: Each layer's parameter indices, ``spec.blocks("layer")`` order.
        G: G_λ (P, P), for a (P, P) factor (its layer blocks).
    """
    if isinstance(factors, list):
        M = kron_factor_transform(A, factors)
    elif isinstance(factors, dict):
        M = block_factor_transform(A, factors, dict(zip(factors, blocks, strict=True)))
    elif factors.ndim == 1:
        M = 0.5 * (A + A.T) / (factors.unsqueeze(1) * factors.unsqueeze(0))
    else:
        if G is None:
            raise InputError("kept_preconditioned needs G_λ for a dense factor (its layer blocks)")
        return factor_transform(A, factors), [preconditioned_matrix(A[ix][:, ix], G[ix][:, ix]) for ix in blocks]
    return M, [M[ix][:, ix] for ix in blocks]


def inverse_blocks(ctx: RuleContext, structure: str, damping: float) -> dict[str, Tensor] | None:
    """G_λ⁻¹'s diagonal blocks by layer, when it is block-diagonal by layer (else None: use :func:`damped_matrix`).

    Block l is sym of the block of g ↦ ``structure.solve(g, λ)`` applied to layer l's unit vectors; G_λ⁻¹ is taken
    to be block-diagonal when every such solve is exactly zero outside its layer.
    """
    G = ctx.structure(structure)
    engine = ctx.engine()
    P = ctx.spec.dim
    blocks = {}
    for k, ix in ctx.spec.blocks("layer").items():
        ix = ix.to(engine.device)
        E = torch.zeros(P, len(ix), dtype=engine.dtype, device=engine.device)
        E[ix, torch.arange(len(ix), device=engine.device)] = 1.0
        cols = G.solve(E, damping)
        block = cols[ix]
        cols[ix] = 0.0
        if bool(cols.any()):
            return None
        blocks[k] = 0.5 * (block + block.T)
    return blocks


def block_congruence(A: Tensor, factors: dict[str, Tensor], index: dict[str, Tensor]) -> Tensor:
    """Kᵀ A K (n, n) for symmetric A and a block-diagonal K with blocks ``factors`` (products only).

    With K_k K_kᵀ = (G_kk)⁻¹ (the Cholesky factor of a block of G⁻¹), Kᵀ A K is similar to G^{-1/2} A G^{-1/2}
    (Kᵀ A K ~ A K Kᵀ = A G⁻¹), and its diagonal block of ``index[k]`` to G_kk^{-1/2} A_kk G_kk^{-1/2}: the
    preconditioned matrix without inverting G⁻¹ or a triangular solve.
    """
    A = 0.5 * (A + A.T)
    X = torch.empty_like(A)
    for k, ix in index.items():
        X[ix] = factors[k].T @ A[ix]
    M = torch.empty_like(A)
    for k, ix in index.items():
        M[:, ix] = X[:, ix] @ factors[k]
    return 0.5 * (M + M.T)


def damped_matrix(ctx: RuleContext, structure: str, damping: float) -> Tensor:
    """G_λ as a dense (P, P) matrix: the inverse of g ↦ ``structure.solve(g, λ)``."""
    G = ctx.structure(structure)
    P = ctx.spec.dim
    eye = torch.eye(P, dtype=ctx.engine().dtype, device=ctx.engine().device)
    Ginv = G.solve(eye, damping)
    return torch.linalg.inv(0.5 * (Ginv + Ginv.T))


def _dense_geometry(ctx: RuleContext, names: list[str], dampings: list[float], skip_unavailable: bool
                    ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Exact spectra: arrays shaped (S, D, P), (S, D), (S, D, L, P_max), (S, D, L); and unavailable reasons."""
    F = ctx.fisher().to_dense()
    P = F.shape[0]
    blocks = list(ctx.spec.blocks("layer").values())
    width = max(len(ix) for ix in blocks)
    S, D, L = len(names), len(dampings), len(blocks)
    out = {"eigenvalue": np.full((S, D, P), np.nan), "condition_number": np.full((S, D), np.nan),
           "layer_eigenvalue": np.full((S, D, L, width), np.nan), "layer_condition_number": np.full((S, D, L), np.nan)}
    reasons = [""] * S
    eye = torch.eye(P, dtype=F.dtype, device=F.device)
    # the preconditioned matrices of every structure and damping are formed first (held up to a quarter of the
    # memory budget), then their spectra are computed together with the true Fisher's, each on one thread
    # (fisherlab.linalg.threads.concurrently)
    pending: list[tuple[int, int, Tensor, list[Tensor]]] = []
    held = 0

    def flush(first: Sequence[Any] = ()) -> list[Any]:
        nonlocal pending, held
        tasks = [*first, *[partial(eigvalsh, m) if m.ndim == 2 else partial(Tensor.clone, m)
                           for *_, M, layer_M in pending for m in (M, *layer_M)]]
        with ctx.timed("geometry eigenvalues"):
            done = concurrently(tasks, F.device)
        spectra = iter(done[len(first):])
        for i, j, _, layer_M in pending:
            ev = next(spectra)
            _store(out, i, j, ev, [next(spectra) for _ in layer_M])
        pending, held = [], 0
        return done[: len(first)]

    true_spectra = [partial(ctx.eigenvalues, "true"), partial(ctx.layer_eigenvalues, "true")]
    for i, name in enumerate(names):
        if name == "original":
            continue
        for j, lam in enumerate(dampings):
            try:
                with ctx.timed(f"geometry {name}"):
                    A = F + lam * eye
                    kept = kept_factors(ctx, name, lam)
                    inverse = inverse_blocks(ctx, name, lam) if kept is None else None
                    G = damped_matrix(ctx, name, lam) if kept is None and inverse is None else None
                    if kept is not None:  # the structure's own factors of G_λ (shared with its solves)
                        dense = isinstance(kept, Tensor) and kept.ndim == 2  # G_λ = G + λI, G the structure's
                        G = ctx.structure(name).to_dense() + lam * eye if dense else None
                        if isinstance(kept, dict) and own_blocks(F, ctx.structure(name), blocks):
                            M = own_blocks_transform(A, kept, dict(zip(kept, blocks, strict=True)))
                            layer_M = [torch.ones(len(ix), dtype=F.dtype, device=F.device) for ix in blocks]
                        else:
                            M, layer_M = kept_preconditioned(A, kept, blocks, G)
                    elif inverse is None:
                        M = preconditioned_matrix(A, G)
                        layer_M = [preconditioned_matrix(A[ix][:, ix], G[ix][:, ix]) for ix in blocks]
                    else:  # K is block-diagonal: each layer's K_lᵀ A_ll K_l is a diagonal block of M
                        factors = {k: _factor(B, k) for k, B in inverse.items()}
                        M = block_congruence(A, factors, dict(zip(inverse, blocks, strict=True)))
                        layer_M = [M[ix][:, ix] for ix in blocks]
                    del A, G, inverse, kept
            except UNAVAILABLE as exc:
                if not skip_unavailable:
                    raise
                reasons[i] = f"{type(exc).__name__}: {exc}"
                break
            pending.append((i, j, M, layer_M))
            held += sum(m.numel() * m.element_size() for m in (M, *layer_M))
            if held > ctx.memory_budget // 4:
                flush(true_spectra)  # the true Fisher's spectra (cached by the context) go with the first batch
                true_spectra = []
    flush(true_spectra)
    base = ctx.eigenvalues("true")
    base_layer = list(ctx.layer_eigenvalues("true").values())  # spec.blocks("layer") order
    i = names.index("original")
    for j, lam in enumerate(dampings):
        _store(out, i, j, base + lam, [e + lam for e in base_layer])
    return out, reasons


def _store(out: dict[str, np.ndarray], i: int, j: int, ev: Tensor, layer_ev: Sequence[Tensor]) -> None:
    """Write one (structure, damping) cell: the spectrum, its κ, and each layer's spectrum and κ."""
    out["eigenvalue"][i, j] = ev.cpu().double().numpy()
    out["condition_number"][i, j] = condition(ev)
    for k, e in enumerate(layer_ev):
        out["layer_eigenvalue"][i, j, k, : len(e)] = e.cpu().double().numpy()
        out["layer_condition_number"][i, j, k] = condition(e)


def _lanczos_spectrum(matvec: Any, P: int, k: int, seed: int, dtype: torch.dtype, device: torch.device,
                      lam_min: float | None = None) -> tuple[Tensor, float]:
    """Top k eigenvalues (descending) of a symmetric PSD operator (P × P) and its smallest eigenvalue.

    The smallest eigenvalue is ``lam_min`` when it is known, else Lanczos on σI − A (σ = the top eigenvalue).
    """
    from fisherlab.linalg import lanczos

    top, _ = lanczos(matvec, P, k, seed=seed, dtype=dtype, device=device)
    if lam_min is None:
        sigma = float(top[0])
        low, _ = lanczos(lambda v: sigma * v - matvec(v), P, 1, num_iter=min(P, LOW_END_ITERATIONS),
                         seed=seed + 1, dtype=dtype, device=device)
        lam_min = max(sigma - float(low[0]), 0.0)
    return top, lam_min


def _ratio(hi: float, lo: float) -> float:
    return hi / lo if lo > 0 else math.inf


def _lanczos_geometry(ctx: RuleContext, names: list[str], dampings: list[float], num_eigs: int, seed: int,
                      skip_unavailable: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """Top ``num_eigs`` eigenvalues (ascending) and κ of F + λI and of each structure's B, by Lanczos."""
    from fisherlab.fidelity.rules import ReconstructedGD

    F = ctx.fisher()
    engine = ctx.engine()
    P, dtype, device = ctx.spec.dim, engine.dtype, engine.device
    k = min(num_eigs, P)
    S, D, L = len(names), len(dampings), len(ctx.spec.layers())
    out = {"eigenvalue": np.full((S, D, k), np.nan), "condition_number": np.full((S, D), np.nan),
           "layer_eigenvalue": np.full((S, D, L, 1), np.nan), "layer_condition_number": np.full((S, D, L), np.nan)}
    reasons = [""] * S
    low_rank = engine.num_samples * engine.rows_per_sample < P  # rank F ≤ N·R < P: λ_min(F) = 0 exactly
    with ctx.timed("geometry original"):
        top_F, lo_F = _lanczos_spectrum(F.matvec, P, k, seed, dtype, device, 0.0 if low_rank else None)
    for i, name in enumerate(names):
        try:
            rule = ReconstructedGD(name, Structure(name), RootMethod.EIGH) if name in RECONSTRUCTIBLE else None
            for j, lam in enumerate(dampings):
                if name == "original":
                    top, kappa = top_F + lam, _ratio(float(top_F[0]) + lam, lo_F + lam)
                else:
                    if rule is None:
                        raise UnsupportedLayerError(f"structure {name!r} has no reconstructed network")
                    with ctx.timed(f"geometry {name}"):
                        net = ctx.reconstructed(rule, lam)  # G built at the first λ, re-rooted at the others

                        def B(v: Tensor, net: Any = net, lam: float = lam) -> Tensor:
                            u = net.to_original_update(v)  # R⁻¹ v (R symmetric)
                            return net.to_original_update(F.matvec(u) + lam * u)

                        top, lo = _lanczos_spectrum(B, P, k, seed, dtype, device)
                    kappa = _ratio(float(top[0]), lo)
                out["eigenvalue"][i, j] = torch.flip(top, [0]).cpu().double().numpy()
                out["condition_number"][i, j] = kappa
        except UNAVAILABLE as exc:
            if not skip_unavailable:
                raise
            reasons[i] = f"{type(exc).__name__}: {exc}"
            out["eigenvalue"][i], out["condition_number"][i] = np.nan, np.nan
    return out, reasons


def fisher_geometry(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    structures: Sequence[str] = DEFAULT_STRUCTURES,
    damping: float | Sequence[float] = 1e-3,
    dtype: torch.dtype | None = torch.float64,
    device: torch.device | str | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
    num_eigs: int = 20,
    skip_unavailable: bool = True,
    progress: bool | None = None,
    config: dict | None = None,
    context: RuleContext | None = None,
) -> xr.Dataset:
    """Spectra and condition numbers of F + λI and of G_λ^{-1/2}(F + λI)G_λ^{-1/2} for each structure.

    Args:
        model: The network (not modified).
        data: The batch: ``(X, y)``, a SplitData (training split) or a DataLoader.
        structures: Fisher structures G (``"dense"``, ``"block"`` (per layer), ``"kfac"``, ...); the row
            ``"original"`` (G = I) is always included first.
        damping: λ, one value or several.
        likelihood: Likelihood name or object.
        dtype: Compute dtype (float64 by default: small eigenvalues matter).
        device: Compute device.
        seed: Seed of Monte-Carlo draws and of Lanczos start vectors.
        memory_budget: Bytes a dense object may take; above it the matrix-free path is used.
        chunk_size: Samples per chunk of the engine.
        num_eigs: Eigenvalues computed by Lanczos on the matrix-free path.
        skip_unavailable: Record a structure that exceeds the budget or meets an unsupported layer as
            unavailable instead of raising.
        progress: Progress bars (``None``: only on a terminal).
        config: Extra configuration stored in the provenance.
        context: A :class:`~fisherlab.fidelity.rules.RuleContext` of ``model`` on ``data`` with these settings,
            already used elsewhere (e.g. by :func:`~fisherlab.evaluate_fidelity`): its Fisher, structures and
            eigenvalues are used instead of computing them again (refused, with an InputError, when its data,
            parameters or settings differ).

    Returns:
        A ``"geometry"`` Dataset with dims ``structure``, ``damping``, ``eig``, ``layer``, ``layer_eig``
        (ascending eigenvalues; layer spectra padded with NaN to the largest layer) and variables
        ``eigenvalue``, ``condition_number``, ``layer_eigenvalue``, ``layer_condition_number``, ``available``,
        ``unavailable_reason``; attribute ``spectrum_method`` (``"eigvalsh"`` or ``"lanczos"``).
    """
    start = time.perf_counter()
    dampings = check_dampings(damping)
    names = ["original", *[s for s in structures if s != "original"]]
    settings = dict(likelihood=likelihood, dtype=dtype, device=device, seed=seed, memory_budget=memory_budget,
                    chunk_size=chunk_size)
    if context is not None:
        context.check_shares(model, data, **settings)
    ctx = RuleContext(model, data, **settings, progress=progress) if context is None else context
    dense = ctx.dense_fits()
    if dense:
        arrays, reasons = _dense_geometry(ctx, names, dampings, skip_unavailable)
    else:
        arrays, reasons = _lanczos_geometry(ctx, names, dampings, num_eigs, seed, skip_unavailable)
    S_D = ("structure", "damping")
    data_vars = {
        "eigenvalue": ((*S_D, "eig"), arrays["eigenvalue"]),
        "condition_number": (S_D, arrays["condition_number"]),
        "layer_eigenvalue": ((*S_D, "layer", "layer_eig"), arrays["layer_eigenvalue"]),
        "layer_condition_number": ((*S_D, "layer"), arrays["layer_condition_number"]),
        "available": (("structure",), np.array([0 if r else 1 for r in reasons], dtype=np.int64)),
        "unavailable_reason": (("structure",), np.array(reasons, dtype=str)),
    }
    engine = ctx.engine()
    coords = {"structure": names, "damping": dampings, "layer": list(ctx.spec.layers()),
              "eig": np.arange(arrays["eigenvalue"].shape[-1]),
              "layer_eig": np.arange(arrays["layer_eigenvalue"].shape[-1])}
    cfg = {"structures": names, "damping": dampings, "likelihood": repr(ctx.likelihood), "num_eigs": num_eigs,
           "memory_budget": ctx.memory_budget, "model": type(model).__name__, **(config or {})}
    ds = results.new_dataset("geometry", data_vars, coords, config=cfg, seed=seed, device=engine.device,
                             dtype=engine.dtype,
                             attrs={"spectrum_method": "eigvalsh" if dense else "lanczos",
                                    "num_params": engine.spec.dim, "total_seconds": time.perf_counter() - start})
    return results.annotate(ds, ANNOTATIONS)


__all__ = ["DEFAULT_STRUCTURES", "condition", "damped_matrix", "fisher_geometry", "preconditioned_eigvalsh",
           "preconditioned_matrix"]
