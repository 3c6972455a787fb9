"""spectral_density (SLQ on the implicit Fisher) against the dense brute-force Fisher's eigendecomposition.

The null fraction's reference is the count of eigenvalues ≤ ``DENSE_TOL`` · λ_max of the float64 brute-force
Fisher (torch.linalg.eigvalsh): round-off puts exact zeros at ~1e-16 · λ_max, and every case here has its
smallest nonzero eigenvalue above 1e-5 · λ_max, so the count is the same for any tolerance in [1e-13, 1e-6]
(checked).
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from cases import MLP, Case, cnn2d, mlp
from torch import nn

from fisherlab.density import spectral_density
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError
from fisherlab.linalg import slq_density
from fisherlab.linalg.krylov import slq_point_mass
from fisherlab.report import build_report
from fisherlab.results import load_dataset, save_dataset

DT = torch.float64
DENSE_TOL = 1e-10


def dense_null_fraction(F: torch.Tensor) -> float:
    """Fraction of the eigenvalues of the dense float64 Fisher F (P, P) at or below DENSE_TOL · λ_max."""
    w = torch.linalg.eigvalsh(F).numpy()
    counts = {tol: float(np.mean(w <= tol * w.max())) for tol in (1e-13, DENSE_TOL, 1e-6)}
    assert len(set(counts.values())) == 1, f"no clean gap above round-off: {counts}"
    return counts[DENSE_TOL]


@pytest.fixture(scope="module")
def case():
    model, X, y = MLP.build(DT)
    w = torch.linalg.eigvalsh(ref.true_fisher(model, X, ref.RefLikelihood("categorical"))).numpy()
    P = len(w)
    ds = spectral_density(model, (X, y), num_probes=60, num_steps=P, seed=2, progress=False)
    return model, X, y, w, ds


def test_ritz_values_and_trace(case) -> None:
    _, _, _, w, ds = case
    at = ds.sel({"kind": "true"})
    # as many Lanczos steps as P (full reorthogonalisation): the largest Ritz value is λ_max
    assert float(at.lambda_max) == pytest.approx(w.max(), rel=1e-8)
    assert float(at.trace_stderr) > 0
    assert abs(float(at.trace) - w.sum()) < 4 * float(at.trace_stderr)
    np.testing.assert_allclose(ds.weights.sum("node").values, 1.0, atol=1e-10)


def test_null_fraction_and_density_mass(case) -> None:
    _, X, _, w, ds = case
    at = ds.sel({"kind": "true"})
    null = np.mean(w <= DENSE_TOL * w.max())
    assert null > 0.5  # rank ≤ N·(C − 1) = 16 of P: mostly null
    # P steps: every run breaks down on its invariant subspace, so each probe's null mass is exact
    assert abs(float(at.null_fraction) - null) <= min(0.05, 4 * float(at.null_fraction_stderr))
    assert float(at.null_fraction_lower) == pytest.approx(1 - 16 / len(w))  # rank F ≤ N·(C − 1)
    mass = np.trapezoid(at.density.values, ds.log10_eigenvalue.values)  # the null mass is not drawn
    assert mass == pytest.approx(1 - float(at.null_mass.mean()), abs=1e-3)


def test_dataset_round_trip_and_report(case, tmp_path) -> None:
    _, _, _, _, ds = case
    save_dataset(ds, tmp_path / "density.nc")
    back = load_dataset(tmp_path / "density.nc", kind="spectral_density",
                        required_dims=("kind", "probe", "node", "log10_eigenvalue"))
    assert back.density.attrs["units"] == "1" and back.trace.attrs["comment"] == "natural-log units (nats)"
    page = build_report(tmp_path).read_text()
    assert "density.nc" in page and "null fraction" in page


def test_point_mass_is_the_christoffel_function_of_the_probe_measure() -> None:
    """slq_point_mass against min over q (deg q < m, q(0) = 1) of Σ_j (u_jᵀv)² q(λ_j)², solved by least squares."""
    n = 200
    lam = torch.cat([torch.zeros(60, dtype=DT), torch.logspace(-3, 0, n - 60, dtype=DT)])
    A = torch.diag(lam)  # eigenvectors e_j and Rademacher probes v = z/√n: every probe's measure puts 1/n on each λ_j
    t = 2 * lam / lam.max() - 1
    sw = torch.full((n, 1), 1 / n, dtype=DT).sqrt()
    for m in (4, 10):
        nodes, weights = slq_density(lambda v: A @ v, n, num_probes=3, num_steps=m, seed=1, dtype=DT)
        mass = slq_point_mass(nodes, weights)
        # q = 1 + Σ_k c_k (T_k(t) − T_k(−1)): Chebyshev polynomials on [0, λ_max], shifted to vanish at λ = 0
        phi = torch.stack([torch.cos(k * torch.arccos(t)) - (-1.0) ** k for k in range(1, m)], 1)
        c = torch.linalg.lstsq(sw * phi, -sw).solution
        expected = float(((sw * (1 + phi @ c)) ** 2).sum())
        np.testing.assert_allclose(mass.numpy(), expected, rtol=1e-7)
        # ‖Π₀v‖² = 60/n ≤ λ_m(0) ≤ the weight of the lowest Ritz node
        assert (mass >= 60 / n).all() and (mass <= weights[:, 0]).all()


# Rank-deficient cases in which the null mass sits on Ritz values 1e-9 … 1e-5 · λ_max, well above round-off (no run
# breaks down: m < rank): (case, kind, Lanczos steps, probes). The old estimator (weight of the nodes at or below
# 1e-6 · θ_max) gave 0.52, 0.18 and 0.83 here, against dense counts of 0.84, 0.87 and 0.83.
RANK_DEFICIENT = {
    "true-mlp": (Case("mlp-6-10-4", lambda: mlp(6, 10, 4), (6,), "categorical", 4, n=12), "true", 24, 20),
    "empirical-mlp": (Case("mlp-6-10-4", lambda: mlp(6, 10, 4), (6,), "categorical", 4, n=30), "empirical", 20, 30),
    "mc-cnn": (Case("cnn2d", lambda: cnn2d(3), (1, 8, 8), "categorical", 3, n=20), "mc", 12, 40),
}


def _reference_fisher(case: Case, kind: str, model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    labels = FisherEngine(model, (X, y), case.likelihood, kind="mc", seed=0)._labels if kind == "mc" else None
    return ref.fisher(kind, model, X, y, ref.RefLikelihood(case.likelihood), labels=labels)


@pytest.mark.parametrize("name", list(RANK_DEFICIENT))
def test_null_fraction_of_rank_deficient_fishers(name) -> None:
    case, kind, steps, probes = RANK_DEFICIENT[name]
    model, X, y = case.build(DT)
    null = dense_null_fraction(_reference_fisher(case, kind, model, X, y))
    assert null > 0.8
    at = spectral_density(model, (X, y), case.likelihood, kinds=[kind], num_probes=probes, num_steps=steps,
                          seed=0, progress=False).sel({"kind": kind})
    lam_max = float(at.lambda_max)
    assert (at.weights > 0).all() and (at.nodes.min("node") > 1e-10 * lam_max).all()  # no breakdown, no round-off
    estimate, stderr = float(at.null_mass.mean()), float(at.null_fraction_stderr)
    assert 0 < stderr < 0.015
    assert abs(estimate - null) <= 4 * stderr  # within its stated (stochastic) error
    assert 0 <= float(at.null_fraction) <= 1 and abs(float(at.null_fraction) - null) <= 0.05
    assert float(at.null_fraction_lower) <= null + 1e-12  # the rank bound holds
    mass = np.trapezoid(at.density.values, at.log10_eigenvalue.values)  # ψ carries the nonzero eigenvalues only
    assert mass == pytest.approx(1 - null, abs=0.05)


def test_unresolved_null_mass_is_an_upper_bound_within_the_resolution() -> None:
    """With 12 steps the true Fisher's smallest nonzero eigenvalues (1.9e-4 · λ_max) are below the resolution."""
    case, kind, _, _ = RANK_DEFICIENT["true-mlp"]
    model, X, y = case.build(DT)
    w = torch.linalg.eigvalsh(_reference_fisher(case, kind, model, X, y)).numpy()
    null = np.mean(w <= DENSE_TOL * w.max())
    at = spectral_density(model, (X, y), case.likelihood, kinds=[kind], num_probes=20, num_steps=12, seed=0,
                          progress=False).sel({"kind": kind})
    estimate, stderr = float(at.null_mass.mean()), float(at.null_fraction_stderr)
    below = np.mean(w < float(at.null_resolution))  # eigenvalues Lanczos cannot tell from 0
    assert float(at.null_fraction_lower) <= null <= estimate + 2 * stderr
    assert estimate <= below + 0.01 + 4 * stderr  # E ν_p ≤ ν(λ < ε) + δ (module docstring)
    assert estimate - null > 4 * stderr  # the bias is real here, and upward


