"""What every local Fisher unit shares: the group layout of its parameters and the damped roots G^{±1/2}.

A **local Fisher unit** (docs/method.md) is one diagonal block G_g of the metric G — one layer, one parameter
tensor, or (structure ``full``) the whole network — together with the reconstructed coordinates
θ'_g = G_g^{1/2} θ_g it owns. Two forms exist: explicit layers around a Linear/Conv weight
(:mod:`~fisherlab.reconstruction.local_layers`) and parametrizations of arbitrary tensors
(:mod:`~fisherlab.reconstruction.parametrize`). Both subclass :class:`LocalFisherUnit` and speak in **group
vectors**: the unit's original tensors flattened row-major and concatenated in the order of
``model.named_parameters()`` — the restriction of fisherlab's flat parameter vector to the unit.

**Roots.** A unit holds a matrix R with RᵀR = G_g (buffer ``sqrt``) and its inverse (``inv_sqrt``), and its
coordinates are θ'_g = R θ_g. Then ∇θ' L = R^{-T} ∇θ L and one GD step on θ' moves θ by −η R^{-1} R^{-T} ∇θ L = −η
G_g^{-1} ∇θ L whatever R is (invariant 2 needs only RᵀR = G). The methods of :data:`ROOT_METHODS`: ``"eigh"``
(reference), ``"denman_beavers"``, ``"newton_schulz"`` give the symmetric root R = G^{1/2} of docs/method.md;
``"cholesky"`` gives the triangular factor R = Lᵀ (G = L Lᵀ): the same NGD steps in other coordinates θ', and about
a quarter of the cost of an eigendecomposition at refresh (n³/3 flops for the factor, n³/3 for its inverse; measured
40 against 175 ms for n = 1024; a dense unit does not form the inverse: :func:`damped_root`, R⁻¹ by triangular
solves). ``"lowrank"`` (:func:`lowrank_roots`) changes G itself: each Kronecker factor wider
than twice the rank k is replaced by its top-k eigen-part plus an isotropic remainder, whose roots cost O(n·k) per
vector instead of O(n²); every other block gets eigh roots.

**Other dampings.** The eigh roots are those of the spectrum of sym(G) shifted by λ, so under
:func:`reuse_spectra` (a :class:`SpectrumCache`, e.g. a fidelity evaluation's dampings) each block is decomposed
once per G and every further λ costs the two products Q diag((w + λ)^{±1/2}) Qᵀ. The Cholesky root factorises
G + λI again at each λ: that already costs less than those two products (n³/3 + n³ flops against 4n³; 128
blocks 513 × 513, one thread: 1.7 s a λ against 2.8 s, beside 6.8 s for their eigendecomposition).

:class:`CombinedLayout` writes tensors that share their leading dimension m (a weight (m, ...) and its bias (m,))
as one matrix W̄ = [W.reshape(m, -1), b] of shape (m, n): the layout of Kronecker, eigenbasis and unit-wise
metrics, whose factors act on the rows (S, m×m) and columns (A, n×n) of W̄. :class:`TransposedLayout` is the
layout of a single weight whose W̄ is its transpose (``nn.Embedding``: weight (V, d), W̄ = weightᵀ (d, V)).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ClassVar

import torch
from torch import Tensor, nn

from fisherlab.errors import InputError, NonFiniteError, SingularMatrixError
from fisherlab.linalg import ConvergenceError, sqrtm, top_eigh
from fisherlab.vocabulary import RootMethod

#: Exponents a unit's root can be applied with: R ~ G^{1/2} (original → reconstructed) and R⁻¹ ~ G^{-1/2} (back).
POWERS = (0.5, -0.5)

#: Root methods of a local Fisher unit (:class:`fisherlab.vocabulary.RootMethod`): the symmetric roots of
#: :func:`fisherlab.linalg.sqrtm`, the Cholesky factor and the low-rank roots of wide Kronecker factors.
ROOT_METHODS: tuple[str, ...] = tuple(m.value for m in RootMethod)

#: A low-rank root (basis U (n, k), coefficients c (k,), shift s ()): the matrix s·I + U diag(c) Uᵀ.
LowRank = tuple[Tensor, Tensor, Tensor]


def damped_roots(G: Tensor, damping: float, method: str, factor: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(R, R⁻¹) with RᵀR = G_λ = G + λI, both (n, n) in G's dtype (see the module docstring).

    ``factor``: for ``"cholesky"`` with λ > 0, the float64 lower Cholesky factor L of sym(G) + λI already at hand
    (e.g. :meth:`~fisherlab.structures.DenseFisher.damped_factor`, which exact NGD solves with): R = Lᵀ from it
    instead of factorising again (the same L the factorisation here would give); ignored otherwise.

    ``"lowrank"`` means ``"eigh"`` here (it serves Kronecker factors only, :func:`lowrank_roots`).
    ``"eigh"`` and ``"cholesky"``: :func:`batched_damped_roots` on a batch of one (float64, with its positivity
    check and, for eigh, the spectra kept under :func:`reuse_spectra`; the eigh path skips
    :func:`fisherlab.linalg.sqrtm`'s residual diagnostics, which cost three more n³ products — as much as the
    eigendecomposition itself for n ≈ 1000). The iterative methods
    (``"denman_beavers"``, ``"newton_schulz"``) run :func:`fisherlab.linalg.sqrtm` and check its convergence.

    The roots are computed in float64 whatever G's dtype: a float32 network with κ(G_λ) = ‖G‖/λ ≈ 1e5 (common
    for small dampings) would otherwise lose the small eigenvalues, which are exactly the directions NGD
    amplifies, and the singularity check (n·eps·‖G‖) would refuse λ < 1e-5·n·‖G‖ in float32.

    Raises:
        SingularMatrixError: G_λ is not numerically positive definite (e.g. λ = 0 and a singular G); the message
            gives the smallest eigenvalue and advises a positive damping.
        NonFiniteError: G contains NaN or inf.
        ConvergenceError: An iterative method did not converge.
    """
    if method == "cholesky" and damping > 0 and factor is not None and factor.dtype == torch.float64:
        sqrt, inv_sqrt = cholesky_roots(factor)
        return sqrt.to(G.dtype), inv_sqrt.to(G.dtype)
    if method in ("eigh", "cholesky", "lowrank"):
        sqrt, inv_sqrt = batched_damped_roots(G.unsqueeze(0), damping, method)
        return sqrt[0], inv_sqrt[0]
    res = sqrtm(G.double(), method=method, damping=damping)
    if not res.converged:
        raise ConvergenceError(
            f"the {method} square root of a {G.shape[0]}×{G.shape[0]} block did not converge in {res.iterations} "
            f"iterations (residual {res.residual:.2e}); increase the damping or use sqrt='eigh'"
        )
    return res.sqrt.to(G.dtype), res.inv_sqrt.to(G.dtype)  # type: ignore[union-attr]


