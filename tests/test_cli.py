"""The ``fisherlab`` command: the main job end to end on small settings, the report, and its bad-input paths."""

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_runs import MAIN_JOB, SMALL, main_job_copy, report_rebuild

from fisherlab.cli import main
from fisherlab.errors import InputError
from fisherlab.results import load_dataset
from fisherlab.study import SpectraConfig, StudyConfig


@pytest.fixture(scope="module")
def fidelity_run(tmp_path_factory):
    """The main job on :data:`shared_runs.MAIN_JOB` (run once per session, shared with tests/test_report.py): a
    copy of this module's own, which its tests change."""
    return main_job_copy(tmp_path_factory, "fid")


@pytest.fixture
def without_report(monkeypatch):
    """The commands skip drawing report.html (most of a small run's time: ~20 s of figure layout under load), for
    the tests that assert on the Datasets, the exit status and the messages only; the report itself is tested on
    the main job above, by test_report_rebuilds_from_saved_datasets, test_own_model_and_data_through_the_main_job,
    test_own_optimizer_trains_its_own_trajectory and tests/test_report.py. No report process is started: the
    command reaches its own (skipped) drawing."""
    from fisherlab import cli, report

    monkeypatch.setattr(cli, "report_process", lambda: None)
    monkeypatch.setattr(report, "build_report", lambda folder, **_: Path(folder) / "report.html")


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
    np.testing.assert_allclose(fid.cosine.sel({"rule": "ngd"}), 1.0, atol=1e-12)
    np.testing.assert_allclose(fid.fisher_rel_error.sel({"rule": "ngd"}), 0.0, atol=1e-10)
    # invariant 2 through the whole pipeline: GD on the KFAC-reconstructed network is the KFAC step
    np.testing.assert_allclose(fid.cosine.sel({"rule": "sngd-kfac"}), fid.cosine.sel({"rule": "kfac"}), atol=1e-8)
    at = {"damping": 1e-3}
    assert float(fid.cosine.sel({"rule": "gd", **at})) < float(fid.cosine.sel({"rule": "kfac", **at}))
    assert fid.attrs["ngd_solver"] == "cholesky"
    spec = load_dataset(fidelity_run / "spectrum.nc", kind="spectrum")
    assert float(spec.rel_frobenius_to_true.sel(kind="true", structure="dense")) == 0.0


def test_rerun_resumes_without_recomputing(fidelity_run, capsys, without_report):
    before = {p.name: p.stat().st_mtime_ns for p in fidelity_run.glob("*.nc")}
    assert main(["fidelity", "--out", str(fidelity_run), *MAIN_JOB]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in fidelity_run.glob("*.nc")} == before
    assert "resuming" in capsys.readouterr().out


def test_different_configuration_is_not_overwritten(fidelity_run, capsys, without_report):
    before = {p.name: p.stat().st_mtime_ns for p in fidelity_run.glob("*.nc")}
    args = ["fidelity", "--out", str(fidelity_run), *MAIN_JOB]
    args[args.index("--n-samples") + 1] = "40"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "n_samples" in err
    assert {p.name: p.stat().st_mtime_ns for p in fidelity_run.glob("*.nc")} == before


