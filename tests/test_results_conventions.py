"""Every kind of Dataset fisherlab builds follows the results conventions.

CF global attributes (``Conventions``, ``title``, ``history``, ``source``), a ``long_name`` on every coordinate and
variable, ``units`` that the UDUNITS-2 library parses (through ``cf_units``, whose wheels bundle libudunits2),
nats marked by a comment, and dims that ``ds.sel`` selects by keyword.
"""

from __future__ import annotations

import cf_units
import numpy as np
import pytest
import torch

from fisherlab.data import load_digits
from fisherlab.density import spectral_density
from fisherlab.fidelity import evaluate_fidelity, fidelity_trajectory, fisher_geometry
from fisherlab.models import MLP
from fisherlab.results import ACCEPTED_UNITS, CONVENTIONS, NATS_COMMENT, load_dataset, save_dataset
from fisherlab.results.schema import RESERVED_DIMS
from fisherlab.spectra import fisher_spectra
from fisherlab.train import compare, sweep_lr, train

D = torch.float64
FIDELITY_NATS = {"kl_predicted", "kl_measured", "loss_change", "loss", "grad_norm"}
TRAINING_NATS = {"loss", "train_loss", "test_loss"}

#: Dataset name -> (the fisherlab call named in its history, its variables in nats).
EXPECTED = {
    "fidelity": ("fisherlab.fidelity.evaluate.evaluate_fidelity", FIDELITY_NATS),
    "fidelity_trajectory": ("fisherlab.fidelity.trajectory.fidelity_trajectory", FIDELITY_NATS),
    "geometry": ("fisherlab.fidelity.geometry.fisher_geometry", set()),
    "spectrum": ("fisherlab.spectra.fisher_spectra", {"eigenvalue", "trace", "layer_eigenvalue"}),
    "spectral_density": ("fisherlab.density.spectral_density",
                         {"nodes", "trace", "trace_stderr", "lambda_max", "null_resolution"}),
    "train": ("fisherlab.train.train", TRAINING_NATS),
    "compare": ("fisherlab.train.compare", TRAINING_NATS),
    "sweep_lr": ("fisherlab.train.sweep_lr", TRAINING_NATS),
}


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    model = MLP(64, [6], 10, "tanh").double().eval()  # P = 455
    return model, load_digits(seed=0, dtype=D).train_subset(48)


@pytest.fixture(scope="module")
def datasets(setting):
    model, data = setting
    batch = (data.X_train, data.y_train)
    quick = {"steps": 2, "batch_size": 16, "eval_every": 1}
    return {
        "fidelity": evaluate_fidelity(model, batch, rules=["gd", "kfac", "sngd-kfac", "ngd"], damping=[1e-3, 1e-1],
                                      dtype=D, progress=False),
        "fidelity_trajectory": fidelity_trajectory(model, batch, train_rule="sngd-kfac", steps=2, every=1,
                                                   refresh_every=2, rules=["gd", "kfac"], damping=1e-2, dtype=D,
                                                   progress=False),
        "geometry": fisher_geometry(model, batch, structures=["dense", "kfac", "diag"], damping=[1e-2],
                                    progress=False),
        "spectrum": fisher_spectra(model, batch, kinds=["true", "mc"], damping=[0.0, 1e-2], progress=False),
        "spectral_density": spectral_density(model, batch, kinds=["true", "empirical"], num_probes=2, num_steps=8,
                                             grid_points=50, progress=False),
        "train": train(model, data, rule="sgd", lr=0.1, **quick),
        "compare": compare(model, data, {"sgd": {"lr": 0.1}, "adam": {"lr": 1e-3}}, **quick),
        "sweep_lr": sweep_lr(model, data, {"sgd": {}}, [0.1, 0.01], **quick),
    }


