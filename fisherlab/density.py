"""Spectral density of a Fisher too large to form, by stochastic Lanczos quadrature (kind ``"spectral_density"``).

F is applied matrix-free (:func:`fisherlab.fisher` with ``structure="implicit"``: one ``jvp`` and one ``vjp`` per
chunk of samples), and :func:`fisherlab.linalg.slq_density` runs ``num_steps`` Lanczos steps from each of
``num_probes`` Rademacher probes. Per probe p this gives Ritz values θ_{p,i} (nodes) and quadrature weights
τ_{p,i} ≥ 0 summing to 1, so that (1/P) tr f(F) ≈ mean_p Σ_i τ_{p,i} f(θ_{p,i}) (exact for polynomials of degree
< 2·num_steps; the error over probes is that of Hutchinson's estimator).

Fisher spectra are often rank deficient (rank F ≤ N·R, R factor rows per sample: C − 1 for the true categorical
Fisher, 1 for the empirical one, S for the Monte-Carlo one with S labels), so the null space is measured apart.
With v = z/√P (E[v vᵀ] = I/P), the null fraction ν = dim ker F / P is E‖Π₀v‖², Π₀ the projector on ker F, and
‖Π₀v‖² is the mass at 0 of the probe's spectral measure μ_v. The Ritz node nearest 0 does not measure it: with
num_steps ≪ P it sits above 0 (≈ 5e-6·θ_max for the true Fisher of the digits MLP with 128 samples and 64
steps, above any fixed round-off cut) and carries the mass of the small nonzero eigenvalues too (0.77 there,
against a dense null fraction of 0.668). Instead, per probe (``null_mass``),

    ν_p = λ_m(0) if min_i θ_{p,i} ≤ ε, else 0,

with λ_m(0) the Christoffel function (:func:`fisherlab.linalg.krylov.slq_point_mass`): the largest mass at 0 of
any measure with the moments vᵀFᵏv the run measured, so ‖Π₀v‖² ≤ λ_m(0), with equality once the m steps separate
0 from the smallest nonzero eigenvalue λ₊. ε (``null_resolution``, nats) is the Lanczos resolution at 0: the
degree-(m − 1) Chebyshev polynomial q with q(0) = 1 has q² ≤ δ = 0.01 on [ε, λ_max], i.e.
4 / (γ + √(γ² − 1))^{2(m−1)} = δ with γ = (λ_max + ε)/(λ_max − ε), so ε ≈ λ_max·(ln(4/δ) / (4(m − 1)))²
(5.6e-4·λ_max for m = 64). If every node exceeds ε then ‖Π₀v‖² ≤ Σ_i τ_i q(θ_i)² ≤ δ (Gauss is exact for q²),
so 0 is right within δ; in general E ν_p ≤ ν(λ < ε) + δ: eigenvalues below ε may count as null. A probe whose
run broke down (an invariant subspace) or ran P steps has its exact measure, and its ε is round-off,
√eps·λ_max. Per kind:

* ``null_fraction`` = mean_p ν_p, clipped to [``null_fraction_lower``, 1] ⊂ [0, 1];
* ``null_fraction_stderr``: the standard error of mean_p ν_p over probes (≈ √(2ν(1 − ν)/P / num_probes));
* ``null_fraction_lower`` = max(0, 1 − N·R/P), from rank F ≤ N·R (no probes: exact);
* ``null_resolution``: ε, the largest over probes.

So ``null_fraction`` agrees with the dense count of zero eigenvalues within ``null_fraction_stderr`` when
λ₊ ≫ ε, and is biased up by the eigenvalues below ε otherwise; the count then lies in [``null_fraction_lower``,
``null_fraction`` + 2·``null_fraction_stderr``]. More steps shrink ε like 1/m². For N·R < P the rank bound is
attained unless the factor rows are linearly dependent, so when the two differ by many standard errors the
difference is mostly unresolved small eigenvalues. Digits MLP (P = 3466), 64 steps, dense count → estimate:
true Fisher, 128 samples, 0.668 → 0.718 ± 0.002 (0.688 with 96 steps; lower bound 0.668); empirical Fisher,
all 1347 samples, 0.611 → 0.698 ± 0.002 (lower bound 0.611); empirical Fisher, 128 samples, 0.963 → 0.965 ± 0.001.

The density of u = log10 λ is drawn from the nodes above ``floor`` = ``rel_floor`` · θ_max, with each probe's
null mass ν_p taken off its lowest node (ν_p ≤ τ of that node):

    ψ(u) = mean_p Σ_{θ_{p,i} > floor} τ'_{p,i} N(u; log10 θ_{p,i}, σ²),   τ' = τ less ν_p on the lowest node,

so ψ integrates (over the grid, the nodes ± 4σ) to 1 − mean_p ν_p less the non-null weight of nodes at or below
the floor (≈ 0 unless Lanczos leaves small nonzero eigenvalues there); the null mass is no spike in ψ.

Variables: ``nodes`` and ``weights`` (dims ``kind``, ``probe``, ``node``; the raw Gauss rule), ``density``
(``kind``, ``log10_eigenvalue``), and per kind ``trace`` (P · mean_p Σ_i τθ) with its standard error over
probes ``trace_stderr``, ``lambda_max`` (the largest Ritz value: a lower bound of λ_max, tight after a few dozen
steps), ``null_fraction``, ``null_fraction_stderr``, ``null_fraction_lower``, ``null_resolution``, and
``null_mass`` (``kind``, ``probe``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from fisherlab import results
from fisherlab.checks import check_dtype, parse_enum
from fisherlab.errors import InputError
from fisherlab.fisher_matrix import fisher
from fisherlab.linalg import slq_density
from fisherlab.linalg.krylov import slq_point_mass
from fisherlab.progress import bar as progress_bar
from fisherlab.vocabulary import FisherKind

__all__ = ["spectral_density"]


#: δ of the resolution ε: a probe whose Ritz values all exceed ε has at most δ of its norm² in the null space.
_NULL_DELTA = 0.01


def _lanczos_resolution(num_steps: int, delta: float = _NULL_DELTA) -> float:
    """ε / λ_max below which m = ``num_steps`` Lanczos steps cannot tell an eigenvalue from 0, at level δ.

    The degree-(m − 1) Chebyshev polynomial q on [ε, λ_max] with q(0) = 1 has q² ≤ δ there when
    4 / (γ + √(γ² − 1))^{2(m−1)} = δ, γ = (λ_max + ε)/(λ_max − ε); this returns that ε / λ_max (1 for m = 1).
    """
    if num_steps < 2:
        return 1.0
    g = (4 / delta) ** (1 / (2 * (num_steps - 1)))
    gamma = (g + 1 / g) / 2
    return (gamma - 1) / (gamma + 1)


def _null_mass(theta: np.ndarray, tau: np.ndarray, christoffel: np.ndarray, lam_max: np.ndarray, P: int,
               eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per probe, the null-space mass ν_p and the cut ε_p it was judged at (module docstring).

    Args:
        theta: Nodes (kinds, probes, m), in nats.
        tau: Weights (kinds, probes, m), zero on the padding after a breakdown.
        christoffel: λ_m(0) per probe (kinds, probes).
        lam_max: Largest node per kind (kinds,), in nats.
        P: Dimension of F.
        eps: Machine epsilon of the compute dtype.

    Returns:
        (ν (kinds, probes) in [0, 1], ε (kinds, probes) in nats).

    ν_p = λ_m(0) when the lowest node is at or below ε_p, else 0: then every node lies in [ε_p, λ_max], where the
    Chebyshev q of :func:`_lanczos_resolution` has q² ≤ δ, so ‖Π₀v‖² ≤ ∫q² dμ_v = Σ τ q(θ)² ≤ δ (Gauss is exact
    for q², of degree 2m − 2). A run that broke down early (fewer positive weights than nodes), or ran P steps,
    is the probe's exact measure: its cut is round-off, √eps · λ_max.
    """
    steps = (tau > 0).sum(-1)  # (kinds, probes)
    m = theta.shape[-1]
    exact = (steps < m) | (steps >= P)
    rel = np.where(exact, math.sqrt(eps), _lanczos_resolution(m))
    cut = rel * lam_max[:, None]
    low = np.where(tau > 0, theta, np.inf).min(-1)
    return np.where(low <= cut, np.clip(christoffel, 0.0, 1.0), 0.0), cut