def test_report_rebuilds_from_saved_datasets(tmp_path_factory):
    rebuilt = report_rebuild(tmp_path_factory)  # the main job's report.html deleted, then `fisherlab report`
    assert rebuilt["status"] == 0
    assert "fidelity.nc" in rebuilt["again"].decode()


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
    assert main(["spectra", "--model", "transformer", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "transformer" in err and "mlp" in err and "module:callable" in err
    assert not (tmp_path / "x").exists()


def test_spectra_command_and_config_file(tmp_path, capsys, without_report):
    cfg = tmp_path / "run.toml"
    cfg.write_text('data = "synthetic-multiclass"\nn-samples = 32\nkinds = ["true", "empirical"]\n'
                   "damping = [0.001, 0.1]\n")
    assert main(["spectra", "--config", str(cfg), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    ds = load_dataset(tmp_path / "s" / "spectrum.nc", kind="spectrum")
    assert list(ds.kind.values) == ["true", "empirical"]
    np.testing.assert_allclose(ds.damping.values, [1e-3, 1e-1])
    assert "κ(λ=0.001)" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 3\n")
    assert main(["spectra", "--config", str(bad), "--out", str(tmp_path / "t")]) == 2
    assert "colour" in capsys.readouterr().err


def test_spectra_slq(tmp_path, capsys, without_report):
    out = tmp_path / "slq"
    assert main(["spectra", "--slq", "--kinds", "true", "empirical", "--probes", "3", "--lanczos-steps", "12",
                 "--n-samples", "64", "--out", str(out), "--no-progress"]) == 0
    ds = load_dataset(out / "spectral_density.nc", kind="spectral_density")
    assert ds.kind.values.tolist() == ["true", "empirical"] and ds.sizes["node"] == 12
    assert "null fraction" in capsys.readouterr().out


# ------------------------------------------------------------------------------- fast, friendly command line
def _run_python(code, timeout=300):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_help_and_version_import_no_torch():
    out = _run_python(
        "import contextlib, io, json, sys\n"
        "from fisherlab.cli import main\n"
        "for argv in (['--version'], ['--help'], *[[c, '--help'] for c in ('fidelity', 'spectra', 'report')]):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as f, contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "    if argv == ['--version']:\n"
        "        version = f.getvalue()\n"
        "heavy = {'torch', 'xarray', 'pandas', 'scipy', 'sklearn', 'matplotlib', 'seaborn'}\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
        "print(json.dumps([version, heavy]))\n")
    version, heavy = json.loads(out)
    assert heavy == []
    assert version.strip() == f"fisherlab {importlib.metadata.version('fisherlab')}"


def _help(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: defaults are not split by wrapping
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(("command", "config"), [("fidelity", StudyConfig), ("spectra", SpectraConfig)])
def test_help_shows_the_configuration_defaults(command, config, capsys, monkeypatch):
    text = _help(command, capsys, monkeypatch)
    lines, current = {}, None  # option → its help, continuation lines joined
    for line in text.split("\n\n")[2].splitlines():  # the options section
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            lines[current] = line.strip()
        elif current:
            lines[current] += " " + line.strip()
    for f in dataclasses.fields(config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        line = lines["--" + f.name.replace("_", "-")]
        if isinstance(default, bool):
            assert "(default" not in line
            continue
        if default == []:  # optimizer, optimizer_args: none
            assert "(default" not in line, line
            continue
        if default is None:  # n_samples: all; geometry_damping: the trajectory's
            assert line.endswith({"geometry_damping": "(default: the trajectory's λ, the middle --damping)"}.get(
                f.name, "(default: all)")), line
            continue
        shown = " ".join(f"{v:g}" if isinstance(v, float) else str(v)
                         for v in (default if isinstance(default, list) else [default]))
        assert line.endswith(f"(default: {shown})"), line
    assert "None" not in text


@pytest.mark.parametrize("command", [None, "fidelity", "spectra", "report"])
def test_help_renders_no_rest_markup(command, capsys, monkeypatch):
    text = _help(command, capsys, monkeypatch)
    assert text.strip()
    for markup in ("``", ":mod:", ":func:", ":class:", ":data:", ":meth:"):
        assert markup not in text


def test_builtin_names_agree_with_the_registries():
    from fisherlab import study
    from fisherlab.data import DATASETS
    from fisherlab.models import MODELS

    assert study.MODELS == MODELS
    assert study.DATA == tuple(d for d in DATASETS if d not in ("mnist", "cifar10", "text"))  # these need files


# ------------------------------------------------------------------------------------------- sequence models
def test_gpt_takes_its_own_defaults_unless_told(tmp_path):
    from fisherlab.cli import apply_model_defaults, build_parser, given_options, make_config

    def config(*argv):
        argv = ["fidelity", *argv]
        args = build_parser().parse_args(argv)
        apply_model_defaults(args, given_options(argv))
        return make_config(StudyConfig, args)

    cfg = config("--model", "gpt")
    assert (cfg.data, cfg.n_samples, cfg.steps, cfg.train_rule) == ("sort-lm", 16, 4, "kfac")
    cfg = config("--model", "gpt", "--data", "sort", "--n-samples", "8", "--steps", "2")
    assert (cfg.data, cfg.n_samples, cfg.steps, cfg.every) == ("sort", 8, 2, 2)
    assert config().data == "digits" and config().n_samples == 512  # the other models keep the general defaults
    (tmp_path / "run.toml").write_text('n-samples = 4\n')
    argv = ["fidelity", "--model", "gpt", "--config", str(tmp_path / "run.toml")]
    from fisherlab.cli import apply_config_file

    args = build_parser().parse_args(argv)
    apply_model_defaults(args, given_options(argv) | apply_config_file(args, argv))
    assert args.n_samples == 4 and args.data == "sort-lm"  # a config file's value is a given one


@pytest.mark.parametrize(("model", "data", "named"), [("mlp", "sort-lm", "use model gpt"),
                                                     ("gpt", "digits", "takes token data: sort, sort-lm"),
                                                     ("encoder", "sort-lm", "takes token data: sort")])
def test_token_models_and_token_data_are_paired(model, data, named):
    with pytest.raises(InputError, match=named) as info:
        StudyConfig(model=model, data=data)
    assert info.value.field == "data"


@pytest.mark.slow  # 47 s on the loaded 2-core machine (report figures included)
def test_main_job_on_a_gpt_language_model(tmp_path):
    """The smallest GPT study (2 sequences of sort-lm, P = 2,009): exact NGD's cosine to itself is 1."""
    out = tmp_path / "gpt"
    assert main(["fidelity", "--model", "gpt", "--out", str(out), "--n-samples", "2", "--no-progress",
                 "--rules", "gd", "ngd", "kfac", "sngd-kfac", "--damping", "0.1", "--steps", "1", "--every", "1",
                 "--trajectory-rules", "gd", "ngd", "--parts", "fidelity", "trajectory"]) == 0
    fid, traj = load_dataset(out / "fidelity.nc"), load_dataset(out / "trajectory.nc")
    assert fid.attrs["num_params"] == 2009 and fid.attrs["num_samples"] == 2
    assert np.abs(fid.cosine.sel(rule="ngd").values - 1).max() < 1e-10
    assert np.abs(traj.cosine.sel(rule="ngd").values - 1).max() < 1e-10
    assert fid.available.sel(rule=["gd", "ngd", "kfac", "sngd-kfac"]).values.tolist() == [1, 1, 1, 1]
    # invariant 2 on the sequence model: GD on the KFAC-reconstructed network takes KFAC's step
    assert np.abs(fid.cosine.sel(rule="sngd-kfac").values - fid.cosine.sel(rule="kfac").values).max() < 1e-10
    assert json.loads(fid.attrs["config"])["data"] == "sort-lm"


# -------------------------------------------------------------------------------------------- config files
def _args_from(tmp_path, text, *argv, suffix=".toml"):
    from fisherlab.cli import apply_config_file, build_parser

    cfg = tmp_path / f"run{suffix}"
    cfg.write_text(text)
    full = ["fidelity", "--config", str(cfg), *argv]
    args = build_parser().parse_args(full)
    apply_config_file(args, full)
    return args


def test_config_values_go_through_the_option_types(tmp_path):
    args = _args_from(tmp_path, 'seed = "1"\nn-samples = 64\ndamping = 0.01\nlr = "0.5"\nsteps = 6\n'
                                'spectrum_kinds = ["true"]\noverwrite = false\nno-progress = true\n')
    assert args.seed == 1 and type(args.seed) is int
    assert args.n_samples == 64 and args.damping == [0.01] and args.lr == 0.5 and args.steps == 6
    assert args.spectrum_kinds == ["true"] and args.overwrite is False and args.no_progress is True
    # options on the command line win, spelled in full or abbreviated
    args = _args_from(tmp_path, "seed = 1\nsteps = 6\nlr = 0.5\n", "--seed", "3", "--ste", "9")
    assert (args.seed, args.steps, args.lr) == (3, 9, 0.5)
    args = _args_from(tmp_path, "n-samples: all\nrules: [gd, kfac]\noverwrite: false\n", suffix=".yaml")
    assert args.n_samples is None and args.rules == ["gd", "kfac"] and args.overwrite is False


@pytest.mark.parametrize(("text", "words"), [
    ('seed = "one"\n', ["seed", "invalid int value", "'one'"]),
    ("seed = 1.5\n", ["seed", "invalid int value"]),
    ("seed = true\n", ["--seed", "true"]),
    ('overwrite = "no"\n', ["overwrite", "true or false", "'no'"]),
    ("overwrite = 1\n", ["overwrite", "true or false"]),
    ('spectrum-kinds = ["true", "bogus"]\n', ["--spectrum-kinds", "'bogus'", "empirical"]),
    ("damping = [[0.1]]\n", ["--damping"]),
    ("damping = []\n", ["--damping", "at least one"]),
    ('lr = [0.1, 0.2]\n', ["--lr", "one value"]),
    ('parts = "everything"\n', ["--parts", "'everything'", "fidelity"]),
    ('config = "other.toml"\n', ["unknown option", "config"]),
    ("seed = \n", ["not a readable configuration file"]),
])
def test_bad_config_values_name_the_file_and_option(tmp_path, capsys, text, words):
    (tmp_path / "run.toml").write_text(text)
    out = tmp_path / "out"
    assert main(["fidelity", "--config", str(tmp_path / "run.toml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "run.toml" in err
    for word in words:
        assert word in err
    assert not out.exists()


def test_config_overwrite_no_keeps_existing_results(tmp_path, capsys, without_report):
    out = tmp_path / "s"
    small = ["--data", "synthetic-multiclass", "--n-samples", "24", "--kinds", "true", "--no-progress"]
    assert main(["spectra", "--out", str(out), *small]) == 0
    before = (out / "spectrum.nc").stat().st_mtime_ns
    (tmp_path / "run.toml").write_text('n-samples = 20\noverwrite = "no"\n')
    assert main(["spectra", "--config", str(tmp_path / "run.toml"), "--out", str(out), *small[:2], "--kinds",
                 "true", "--no-progress"]) == 2
    assert "overwrite" in capsys.readouterr().err
    (tmp_path / "run.toml").write_text("n-samples = 20\noverwrite = false\n")
    assert main(["spectra", "--config", str(tmp_path / "run.toml"), "--out", str(out), *small[:2], "--kinds",
                 "true", "--no-progress"]) == 2
    assert "different configuration" in capsys.readouterr().err
    assert (out / "spectrum.nc").stat().st_mtime_ns == before


# ------------------------------------------------------------------- every option checked before --out is claimed
def _status(argv):
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own checks (choices, types) exit with status 2
        return exc.code


NO_CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"

BAD_FIDELITY = [
    (["--spectrum-kinds", "true", "bogus"], "--spectrum-kinds"),
    (["--device", NO_CUDA], "--device"),
    (["--device", "banana"], "--device"),
    (["--damping", "0"], "--damping"),
    (["--damping", "nan"], "--damping"),
    (["--geometry-damping", "-1"], "--geometry-damping"),
    (["--rules", "gd", "newton"], "--rules"),
    (["--trajectory-rules", "gd", "gd"], "--trajectory-rules"),
    (["--train-rule", "newton"], "--train-rule"),
    (["--steps", "0"], "--steps"),
    (["--every", "-1"], "--every"),
    (["--refresh-every", "0"], "--refresh-every"),
    (["--lr", "inf"], "--lr"),
    (["--train-lr", "0"], "--train-lr"),
    (["--n-samples", "0"], "--n-samples"),
    (["--n-samples", "100000"], "--n-samples"),
    (["--seed", "-1"], "--seed"),
    (["--dtype", "float16"], "--dtype"),
    (["--geometry-structures", "implicit"], "--geometry-structures"),
    (["--parts", "fidelity", "fidelity"], "--parts"),
    (["--model", "lstm", "--data", "digits"], "--data"),
    (["--model", "no_such_module_xyz:make"], "--model"),
    (["--data", "no_such_file.py:make"], "--data"),
]


@pytest.mark.parametrize(("bad", "option"), BAD_FIDELITY, ids=[" ".join(b) for b, _ in BAD_FIDELITY])
def test_bad_fidelity_option_is_refused_before_the_folder_is_claimed(tmp_path, capsys, bad, option):
    out = tmp_path / "run"
    assert _status(["fidelity", "--out", str(out), *SMALL, *bad]) == 2
    assert option in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("bad", "option"), [(["--kinds", "bogus"], "--kinds"), (["--device", NO_CUDA], "--device"),
                                             (["--damping", "-1"], "--damping"), (["--probes", "0"], "--probes"),
                                             (["--slq", "--lanczos-steps", "0"], "--lanczos-steps")])
def test_bad_spectra_option_is_refused_before_the_folder_is_claimed(tmp_path, capsys, bad, option):
    out = tmp_path / "run"
    assert _status(["spectra", "--out", str(out), *SMALL, *bad]) == 2
    assert option in capsys.readouterr().err
    assert not out.exists()


def test_corrected_rerun_after_a_refused_option_succeeds(tmp_path, capsys, without_report):
    out = tmp_path / "run"
    good = ["fidelity", "--out", str(out), *SMALL, "--parts", "fidelity", "--rules", "gd", "ngd", "--damping", "0.1"]
    assert main([*good, "--device", NO_CUDA]) == 2
    assert main([*good, "--spectrum-kinds", "true", "--device", "cpu"]) == 0
    assert (out / "fidelity.nc").is_file()
    assert main(["spectra", "--out", str(tmp_path / "s"), *SMALL, "--device", NO_CUDA]) == 2
    assert main(["spectra", "--out", str(tmp_path / "s"), *SMALL, "--kinds", "true"]) == 0


# ------------------------------------------------------------------------------------ your own model and data
OWN = '''
import torch
from torch import nn


def data(seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    X = torch.randn(30, 5, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.3).long()  # three classes
    return X, y


def net(split):
    return nn.Sequential(nn.Linear(split.input_shape[0], 4), nn.Tanh(), nn.Linear(4, split.n_outputs))


def net_without_data():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def not_a_module(split):
    return 3


def wrong_outputs():
    return nn.Linear(5, 7)


def no_parameters():
    return nn.Tanh()


def two_arguments(a, b):
    return nn.Linear(5, 3)


def string_data():
    return "digits"


def float_labels():
    return torch.randn(10, 5), torch.randn(10)


def nan_inputs():
    return torch.full((10, 5), float("nan")), torch.zeros(10, dtype=torch.int64)


broken = 3
'''


def _reference_fisher_and_gradient(make_net, X, y, seed):
    """Float64 true Fisher (1/N) Σ Jᵀ(diag p − ppᵀ)J and gradient of the mean cross-entropy, by torch.func."""
    from torch.func import functional_call, jacrev

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_net().double()
    names = [n for n, _ in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def logits(flat, x):
        chunks, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            chunks[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, chunks, (x,))

    X = X.double()
    J = jacrev(logits)(theta, X)  # (N, C, P)
    p = torch.softmax(logits(theta, X), dim=-1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    F = torch.einsum("ncp,ncd,ndq->pq", J, H, J) / X.shape[0]
    onehot = torch.nn.functional.one_hot(y, p.shape[-1]).double()
    g = torch.einsum("nc,ncp->p", p - onehot, J) / X.shape[0]
    return F, g


@pytest.mark.slow  # 4-8 s at load 4-5
def test_own_model_and_data_through_the_main_job(tmp_path, request):
    mine = tmp_path / "mine.py"
    mine.write_text(OWN)
    out = tmp_path / "own"
    model_spec, data_spec = f"{mine}:net", f"{mine}:data"
    assert main(["fidelity", "--model", model_spec, "--data", data_spec, "--n-samples", "all", "--seed", "2",
                 "--rules", "gd", "ngd", "kfac", "sngd-kfac", "--damping", "0.01", "--parts", "fidelity",
                 "--out", str(out), "--no-progress"]) == 0
    fid = load_dataset(out / "fidelity.nc", kind="fidelity")
    assert model_spec in fid.attrs["config"] and data_spec in fid.attrs["config"]  # provenance names the specs
    # independent float64 reference: the user's net drawn in float32 from the seed, the data from its callable
    namespace = {}
    exec(OWN, namespace)
    X, y = namespace["data"](seed=2)
    F, g = _reference_fisher_and_gradient(lambda: namespace["net_without_data"](), X, y, seed=2)
    ngd = torch.linalg.solve(F + 0.01 * torch.eye(F.shape[0], dtype=F.dtype), g)
    expected = float(g @ ngd / (g.norm() * ngd.norm()))
    np.testing.assert_allclose(float(fid.cosine.sel(rule="gd", damping=0.01)), expected, rtol=1e-9)
    np.testing.assert_allclose(float(fid.cosine.sel(rule="ngd", damping=0.01)), 1.0, atol=1e-12)
    assert (out / "report.html").is_file()

    # the same model and data through spectra: the dense true Fisher's largest eigenvalue (its report not drawn)
    request.getfixturevalue("without_report")
    assert main(["spectra", "--model", f"{mine}:net_without_data", "--data", data_spec, "--seed", "2",
                 "--kinds", "true", "--damping", "0.1", "--out", str(tmp_path / "spec"), "--no-progress"]) == 0
    spec = load_dataset(tmp_path / "spec" / "spectrum.nc", kind="spectrum")
    top = float(spec.eigenvalue.sel(kind="true", structure="dense").max())
    np.testing.assert_allclose(top, float(torch.linalg.eigvalsh(F)[-1]), rtol=1e-9)


@pytest.mark.parametrize(("model", "data", "option", "words"), [
    ("not_a_module", "data", "--model", ["returned int", "torch.nn.Module"]),
    ("wrong_outputs", "data", "--model", ["(2, 7)", "(2, 3)"]),
    ("no_parameters", "data", "--model", ["no trainable parameters"]),
    ("two_arguments", "data", "--model", ["2 required arguments"]),
    ("broken", "data", "--model", ["not a callable"]),
    ("missing", "data", "--model", ["no attribute 'missing'"]),
    ("net", "string_data", "--data", ["returned str", "SplitData", "(X, y)"]),
    ("net", "float_labels", "--data", ["int64 class labels", "(N, k)"]),
    ("net", "nan_inputs", "--data", ["NaN"]),
])
def test_own_model_and_data_are_checked_before_the_folder_is_claimed(tmp_path, capsys, model, data, option, words):
    mine = tmp_path / "mine.py"
    mine.write_text(OWN)
    out = tmp_path / "own"
    assert main(["fidelity", "--model", f"{mine}:{model}", "--data", f"{mine}:{data}", "--n-samples", "all",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {option}:" in err
    for word in words:
        assert word in err
    assert not out.exists()


def test_own_model_from_an_importable_module(tmp_path, monkeypatch, without_report):
    (tmp_path / "my_fisher_models.py").write_text(OWN)
    monkeypatch.chdir(tmp_path)  # module:callable finds modules in the working directory
    monkeypatch.delitem(sys.modules, "my_fisher_models", raising=False)
    out = tmp_path / "own"
    assert main(["spectra", "--model", "my_fisher_models:net_without_data", "--data", "my_fisher_models:data",
                 "--kinds", "true", "--out", str(out), "--no-progress"]) == 0
    assert "my_fisher_models:data" in load_dataset(out / "spectrum.nc", kind="spectrum").attrs["config"]
    sys.modules.pop("my_fisher_models", None)


def test_old_option_spellings_say_the_new_name(tmp_path, capsys):
    from fisherlab.cli import apply_config_file, build_parser

    args = build_parser().parse_args(["fidelity", "--dampings", "0.1", "0.2", "--train-method", "gd",
                                      "--geometry-dampings", "0.3"])
    assert (args.damping, args.train_rule, args.geometry_damping) == ([0.1, 0.2], "gd", [0.3])
    err = capsys.readouterr().err
    for old, new in (("--dampings", "--damping"), ("--train-method", "--train-rule"),
                     ("--geometry-dampings", "--geometry-damping")):
        assert f"{old} is deprecated; use {new}" in err
    (tmp_path / "run.toml").write_text('train_method = "kfac"\ndampings = [0.5]\n')
    argv = ["fidelity", "--config", str(tmp_path / "run.toml"), "--geometry-dampings", "0.2"]
    args = build_parser().parse_args(argv)
    apply_config_file(args, argv)
    assert (args.train_rule, args.damping, args.geometry_damping) == ("kfac", [0.5], [0.2])
    err = capsys.readouterr().err
    assert "train_method is deprecated; use train-rule" in err and "dampings is deprecated; use damping" in err
    assert err.count("--geometry-dampings is deprecated") == 1


# ----------------------------------------------------------------------------------------- own optimizers
#: On the synthetic data (P = 1,507; on digits P = 3,466 and each exact-NGD Cholesky costs ~12x as much).
OWN_OPTIMIZER = ["--data", "synthetic-multiclass", "--n-samples", "64", "--steps", "4", "--every", "2",
                 "--parts", "trajectory", "--no-progress", "--train-rule", "gd", "--trajectory-rules", "gd",
                 "--damping", "1e-2"]


@pytest.mark.slow  # 4-8 s at load 4-5
def test_own_optimizer_trains_its_own_trajectory(tmp_path):
    from fisherlab import fidelity_trajectory
    from fisherlab.study import headline, load_model_and_data

    out = tmp_path / "run"
    assert main(["fidelity", "--out", str(out), *OWN_OPTIMIZER, "--optimizer", "torch.optim.AdamW",
                 "--optimizer-args", "lr=1e-3", "weight_decay=0.01"]) == 0
    ds = load_dataset(out / "trajectory.nc", kind="fidelity_trajectory")
    assert list(ds.rule.values) == ["gd", "optimizer:AdamW"]
    assert list(ds.trained_with.values) == ["gd", "optimizer:AdamW"]
    assert json.loads(ds.attrs["config"])["optimizer_args"] == [["lr=0.001", "weight_decay=0.01"]]
    # independently: the library call with the user's own AdamW instance on the same settings
    cfg = StudyConfig(data="synthetic-multiclass", n_samples=64, steps=4, every=2, parts=["trajectory"],
                      damping=[1e-2])
    model, split = load_model_and_data(cfg)
    ref = fidelity_trajectory(model, split, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01),
                              rules=[], steps=4, every=2, damping=1e-2, lr=cfg.lr, dtype=torch.float64, seed=0,
                              progress=False)
    own = ds.sel(rule="optimizer:AdamW")
    np.testing.assert_allclose(own.cosine.values, ref.cosine.sel(rule="optimizer:AdamW").values, rtol=0, atol=1e-12)
    np.testing.assert_allclose(own.fisher_rel_error.values, ref.fisher_rel_error.sel(rule="optimizer:AdamW").values,
                               rtol=1e-12)
    np.testing.assert_allclose(own.training_loss.values, ref.loss.values, rtol=1e-12)
    np.testing.assert_allclose(ds.training_loss.sel(rule="gd").values, ds.loss.values, rtol=0)  # gd: the main run
    assert not np.allclose(ds.loss.values[1:], ref.loss.values[1:])  # two different runs
    header, rows = headline({"trajectory": ds})
    assert ["optimizer:AdamW (its own training run)", f"{float(own.cosine.isel(step=-1).squeeze()):.3f}"] in rows
    assert "optimizer:AdamW (its own training run)" in (out / "report.html").read_text()  # the headline


def test_several_optimizers_and_the_config_file_agree(tmp_path):
    from fisherlab.cli import build_parser, make_config
    from fisherlab.study import optimizer_rules_of

    argv = ["fidelity", "--optimizer", "torch.optim.AdamW", "--optimizer-args", "lr=1e-3", "--optimizer",
            "torch.optim.SGD", "--optimizer-args", "lr=0.1", "momentum=0.9", "--optimizer", "torch.optim.AdamW"]
    cli = make_config(StudyConfig, build_parser().parse_args(argv))
    assert cli.optimizer == ["torch.optim.AdamW", "torch.optim.SGD", "torch.optim.AdamW"]
    assert cli.optimizer_args == [["lr=0.001"], ["lr=0.1", "momentum=0.9"], []]
    assert list(optimizer_rules_of(cli)) == ["optimizer:AdamW(lr=0.001)", "optimizer:SGD", "optimizer:AdamW()"]
    sgd = optimizer_rules_of(cli)["optimizer:SGD"]([torch.zeros(2, requires_grad=True)])
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9
    args = _args_from(tmp_path, 'optimizer = ["torch.optim.AdamW", "torch.optim.SGD", "torch.optim.AdamW"]\n'
                                'optimizer-args = [["lr=1e-3"], ["lr=0.1", "momentum=0.9"], []]\n')
    assert make_config(StudyConfig, args).to_dict() == cli.to_dict()
    assert "optimizer" not in StudyConfig().to_dict()  # folders written without optimizers keep their config


BAD_OPTIMIZER = [
    (["--optimizer", "torch.optim.NoSuchOptimizer"], "--optimizer"),
    (["--optimizer", "no_such_module_xyz.Opt"], "--optimizer"),
    (["--optimizer", "no_such_module_xyz:make"], "--optimizer"),
    (["--optimizer", "torch.nn.Linear"], "--optimizer"),  # a class, not an Optimizer
    (["--optimizer", "os.sep"], "--optimizer"),  # not callable
    (["--optimizer", "math:sqrt"], "--optimizer"),  # a callable that returns no optimizer
    (["--optimizer", "torch.optim.AdamW", "--optimizer-args", "lr"], "--optimizer-args"),
    (["--optimizer", "torch.optim.AdamW", "--optimizer-args", "lr=__import__('os').getcwd()"], "--optimizer-args"),
    (["--optimizer", "torch.optim.AdamW", "--optimizer-args", "lrr=1e-3"], "--optimizer-args"),
    (["--optimizer", "torch.optim.AdamW", "--optimizer-args", "lr=-1.0"], "--optimizer-args"),
    (["--optimizer", "torch.optim.AdamW", "--optimizer-args", "lr=1", "lr=2"], "--optimizer-args"),
    (["--optimizer-args", "lr=1e-3"], "--optimizer-args"),  # no optimizer before it
    (["--optimizer", "torch.optim.SparseAdam"], "--optimizer"),
    (["--optimizer", "torch.optim.AdamW", "--optimizer", "torch.optim.AdamW"], "--optimizer"),
]


@pytest.mark.parametrize(("bad", "option"), BAD_OPTIMIZER, ids=[" ".join(b) for b, _ in BAD_OPTIMIZER])
def test_bad_optimizer_is_refused_before_the_folder_is_claimed(tmp_path, capsys, bad, option):
    out = tmp_path / "run"
    assert _status(["fidelity", "--out", str(out), *OWN_OPTIMIZER, *bad]) == 2
    assert option in capsys.readouterr().err
    assert not out.exists()