def test_accepted_units_are_udunits_strings():
    for units in ACCEPTED_UNITS:
        assert not cf_units.Unit(units).is_unknown(), units
    assert cf_units.Unit("1").is_dimensionless()
    assert cf_units.Unit("s").convert(60.0, "minutes") == 1.0
    # why nats are "1" plus a comment: UDUNITS reads "nat" as nano-atmospheres and knows no "nats"
    assert cf_units.Unit("nat").is_convertible("Pa")
    for legacy in ("nats", "parameter units", "nat per parameter unit"):
        with pytest.raises(ValueError, match="Failed to parse unit"):
            cf_units.Unit(legacy)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_units_string_parses_with_udunits_and_nats_say_so(datasets, name):
    ds = datasets[name]
    with_units = {str(k): v.attrs["units"] for k, v in ds.variables.items() if "units" in v.attrs}
    assert with_units, name
    for var, units in with_units.items():
        unit = cf_units.Unit(units)  # raises ValueError for a string UDUNITS can't parse
        assert not unit.is_unknown(), (name, var, units)
        assert unit.is_dimensionless() or unit.is_convertible("s"), (name, var, units)
    nats = {str(k) for k, v in ds.variables.items() if v.attrs.get("comment") == NATS_COMMENT}
    assert nats == EXPECTED[name][1], name
    assert all(with_units[v] == "1" for v in nats)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_cf_global_attributes_and_labelled_coordinates(datasets, name, tmp_path):
    ds = datasets[name]
    assert ds.attrs["Conventions"] == CONVENTIONS == "CF-1.10"
    assert ds.attrs["title"] == f"fisherlab {ds.attrs['fisherlab_kind'].replace('_', ' ')} results"
    version = ds.attrs["fisherlab_version"]
    assert ds.attrs["history"] == f"{ds.attrs['created']}: {EXPECTED[name][0]} (fisherlab {version})"
    assert ds.attrs["source"] == f"fisherlab {version} (torch {torch.__version__})"
    assert not RESERVED_DIMS & set(map(str, ds.dims)), name
    for coord, var in ds.coords.items():
        assert var.attrs.get("long_name"), (name, coord)
        if var.dtype.kind == "U":
            assert "units" not in var.attrs, (name, coord)
    for vname, var in ds.data_vars.items():
        assert var.attrs.get("long_name"), (name, vname)
        assert ("units" in var.attrs) == (var.dtype.kind != "U"), (name, vname)
    loaded = load_dataset(save_dataset(ds, tmp_path / f"{name}.nc"))
    for vname, var in loaded.variables.items():
        assert var.attrs == ds[vname].attrs, (name, vname)
    assert {k: loaded.attrs[k] for k in ("Conventions", "title", "history", "source")} == {
        k: ds.attrs[k] for k in ("Conventions", "title", "history", "source")}


def test_sel_rule_selects_exactly_those_rules(datasets):
    ds = datasets["fidelity"]
    assert ds.rule.values.tolist() == ["gd", "kfac", "sngd-kfac", "ngd"]
    two = ds.sel(rule=["gd", "kfac"])
    assert two.sizes["rule"] == 2 and two.rule.values.tolist() == ["gd", "kfac"]
    np.testing.assert_array_equal(two.cosine.values, ds.cosine.values[[0, 1]])
    np.testing.assert_array_equal(two.cosine_layer.values, ds.cosine_layer.values[[0, 1]])
    reordered = ds.cosine.sel(rule=["ngd", "gd"])
    assert reordered.rule.values.tolist() == ["ngd", "gd"]
    np.testing.assert_array_equal(reordered.values, ds.cosine.values[[3, 0]])
    np.testing.assert_allclose(ds.cosine.sel(rule="ngd"), 1.0, atol=1e-10)  # exact NGD against itself
    traj = datasets["fidelity_trajectory"]
    assert traj.cosine.sel(rule=["kfac", "train:sngd-kfac"]).sizes["rule"] == 2
    spectrum = datasets["spectrum"]
    assert spectrum.eigenvalue.sel(kind=["mc"]).kind.values.tolist() == ["mc"]
    runs = datasets["compare"]
    assert runs.loss.sel(rule=["adam"]).rule.values.tolist() == ["adam"]
