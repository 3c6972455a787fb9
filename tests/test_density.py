"""spectral_density (SLQ on the implicit Fisher) against the dense brute-force Fisher's eigendecomposition."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from cases import MLP

from fisherlab.density import spectral_density
from fisherlab.errors import InputError
from fisherlab.report import build_report
from fisherlab.results import load_dataset, save_dataset

DT = torch.float64


@pytest.fixture(scope="module")
def case():
    model, X, y = MLP.build(DT)
    w = torch.linalg.eigvalsh(ref.true_fisher(model, X, ref.RefLikelihood("categorical"))).numpy()
    P = len(w)
    ds = spectral_density(model, (X, y), num_probes=60, num_steps=P, seed=2, progress=False)
    return model, X, y, w, ds


def test_ritz_values_and_trace(case) -> None:
    _, _, _, w, ds = case
    at = ds.sel({"fisher_kind": "true"})
    # as many Lanczos steps as P (full reorthogonalisation): the largest Ritz value is λ_max
    assert float(at.lambda_max) == pytest.approx(w.max(), rel=1e-8)
    assert float(at.trace_stderr) > 0
    assert abs(float(at.trace) - w.sum()) < 4 * float(at.trace_stderr)
    np.testing.assert_allclose(ds.weights.sum("node").values, 1.0, atol=1e-10)


def test_null_fraction_and_density_mass(case) -> None:
    _, X, _, w, ds = case
    at = ds.sel({"fisher_kind": "true"})
    null = np.mean(w <= 1e-6 * w.max())  # the default rel_floor
    assert null > 0.5  # rank ≤ N·(C − 1) = 16 of P: mostly null
    assert float(at.null_fraction) == pytest.approx(null, abs=0.05)
    mass = np.trapezoid(at.density.values, ds.log10_eigenvalue.values)
    assert mass == pytest.approx(1 - float(at.null_fraction), abs=1e-3)


def test_dataset_round_trip_and_report(case, tmp_path) -> None:
    _, _, _, _, ds = case
    save_dataset(ds, tmp_path / "density.nc")
    back = load_dataset(tmp_path / "density.nc", kind="spectral_density",
                        required_dims=("fisher_kind", "probe", "node", "log10_eigenvalue"))
    assert back.density.attrs["units"] == "1 / decade"
    page = build_report(tmp_path).read_text()
    assert "density.nc" in page and "null fraction" in page


def test_null_mass_of_a_rank_deficient_fisher_with_few_lanczos_steps() -> None:
    """Empirical Fisher of rank ≤ N = 8 < P: with 12 steps the zero eigenvalues still count as null."""
    model, X, y = MLP.build(DT)
    w = torch.linalg.eigvalsh(ref.empirical_fisher(model, X, y, ref.RefLikelihood("categorical"))).numpy()
    ds = spectral_density(model, (X, y), kinds=["empirical"], num_probes=40, num_steps=12, progress=False)
    expected = np.mean(w <= 1e-6 * w.max())
    assert expected > 0.8
    assert float(ds.null_fraction.item()) == pytest.approx(expected, abs=0.06)


def test_several_kinds_and_bad_input() -> None:
    model, X, y = MLP.build(DT)
    ds = spectral_density(model, (X, y), kinds=["true", "empirical"], num_probes=3, num_steps=10, progress=False)
    assert ds.fisher_kind.values.tolist() == ["true", "empirical"] and ds.sizes["node"] == 10
    for kwargs, match in (({"num_probes": 0}, "num_probes"), ({"rel_floor": 1.0}, "rel_floor"),
                          ({"sigma": 0.0}, "sigma"), ({"kinds": ["hessian"]}, "Fisher kind")):
        with pytest.raises(InputError, match=match):
            spectral_density(model, (X, y), **kwargs)
