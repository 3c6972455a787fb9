"""Files written before schema 2 (dims ``method`` / ``fisher_kind``, non-UDUNITS units, no CF attributes) still load.

Each test writes a file exactly as fisherlab's schema-1 ``save_dataset`` did — the old dims, variables, units and
provenance attributes, written by xarray with h5netcdf — and checks what ``load_dataset`` makes of it.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr

from fisherlab.errors import ResultsFileError, SchemaUpgradeWarning
from fisherlab.results import NATS_COMMENT, SCHEMA_VERSION, ResultsStore, load_dataset, save_dataset

CREATED = "2026-11-24T00:59:28+00:00"


def write_schema1(path, kind: str, data_vars: dict, coords: dict, attrs: dict | None = None):
    """A results file as schema 1 wrote it: its provenance attributes, no CF attributes, strings as <U."""
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs = {**(attrs or {}), "fisherlab_schema": 1, "fisherlab_version": "0.1.0", "torch_version": "2.13.0+cpu",
                "numpy_version": "2.4.6", "xarray_version": "2026.9.0", "python_version": "3.11.7",
                "platform": "Linux", "device": "cpu", "dtype": "float64", "seed": 0,
                "config": json.dumps({"rules": ["gd", "kfac"], "train_method": "sngd-full"}), "created": CREATED,
                "git_commit": "unknown", "fisherlab_kind": kind}
    ds.to_netcdf(path, engine="h5netcdf")
    return path


def fidelity_schema1(path, rng):
    cosine = rng.uniform(-1, 1, (3, 2))
    write_schema1(
        path, "fidelity",
        {"cosine": (("method", "damping"), cosine, {"long_name": "cosine similarity to exact NGD", "units": "1"}),
         "kl_predicted": (("method", "damping"), rng.uniform(0, 1, (3, 2)), {"long_name": "KL", "units": "nat"}),
         "update_norm": (("method", "damping"), rng.uniform(0, 1, (3, 2)),
                         {"long_name": "||u||", "units": "parameter units"}),
         "grad_norm": ((), 0.5, {"long_name": "gradient norm", "units": "nat per parameter unit"}),
         "unavailable_reason": (("method",), np.array(["", "", ""]), {"units": "1"})},
        {"method": np.array(["gd", "kfac", "sngd-full"]),
         "damping": ("damping", [1e-3, 1e-1], {"long_name": "damping lambda", "units": "1"})},
        {"ngd_solver": "cholesky", "lr": 0.1})
    return cosine


def test_fidelity_file_of_schema_1_loads_with_rule_dim_and_warns(tmp_path):
    path = tmp_path / "fidelity.nc"
    cosine = fidelity_schema1(path, np.random.default_rng(0))
    with pytest.warns(SchemaUpgradeWarning, match=re.escape(str(path))) as caught:
        ds = load_dataset(path, kind="fidelity", required_dims=("rule", "damping"))
    message = str(caught[0].message)
    assert len(caught) == 1
    for change in ("schema 1 upgraded to 2", "'method' -> 'rule'", "rule 'sngd-full' -> 'sngd-dense'",
                   "units 'nat' -> '1' (kl_predicted)", "units 'parameter units' -> '1' (update_norm)"):
        assert change in message, (change, message)

    assert "method" not in ds.dims and "method" not in ds.variables
    assert ds.attrs["fisherlab_schema"] == SCHEMA_VERSION == 2
    assert ds.rule.values.tolist() == ["gd", "kfac", "sngd-dense"]
    two = ds.cosine.sel(rule=["gd", "kfac"])
    assert two.dims == ("rule", "damping") and two.rule.values.tolist() == ["gd", "kfac"]
    np.testing.assert_array_equal(two.values, cosine[:2])
    np.testing.assert_array_equal(ds.cosine.sel(rule="sngd-dense").values, cosine[2])
    # units are UDUNITS strings now; nats say so in a comment
    assert ds.kl_predicted.attrs == {"long_name": "KL", "units": "1", "comment": NATS_COMMENT}
    assert ds.grad_norm.attrs["comment"] == NATS_COMMENT
    assert ds.update_norm.attrs == {"long_name": "||u||", "units": "1"}
    # CF global attributes and coordinate labels
    assert ds.attrs["Conventions"] == "CF-1.10"
    assert ds.attrs["title"] == "fisherlab fidelity results"
    assert ds.attrs["source"] == "fisherlab 0.1.0 (torch 2.13.0+cpu)"
    first, second = ds.attrs["history"].split("\n")
    assert first == f"{CREATED}: fisherlab 0.1.0"
    assert "upgraded from schema 1 to 2 on load" in second
    assert ds.rule.attrs == {"long_name": "update rule"}
    assert ds.damping.attrs == {"long_name": "damping lambda", "units": "1"}
    # other attributes, the config included, are kept as they were
    assert ds.attrs["ngd_solver"] == "cholesky" and ds.attrs["created"] == CREATED
    assert json.loads(ds.attrs["config"])["train_method"] == "sngd-full"

    # saved again, the file is of the current schema: no warning, same Dataset
    again = save_dataset(ds, tmp_path / "again.nc")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SchemaUpgradeWarning)
        xr.testing.assert_identical(load_dataset(again), ds)
    # an old store entry loads the same way
    store = ResultsStore(tmp_path / "store")
    store.directory.mkdir()
    shutil.copyfile(path, store.path("old"))
    with pytest.warns(SchemaUpgradeWarning, match=re.escape(str(store.path("old")))):
        assert store.load("old", required_dims=("rule",)).sizes["rule"] == 3


def test_trajectory_and_training_files_rename_attributes_and_train_rule(tmp_path):
    rng = np.random.default_rng(1)
    traj = write_schema1(
        tmp_path / "trajectory.nc", "fidelity_trajectory",
        {"cosine": (("step", "method"), rng.uniform(size=(2, 3)))},
        {"step": [0, 2], "method": np.array(["gd", "kfac", "train:sngd-full"])},
        {"train_method": "sngd-full", "diverged_at_step": -1})
    with pytest.warns(SchemaUpgradeWarning, match="attribute 'train_method' -> 'train_rule'"):
        ds = load_dataset(traj, kind="fidelity_trajectory")
    assert ds.attrs["train_rule"] == "sngd-dense" and "train_method" not in ds.attrs
    assert ds.rule.values.tolist() == ["gd", "kfac", "train:sngd-dense"]
    assert ds.cosine.sel(rule=["gd", "train:sngd-dense"]).sizes["rule"] == 2
    assert ds.step.attrs == {"long_name": "training step", "units": "1"}

    training = write_schema1(
        tmp_path / "training.nc", "training",
        {"loss": (("method", "step"), rng.uniform(size=(2, 4)), {"long_name": "loss", "units": "nats"}),
         "time": (("method", "step"), rng.uniform(size=(2, 4)), {"long_name": "wall time", "units": "s"})},
        {"method": np.array(["sgd", "adam"]), "step": np.arange(4)}, {"method": "sgd", "diverged": 0})
    with pytest.warns(SchemaUpgradeWarning, match="attribute 'method' -> 'rule'"):
        ds = load_dataset(training, kind="training")
    assert ds.attrs["rule"] == "sgd" and ds.loss.dims == ("rule", "step")
    assert ds.loss.attrs["units"] == "1" and ds.loss.attrs["comment"] == NATS_COMMENT
    assert ds.time.attrs["units"] == "s"
    assert ds.loss.sel(rule=["adam"]).sizes["rule"] == 1

    # a staleness study: a train_method dim becomes train_rule, its values renamed like rules
    study = write_schema1(tmp_path / "staleness.nc", "staleness",
                          {"cosine": (("train_method", "method"), rng.uniform(size=(2, 2)))},
                          {"train_method": np.array(["sngd-kfac", "sngd-full"]), "method": np.array(["train", "kfac"])})
    with pytest.warns(SchemaUpgradeWarning, match="'train_method' -> 'train_rule'"):
        ds = load_dataset(study)
    assert ds.cosine.dims == ("train_rule", "rule")
    assert ds.train_rule.values.tolist() == ["sngd-kfac", "sngd-dense"]


@pytest.mark.parametrize("kind", ["spectrum", "spectral_density"])
def test_spectra_files_rename_fisher_kind_to_kind(tmp_path, kind):
    rng = np.random.default_rng(2)
    eig = np.sort(rng.uniform(size=(3, 5)), axis=1)
    path = write_schema1(
        tmp_path / f"{kind}.nc", kind,
        {"eigenvalue": (("fisher_kind", "eig"), eig, {"long_name": "eigenvalues of F", "units": "nat / parameter²"}),
         "density": (("fisher_kind", "log10_eigenvalue"), rng.uniform(size=(3, 4)),
                     {"long_name": "density", "units": "1 / decade"})},
        {"fisher_kind": np.array(["true", "mc", "empirical"]), "eig": np.arange(5),
         "log10_eigenvalue": ("log10_eigenvalue", np.linspace(-3, 0, 4),
                              {"long_name": "log10 λ", "units": "log10(nat / parameter²)"})})
    with pytest.warns(SchemaUpgradeWarning, match="'fisher_kind' -> 'kind'") as caught:
        ds = load_dataset(path, kind=kind, required_dims=("kind",))
    assert "units 'nat / parameter²' -> '1' (eigenvalue)" in str(caught[0].message)
    two = ds.eigenvalue.sel(kind=["true", "mc"])
    assert two.kind.values.tolist() == ["true", "mc"]
    np.testing.assert_array_equal(two.values, eig[:2])
    assert ds.eigenvalue.attrs == {"long_name": "eigenvalues of F", "units": "1", "comment": NATS_COMMENT}
    assert ds.density.attrs["units"] == "1" and ds.log10_eigenvalue.attrs["units"] == "1"
    assert ds.kind.attrs == {"long_name": "Fisher kind"}
    assert ds.eig.attrs == {"long_name": "eigenvalue index, ascending", "units": "1"}


def test_schema_1_file_with_nothing_renamed_still_gets_cf_attributes(tmp_path):
    path = write_schema1(tmp_path / "geometry.nc", "geometry",
                         {"condition_number": (("structure",), [10.0, 3.0], {"units": "1"})},
                         {"structure": np.array(["original", "kfac"])})
    with pytest.warns(SchemaUpgradeWarning, match="schema 1 upgraded to 2 in memory: CF attributes added"):
        ds = load_dataset(path, kind="geometry")
    assert ds.attrs["Conventions"] == "CF-1.10" and ds.structure.attrs == {"long_name": "Fisher structure"}


def test_file_with_old_and_new_name_is_refused(tmp_path):
    path = write_schema1(tmp_path / "both.nc", "fidelity",
                         {"cosine": (("method", "rule"), np.ones((2, 2)))},
                         {"method": np.array(["a", "b"]), "rule": np.array(["gd", "ngd"])})
    with pytest.raises(ResultsFileError, match=r"both the old and the new name\(s\) \['rule'\]"):
        load_dataset(path)
