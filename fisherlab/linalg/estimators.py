"""Matrix-free stochastic estimators of tr(A) and diag(A) from products v ↦ A v.

``matvec`` maps a vector (n,) to A v (n,). With ``batched=True`` it is instead called once with a block
(n, k) and must return A V (n, k) — e.g. ``ImplicitFisher.matmat``.

* :func:`hutchinson_trace` — tr(A) ≈ (1/m) Σ_i z_iᵀ A z_i with E[z zᵀ] = I (Hutchinson, 1990); the standard
  error is the sample standard deviation of z_iᵀ A z_i over √m.
* :func:`hutchpp_trace` — Hutch++ (Meyer, Musco, Musco & Woodruff, 2021): with m products, m/3 sketch a range
  basis Q of A S, tr(Qᵀ A Q) is taken exactly (m/3 products) and Hutchinson with the remaining m/3 probes
  estimates the trace of the deflated (I − QQᵀ) A (I − QQᵀ). Error O(1/m) instead of O(1/√m) for
  matrices with decaying spectra (Fisher matrices).
* :func:`hutchinson_diag` — diag(A) ≈ Σ_i z_i ⊙ A z_i / Σ_i z_i ⊙ z_i (Bekas, Kokiopoulou & Saad, 2007).

Probes are ``"rademacher"`` (±1 entries, the minimum-variance choice for a fixed matrix) or
``"gaussian"`` (standard normal). They are drawn from a local ``torch.Generator`` on ``device`` seeded with
``seed``; the global RNG is untouched. Random streams differ between device types, so a given seed gives
the same probes on every run on the same kind of device, not across CPU and CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fisherlab.errors import InputError, NonFiniteError
from fisherlab.linalg.solve import _check_option

__all__ = ["PROBE_DISTRIBUTIONS", "hutchinson_diag", "hutchinson_trace", "hutchpp_trace"]

PROBE_DISTRIBUTIONS: tuple[str, ...] = ("rademacher", "gaussian")

Matvec = Callable[[Tensor], Tensor]

# --------------------------------------------------------------------------------------------------------
# shared helpers (private; also used by krylov)
# --------------------------------------------------------------------------------------------------------


def _resolve(
    dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    """Default dtype (torch default) and device (cpu); validate that dtype is floating."""
    dt = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise InputError(f"dtype must be a real floating torch.dtype, got {dtype!r}")
    dev = torch.device("cpu") if device is None else torch.device(device)
    return dt, dev


def _generator(seed: int, device: torch.device) -> torch.Generator:
    if not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _check_pos_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _probes(
    n: int, k: int, gen: torch.Generator, dtype: torch.dtype, device: torch.device, distribution: str
) -> Tensor:
    """Draw k probe vectors as the columns of an (n, k) tensor."""
    _check_option(distribution, PROBE_DISTRIBUTIONS, "distribution")
    if distribution == "rademacher":
        z = torch.randint(0, 2, (n, k), generator=gen, device=device).to(dtype)
        return 2.0 * z - 1.0
    return torch.randn(n, k, generator=gen, device=device, dtype=dtype)


def _apply(matvec: Matvec, v: Tensor, name: str = "matvec") -> Tensor:
    """matvec(v) with a shape check (the result must have v's shape); cast to v's dtype."""
    out = matvec(v)
    if not isinstance(out, Tensor):
        raise InputError(f"{name} must return a torch.Tensor, got {type(out).__name__}")
    if out.shape != v.shape:
        raise InputError(f"{name} maps an input of shape {tuple(v.shape)} to shape {tuple(out.shape)}; "
                         "expected the same shape")
    return out.to(v.dtype)


def _apply_columns(matvec: Matvec, V: Tensor, batched: bool) -> Tensor:
    """Compute A V for a block V (n, k): one batched call, or one call per column."""
    if batched:
        return _apply(matvec, V, "matvec (batched)")
    if V.shape[1] == 0:
        return V.clone()
    return torch.stack([_apply(matvec, V[:, j]) for j in range(V.shape[1])], dim=1)


def _finite_or_raise(x: Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(f"{what} contains NaN or inf (the matvec returned non-finite values)")


def _mean_stderr(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard error (sample std / √m) of a 1-D sample; stderr is inf for one sample."""
    m = samples.numel()
    mean = samples.mean()
    if m < 2:
        return mean, torch.full((), math.inf, dtype=samples.dtype, device=samples.device)
    return mean, samples.std(correction=1) / math.sqrt(m)


# --------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------


def hutchinson_trace(
    matvec: Matvec,
    n: int,
    num_probes: int = 100,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    distribution: str = "rademacher",
    *,
    batched: bool = False,
    quadratic_forms: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate of tr(A) and its standard error.

    tr(A) ≈ (1/m) Σ_{i=1..m} z_iᵀ A z_i, z_i i.i.d. with E[z zᵀ] = I; for Rademacher probes
    Var[zᵀ A z] = 2 (‖A‖_F² − Σ_j A_jj²), for Gaussian 2 ‖A‖_F² (A symmetric).

    Args:
        matvec: v (n,) ↦ A v (n,) (or (n, k) ↦ (n, k) with ``batched=True``).
        n: Dimension of A.
        num_probes: m ≥ 1 probes (= matvecs).
        seed: Seed of the local generator.
        dtype: Probe dtype (default: torch's default dtype).
        device: Probe device (default: cpu).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        batched: Call ``matvec`` once on the (n, m) block of probes.
        quadratic_forms: Z (n, m) ↦ (z_iᵀ A z_i)_i (m,), called once on the probes instead of ``matvec``
            (which is then not called), e.g. :meth:`fisherlab.structures.FisherMatrix.quadratic_forms`: the
            implicit Fisher's needs forward mode only, no product A z.

    Returns:
        (estimate, stderr) as 0-d tensors; stderr = sample std / √m (inf when m = 1).

    Raises:
        InputError: Bad n, num_probes, dtype or distribution, or a matvec returning the wrong shape.
        NonFiniteError: The matvec returned NaN/inf.
    """
    _check_pos_int(n, "n")
    _check_pos_int(num_probes, "num_probes")
    _check_option(distribution, PROBE_DISTRIBUTIONS, "distribution")
    dt, dev = _resolve(dtype, device)
    gen = _generator(seed, dev)
    Z = _probes(n, num_probes, gen, dt, dev, distribution)
    if quadratic_forms is None:
        samples = (Z * _apply_columns(matvec, Z, batched)).sum(0)
    else:
        samples = quadratic_forms(Z)
        if not isinstance(samples, Tensor) or samples.shape != (num_probes,):
            raise InputError(f"quadratic_forms must return a tensor of shape ({num_probes},) for the "
                             f"({n}, {num_probes}) probes; got "
                             f"{tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__}")
    _finite_or_raise(samples, "hutchinson_trace samples")
    return _mean_stderr(samples)


def hutchpp_trace(
    matvec: Matvec,
    n: int,
    num_matvecs: int = 102,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    distribution: str = "rademacher",
    *,
    batched: bool = False,
) -> tuple[Tensor, Tensor]:
    """Hutch++ estimate of tr(A) for symmetric A using ``num_matvecs`` products.

    With s = ⌊m/3⌋ and g = m − 2s: S (n, s) random, Q = orth(A S); then

        tr(A) ≈ tr(Qᵀ A Q) + (1/g) Σ_i ẑ_iᵀ A ẑ_i,   ẑ_i = (I − QQᵀ) z_i,

    (Meyer et al., 2021, Algorithm 1). The first term is exact given Q; the standard error reported is that
    of the second (Hutchinson) term.

    Args:
        matvec: v (n,) ↦ A v (n,) (or a block with ``batched=True``).
        n: Dimension of A.
        num_matvecs: m ≥ 3 products in total.
        seed: Seed of the local generator.
        dtype: Probe dtype (default: torch's default dtype).
        device: Probe device (default: cpu).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        batched: Call ``matvec`` on blocks (n, k).

    Returns:
        (estimate, stderr) as 0-d tensors (stderr inf when g = 1).

    Raises:
        InputError: Bad arguments or num_matvecs < 3.
        NonFiniteError: The matvec returned NaN/inf.
    """
    _check_pos_int(n, "n")
    _check_pos_int(num_matvecs, "num_matvecs", 3)
    _check_option(distribution, PROBE_DISTRIBUTIONS, "distribution")
    dt, dev = _resolve(dtype, device)
    gen = _generator(seed, dev)
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    S = _probes(n, s, gen, dt, dev, distribution)
    G = _probes(n, g, gen, dt, dev, distribution)
    AS = _apply_columns(matvec, S, batched)
    _finite_or_raise(AS, "hutchpp_trace sketch A S")
    Q, _ = torch.linalg.qr(AS, mode="reduced")
    AQ = _apply_columns(matvec, Q, batched)
    t_low = (Q * AQ).sum()
    Gp = G - Q @ (Q.mT @ G)
    AGp = _apply_columns(matvec, Gp, batched)
    samples = (Gp * AGp).sum(0)
    _finite_or_raise(torch.cat([samples, t_low.reshape(1)]), "hutchpp_trace products")
    mean, stderr = _mean_stderr(samples)
    return t_low + mean, stderr


def hutchinson_diag(
    matvec: Matvec,
    n: int,
    num_probes: int = 100,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    distribution: str = "rademacher",
    *,
    batched: bool = False,
) -> Tensor:
    """Stochastic estimate of diag(A): Σ_i z_i ⊙ A z_i / Σ_i z_i ⊙ z_i.

    Entry j has error of order sqrt(Σ_{l≠j} A_jl² / m) for Rademacher probes (for which z ⊙ z = 1).

    Args:
        matvec: v (n,) ↦ A v (n,) (or a block with ``batched=True``).
        n: Dimension of A.
        num_probes: m ≥ 1 probes.
        seed: Seed of the local generator.
        dtype: Probe dtype (default: torch's default dtype).
        device: Probe device (default: cpu).
        distribution: ``"rademacher"`` or ``"gaussian"``.
        batched: Call ``matvec`` once on the (n, m) probe block.

    Returns:
        The diagonal estimate (n,).

    Raises:
        InputError: Bad arguments.
        NonFiniteError: The matvec returned NaN/inf.
    """
    _check_pos_int(n, "n")
    _check_pos_int(num_probes, "num_probes")
    _check_option(distribution, PROBE_DISTRIBUTIONS, "distribution")
    dt, dev = _resolve(dtype, device)
    gen = _generator(seed, dev)
    Z = _probes(n, num_probes, gen, dt, dev, distribution)
    AZ = _apply_columns(matvec, Z, batched)
    est = (Z * AZ).sum(1) / (Z * Z).sum(1)
    _finite_or_raise(est, "hutchinson_diag estimate")
    return est