def damped_root(G: Tensor, damping: float, method: str, factor: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None]:
    """(R, R⁻¹) as :func:`damped_roots`, except that ``"cholesky"`` gives (R, None): R⁻¹ is not formed.

    R = Lᵀ is upper triangular, so R⁻¹ V is a triangular solve (:func:`inverse_root_rows`, n² flops a vector)
    where forming R⁻¹ costs n³ (1.2 one-thread CPU s at n = 3,466, per damping). Same checks, ``factor`` and
    float64 computation as :func:`damped_roots`; R in G's dtype.

    Raises:
        SingularMatrixError: G_λ is not numerically positive definite.
        NonFiniteError: G contains NaN or inf.
        ConvergenceError: An iterative method did not converge.
    """
    if method != "cholesky":
        return damped_roots(G, damping, method, factor)
    if damping > 0 and factor is not None and factor.dtype == torch.float64:
        return factor.mT.to(G.dtype), None
    return _damped_cholesky(G.unsqueeze(0), damping)[0].mT.to(G.dtype), None


def inverse_root_rows(R: Tensor, V: Tensor) -> Tensor:
    """V R^{-T} for an upper triangular R (n, n) and rows V (k, n): R⁻¹ on each row, by one triangular solve."""
    return torch.linalg.solve_triangular(R.mT, V, upper=False, left=False)


