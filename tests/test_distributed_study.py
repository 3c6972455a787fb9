"""The fidelity study under torchrun (gloo, CPU): the same Datasets as one process, a killed rank, refusals.

The 2-rank runs are processes on 127.0.0.1 (``torchrun --standalone``, or the launcher's environment variables
set by hand, so that the surviving rank's own error handling is what is tested), each bounded by a timeout and
killed on failure. Ranks launched by hand are ``python -m fisherlab`` forked from one process that imported torch
and fisherlab once (:mod:`forked`). A tiny user model (``tiny.py:model``, 5 hidden units) on 23 synthetic samples:
the shards have 12 and 11 samples.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from forked import Child, Spawner

from fisherlab.errors import InputError
from fisherlab.study import PARTS, StudyConfig

TIMEOUT_S = 120
N = 23
TINY = """\
from torch import nn


def model(split):
    return nn.Sequential(nn.Linear(split.X_train.shape[1], 5), nn.Tanh(), nn.Linear(5, split.n_outputs))
"""
#: Every kind of built-in rule (a reconstructed network's: sngd-kfac), two dampings.
OPTIONS = {"data": "synthetic-multiclass", "n_samples": N, "damping": [1e-3, 1e-1], "train_rule": "ngd",
           "rules": ["gd", "adam", "ngd", "block-ngd", "kfac", "ekfac", "unit", "diag", "empirical-ngd", "mc-ngd",
                     "lowrank", "sngd-kfac"],
           "steps": 2, "every": 1, "trajectory_rules": ["gd", "ngd", "kfac", "mc-ngd"]}
#: Variables that are round-off themselves (relative residuals of direct solves, about 1e-16): compared absolutely.
ROUND_OFF = ("ngd_residual",)


def argv(options: dict, model: str, out: Path) -> list[str]:
    """The ``fisherlab fidelity`` command line of ``options``."""
    args = ["fidelity", "--model", model, "--out", str(out), "--no-progress"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return args


def run(cmd: list[str], env: dict[str, str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run ``cmd``; on a timeout, kill its process group and fail."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = proc.communicate(timeout=timeout)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{cmd} ran past {timeout} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def quiet_env() -> dict[str, str]:
    return {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m fisherlab ARGS``."""
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "fisherlab", *args], quiet_env())


#: ``python -m fisherlab ARGS`` in a child of the ``spawner`` fixture (tests/conftest.py).
FISHERLAB = "import runpy; runpy.run_module('fisherlab', run_name='__main__', alter_sys=True)"


def ranks_by_hand(spawner: Spawner, args: list[str]) -> list[Child]:
    """``fisherlab ARGS`` as ranks 0 and 1 of 2, the launcher's environment variables set by hand (a free port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [spawner.spawn(FISHERLAB, *args, env={"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            for rank in (0, 1)]


def logs_of(procs: list[Child], timeout: float = 60.0) -> list[str]:
    """Each rank's stdout and stderr once it ended (bounded: a rank still running is killed)."""
    try:
        return ["".join(p.communicate(timeout=timeout)) for p in procs]
    finally:
        for p in procs:
            p.kill()


@pytest.fixture
def tiny(tmp_path: Path) -> str:
    (tmp_path / "tiny.py").write_text(TINY)
    return f"{tmp_path / 'tiny.py'}:model"


def assert_same_values(one: xr.Dataset, two: xr.Dataset, rtol: float = 1e-12) -> float:
    """Every variable of ``two`` equals ``one``'s: floats to ``rtol`` of the variable's scale; returns the worst."""
    assert set(one.data_vars) == set(two.data_vars)
    worst = 0.0
    for name in one.data_vars:
        a, b = one[name].values, two[name].values
        assert a.shape == b.shape, name
        if a.dtype.kind != "f":
            assert (a == b).all(), name
            continue
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=name)
        ok = np.isfinite(a)
        if name in ROUND_OFF:
            assert np.abs(a[ok] - b[ok]).max(initial=0) <= rtol, name
            continue
        if name == "condition_number":  # κ = λ_max/λ_min: a round-off ε‖A‖ in λ_min moves κ by ε·κ relatively
            assert (np.abs(a[ok] - b[ok]) <= 8 * np.finfo(np.float64).eps * a[ok] ** 2).all(), name
            continue
        rel = np.abs(a[ok] - b[ok]).max(initial=0) / max(np.abs(a[ok]).max(initial=0), 1e-300)
        assert rel <= rtol, (name, rel)
        worst = max(worst, rel)
    return worst


@pytest.mark.slow
def test_two_ranks_write_what_one_process_computes(tiny: str, tmp_path: Path) -> None:
    """Every part, with a reconstructed network's rule measured (sngd-kfac) and trained along the trajectory."""
    from fisherlab.results import load_dataset
    from fisherlab.study import run_study

    options = {**OPTIONS, "train_rule": "sngd-kfac", "trajectory_rules": [*OPTIONS["trajectory_rules"], "sngd-kfac"]}
    cfg = StudyConfig(model=tiny, **options)
    single = run_study(cfg, tmp_path / "one", progress=False, log=lambda message: None)
    assert single["fidelity"].available.sel(rule="sngd-kfac") == 1
    done = torchrun(argv(options, tiny, tmp_path / "two"))
    assert done.returncode == 0, done.stdout[-4000:]
    assert done.stdout.count("[fidelity] running") == 1  # rank 0 alone logs
    worst = {}
    for part in PARTS:
        ds = load_dataset(tmp_path / "two" / f"{part}.nc")
        assert (ds.attrs["world_size"], ds.attrs["backend"]) == (2, "gloo")
        assert "world_size" not in single[part].attrs
        assert ds.attrs["num_samples" if "num_samples" in ds.attrs else "seed"] == single[part].attrs.get(
            "num_samples", single[part].attrs["seed"])
        worst[part] = assert_same_values(single[part], ds)
    print("2 ranks vs one process, worst relative difference per part:", worst)
    assert (tmp_path / "two" / "report.html").is_file()
    assert sorted(p.name for p in (tmp_path / "two").glob("*.nc")) == sorted(f"{p}.nc" for p in PARTS)


