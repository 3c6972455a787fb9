"""The ``fisherlab`` command: the main job end to end on small settings, the report, and its bad-input paths."""

import os

import numpy as np
import pytest

from fisherlab.cli import main
from fisherlab.results import load_dataset

SMALL = ["--data", "synthetic-multiclass", "--n-samples", "48", "--no-progress"]
FIDELITY_SMALL = [*SMALL, "--rules", "gd", "ngd", "block-ngd", "kfac", "sngd-kfac", "--dampings", "1e-3", "1e-1",
                  "--steps", "4", "--every", "2", "--refresh-every", "2", "--trajectory-rules", "gd", "ngd", "kfac",
                  "--geometry-structures", "block", "kfac", "--geometry-dampings", "1e-2",
                  "--spectrum-kinds", "true", "empirical"]


@pytest.fixture(scope="module")
def fidelity_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fid") / "run"
    assert main(["fidelity", "--out", str(out), *FIDELITY_SMALL]) == 0
    return out


def test_main_job_writes_every_part_figures_and_report(fidelity_run):
    out = fidelity_run
    parts = ["fidelity", "trajectory", "geometry", "spectrum"]
    for part in parts:
        assert (out / f"{part}.nc").stat().st_size > 0
    figures = sorted((out / "figures").iterdir())
    assert figures and all(f.stat().st_size > 0 for f in figures)
    assert {f.suffix for f in figures} == {".png", ".svg"}
    page = (out / "report.html").read_text()
    for part in parts:
        assert f"{part}.nc" in page  # the report names every Dataset it drew from
    assert page.count("data:image/png;base64,") == len(figures) // 2  # every figure is embedded


def test_main_job_results_are_consistent(fidelity_run):
    fid = load_dataset(fidelity_run / "fidelity.nc", kind="fidelity", required_vars=["cosine", "fisher_rel_error"])
    np.testing.assert_allclose(fid.cosine.sel({"method": "ngd"}), 1.0, atol=1e-12)
    np.testing.assert_allclose(fid.fisher_rel_error.sel({"method": "ngd"}), 0.0, atol=1e-10)
    # invariant 2 through the whole pipeline: GD on the KFAC-reconstructed network is the KFAC step
    np.testing.assert_allclose(fid.cosine.sel({"method": "sngd-kfac"}), fid.cosine.sel({"method": "kfac"}), atol=1e-8)
    at = {"damping": 1e-3}
    assert float(fid.cosine.sel({"method": "gd", **at})) < float(fid.cosine.sel({"method": "kfac", **at}))
    assert fid.attrs["ngd_solver"] == "cholesky"
    spec = load_dataset(fidelity_run / "spectrum.nc", kind="spectrum")
    assert float(spec.rel_frobenius_to_true.sel(fisher_kind="true", structure="dense")) == 0.0


def test_rerun_resumes_without_recomputing(fidelity_run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in fidelity_run.glob("*.nc")}
    assert main(["fidelity", "--out", str(fidelity_run), *FIDELITY_SMALL]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in fidelity_run.glob("*.nc")} == before
    assert "resuming" in capsys.readouterr().out


def test_different_configuration_is_not_overwritten(fidelity_run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in fidelity_run.glob("*.nc")}
    args = ["fidelity", "--out", str(fidelity_run), *FIDELITY_SMALL]
    args[args.index("--n-samples") + 1] = "40"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "n_samples" in err
    assert {p.name: p.stat().st_mtime_ns for p in fidelity_run.glob("*.nc")} == before


def test_report_rebuilds_from_saved_datasets(fidelity_run):
    (fidelity_run / "report.html").unlink()
    assert main(["report", str(fidelity_run)]) == 0
    assert "fidelity.nc" in (fidelity_run / "report.html").read_text()


def test_report_refuses_corrupt_and_foreign_files(tmp_path, capsys):
    (tmp_path / "junk.nc").write_bytes(os.urandom(256))
    assert main(["report", str(tmp_path)]) == 2
    assert "not a readable netCDF file" in capsys.readouterr().err
    (tmp_path / "junk.nc").unlink()
    import xarray as xr

    xr.Dataset({"x": ("a", np.arange(3.0))}).to_netcdf(tmp_path / "foreign.nc", engine="h5netcdf")
    assert main(["report", str(tmp_path)]) == 2
    assert "fisherlab" in capsys.readouterr().err


def test_unknown_rule_lists_the_valid_ones(tmp_path, capsys):
    assert main(["fidelity", "--out", str(tmp_path / "x"), *SMALL, "--rules", "gd", "newton"]) == 2
    err = capsys.readouterr().err
    assert "newton" in err and "kfac" in err and "ngd" in err


def test_unknown_model_lists_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["spectra", "--model", "transformer", "--out", str(tmp_path)])
    assert "mlp" in capsys.readouterr().err


def test_spectra_command_and_config_file(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('data = "synthetic-multiclass"\nn-samples = 32\nkinds = ["true", "empirical"]\n'
                   "dampings = [0.001, 0.1]\n")
    assert main(["spectra", "--config", str(cfg), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    ds = load_dataset(tmp_path / "s" / "spectrum.nc", kind="spectrum")
    assert list(ds.fisher_kind.values) == ["true", "empirical"]
    np.testing.assert_allclose(ds.damping.values, [1e-3, 1e-1])
    assert "κ(λ=0.001)" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 3\n")
    assert main(["spectra", "--config", str(bad), "--out", str(tmp_path / "t")]) == 2
    assert "colour" in capsys.readouterr().err


def test_spectra_slq(tmp_path, capsys):
    out = tmp_path / "slq"
    assert main(["spectra", "--slq", "--kinds", "true", "empirical", "--probes", "3", "--lanczos-steps", "12",
                 "--n-samples", "64", "--out", str(out), "--no-progress"]) == 0
    ds = load_dataset(out / "spectral_density.nc", kind="spectral_density")
    assert ds.fisher_kind.values.tolist() == ["true", "empirical"] and ds.sizes["node"] == 12
    assert "null fraction" in capsys.readouterr().out