def _advice(damping: float) -> str:
    return "pass damping > 0" if damping == 0 else f"increase the damping (now {damping:g})"


def positive_roots(d: Tensor, damping: float, what: str) -> tuple[Tensor, Tensor]:
    """((d + λ)^{1/2}, (d + λ)^{-1/2}) elementwise, for the eigenvalues ``d`` of a diagonal(ised) block.

    Raises:
        SingularMatrixError: An entry of d + λ is ≤ 0 (the message names ``what`` and the smallest entry).
    """
    shifted = d + damping
    lo = float(shifted.min())
    if not lo > 0:
        raise SingularMatrixError(f"{what} + damping is not positive: its smallest entry is {lo:.3e} "
                                  f"(damping={damping:g}); {_advice(damping)}")
    return shifted.sqrt(), shifted.rsqrt()


def _refuse_singular(w: Tensor, damping: float, blocks: int, n: int | None = None,
                     index: Tensor | None = None) -> None:
    """Raise SingularMatrixError if a block of size n with ascending eigenvalues w (b, ·) has w_min ≤ n·eps·max|w|.

    ``index`` (b,): the block number of each row of w among the ``blocks`` (default: row i is block i).
    """
    n = w.shape[-1] if n is None else n
    bad = w[:, 0] <= n * torch.finfo(torch.float64).eps * w.abs().amax(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        first = i if index is None else int(index[i])
        where = f"{int(bad.sum())} of {blocks} blocks (first: block {first})" if blocks > 1 else "the block"
        raise SingularMatrixError(
            f"{where} + damping·I (damping={damping:g}, size {n}) is not numerically positive definite: smallest "
            f"eigenvalue {float(w[i, 0]):.3e}, largest {float(w[i, -1]):.3e}; {_advice(damping)}")


#: Float64 bytes of the blocks :func:`batched_damped_roots` takes at once on a CPU: a chunk of blocks stays in
#: cache through symmetrisation, damping, factorisation, roots and the cast back, where a whole batch of large
#: blocks (128 × 513 × 513: 270 MB in float64) streams through memory at every step (Cholesky roots of that batch,
#: one thread: 2.33 s whole, 1.72 s in chunks of 1 MiB; of 512 × 129 × 129: 0.42 against 0.25 s). Other devices
#: take the batch at once.
CHUNK_BYTES = 2**20


def _chunks(G: Tensor) -> Iterator[slice]:
    """Consecutive slices of the blocks G (b, n, n), :data:`CHUNK_BYTES` of float64 blocks each (one at least)."""
    b, n = G.shape[0], G.shape[-1]
    step = max(1, CHUNK_BYTES // (8 * n * n)) if G.device.type == "cpu" else max(b, 1)
    return (slice(a, min(a + step, b)) for a in range(0, b, step))


class SpectrumCache:
    """The float64 eigendecompositions sym(G) = Q diag(w) Qᵀ that ``"eigh"`` roots took, to root G at other dampings.

    While a cache is active (:func:`reuse_spectra`), :func:`batched_damped_roots` (and so :func:`damped_roots`,
    every unit's ``update``) with ``"eigh"`` keeps the (w, Q) of each block batch G it decomposes and, given the
    same G again — the same tensor memory, shape and strides, unmodified (its version counter) — forms
    (G + λI)^{±1/2} = Q diag((w + λ)^{±1/2}) Qᵀ at the new λ without a new eigendecomposition (same refusal rule
    on w + λ). The roots are those of a cache-free call, bit for bit: the eigh path always decomposes sym(G)
    undamped and shifts its eigenvalues. A spectrum that would take the cache past ``budget`` bytes is not kept.

    Args:
        budget: Bytes the kept spectra may take (None: no limit).
    """

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self.nbytes = 0
        self._kept: dict[tuple, tuple[Tensor, int, Tensor, Tensor]] = {}

    @staticmethod
    def _key(G: Tensor) -> tuple:
        return G.data_ptr(), tuple(G.shape), G.stride(), G.dtype, G.device

    def get(self, G: Tensor) -> tuple[Tensor, Tensor] | None:
        """(w (b, n), Q (b, n, n)) of sym(G) for blocks G (b, n, n) kept earlier, or None."""
        kept = self._kept.get(self._key(G))
        if kept is None or kept[1] != G._version:
            return None
        return kept[2], kept[3]

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the budget."""
        return self.budget is None or self.nbytes + nbytes <= self.budget

    def put(self, G: Tensor, w: Tensor, Q: Tensor) -> None:
        """Keep the spectrum (w, Q) of sym(G); G is held (so its memory is not reused by another tensor)."""
        old = self._kept.pop(self._key(G), None)
        if old is not None:
            self.nbytes -= old[2].nbytes + old[3].nbytes
        self._kept[self._key(G)] = G, G._version, w, Q
        self.nbytes += w.nbytes + Q.nbytes


_ACTIVE_SPECTRA: ContextVar[SpectrumCache | None] = ContextVar("fisherlab_active_spectra", default=None)


@contextmanager
def reuse_spectra(cache: SpectrumCache) -> Iterator[SpectrumCache]:
    """Keep and reuse ``"eigh"`` roots' eigendecompositions in ``cache`` (a :class:`SpectrumCache`) within the block.

    The cache active before is active again after it.
    """
    token = _ACTIVE_SPECTRA.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE_SPECTRA.reset(token)


def batched_damped_roots(G: Tensor, damping: float, method: str) -> tuple[Tensor, Tensor]:
    """Roots (R, R⁻¹), RᵀR = G_b + λI, of a batch of blocks G (b, n, n): (b, n, n) each, in G's dtype.

    Computed in float64 from sym(G), a chunk of blocks at a time (:data:`CHUNK_BYTES`). ``"eigh"``: the batched
    eigendecomposition sym(G) = Q diag(w) Qᵀ, R = Q diag((w + λ)^{1/2}) Qᵀ, refused when a block's smallest
    eigenvalue w + λ is ≤ n·eps·max|w + λ| (as :func:`fisherlab.linalg.sqrtm`); under :func:`reuse_spectra` the
    (w, Q) of a G decomposed before are reused. ``"cholesky"``: R = Lᵀ (upper triangular) from one batched
    Cholesky factorisation of sym(G) + λI and R⁻¹ by a triangular solve; refused when the factorisation fails, and,
    with λ = 0, by the eigenvalue rule above. The iterative methods run :func:`damped_roots` on each block;
    ``"lowrank"`` means ``"eigh"``.

    Raises:
        SingularMatrixError: A damped block is not numerically positive definite (names the first such block).
        NonFiniteError: G contains NaN or inf.
    """
    if method not in ("eigh", "cholesky", "lowrank"):
        roots = [damped_roots(B, damping, method) for B in G]
        return torch.stack([r[0] for r in roots]), torch.stack([r[1] for r in roots])
    if method == "cholesky":
        return _batched_cholesky_roots(G, damping)
    return _batched_eigh_roots(G, damping)


def _batched_eigh_roots(G: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """The ``"eigh"`` roots of :func:`batched_damped_roots`, from the active :class:`SpectrumCache` when it has G."""
    b, n = G.shape[0], G.shape[-1]
    cache = _ACTIVE_SPECTRA.get()
    spectrum = None if cache is None else cache.get(G)
    if spectrum is None:
        w_all = torch.empty(b, n, dtype=torch.float64, device=G.device)
        keep = cache is not None and cache.fits(8 * b * n * (n + 1))
        # column-major matrices, as eigh returns them: the roots' products see the same operand layout either way
        # (a GEMM's bits can depend on it: MKL on an AMD EPYC), so cached and fresh roots agree bit for bit
        Q_all = torch.empty(b, n, n, dtype=torch.float64, device=G.device).mT if keep else None
    else:
        (w_all, Q_all), keep = spectrum, False
        _refuse_singular(w_all + damping, damping, b)
    sqrt, inv_sqrt, eye = G.new_empty(b, n, n), G.new_empty(b, n, n), _eye(G)
    for s in _chunks(G):
        if spectrum is None:
            w, Q = torch.linalg.eigh(_damped(G[s], 0.0, eye))
            w_all[s] = w
            if Q_all is not None:
                Q_all[s] = Q
        else:
            w, Q = w_all[s], Q_all[s]  # type: ignore[index]
        shifted = w + damping
        sqrt[s] = (Q * shifted.sqrt().unsqueeze(-2)) @ Q.mT
        inv_sqrt[s] = (Q * shifted.rsqrt().unsqueeze(-2)) @ Q.mT
    if keep:
        cache.put(G, w_all, Q_all)  # type: ignore[union-attr, arg-type]
    if spectrum is None:
        _refuse_singular(w_all + damping, damping, b)
    return sqrt, inv_sqrt


def _batched_cholesky_roots(G: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """The ``"cholesky"`` roots of :func:`batched_damped_roots`: R (b, n, n) contiguous, R⁻¹ column-major blocks."""
    b, n = G.shape[0], G.shape[-1]
    R, R_inv = G.new_empty(b, n, n), G.new_empty(b, n, n).mT
    info = torch.empty(b, dtype=torch.int32, device=G.device)
    w = torch.empty(b, n, dtype=torch.float64, device=G.device) if damping == 0 else None
    eye = _eye(G)
    for s in _chunks(G):
        Gd = _damped(G[s], damping, eye)
        L, info[s] = torch.linalg.cholesky_ex(Gd)
        if w is not None:
            w[s] = torch.linalg.eigvalsh(Gd)
        R[s], R_inv[s] = cholesky_roots(L, eye)
    _check_cholesky(G, damping, info)
    if w is not None:
        _refuse_singular(w, damping, b)
    return R, R_inv


def _damped(G: Tensor, damping: float, eye: Tensor | None = None) -> Tensor:
    """sym(G) + λI in float64 for blocks G (b, n, n), refused when G is not finite; ``eye``: I (n, n), float64."""
    if not bool(torch.isfinite(G).all()):
        raise NonFiniteError("a Fisher block to take square roots of contains NaN or inf values")
    eye = _eye(G) if eye is None else eye
    return (G + G.mT).double().mul_(0.5).add_(eye, alpha=damping)


def _eye(G: Tensor) -> Tensor:
    """The float64 identity of the blocks G (..., n, n)."""
    return torch.eye(G.shape[-1], dtype=torch.float64, device=G.device)


def _check_cholesky(G: Tensor, damping: float, info: Tensor) -> None:
    """Refuse the blocks G (b, n, n) whose factorisation of sym(G) + λI failed (``info`` (b,) ≠ 0), naming the first."""
    failed = (info != 0).nonzero()[:, 0]
    if failed.numel():
        _refuse_singular(torch.linalg.eigvalsh(_damped(G[failed], damping)), damping, G.shape[0], index=failed)
        raise SingularMatrixError(f"the Cholesky factorisation of a block + damping·I failed "
                                  f"(damping={damping:g}); {_advice(damping)}")


def _damped_cholesky(G: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factors L (b, n, n), float64, of sym(G_b) + λI, refused as :func:`batched_damped_roots` says."""
    Gd = _damped(G, damping)
    L, info = torch.linalg.cholesky_ex(Gd)
    _check_cholesky(G, damping, info)
    if damping == 0:
        _refuse_singular(torch.linalg.eigvalsh(Gd), damping, G.shape[0])
    return L


def cholesky_roots(L: Tensor, eye: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(R, R⁻¹) with R = Lᵀ (upper triangular, RᵀR = L Lᵀ) for lower Cholesky factors L (..., n, n).

    ``eye``: the identity (n, n) in L's dtype, if at hand.
    """
    R = L.mT
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device) if eye is None else eye
    return R, torch.linalg.solve_triangular(R, eye, upper=True)


def lowrank_roots(M: Tensor, damping: float, rank: int) -> tuple[Tensor, Tensor, LowRank | None]:
    """Symmetric roots of M̃ + δI, M̃ = U diag(w) Uᵀ + σ (I − UUᵀ): a factor's top-k eigen-part plus its mean remainder.

    (U (n, k), w) are the k largest eigenpairs of M (:func:`fisherlab.linalg.top_eigh`: randomized subspace
    iteration, seed 0 — Ritz pairs, exact when rank M ≤ k + 10), and σ = (tr M − Σ w)/(n − k) ≥ 0 keeps the trace.
    M̃ + δI has eigenvalues w + δ on span U and σ + δ on its complement, so

        (M̃ + δI)^p = (σ + δ)^p I + U ((w + δ)^p − (σ + δ)^p) Uᵀ,

    applied to a vector in 4nk multiply-adds instead of n². When 2k ≥ n there is nothing to gain: exact eigh roots
    of M + δI, and no low-rank form.

    Args:
        M: Symmetric PSD factor (n, n).
        damping: δ ≥ 0.
        rank: k ≥ 1.

    Returns:
        (sqrt (n, n), inv_sqrt (n, n), low-rank form (U, c, s) of inv_sqrt or None), in M's dtype (computed in
        float64).

    Raises:
        SingularMatrixError: M̃ + δI is not numerically positive definite.
        NonFiniteError: M contains NaN or inf.
    """
    n = M.shape[-1]
    if 2 * rank >= n:
        return (*damped_roots(M, damping, "eigh"), None)
    if not bool(torch.isfinite(M).all()):
        raise NonFiniteError("a Kronecker factor to take low-rank roots of contains NaN or inf values")
    M64 = M.double()
    w, U = top_eigh(M64, rank)
    sigma = (M64.trace() - w.sum()).clamp_min(0) / (n - rank)
    spectrum = torch.cat([w.flip(0), sigma.reshape(1)]).clamp_min(0) + damping
    _refuse_singular(spectrum.sort().values.unsqueeze(0), damping, 1, n)
    shift, top = (sigma + damping).rsqrt(), (w + damping).rsqrt()
    eye = torch.eye(n, dtype=torch.float64, device=M.device)
    inv_sqrt = shift * eye + (U * (top - shift)) @ U.T
    sqrt = (sigma + damping).sqrt() * eye + (U * ((w + damping).sqrt() - (sigma + damping).sqrt())) @ U.T
    return sqrt.to(M.dtype), inv_sqrt.to(M.dtype), (U.to(M.dtype), (top - shift).to(M.dtype), shift.to(M.dtype))


def check_power(power: float) -> float:
    """Refuse an exponent other than ±1/2."""
    if power not in POWERS:
        raise InputError(f"a local Fisher unit applies G^p for p in {POWERS}; got p = {power}")
    return power


class CombinedLayout:
    """Tensors with a common leading dimension m, viewed as one matrix W̄ (m, n) = [T_1.reshape(m, -1), ...].

    Args:
        shapes: Shapes of the tensors, in group order (e.g. a weight (m, c, k) and a bias (m,)).

    Attributes:
        rows: m.
        cols: Columns of W̄ contributed by each tensor.
        edges: Column offsets (length ``len(shapes) + 1``); tensor i fills columns ``edges[i]:edges[i+1]``.
    """

    def __init__(self, shapes: Sequence[torch.Size]):
        shapes = [torch.Size(s) for s in shapes]
        if not shapes or any(len(s) == 0 or s[0] != shapes[0][0] for s in shapes):
            raise InputError(f"a combined matrix needs tensors with a common leading dimension; got {shapes}")
        self.shapes = tuple(shapes)
        self.rows = int(shapes[0][0])
        self.cols = tuple(math.prod(s) // self.rows for s in shapes)
        edges = [0]
        for c in self.cols:
            edges.append(edges[-1] + c)
        self.edges = tuple(edges)

    @property
    def n(self) -> int:
        """Columns of W̄."""
        return self.edges[-1]

    def to_matrix(self, tensors: Sequence[Tensor]) -> Tensor:
        """W̄ (*B, m, n) from tensors of shapes (*B, *shape_i)."""
        batch = tensors[0].shape[: tensors[0].dim() - len(self.shapes[0])]
        return torch.cat([t.reshape(*batch, self.rows, -1) for t in tensors], dim=-1)

    def from_matrix(self, M: Tensor) -> list[Tensor]:
        """The tensors (*B, *shape_i) of a matrix W̄ (*B, m, n)."""
        batch = M.shape[:-2]
        spans = zip(self.edges[:-1], self.edges[1:], self.shapes, strict=True)
        return [M[..., a:b].reshape(*batch, *s) for a, b, s in spans]

    def member_from_columns(self, k: int, M: Tensor) -> Tensor:
        """Tensor k (its shape) from the columns ``edges[k]:edges[k+1]`` of W̄ (m, n_k)."""
        return M.reshape(self.shapes[k])

    def flat_to_matrix(self, v: Tensor) -> Tensor:
        """Group vectors (*B, P_g) (tensors flattened and concatenated) → W̄ (*B, m, n)."""
        return self.to_matrix(unflatten(v, self.shapes))

    def matrix_to_flat(self, M: Tensor) -> Tensor:
        """W̄ (*B, m, n) → group vectors (*B, P_g)."""
        return flatten(self.from_matrix(M), self.shapes)


class TransposedLayout(CombinedLayout):
    """One weight T of shape (n, m) viewed as W̄ = Tᵀ (m, n) (an ``nn.Embedding``'s weight (V, d): W̄ (d, V)).

    ``shapes`` is T's shape (group vectors list T row-major); ``rows`` = m and ``n`` are those of W̄.

    Args:
        shape: T's shape (n, m).
    """

    def __init__(self, shape: torch.Size):
        if len(shape) != 2:
            raise InputError(f"a transposed layout needs one 2-D weight; got shape {tuple(shape)}")
        super().__init__([torch.Size((shape[1], shape[0]))])
        self.shapes = (torch.Size(shape),)

    def to_matrix(self, tensors: Sequence[Tensor]) -> Tensor:
        return tensors[0].transpose(-1, -2)

    def from_matrix(self, M: Tensor) -> list[Tensor]:
        return [M.transpose(-1, -2)]

    def member_from_columns(self, k: int, M: Tensor) -> Tensor:
        return M.transpose(-1, -2)


def flatten(tensors: Sequence[Tensor], shapes: Sequence[torch.Size]) -> Tensor:
    """Concatenate tensors (*B, *shape_i) into group vectors (*B, P_g)."""
    batch = tensors[0].shape[: tensors[0].dim() - len(shapes[0])]
    return torch.cat([t.reshape(*batch, -1) for t in tensors], dim=-1)


def unflatten(v: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Split group vectors (*B, P_g) into tensors (*B, *shape_i) (views)."""
    out, start = [], 0
    for s in shapes:
        n = math.prod(s)
        out.append(v[..., start: start + n].reshape(*v.shape[:-1], *s))
        start += n
    if start != v.shape[-1]:
        raise InputError(f"group vector has length {v.shape[-1]}, expected {start}")
    return out


class LocalFisherUnit(nn.Module):
    """Base class of local Fisher units: a block G_g of the metric and the reconstructed coordinates θ'_g.

    A subclass holds the roots of G_g as **buffers** (never differentiated) and the reconstructed parameters
    θ'_g as ``nn.Parameter`` s (:meth:`primes`), and states:

    * :meth:`apply` — R v (p = 1/2) or R⁻¹ v (p = −1/2) on group vectors v of shape (P_g,) or (P_g, k), with
      RᵀR = G_g (R = G_g^{1/2} for the symmetric root methods);
    * :meth:`update` — recompute the roots from new statistics (``statistics`` names them) and a damping;
    * :meth:`primes_to_flat` / :meth:`flat_to_primes` — between the shapes of the θ' parameters and group
      vectors (the identity for a parametrization; W̄' ↔ [vec W', b'] for a layer).

    Attributes:
        shapes: Shapes of the original tensors, in group order.
    """

    statistics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, shapes: Sequence[torch.Size]):
        super().__init__()
        self.shapes = tuple(torch.Size(s) for s in shapes)

    @property
    def dim(self) -> int:
        """P_g, the number of scalar parameters of the unit."""
        return self.offsets[-1]

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each original tensor in the group vector (length ``len(shapes) + 1``)."""
        out = [0]
        for s in self.shapes:
            out.append(out[-1] + math.prod(s))
        return tuple(out)

    # ------------------------------------------------------------------------------------ to implement
    def primes(self) -> list[Tensor]:
        """The θ' parameters of the unit (the tensors an optimizer updates)."""
        raise NotImplementedError

    def primes_to_flat(self, tensors: Sequence[Tensor]) -> Tensor:
        """Tensors shaped like :meth:`primes` (values or gradients) → group vector (P_g,)."""
        return flatten(tensors, self.shapes)

    def flat_to_primes(self, v: Tensor) -> list[Tensor]:
        """Group vector (P_g,) → tensors shaped like :meth:`primes`."""
        return unflatten(v, self.shapes)

    def _apply_rows(self, V: Tensor, power: float) -> Tensor:
        """R^{±1} (p = ±1/2) applied to the rows of V (k, P_g): V R^{±T}."""
        raise NotImplementedError

    def update(self, stats: Mapping[str, Tensor], damping: float, method: str, rank: int = 64) -> None:
        """Set the roots of G_g = (statistics) + damping from ``stats`` (keys :attr:`statistics`).

        ``method`` is one of :data:`ROOT_METHODS`; ``rank`` is k of ``"lowrank"`` (:func:`lowrank_roots`).
        """
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- derived
    def apply(self, v: Tensor, power: float) -> Tensor:
        """R v (p = 1/2) or R⁻¹ v (p = −1/2); v of shape (P_g,) or (P_g, k), same shape back."""
        check_power(power)
        if v.shape[0] != self.dim or v.dim() not in (1, 2):
            raise InputError(f"expected a group vector of shape ({self.dim},) or ({self.dim}, k); got {tuple(v.shape)}")
        rows = v.unsqueeze(0) if v.dim() == 1 else v.T
        out = self._apply_rows(rows, power)
        return out.squeeze(0) if v.dim() == 1 else out.T

    def prime_vector(self) -> Tensor:
        """θ'_g as a group vector (P_g,), detached."""
        return self.primes_to_flat([p.detach() for p in self.primes()])

    def theta_vector(self) -> Tensor:
        """θ_g = R⁻¹ θ'_g as a group vector (P_g,), detached."""
        return self.apply(self.prime_vector(), -0.5)

    @torch.no_grad()
    def load_theta(self, theta: Tensor) -> None:
        """Set θ'_g = R θ_g for the original parameters θ_g (group vector (P_g,))."""
        primes = self.primes()
        for p, t in zip(primes, self.flat_to_primes(self.apply(theta.to(primes[0]), 0.5)), strict=True):
            p.copy_(t)

    def _check_stats(self, stats: Mapping[str, Tensor]) -> None:
        missing = [k for k in self.statistics if k not in stats]
        if missing:
            raise InputError(f"{type(self).__name__}.update needs statistics {missing}")