def test_full_rank_fisher_has_null_fraction_zero() -> None:
    """Logistic regression on 100 samples (P = 9, κ ≈ 3): full rank; 6 < P steps resolve its smallest eigenvalue."""
    case = Case("logreg-8", lambda: nn.Linear(8, 1), (8,), "bernoulli", 1, n=100)
    model, X, y = case.build(DT)
    assert dense_null_fraction(_reference_fisher(case, "true", model, X, y)) == 0.0
    at = spectral_density(model, (X, y), "bernoulli", num_probes=10, num_steps=6, progress=False).sel(kind="true")
    assert (at.weights > 0).all()  # no breakdown
    assert (at.nodes.min("node") > at.null_resolution).all()  # every Ritz value resolved away from 0 …
    assert float(at.null_fraction) == 0.0 and float(at.null_fraction_lower) == 0.0  # … so no null mass (not −4e-16)
    assert float(at.null_fraction_stderr) == 0.0


def test_several_kinds_and_bad_input() -> None:
    model, X, y = MLP.build(DT)
    ds = spectral_density(model, (X, y), kinds=["true", "empirical"], num_probes=3, num_steps=10, progress=False)
    assert ds.kind.values.tolist() == ["true", "empirical"] and ds.sizes["node"] == 10
    for kwargs, match in (({"num_probes": 0}, "num_probes"), ({"rel_floor": 1.0}, "rel_floor"),
                          ({"sigma": 0.0}, "sigma"), ({"kinds": ["hessian"]}, "Fisher kind")):
        with pytest.raises(InputError, match=match):
            spectral_density(model, (X, y), **kwargs)
