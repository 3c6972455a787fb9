"""Sharded results: a sweep's files (one per configuration) combined lazily by :func:`fisherlab.results.open_sweep`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fisherlab.errors import InputError
from fisherlab.results import ResultsStore, config_key, new_dataset, open_sweep, run_sweep

pytest.importorskip("dask")


def closed_form(lr: float, dampings: list[float]) -> np.ndarray:
    """The values the toy sweep stores for one configuration: cos(lr · (rule index + 1) / λ), shape (2, D)."""
    return np.cos(lr * np.outer([1.0, 2.0], 1 / np.asarray(dampings)))


def toy(config: dict) -> object:
    """A results Dataset of kind ``toy`` from the closed form (rules × dampings)."""
    return new_dataset("toy", {"cosine": (("rule", "damping"), closed_form(config["lr"], config["damping"]))},
                       {"rule": ["gd", "ngd"], "damping": config["damping"]}, config=config, seed=0, device="cpu",
                       dtype="float64")


def test_open_sweep_reads_each_configuration_lazily(tmp_path: Path) -> None:
    configs = [{"lr": 0.1, "damping": [1e-2, 1e-1]}, {"lr": 0.2, "damping": [1e-2, 1e-1]},
               {"lr": 0.3, "damping": [1e-1, 1.0]}]  # other dampings: aligned by outer join
    store = ResultsStore(tmp_path / "sweep")
    run_sweep(configs, store, toy, progress=False)
    ds = open_sweep(store)
    assert ds.cosine.chunks is not None  # dask: nothing read yet
    keys = sorted(config_key(c) for c in configs)
    assert list(ds.config.values) == keys
    assert list(ds.damping.values) == [1e-2, 1e-1, 1.0]
    for key, config in zip(keys, sorted(configs, key=config_key), strict=True):
        assert json.loads(str(ds.sweep_config.sel(config=key).values)) == config
        got = ds.cosine.sel(config=key).compute()
        np.testing.assert_array_equal(got.sel(damping=config["damping"]).values,
                                      closed_form(config["lr"], config["damping"]))
        absent = [d for d in ds.damping.values if d not in config["damping"]]
        assert np.isnan(got.sel(damping=absent).values).all()
    assert "fisherlab_checksum" not in ds.attrs and ds.attrs["fisherlab_kind"] == "toy"
    mean = ds.cosine.sel(damping=1e-1).mean("config").compute()
    np.testing.assert_allclose(mean.values, np.mean([closed_form(c["lr"], [1e-1])[:, 0] for c in configs], axis=0),
                               rtol=1e-15)
    ds.close()


def test_open_sweep_refuses_missing_keys_and_mixed_kinds(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "sweep")
    with pytest.raises(InputError, match="no entries to open"):
        open_sweep(store)
    run_sweep({"a": {"lr": 0.1, "damping": [1.0]}}, store, toy, progress=False)
    with pytest.raises(InputError, match=r"has no entries \['b'\]"):
        open_sweep(store, ["a", "b"])
    store.save("b", toy({"lr": 0.2, "damping": [1.0]}).assign_attrs(fisherlab_kind="other"))
    with pytest.raises(InputError, match="mixes results of kinds"):
        open_sweep(store)
