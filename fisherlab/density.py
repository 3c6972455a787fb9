"""Spectral density of a Fisher too large to form, by stochastic Lanczos quadrature (kind ``"spectral_density"``).

F is applied matrix-free (:func:`fisherlab.fisher` with ``structure="implicit"``: one ``jvp`` and one ``vjp`` per
chunk of samples), and :func:`fisherlab.linalg.slq_density` runs ``num_steps`` Lanczos steps from each of
``num_probes`` Rademacher probes. Per probe p this gives Ritz values θ_{p,i} (nodes) and quadrature weights
τ_{p,i} ≥ 0 summing to 1, so that (1/P) tr f(F) ≈ mean_p Σ_i τ_{p,i} f(θ_{p,i}) (exact for polynomials of degree
< 2·num_steps; the error over probes is that of Hutchinson's estimator).

Fisher spectra span many decades and are often rank deficient (rank ≤ N·R < P), so the density is reported for
u = log10 λ over the eigenvalues above ``floor`` = ``rel_floor`` · θ_max, with the mass below it counted apart:

    ψ(u) = mean_p Σ_{θ_{p,i} > floor} τ_{p,i} N(u; log10 θ_{p,i}, σ²),        null_fraction = 1 − ∫ψ,

ψ integrates (over the grid, which covers the nodes ± 4σ) to the estimated fraction of eigenvalues above the
floor. Lanczos resolves the bottom of the spectrum only to its own resolution: with num_steps ≪ P the mass of
exact zeros (e.g. an empirical Fisher of rank ≤ N < P) lands on one Ritz value well above 0 — about 3e-7·θ_max
for the digits MLP with 512 samples and 64 steps — so the default floor is 1e-6·θ_max, not round-off level.

Variables: ``nodes`` and ``weights`` (dims ``fisher_kind``, ``probe``, ``node``), ``density``
(``fisher_kind``, ``log10_eigenvalue``), and per kind ``trace`` (P · mean_p Σ_i τθ) with its standard error over
probes ``trace_stderr``, ``lambda_max`` (the largest Ritz value: a lower bound of λ_max, tight after a few dozen
steps) and ``null_fraction``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fisherlab import results
from fisherlab.engine import FisherType, parse_enum
from fisherlab.errors import InputError
from fisherlab.fisher import fisher
from fisherlab.linalg import slq_density

__all__ = ["spectral_density"]


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
        rel_floor: Eigenvalues at or below ``rel_floor`` · θ_max count as null (``null_fraction``).
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
    kinds = list(dict.fromkeys(parse_enum(FisherType, k, "Fisher kind").value for k in kinds))
    for value, name in ((num_probes, "num_probes"), (num_steps, "num_steps"), (grid_points, "grid_points")):
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "grid_points" else 1):
            raise InputError(f"{name} must be a positive integer; got {value!r}")
    if not (isinstance(rel_floor, (int, float)) and 0 < rel_floor < 1):
        raise InputError(f"rel_floor must be in (0, 1); got {rel_floor!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise InputError(f"sigma must be a positive number (decades); got {sigma!r}")
    nodes, weights = [], []
    P = num_samples = 0
    for kind in tqdm(kinds, desc="SLQ spectral density", disable=progress is False):
        F = fisher(model, data, likelihood, kind=kind, structure="implicit", mc_samples=mc_samples, seed=seed,
                   dtype=dtype, device=device, chunk_size=chunk_size, memory_budget=memory_budget, progress=progress)
        P, num_samples = F.shape[0], F.meta["num_samples"]
        theta, tau = slq_density(F.matvec, P, num_probes=num_probes, num_steps=num_steps, seed=seed, dtype=dtype,
                                 device=F.device)
        nodes.append(theta.cpu().double().numpy())
        weights.append(tau.cpu().double().numpy())
    theta, tau = np.stack(nodes), np.stack(weights)  # (kinds, probes, m)
    lam_max = theta.max(axis=(1, 2))
    above = theta > rel_floor * lam_max[:, None, None]
    log_theta = np.log10(np.where(above, theta, 1.0))
    lo = min(float(log_theta[k][above[k]].min()) if above[k].any() else 0.0 for k in range(len(kinds))) - 4 * sigma
    grid = np.linspace(lo, float(np.log10(lam_max.max())) + 4 * sigma, grid_points)
    kernel = np.exp(-0.5 * ((grid[None, None, None, :] - log_theta[..., None]) / sigma) ** 2) / (
        sigma * math.sqrt(2 * math.pi))
    density = (np.where(above, tau, 0.0)[..., None] * kernel).sum(2).mean(1)  # (kinds, grid)
    per_probe_trace = P * (tau * theta).sum(-1)  # (kinds, probes)
    ds = results.new_dataset(
        "spectral_density",
        {
            "nodes": (("fisher_kind", "probe", "node"), theta),
            "weights": (("fisher_kind", "probe", "node"), tau),
            "density": (("fisher_kind", "log10_eigenvalue"), density),
            "trace": (("fisher_kind",), per_probe_trace.mean(1)),
            "trace_stderr": (("fisher_kind",), per_probe_trace.std(1, ddof=1) / math.sqrt(num_probes)
                             if num_probes > 1 else np.full(len(kinds), np.nan)),
            "lambda_max": (("fisher_kind",), lam_max),
            "null_fraction": (("fisher_kind",), 1.0 - np.where(above, tau, 0.0).sum(-1).mean(-1)),
        },
        {"fisher_kind": kinds, "probe": np.arange(theta.shape[1]), "node": np.arange(theta.shape[2]),
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
        "null_fraction": ("estimated fraction of eigenvalues ≤ rel_floor · λ_max", "1"),
        "log10_eigenvalue": ("log10 of the eigenvalue λ (λ in nats)", "1"),
    })
