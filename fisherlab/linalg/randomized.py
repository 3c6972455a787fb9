"""Top eigenpairs of a symmetric matrix by randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4).

A seeded Gaussian test matrix Ω (n, k + p) is pushed through ``power_iters`` rounds of M·, re-orthonormalised by
QR after each product (which keeps the small eigen-directions from being rounded away); the Rayleigh–Ritz
projection QᵀMQ of the final basis gives the eigenpairs. Cost: (power_iters + 2)·n²·(k + p) multiply-adds plus
QRs of n × (k + p), against ≈ 9n³ for a full eigendecomposition. Exact (to round-off) whenever rank(M) ≤ k + p:
the basis then spans the range of M. Otherwise the error of the j-th Ritz pair shrinks like
(w_{k+p+1}/w_j)^{2·power_iters+1}.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fisherlab.errors import InputError

__all__ = ["top_eigh"]


def top_eigh(M: Tensor, k: int, *, oversample: int = 10, power_iters: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """The k largest eigenpairs of a symmetric matrix M (n, n).

    Args:
        M: Symmetric matrix (n, n) (only sym(M) is used); floating dtype, any device.
        k: Number of eigenpairs, 1 ≤ k ≤ n.
        oversample: Extra columns p of the test matrix (the basis has min(n, k + p) columns).
        power_iters: Rounds of subspace iteration (0: a single sketch).
        seed: Seed of the Gaussian test matrix (drawn on M's device: the same seed gives the same result there).

    Returns:
        (w (k,), U (n, k)): Ritz values in descending order and orthonormal Ritz vectors, in M's dtype.

    Raises:
        InputError: M not square, or k, oversample, power_iters out of range.
    """
    if M.dim() != 2 or M.shape[0] != M.shape[1] or not M.is_floating_point():
        raise InputError(f"top_eigh needs a square floating matrix; got {tuple(M.shape)} {M.dtype}")
    n = M.shape[0]
    if not (isinstance(k, int) and 1 <= k <= n):
        raise InputError(f"k must be an integer in [1, {n}]; got {k!r}")
    for value, name in ((oversample, "oversample"), (power_iters, "power_iters")):
        if not (isinstance(value, int) and value >= 0):
            raise InputError(f"{name} must be an integer ≥ 0; got {value!r}")
    M = 0.5 * (M + M.T)
    width = min(n, k + oversample)
    if width == n:  # the sketch would span everything: a full eigendecomposition is cheaper and exact
        w, U = torch.linalg.eigh(M)
        return w.flip(0)[:k], U.flip(1)[:, :k]
    gen = torch.Generator(device=M.device).manual_seed(seed)
    Q = torch.randn(n, width, generator=gen, dtype=M.dtype, device=M.device)
    for _ in range(power_iters + 1):
        Q = torch.linalg.qr(M @ Q).Q
    w, V = torch.linalg.eigh(Q.T @ M @ Q)
    return w.flip(0)[:k], (Q @ V.flip(1))[:, :k]