def spectral_density(
    model: nn.Module,
    data: Any,
    likelihood: str = "categorical",
    *,
    kinds: Sequence[str] = ("true",),
    num_probes: int = 10,
    num_steps: int = 64,
    rel_floor: float = 1e-6,
    sigma: float = 0.05,
    grid_points: int = 400,
    mc_samples: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    progress: bool | None = None,
    config: dict | None = None,
) -> Any:
    """SLQ spectral density of the Fisher kinds ``kinds`` of ``model`` on ``data`` (module docstring).

    Args:
        model: Any ``nn.Module`` (eval mode if it has batch-norm or dropout).
        data: ``(X, y)``, a SplitData (training split) or a DataLoader.
        likelihood: Likelihood name.
        kinds: Fisher kinds (``true``, ``mc``, ``empirical``, ``ggn``).
        num_probes: Rademacher probes (the trace's standard error falls like 1/√num_probes).
        num_steps: Lanczos steps per probe (capped at P).
        rel_floor: Nodes at or below ``rel_floor`` · θ_max are left out of the log10 λ density (the null mass is
            measured apart, module docstring).
        sigma: Kernel width in decades of λ (units of log10 λ).
        grid_points: Points of the log10 λ grid.
        mc_samples: Labels per input for the Monte-Carlo Fisher.
        seed: Seed of the probes (and of the Monte-Carlo labels).
        dtype: Compute dtype (float64: Lanczos loses orthogonality fast in float32).
        device: Compute device.
        chunk_size: Samples per chunk of the matrix-free products.
        memory_budget: Bytes a dense object may take (only chunks are formed here).
        progress: Progress bar (``None``: only on a terminal).
        config: Extra configuration recorded in the provenance attrs.

    Returns:
        The ``"spectral_density"`` Dataset.

    Raises:
        InputError: Bad counts, ``rel_floor`` outside (0, 1), ``sigma`` ≤ 0, unknown Fisher kind.
    """
    kinds = list(dict.fromkeys(parse_enum(FisherKind, k, "Fisher kind").value for k in kinds))
    dtype = check_dtype(dtype)
    for value, name in ((num_probes, "num_probes"), (num_steps, "num_steps"), (grid_points, "grid_points")):
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "grid_points" else 1):
            raise InputError(f"{name} must be a positive integer; got {value!r}")
    if not (isinstance(rel_floor, (int, float)) and 0 < rel_floor < 1):
        raise InputError(f"rel_floor must be in (0, 1); got {rel_floor!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma must be a positive number (decades); got {sigma!r}")
    nodes, weights, christoffel, lower = [], [], [], []
    P = num_samples = 0
    for kind in progress_bar(kinds, desc="SLQ spectral density", progress=progress):
        F = fisher(model, data, likelihood, kind=kind, structure="implicit", mc_samples=mc_samples, seed=seed,
                   dtype=dtype, device=device, chunk_size=chunk_size, memory_budget=memory_budget, progress=progress)
        P, num_samples = F.shape[0], F.meta["num_samples"]
        theta, tau = slq_density(F.matvec, P, num_probes=num_probes, num_steps=num_steps, seed=seed, dtype=dtype,
                                 device=F.device)
        nodes.append(theta.cpu().double().numpy())
        weights.append(tau.cpu().double().numpy())
        christoffel.append(slq_point_mass(theta, tau, 0.0).cpu().double().numpy())
        lower.append(max(0.0, 1.0 - num_samples * F.engine.rows_per_sample / P))  # rank F ≤ N·R
    theta, tau = np.stack(nodes), np.stack(weights)  # (kinds, probes, m)
    lam_max = theta.max(axis=(1, 2))
    nu, cut = _null_mass(theta, tau, np.stack(christoffel), lam_max, P, torch.finfo(dtype).eps)  # (kinds, probes)
    lowest = np.where(tau > 0, theta, np.inf).argmin(-1)[..., None]  # (kinds, probes, 1)
    tau_drawn = tau.copy()
    tau_low = np.take_along_axis(tau, lowest, -1)
    np.put_along_axis(tau_drawn, lowest, tau_low - np.minimum(nu[..., None], tau_low), -1)
    above = theta > rel_floor * lam_max[:, None, None]
    log_theta = np.log10(np.where(above, theta, 1.0))
    lo = min(float(log_theta[k][above[k]].min()) if above[k].any() else 0.0 for k in range(len(kinds))) - 4 * sigma
    grid = np.linspace(lo, float(np.log10(lam_max.max())) + 4 * sigma, grid_points)
    kernel = np.exp(-0.5 * ((grid[None, None, None, :] - log_theta[..., None]) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi))
    density = (np.where(above, tau_drawn, 0.0)[..., None] * kernel).sum(2).mean(1)  # (kinds, grid)
    per_probe_trace = P * (tau * theta).sum(-1)  # (kinds, probes)
    ds = results.new_dataset(
        "spectral_density",
        {
            "nodes": (("kind", "probe", "node"), theta),
            "weights": (("kind", "probe", "node"), tau),
            "density": (("kind", "log10_eigenvalue"), density),
            "trace": (("kind",), per_probe_trace.mean(1)),
            "trace_stderr": (("kind",), per_probe_trace.std(1, ddof=1) / math.sqrt(num_probes)
                             if num_probes > 1 else np.full(len(kinds), np.nan)),
            "lambda_max": (("kind",), lam_max),
            "null_mass": (("kind", "probe"), nu),
            "null_fraction": (("kind",), np.clip(nu.mean(1), lower, 1.0)),
            "null_fraction_stderr": (("kind",), nu.std(1, ddof=1) / math.sqrt(num_probes)
                                     if num_probes > 1 else np.full(len(kinds), np.nan)),
            "null_fraction_lower": (("kind",), np.array(lower)),
            "null_resolution": (("kind",), cut.max(1)),
        },
        {"kind": kinds, "probe": np.arange(theta.shape[1]), "node": np.arange(theta.shape[2]),
         "log10_eigenvalue": grid},
        config={"likelihood": likelihood, "kinds": kinds, "num_probes": num_probes, "num_steps": num_steps,
                "rel_floor": rel_floor, "sigma": sigma, "grid_points": grid_points, "mc_samples": mc_samples,
                "num_samples": num_samples, "num_params": P, **(config or {})},
        seed=seed, device=device or next(iter(model.parameters())).device, dtype=dtype,
    )
    return results.annotate(ds, {
        "nodes": ("Ritz values θ of the Lanczos runs (SLQ nodes)", *results.NATS),
        "weights": ("SLQ quadrature weights τ (sum to 1 per probe)", "1"),
        "density": ("smoothed density of log10 λ over eigenvalues above the floor (per decade)", "1"),
        "trace": ("SLQ estimate of tr F", *results.NATS),
        "trace_stderr": ("standard error of the trace estimate over probes", *results.NATS),
        "lambda_max": ("largest Ritz value (a lower bound of λ_max)", *results.NATS),
        "null_mass": ("per probe, the estimate of the probe's norm² in the null space (module docstring)", "1"),
        "null_fraction": ("SLQ estimate of the fraction of zero eigenvalues, mean over probes of the Christoffel "
                          "function at 0 (an upper bound: counts eigenvalues below null_resolution too), clipped "
                          "to [null_fraction_lower, 1]", "1"),
        "null_fraction_stderr": ("standard error of null_fraction over probes", "1"),
        "null_fraction_lower": ("lower bound of the null fraction from rank F ≤ N·R (R factor rows per sample)",
                                "1"),
        "null_resolution": ("eigenvalue below which the Lanczos runs cannot tell λ from 0 (mean Christoffel "
                            "weight at 0 ≤ fraction of eigenvalues below it + 0.01)", *results.NATS),
        "log10_eigenvalue": ("log10 of the eigenvalue λ (λ in nats)", "1"),
    })
