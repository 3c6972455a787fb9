"""Tests of fisherlab.results: provenance, CF attributes, units, atomic netCDF round trips, validation, the store."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from fisherlab import results as R
from fisherlab.errors import InputError, ResultsFileError
from fisherlab.results import io as results_io
from fisherlab.results import metadata as results_metadata

CONFIG = {
    "model": {"widths": (8, 4), "activation": "tanh"},
    "lr": 0.1,
    "damping": [1e-3, 1e-2],
    "dtype": torch.float64,
    "device": torch.device("cpu"),
    "out": Path("/tmp/run"),
    "steps": np.int64(10),
    "eps": np.float32(0.5),
    "flag": True,
    "nothing": None,
}
CONFIG_JSON = {
    "model": {"widths": [8, 4], "activation": "tanh"},
    "lr": 0.1,
    "damping": [1e-3, 1e-2],
    "dtype": "float64",
    "device": "cpu",
    "out": "/tmp/run",
    "steps": 10,
    "eps": 0.5,
    "flag": True,
    "nothing": None,
}


def make_ds(kind: str = "fidelity", seed: int | None = 3, config: dict | None = None) -> xr.Dataset:
    rng = np.random.default_rng(0)
    ds = R.new_dataset(
        kind,
        {
            "cosine": (("rule", "layer", "damping"), rng.uniform(-1, 1, (2, 3, 4)).astype(np.float32)),
            "rel_error": (("rule", "damping"), rng.exponential(size=(2, 4))),
            "n_steps": (("rule",), np.array([5, 7], dtype=np.int64)),
            "converged": (("rule",), np.array([True, False])),
        },
        {
            "rule": ["sgd", "ngd"],
            "layer": np.array(["fc1", "fc2", "λ-out"], dtype=object),
            "damping": [1e-4, 1e-3, 1e-2, 1e-1],
        },
        config=CONFIG if config is None else config,
        seed=seed,
        device=torch.device("cpu"),
        dtype=torch.float64,
        attrs={"note": "unit test", "batch_size": 32, "exact": True, "widths": (8, 4), "names": ["a", "b"]},
    )
    R.annotate(
        ds,
        {
            "cosine": ("cosine similarity to exact NGD", "1"),
            "rel_error": ("relative error", "1"),
            "damping": ("damping lambda", "1"),
            "n_steps": ("steps", "1"),
        },
    )
    return ds


def expected_after_roundtrip(ds: xr.Dataset) -> xr.Dataset:
    """The documented conversions: object string coords become fixed-width unicode."""
    return ds.assign_coords(layer=ds["layer"].astype(str))


# ------------------------------------------------------------------------------------------ provenance


def test_provenance_has_every_key_and_config_parses_back():
    prov = R.provenance(CONFIG, seed=7, device="cpu", dtype="torch.float32", kind="spectrum")
    assert set(prov) == set(R.PROVENANCE_KEYS) | {R.ATTR_KIND}
    assert prov[R.ATTR_SCHEMA] == R.SCHEMA_VERSION == 2
    assert prov[R.ATTR_KIND] == "spectrum"
    assert prov["seed"] == 7
    assert prov["device"] == "cpu"
    assert prov["dtype"] == "float32"
    assert prov["torch_version"] == str(torch.__version__)
    assert prov["numpy_version"] == np.__version__
    assert prov["xarray_version"] == xr.__version__
    assert prov["created"].endswith("+00:00")
    commit = prov["git_commit"]
    assert commit == "unknown" or (len(commit) == 40 and int(commit, 16) >= 0)
    assert json.loads(prov["config"]) == CONFIG_JSON
    assert prov["config"] == json.dumps(CONFIG_JSON, sort_keys=True)
    for value in prov.values():
        assert isinstance(value, (str, int, float))
    assert R.provenance({}, seed=None, device=torch.device("cpu"), dtype=torch.float64)["seed"] == "none"


def test_provenance_names_unserialisable_key():
    with pytest.raises(InputError, match=r"config\.model\.act.*object"):
        R.provenance({"model": {"act": object()}}, seed=0, device="cpu", dtype="float64")
    with pytest.raises(InputError, match=r"config\.layers\[1\]"):
        R.provenance({"layers": [1, lambda x: x]}, seed=0, device="cpu", dtype="float64")
    with pytest.raises(InputError, match="not a string"):
        R.provenance({1: "a"}, seed=0, device="cpu", dtype="float64")
    with pytest.raises(InputError, match="dtype"):
        R.provenance({}, seed=0, device="cpu", dtype="float65")
    with pytest.raises(InputError, match="seed"):
        R.provenance({}, seed=1.5, device="cpu", dtype="float64")  # type: ignore[arg-type]


def test_to_jsonable_conversions():
    @dataclasses.dataclass
    class Opt:
        lr: float = 0.1
        betas: tuple = (0.9, 0.99)

    out = R.to_jsonable({"opt": Opt(), "s": {3, 1, 2}, "t": torch.tensor([1.0, 2.0]), "z": np.bool_(True)})
    assert out == {"opt": {"lr": 0.1, "betas": [0.9, 0.99]}, "s": [1, 2, 3], "t": [1.0, 2.0], "z": True}
    assert json.loads(json.dumps(out)) == out


# ------------------------------------------------------------------------------------------ round trip


def test_roundtrip_is_identical(tmp_path):
    ds = make_ds()
    path = R.save_dataset(ds, tmp_path / "deep" / "dir" / "fid.nc")
    assert path == (tmp_path / "deep" / "dir" / "fid.nc").absolute()
    loaded = R.load_dataset(path, kind="fidelity")
    expected = expected_after_roundtrip(ds)
    # documented conversion: bool attrs are stored as ints (new_dataset already converted them).
    assert ds.attrs["exact"] == 1 and type(ds.attrs["exact"]) is int
    xr.testing.assert_identical(loaded, expected)
    # exact values and dtypes, not just closeness
    for name in ("cosine", "rel_error", "n_steps", "converged"):
        assert loaded[name].dtype == ds[name].dtype
        np.testing.assert_array_equal(loaded[name].values, ds[name].values)
    assert loaded["cosine"].dtype == np.float32 and loaded["rel_error"].dtype == np.float64
    assert loaded["n_steps"].dtype == np.int64
    assert loaded["rule"].values.tolist() == ["sgd", "ngd"] and loaded["rule"].dtype.kind == "U"
    assert loaded["layer"].values.tolist() == ["fc1", "fc2", "λ-out"] and loaded["layer"].dtype.kind == "U"
    assert loaded["damping"].values.tolist() == [1e-4, 1e-3, 1e-2, 1e-1]
    assert dict(loaded.sizes) == {"rule": 2, "layer": 3, "damping": 4}
    assert loaded["cosine"].attrs == {"long_name": "cosine similarity to exact NGD", "units": "1"}
    # dataset attrs equal exactly, with plain Python scalars for numbers
    assert set(loaded.attrs) == set(ds.attrs)
    for key, value in ds.attrs.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(loaded.attrs[key], value)
        else:
            assert loaded.attrs[key] == value, key
            assert type(loaded.attrs[key]) is type(value), key
    assert R.config_of(loaded) == CONFIG_JSON
    # the file is closed: it can be removed and replaced right away
    R.save_dataset(loaded, path)
    xr.testing.assert_identical(R.load_dataset(path), expected)


def test_reading_checking_and_saving_results_does_not_import_torch(tmp_path):
    """A report, a lock or an upgrade works on saved Datasets: it never pays torch's import (the results layer
    recognises torch objects only once torch is loaded)."""
    import subprocess
    import sys

    path = R.save_dataset(make_ds(), tmp_path / "fid.nc")
    code = ("import sys; import fisherlab.report; from fisherlab import results as R; "
            f"ds = R.load_dataset({str(path)!r}, kind='fidelity'); R.save_dataset(ds, {str(tmp_path / 'again.nc')!r}); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    xr.testing.assert_identical(R.load_dataset(tmp_path / "again.nc"), R.load_dataset(path))


def test_save_does_not_mutate_input_and_drops_encoding(tmp_path):
    ds = make_ds()
    ds["cosine"].encoding["dtype"] = np.dtype("float16")  # stale encoding must not change stored values
    before = ds.copy(deep=True)
    R.save_dataset(ds, tmp_path / "a.nc")
    xr.testing.assert_identical(ds, before)
    assert ds["layer"].dtype == object
    assert R.load_dataset(tmp_path / "a.nc")["cosine"].dtype == np.float32


def test_attr_conversions_and_refusals(tmp_path):
    assert R.netcdf_attr_value(True) == 1
    np.testing.assert_array_equal(R.netcdf_attr_value([True, False]), [1, 0])
    assert R.netcdf_attr_value(("a", "b")) == ["a", "b"]
    for bad, msg in [(None, "None"), ({"a": 1}, "mapping"), ([], "empty"), ([1, "a"], "only numbers")]:
        with pytest.raises(InputError, match=msg):
            R.netcdf_attr_value(bad, "dataset attribute 'x'")
    ds = make_ds()
    ds.attrs["bad"] = None
    with pytest.raises(InputError, match="'bad'"):
        R.save_dataset(ds, tmp_path / "x.nc")
    ds = make_ds()
    ds["cosine"].attrs["extra"] = {"nested": 1}
    with pytest.raises(InputError, match="variable 'cosine' attribute 'extra'"):
        R.save_dataset(ds, tmp_path / "x.nc")
    ds = make_ds()
    ds["rel_error"].attrs["units"] = "days since 2000-01-01"
    with pytest.raises(InputError, match="rel_error.*CF time units"):
        R.save_dataset(ds, tmp_path / "x.nc")
    ds = make_ds()
    ds["rel_error"].attrs["scale_factor"] = 2.0
    with pytest.raises(InputError, match="scale_factor"):
        R.save_dataset(ds, tmp_path / "x.nc")
    with pytest.raises(InputError, match="fisherlab attribute"):
        R.save_dataset(xr.Dataset({"a": ("x", [1.0])}), tmp_path / "x.nc")
    assert not (tmp_path / "x.nc").exists()
    assert list(tmp_path.iterdir()) == []


def test_new_dataset_refuses_overriding_provenance_and_bad_vars():
    with pytest.raises(InputError, match="seed"):
        R.new_dataset("spectrum", {}, config={}, seed=0, device="cpu", dtype="float64", attrs={"seed": 1})
    with pytest.raises(InputError, match="spectrum"):
        R.new_dataset(
            "spectrum",
            {"a": (("x",), np.zeros(3)), "b": (("x",), np.zeros(4))},
            config={},
            seed=0,
            device="cpu",
            dtype="float64",
        )
    ds = R.new_dataset(
        "spectrum",
        {"eig": (("k",), torch.arange(3, dtype=torch.float64))},
        {"k": torch.arange(3)},
        config={},
        seed=None,
        device="cpu",
        dtype=torch.float64,
    )
    assert ds["eig"].values.tolist() == [0.0, 1.0, 2.0] and ds.attrs["fisherlab_kind"] == "spectrum"


def test_new_dataset_cf_attributes_and_coordinate_labels():
    ds = make_ds()
    assert list(ds.attrs)[:4] == ["Conventions", "title", "history", "source"] == list(R.CF_ATTRS)
    assert ds.attrs["Conventions"] == "CF-1.10"
    assert ds.attrs["title"] == "fisherlab fidelity results"
    version = ds.attrs["fisherlab_version"]
    assert ds.attrs["history"] == f"{ds.attrs['created']}: {__name__}.make_ds (fisherlab {version})"
    assert ds.attrs["source"] == f"fisherlab {version} (torch {torch.__version__})"
    # coordinates get the defaults of COORDINATES; an annotation replaces them
    assert ds["rule"].attrs == {"long_name": "update rule"}
    assert ds["layer"].attrs == {"long_name": R.COORDINATES["layer"][0]}
    assert ds["damping"].attrs == {"long_name": "damping lambda", "units": "1"}
    titled = R.new_dataset("spectrum", {}, config={}, seed=0, device="cpu", dtype="float64",
                           attrs={"title": "Fisher spectra of my model"})
    assert titled.attrs["title"] == "Fisher spectra of my model"


def test_new_dataset_refuses_sel_keyword_dims_bad_units_and_cf_overrides(tmp_path):
    common = {"config": {}, "seed": 0, "device": "cpu", "dtype": "float64"}
    for dim in ("method", "tolerance", "drop"):
        with pytest.raises(InputError, match=rf"\['{dim}'\].*keyword.*sel"):
            R.new_dataset("fidelity", {"cosine": ((dim,), np.ones(2))}, {dim: ["gd", "ngd"]}, **common)
    with pytest.raises(InputError, match="variable 'kl'.*'nat' are not one of the accepted"):
        R.new_dataset("fidelity", {"kl": (("rule",), np.ones(2), {"units": "nat"})}, **common)
    with pytest.raises(InputError, match="override.*history"):
        R.new_dataset("fidelity", {}, attrs={"history": "mine"}, **common)
    ds = make_ds()
    ds["rel_error"].attrs["units"] = "parameter units"  # set by hand after new_dataset: refused on save
    with pytest.raises(InputError, match="variable 'rel_error'.*'parameter units'"):
        R.save_dataset(ds, tmp_path / "x.nc")
    assert list(tmp_path.iterdir()) == []


def test_annotate_rejects_unknown_names_without_changing_anything():
    ds = make_ds()
    with pytest.raises(InputError, match="nope"):
        R.annotate(ds, {"cosine": ("changed", "1"), "nope": ("x", "1")})
    assert ds["cosine"].attrs["long_name"] == "cosine similarity to exact NGD"
    assert R.annotate(ds, {"layer": ("layer name", None)}) is ds
    assert ds["layer"].attrs == {"long_name": "layer name"}
    R.annotate(ds, {"rel_error": ("KL", *R.NATS)})
    assert ds["rel_error"].attrs == {"long_name": "KL", "units": "1", "comment": "natural-log units (nats)"}
    R.annotate(ds, {"rel_error": ("time", "s")})  # a later annotation replaces units and keeps the comment
    assert ds["rel_error"].attrs["units"] == "s"
    for units in ("nat", "nats", "parameter units", "", "count", "1 / decade"):
        with pytest.raises(InputError, match="not one of the accepted UDUNITS strings"):
            R.annotate(ds, {"cosine": ("changed", units)})
    with pytest.raises(InputError, match=r"\*NATS"):
        R.annotate(ds, {"cosine": ("changed", "nat")})
    with pytest.raises(InputError, match="tuple of strings"):
        R.annotate(ds, {"cosine": ("changed",)})
    assert ds["cosine"].attrs["long_name"] == "cosine similarity to exact NGD"


# ------------------------------------------------------------------------------------------ atomicity


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "res.nc"

    def half_write(ds, path):
        Path(path).write_bytes(b"\x89HDF\r\n\x1a\n partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(results_io, "_write_netcdf", half_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        R.save_dataset(make_ds(), target)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "res.nc"
    old = make_ds(seed=1)
    R.save_dataset(old, target)
    old_bytes = target.read_bytes()
    real_to_netcdf = xr.Dataset.to_netcdf

    def to_netcdf_then_fail(self, path, *args, **kwargs):
        real_to_netcdf(self, path, *args, **kwargs)  # a full temporary file exists ...
        raise OSError("ENOSPC: no space left on device")  # ... then the write fails

    monkeypatch.setattr(xr.Dataset, "to_netcdf", to_netcdf_then_fail)
    with pytest.raises(ResultsFileError, match="could not write results file.*no space left"):
        R.save_dataset(make_ds(seed=2), target)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.nc"]
    assert target.read_bytes() == old_bytes
    assert R.load_dataset(target).attrs["seed"] == 1

    def fsync_fails(fd):
        raise OSError("EIO")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(ResultsFileError, match="EIO"):
        R.save_dataset(make_ds(seed=3), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.nc"]
    assert target.read_bytes() == old_bytes


# ------------------------------------------------------------------------------------------ validation


def test_missing_file(tmp_path):
    with pytest.raises(ResultsFileError, match=r"not found: .*nothing\.nc"):
        R.load_dataset(tmp_path / "nothing.nc")


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.nc"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ResultsFileError, match=r"not a readable netCDF file: .*bad\.nc: "):
        R.load_dataset(bad)
    good = R.save_dataset(make_ds(), tmp_path / "trunc.nc")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultsFileError, match=r"not a readable netCDF file: .*trunc\.nc"):
        R.load_dataset(good)


def test_foreign_file(tmp_path):
    path = tmp_path / "plain.nc"
    xr.Dataset({"a": (("x",), np.arange(3.0))}).to_netcdf(path, engine="h5netcdf")
    with pytest.raises(ResultsFileError, match=r"not written by fisherlab.*plain\.nc"):
        R.load_dataset(path)


def test_future_schema(tmp_path):
    ds = make_ds()
    ds.attrs["fisherlab_schema"] = R.SCHEMA_VERSION + 1
    path = R.save_dataset(ds, tmp_path / "future.nc")
    with pytest.raises(ResultsFileError, match="unsupported fisherlab schema version 3"):
        R.load_dataset(path)


def test_wrong_kind_and_missing_fields(tmp_path):
    path = R.save_dataset(make_ds("fidelity"), tmp_path / "f.nc")
    with pytest.raises(ResultsFileError, match="holds kind 'fidelity', expected 'spectrum'"):
        R.load_dataset(path, kind="spectrum")
    with pytest.raises(ResultsFileError, match=r"variable\(s\) \['eigenvalues', 'other'\]"):
        R.load_dataset(path, required_vars=("cosine", "eigenvalues", "other"))
    with pytest.raises(ResultsFileError, match=r"dimension\(s\) \['step'\]"):
        R.load_dataset(path, required_dims=("rule", "step"))
    with pytest.raises(ResultsFileError, match=r"attribute\(s\) \['lr'\]"):
        R.load_dataset(path, required_attrs=("seed", "lr"))
    ok = R.load_dataset(
        path,
        kind="fidelity",
        required_vars=("cosine", "layer"),
        required_dims=("damping",),
        required_attrs=("seed", "config"),
    )
    assert ok.attrs["fisherlab_kind"] == "fidelity"


# ------------------------------------------------------------------------------------------ configs


def test_same_config_and_diff():
    a = {"lr": 0.1, "opt": {"momentum": 0.9, "betas": (0.9, 0.99)}, "seed": 1, "out": "a"}
    b = {"lr": 0.1, "opt": {"momentum": 0.9, "betas": [0.9, 0.99]}, "seed": 2, "out": "b"}
    assert not R.same_config(a, b)
    assert R.config_diff(a, b) == ["out", "seed"]
    assert R.same_config(a, b, ignore=("seed", "out"))
    c = {**b, "opt": {"momentum": 0.5, "betas": [0.9, 0.99]}}
    assert R.config_diff(a, c, ignore=["seed", "out"]) == ["opt.momentum"]
    assert R.same_config(a, c, ignore=["seed", "out", "opt.momentum"])
    assert not R.same_config({"x": True}, {"x": 1})
    assert R.same_config({"x": float("nan")}, {"x": float("nan")})
    assert R.config_diff({"x": 1}, {"y": 1}) == ["x", "y"]
    ds = make_ds()
    assert R.same_config(ds, CONFIG)
    assert R.same_config(ds, CONFIG_JSON)
    assert not R.same_config(ds, {**CONFIG, "lr": 0.2})
    assert R.same_config(ds, {**CONFIG, "lr": 0.2}, ignore=["lr"])


def test_config_of_errors():
    ds = make_ds()
    ds.attrs["config"] = "{not json"
    with pytest.raises(ResultsFileError, match="not valid JSON"):
        R.config_of(ds)
    del ds.attrs["config"]
    with pytest.raises(ResultsFileError, match="no 'config'"):
        R.config_of(ds)


# ------------------------------------------------------------------------------------------ store


def test_store_save_has_keys_load(tmp_path):
    store = R.ResultsStore(tmp_path / "sweep")
    assert store.keys() == [] and not store.has("a")
    assert store.load_all() == {}
    keys = ["lr=0.1/seed=0", "lr=0.2/seed=0", ".hidden key"]
    for i, key in enumerate(keys):
        path = store.save(key, make_ds(seed=i))
        assert path.parent == store.directory and path.suffix == ".nc"
        assert "/" not in path.name and not path.name.startswith(".")
    assert store.path("a/b") != store.path("a_b")
    assert store.keys() == sorted(keys)
    assert all(store.has(k) for k in keys) and not store.has("lr=0.3/seed=0")
    assert store.load("lr=0.2/seed=0", kind="fidelity").attrs["seed"] == 1
    with pytest.raises(ResultsFileError, match="expected 'spectrum'"):
        store.load("lr=0.2/seed=0", kind="spectrum")
    with pytest.raises(ResultsFileError, match="not found"):
        store.load("missing")
    # leftovers of a crash and unrelated files are not keys
    (store.directory / ".lr=0.3.nc.0123abcd.tmp").write_bytes(b"partial")
    (store.directory / "notes.txt").write_text("hi")
    assert store.keys() == sorted(keys)
    loaded = store.load_all(kind="fidelity")
    assert list(loaded) == sorted(keys)
    assert [loaded[k].attrs["seed"] for k in keys] == [0, 1, 2]
    with pytest.raises(InputError):
        store.path("")


def test_store_load_all_concat(tmp_path):
    store = R.ResultsStore(tmp_path)
    for seed in range(3):
        store.save(f"seed{seed}", make_ds(seed=seed))
    cat = store.load_all(kind="fidelity", concat_dim="run")
    assert isinstance(cat, xr.Dataset)
    assert cat["run"].values.tolist() == ["seed0", "seed1", "seed2"]
    assert cat["cosine"].dims == ("run", "rule", "layer", "damping")
    for seed in range(3):
        xr.testing.assert_equal(cat["cosine"].sel(run=f"seed{seed}", drop=True), make_ds(seed=seed)["cosine"])
    # attrs shared by all entries are kept; those that differ (seed, created, ...) are dropped
    assert cat.attrs["fisherlab_kind"] == "fidelity"
    assert "seed" not in cat.attrs

    # concatenation along an existing dimension
    store2 = R.ResultsStore(tmp_path / "traj")
    for start in (0, 3):
        steps = np.arange(start, start + 3)
        ds = R.new_dataset(
            "trajectory",
            {"loss": (("step",), steps * 0.5)},
            {"step": steps},
            config={"lr": 0.1},
            seed=0,
            device="cpu",
            dtype="float64",
        )
        store2.save(f"chunk{start}", ds)
    traj = store2.load_all(kind="trajectory", concat_dim="step")
    assert traj["step"].values.tolist() == list(range(6))
    assert traj["loss"].values.tolist() == [s * 0.5 for s in range(6)]
    with pytest.raises(ResultsFileError, match="is empty"):
        R.ResultsStore(tmp_path / "empty").load_all(concat_dim="run")


# ------------------------------------------------------------------------------------------ merge


def test_merge_provenance(tmp_path):
    a, b = make_ds(seed=1), make_ds("spectrum", seed=None)
    summary = R.merge_provenance({"a": a, "b": b})
    assert summary["n_datasets"] == 2
    assert summary["torch_version"] == str(torch.__version__)
    assert summary["kinds"] == ["fidelity", "spectrum"]
    assert summary["seeds"] == [1, "none"]
    assert summary["created_first"] <= summary["created_last"]
    b.attrs["torch_version"] = "1.0.0"
    with pytest.raises(InputError, match=r"torch_version.*1\.0\.0"):
        R.merge_provenance([a, b])
    del b.attrs["git_commit"]
    with pytest.raises(ResultsFileError, match="git_commit"):
        R.merge_provenance([a, b])
    with pytest.raises(InputError):
        R.merge_provenance([])


def test_string_variables_of_object_and_stringdtype_roundtrip(tmp_path):
    ds = R.new_dataset(
        "training",
        {
            "names": (("i",), np.array(["a", "bcd"], dtype=object), {"units": "1"}),
            "labels": (("i",), np.array(["λ", "z"], dtype=np.dtypes.StringDType())),
        },
        {"i": [0, 1], "aux": (("i",), np.array(["p", "q"], dtype=object))},
        config={},
        seed=0,
        device="cpu",
        dtype="float32",
    )
    loaded = R.load_dataset(R.save_dataset(ds, tmp_path / "s.nc"))
    for name, values in (("names", ["a", "bcd"]), ("labels", ["λ", "z"]), ("aux", ["p", "q"])):
        assert loaded[name].dtype.kind == "U" and loaded[name].values.tolist() == values
    assert loaded["names"].attrs == {"units": "1"}
    mixed = ds.assign(m=(("i",), np.array([1, "a"], dtype=object)))
    with pytest.raises(InputError, match="variable 'm'.*non-string"):
        R.save_dataset(mixed, tmp_path / "m.nc")


def test_git_commit_found_or_unknown(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "checkout"
    (repo / "fisherlab" / "results").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout
    monkeypatch.setattr(results_metadata, "__file__", str(repo / "fisherlab" / "results" / "metadata.py"))
    assert results_metadata._git_commit.__wrapped__() == head.strip()
    plain = tmp_path / "plain" / "fisherlab" / "results"
    plain.mkdir(parents=True)
    monkeypatch.setattr(results_metadata, "__file__", str(plain / "metadata.py"))
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert results_metadata._git_commit.__wrapped__() == "unknown"

    def hang(*args, **kwargs):
        raise subprocess.TimeoutExpired(cmd="git", timeout=2.0)

    monkeypatch.setattr(results_metadata.subprocess, "run", hang)
    assert results_metadata._git_commit.__wrapped__() == "unknown"