#: A user model whose rank 1, once the fidelity part is saved, raises (``HOW`` "raises") or stops until it is killed
#: (``OUT`` is replaced by the output folder): the failure lands inside the trajectory part, however fast the rest.
FAILING = """\
import os
import time
from pathlib import Path

from torch import nn


class Failing(nn.Sequential):
    def forward(self, x):
        if os.environ["RANK"] == "1" and Path("OUT", "fidelity.nc").exists():
            if "HOW" == "raises":
                raise RuntimeError("boom on rank 1")
            time.sleep(600)  # until the test kills it
        return super().forward(x)


def model(split):
    return Failing(nn.Linear(split.X_train.shape[1], 5), nn.Tanh(), nn.Linear(5, split.n_outputs))
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "raises"])
def test_a_failed_rank_stops_the_other_with_a_named_error(how: str, spawner: Spawner, tmp_path: Path) -> None:
    """Once rank 0 has saved the fidelity part, rank 1 is SIGKILLed (or its model raises); rank 0 names rank 1 and
    exits; the saved part is intact and the folder resumes."""
    from fisherlab.results import ResultsStore, guard_output_folder, release_output_folder

    # two rules, a 2-step trajectory: the failure is made to land inside it by the model (FAILING)
    options = {**OPTIONS, "rules": ["gd", "ngd"], "trajectory_rules": ["gd", "ngd"]}
    out = tmp_path / "run"
    (tmp_path / "failing.py").write_text(FAILING.replace("OUT", str(out)).replace("HOW", how))
    tiny = f"{tmp_path / 'failing.py'}:model"
    procs = ranks_by_hand(spawner, [*argv(options, tiny, out), "--timeout", "60"])
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "fidelity.nc").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, "the fidelity part was never saved"
            time.sleep(0.05)
        if how == "killed":
            procs[1].kill()
        failed_at = time.monotonic()
        logs = logs_of(procs)
        took = time.monotonic() - failed_at
    finally:
        for p in procs:
            p.kill()
    log = logs[0]
    print(f"rank 0 stopped {took:.1f} s after rank 1 {how}:", log.splitlines()[-1])
    assert procs[0].returncode == 2, log[-3000:]
    named = "stopped without a word" if how == "killed" else "failed: InputError: "
    assert f"RankFailedError: rank 0 of 2 stopped: rank 1 {named}" in log, log[-3000:]
    assert "Traceback" not in log
    if how == "raises":
        assert procs[1].returncode == 2 and "boom on rank 1" in logs[1] and "boom on rank 1" in log, logs[1][-3000:]
    cfg = StudyConfig(model=tiny, **options)
    store = ResultsStore(out)
    assert store.has("fidelity") and not store.has("trajectory")
    assert store.load("fidelity", config=cfg.to_dict()).attrs["world_size"] == 2  # checksum and configuration
    assert not list(out.glob("*.tmp*"))
    assert guard_output_folder(out, cfg.to_dict()) is True  # the folder is free again and resumes
    release_output_folder(out)


@pytest.mark.slow
def test_rank_zeros_refusal_reaches_every_rank(spawner: Spawner, tiny: str, tmp_path: Path) -> None:
    """Rank 0's refusal of a folder holding another configuration is raised on both ranks."""
    from fisherlab.results import guard_output_folder, release_output_folder

    other = tmp_path / "other"
    guard_output_folder(other, {"command": "fidelity", "seed": 99})
    release_output_folder(other)
    procs = ranks_by_hand(spawner, argv({**OPTIONS, "parts": ["fidelity"]}, tiny, other))
    logs = logs_of(procs, TIMEOUT_S)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode != 0
        assert log.count("holds results of a different configuration") == 1, log[-3000:]
    assert not (other / "fidelity.nc").exists()


def test_launch_environment_reads_torchrun_variables() -> None:
    from fisherlab.distributed import LaunchEnv, launch_environment

    assert launch_environment({}) is None and launch_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
           "TORCHELASTIC_RESTART_COUNT": "2"}
    assert launch_environment(env) == LaunchEnv(3, 4, 1, "node0", 29500, 2)
    with pytest.raises(InputError, match="MASTER_PORT"):
        launch_environment({**env, "MASTER_PORT": "x"})
    with pytest.raises(InputError, match="outside"):
        launch_environment({**env, "RANK": "4"})


def test_backend_auto_is_gloo_on_cpu_and_nccl_needs_cuda() -> None:
    from fisherlab.distributed import resolve_backend

    assert resolve_backend("auto", "cpu") == "gloo" and resolve_backend("gloo", "cpu") == "gloo"
    with pytest.raises(InputError, match="nccl runs on CUDA"):
        resolve_backend("nccl", "cpu")
    with pytest.raises(InputError, match="unknown backend"):
        resolve_backend("mpi", "cpu")


def test_spectra_refuses_to_run_under_torchrun(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
                                               ) -> None:
    from fisherlab.cli import main

    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["spectra", "--out", "unused"]) == 2
    assert "does not yet run under torchrun" in capsys.readouterr().err
