"""Fault injection for results files and output folders (issue 10): nothing finished is lost or mixed.

Each test breaks a folder the way a user, a crash or a full disk does — ``kill -9`` while saving, two processes
claiming one folder at the same instant, a full file system, hand-edited values, a part missing a variable, a
part copied in from another configuration, a deleted or corrupt manifest, ``--overwrite`` next to the user's own
files — and then checks that fisherlab ends with a named error (the file named), that the parts finished before
are byte-for-byte intact (SHA-256 of the files, and the content checksum ``load_dataset`` verifies), and that
the rerun completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from forked import Child, Spawner

from fisherlab.cli import main
from fisherlab.errors import InputError, ResultsFileError, ResultsIntegrityWarning
from fisherlab.results import (
    MANIFEST,
    ResultsStore,
    guard_output_folder,
    load_dataset,
    load_output_folder,
    new_dataset,
    read_manifest,
    release_output_folder,
    run_sweep,
    save_dataset,
)
from fisherlab.study import StudyConfig, run_study

CONFIG = {"command": "faults", "seed": 0, "lr": 0.1}
PARTS = ("a", "b", "c")
# A fidelity study small enough for a subprocess: two parts, a user's model of 3 hidden units (P = 45; the built-in
# mlp's P = 1,507 dense Fisher and its eigendecomposition cost ten times the CPU and prove nothing more here).
STUDY = {"data": "synthetic-multiclass", "n_samples": 16, "parts": ["fidelity", "spectrum"], "rules": ["gd", "ngd"],
         "damping": [1e-2], "spectrum_kinds": ["true"]}
TINY = """\
from torch import nn


def model(split):
    return nn.Sequential(nn.Linear(split.X_train.shape[1], 3), nn.Tanh(), nn.Linear(3, split.n_outputs))
"""


# ------------------------------------------------------------------------------------------------ helpers
def part(config: dict, name: str, cosine: float = 0.5) -> xr.Dataset:
    """A complete fidelity part (every variable the report reads) produced by ``config``."""
    shape = (2, 2)
    values = {"cosine": np.array([[cosine, 0.25], [1.0, 1.0]]), "rel_error": np.full(shape, 0.5),
              "fisher_rel_error": np.full(shape, 0.25), "kl_predicted": np.full(shape, 1e-3),
              "kl_measured": np.full(shape, 1.1e-3), "loss_change": np.full(shape, -2e-3)}
    return new_dataset("fidelity", {k: (("rule", "damping"), v) for k, v in values.items()},
                       {"rule": ["gd", "ngd"], "damping": [1e-3, 1e-1]}, config={**config, "part": name}, seed=0,
                       device="cpu", dtype="float64")


def mini_run(out: Path, config: dict, *, overwrite: bool = False) -> tuple[bool, list[str]]:
    """A run in the shape of ``run_study``: claim the folder, reuse the finished parts, compute the others.

    Returns:
        (whether the claim resumed, the parts computed by this run).
    """
    resumed = guard_output_folder(out, config, overwrite=overwrite)
    try:
        store, computed = ResultsStore(out), []
        for name in PARTS:
            if store.has(name):
                store.load(name, config=config)
            else:
                store.save(name, part(config, name))
                computed.append(name)
        return resumed, computed
    finally:
        release_output_folder(out)


def digests(folder: Path, pattern: str = "*.nc") -> dict[str, str]:
    """SHA-256 of every file matching ``pattern`` (the bytes on disk)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob(pattern))}


def assert_intact(folder: Path, before: dict[str, str]) -> None:
    """The files of ``before`` are unchanged on disk, and each still loads (its content checksum verified)."""
    now = digests(folder)
    assert {k: now.get(k) for k in before} == before
    for name in before:
        load_dataset(folder / name, kind_variables=True)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def wait_for(path: Path, proc: Child, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child ended (rc {proc.returncode}) before {path.name}: "
                                 f"{proc.stderr.read().decode(errors='replace')}")
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------ kill -9 while saving
KILLED = """
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[4])
    import fisherlab.results.io as rio

    out, point, ready = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    real = rio._write_netcdf

    def write(ds, path):  # the last part: stop with its temporary file half or fully written
        last = (ds.attrs["fisherlab_kind"] == "spectrum" if LAST is None
                else json.loads(ds.attrs["config"]).get("part") == LAST)
        if not last:
            return real(ds, path)
        if point == "half written":
            data = bytes(ds.to_netcdf(None, engine="h5netcdf"))
            Path(path).write_bytes(data[: len(data) // 2])
        else:
            real(ds, path)  # complete and fsync-ed, not yet renamed
        ready.write_text(point)
        time.sleep(600)

    rio._write_netcdf = write
    if sys.argv[5] == "study":
        from fisherlab.study import StudyConfig, run_study
        from fisherlab.results import guard_output_folder
        LAST = None  # the spectrum part (not a fidelity Dataset)
        cfg = StudyConfig(**json.loads(sys.argv[6]))
        guard_output_folder(out, cfg.to_dict())
        run_study(cfg, out, progress=False, log=lambda m: None)
    else:
        from test_results_faults import CONFIG, mini_run
        LAST = "c"
        mini_run(out, CONFIG)
"""


def _kill_while_saving(spawner: Spawner, tmp_path: Path, point: str, *args: str) -> tuple[Path, dict[str, str]]:
    """Run ``KILLED`` until it is saving its last part, ``kill -9`` it; the folder and its finished files."""
    out, ready = tmp_path / "run", tmp_path / "ready"
    child = spawner.spawn(KILLED, str(out), point, str(ready), str(Path(__file__).parent), *args)
    try:
        wait_for(ready, child)
        before = digests(out)
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert [n for n in hidden(out) if n.endswith(".tmp")] != []  # the killed run's temporary file
    assert_intact(out, before)
    assert read_manifest(out)["files"] == sorted(before)
    return out, before


@pytest.mark.parametrize("point", ["half written", "before the rename"])
def test_kill_9_while_saving_keeps_finished_parts_and_the_rerun_completes(spawner, tmp_path, point):
    out, before = _kill_while_saving(spawner, tmp_path, point, "mini")
    assert list(before) == ["a.nc", "b.nc"] and not (out / "c.nc").exists()
    assert mini_run(out, CONFIG) == (True, ["c"])  # the kill released the lock: claimed at once, resumed
    assert_intact(out, before)
    assert hidden(out) == [".fisherlab.lock"]  # the stale temporary file is gone
    assert read_manifest(out)["files"] == ["a.nc", "b.nc", "c.nc"]


@pytest.fixture
def study(tmp_path: Path) -> dict:
    """:data:`STUDY` on the model of :data:`TINY`."""
    (tmp_path / "tiny.py").write_text(TINY)
    return {**STUDY, "model": f"{tmp_path / 'tiny.py'}:model"}


@pytest.mark.slow
def test_kill_9_while_run_study_saves(spawner, tmp_path, study):
    out, before = _kill_while_saving(spawner, tmp_path, "before the rename", "study", json.dumps(study))
    assert list(before) == ["fidelity.nc"] and not (out / "spectrum.nc").exists()
    cfg = StudyConfig(**study)
    log: list[str] = []
    assert guard_output_folder(out, cfg.to_dict()) is True
    try:
        results = run_study(cfg, out, progress=False, log=log.append)
    finally:
        release_output_folder(out)
    assert any(m.startswith("[fidelity] already in") for m in log)
    assert_intact(out, before)  # reused, not recomputed
    assert hidden(out) == [".fisherlab.lock"]
    assert read_manifest(out)["files"] == ["fidelity.nc", "spectrum.nc"]
    assert load_dataset(out / "spectrum.nc", kind="spectrum").eigenvalue.shape == results["spectrum"].eigenvalue.shape


# ---------------------------------------------------------------------------------- concurrent claims of a folder
CLAIMER = """
    import json, sys, time
    from fisherlab.results import ResultsStore, guard_output_folder, new_dataset, release_output_folder
    root, name, trials = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    print("ready", flush=True)
    t0 = float(sys.stdin.readline())
    outcomes = []
    for k, (start, hold, wait, same) in enumerate(trials):
        folder = f"{root}/trial{k}"
        cfg = {"who": "both" if same else name, "trial": k}
        while (ahead := t0 + start - time.time()) > 0.005:  # both processes claim at this instant
            time.sleep(ahead - 0.005)
        while time.time() < t0 + start:
            pass
        try:
            resumed = guard_output_folder(folder, cfg, wait=wait)
        except Exception as exc:  # noqa: BLE001 - any other kind is what this test looks for
            outcomes.append([type(exc).__name__, str(exc)])
            continue
        store = ResultsStore(folder)
        if not store.has("part"):
            store.save("part", new_dataset("fidelity", {"cosine": ((), 0.5)}, config={**cfg, "by": name}, seed=0,
                                           device="cpu", dtype="float64"))
        time.sleep(hold)
        release_output_folder(folder)
        outcomes.append(["accepted", resumed])
    print(json.dumps(outcomes), flush=True)
"""


def _race(spawner: Spawner, root: Path, trials: list[tuple[float, float, float, bool]]) -> list[list]:
    """Two processes claim ``root/trial<k>`` at the same instant, for each trial ``(start, hold, wait, same)``."""
    procs = [spawner.spawn(CLAIMER, str(root), name, json.dumps(trials)) for name in ("p", "q")]
    try:
        for p in procs:
            assert p.stdout.readline().decode().strip() == "ready", p.stderr.read()
        t0 = f"{time.time() + 0.2}\n"
        for p in procs:
            p.stdin.write(t0)
            p.stdin.flush()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]


def test_concurrent_claims_one_run_per_folder(spawner, tmp_path):
    """20 pairs of processes claim a folder for different configurations at the same instant, 8 for the same."""
    n_other, n_same = 20, 8
    trials = [(0.15 * k, 0.08, 0.0, False) for k in range(n_other)]
    trials += [(0.15 * n_other + 0.25 * k, 0.08, 5.0, True) for k in range(n_same)]
    p, q = _race(spawner, tmp_path, trials)
    in_use = 0
    for k, (a, b) in enumerate(zip(p[:n_other], q[:n_other], strict=True)):
        outcome = sorted([a[0], b[0]])
        assert outcome == ["InputError", "accepted"], (k, a, b)  # never both, never a FileNotFoundError
        refusal = a[1] if a[0] == "InputError" else b[1]
        assert "in use by process" in refusal or "different configuration" in refusal, refusal
        in_use += "in use by process" in refusal
        winner = "p" if a[0] == "accepted" else "q"
        folder = tmp_path / f"trial{k}"
        assert read_manifest(folder)["config"] == {"who": winner, "trial": k}
        assert read_manifest(folder)["files"] == ["part.nc"]
        ds = load_dataset(folder / "part.nc")
        assert json.loads(ds.attrs["config"])["by"] == winner
        assert hidden(folder) == [".fisherlab.lock"]  # no temporary file left behind
    assert in_use >= n_other // 4  # the claims really overlapped (a busy machine may delay one process)
    # the same configuration, waiting (bounded) for the folder: the second resumes what the first wrote
    for a, b in zip(p[n_other:], q[n_other:], strict=True):
        assert sorted([a, b]) == [["accepted", False], ["accepted", True]]


def test_a_held_folder_is_refused_until_its_holder_dies(spawner, tmp_path):
    out = tmp_path / "run"
    (out / "store").mkdir(parents=True)
    held = tmp_path / "held"
    child = spawner.spawn("""
        import sys, time
        from pathlib import Path
        from fisherlab.results.lock import hold_folder
        hold_folder(Path(sys.argv[1]))
        hold_folder(Path(sys.argv[1]) / "store")
        Path(sys.argv[2]).write_text("held")
        time.sleep(600)
    """, str(out), str(held))
    try:
        wait_for(held, child)
        start = time.monotonic()
        with pytest.raises(InputError, match=rf"output folder .*run is in use by process {child.pid} .*after "
                                             r"waiting 0\.3 s"):
            guard_output_folder(out, CONFIG, wait=0.3)
        assert 0.3 <= time.monotonic() - start < 5  # bounded wait
        with pytest.raises(InputError, match=rf"results store .*store is in use by process {child.pid}"):
            run_sweep({"k": {"x": 1}}, ResultsStore(out / "store"), lambda c: part(c, "k"), progress=False)
        assert not (out / MANIFEST).exists()
    finally:
        child.kill()
        child.communicate()
    assert mini_run(out, CONFIG) == (False, list(PARTS))  # kill -9 released the lock
    assert run_sweep({"k": {"x": 1}}, ResultsStore(out / "store"), lambda c: part(c, "k"), progress=False)


# ------------------------------------------------------------------------------------------------- disk full
@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs (needs root and a kernel that lets the test mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"can't mount a small tmpfs here: {r.stderr.strip()}")
    yield disk
    release_output_folder(disk / "run")
    subprocess.run(["umount", "-l", str(disk)], check=False)


FULL_DISK = """
    import sys
    import numpy as np
    from fisherlab.errors import ResultsFileError
    from fisherlab.results import ResultsStore, guard_output_folder, new_dataset

    def ds(n):
        return new_dataset("eigenvalues", {"eigenvalue": (("eig",), np.linspace(0.0, 1.0, n))}, config={"n": n},
                           seed=0, device="cpu", dtype="float64")

    out = sys.argv[1]
    guard_output_folder(out, {"run": "disk"})
    store = ResultsStore(out)
    store.save("small", ds(10))
    try:
        store.save("big", ds(100_000))  # 800 kB on a 128 kB disk
    except ResultsFileError as exc:
        print("refused:", exc)
    store.save("after", ds(20))
    print("continued")
"""


def test_disk_full_while_saving_is_a_named_error_and_the_process_continues(spawner, small_disk):
    out = small_disk / "run"
    child = spawner.spawn(FULL_DISK, str(out))
    try:
        stdout, stderr = child.communicate(120)
    finally:
        child.kill()
    assert child.returncode == 0, (child.returncode, stderr[-2000:])  # was 139: a segfault in h5py's cleanup
    assert "refused: could not write results file" in stdout and "big.nc" in stdout
    assert "No space left on device" in stdout and "continued" in stdout
    assert not (out / "big.nc").exists() and hidden(out) == [".fisherlab.lock"]  # nothing partial
    assert read_manifest(out)["files"] == ["after.nc", "small.nc"]
    before = digests(out)
    assert_intact(out, before)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    assert guard_output_folder(out, {"run": "disk"}) is True  # the rerun, with room, completes
    big = new_dataset("eigenvalues", {"eigenvalue": (("eig",), np.linspace(0, 1, 100_000))}, config={"n": 100_000},
                      seed=0, device="cpu", dtype="float64")
    path = ResultsStore(out).save("big", big)
    assert load_dataset(path).sizes["eig"] == 100_000
    assert_intact(out, before)


def test_save_failure_in_process_leaves_nothing_and_saving_goes_on(tmp_path, monkeypatch):
    import fisherlab.results.lock as lock

    real = os.write
    calls = []

    def enospc_on_second_chunk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data)[: len(data) // 2])  # a short write, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lock.os, "write", enospc_on_second_chunk)
    with pytest.raises(ResultsFileError, match=r"could not write results file .*x\.nc.*No space left"):
        save_dataset(part(CONFIG, "x"), tmp_path / "x.nc")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    assert load_dataset(save_dataset(part(CONFIG, "y"), tmp_path / "y.nc")).attrs["fisherlab_kind"] == "fidelity"


# ------------------------------------------------------------------------------------------ tampered values
def test_hand_edited_values_are_refused_or_warned_and_the_rerun_recomputes(tmp_path, capsys):
    out = tmp_path / "run"
    mini_run(out, CONFIG)
    before = digests(out)
    with h5py.File(out / "b.nc", "r+") as f:  # edited outside fisherlab: the stored checksum no longer matches
        f["cosine"][0, 0] = 7.0
    with pytest.raises(ResultsFileError, match=r"b\.nc: its values were changed after fisherlab wrote it .*"
                                               r"'cosine': 1 value\(s\) outside \[-1, 1\], e\.g\. 7 at rule='gd', "
                                               r"damping=0\.001"):
        load_dataset(out / "b.nc")
    with pytest.warns(ResultsIntegrityWarning, match=r"b\.nc.*strict=False"):
        assert float(load_dataset(out / "b.nc", strict=False).cosine[0, 0]) == 7.0
    with pytest.raises(ResultsFileError, match=r"b\.nc.*changed after"):
        mini_run(out, CONFIG)  # a resume does not reuse it
    assert main(["report", str(out)]) == 2
    assert "b.nc" in capsys.readouterr().err and not (out / "report.html").exists()

    with h5py.File(out / "c.nc", "r+") as f:  # a NaN typed in: in range, but not what was written
        f["kl_measured"][1, 1] = np.nan
    with pytest.raises(ResultsFileError, match=r"c\.nc: its values were changed"):
        load_dataset(out / "c.nc")

    # out of range but re-saved through fisherlab (a consistent checksum): the range check still refuses it
    bad = part(CONFIG, "d", cosine=7.0)
    save_dataset(bad, tmp_path / "d.nc")
    with pytest.raises(ResultsFileError, match=r"d\.nc: values outside their documented range.*'cosine'"):
        load_dataset(tmp_path / "d.nc")
    kappa = new_dataset("geometry", {"condition_number": (("structure",), np.array([3.0, -2.0]))},
                        {"structure": ["original", "kfac"]}, config={}, seed=0, device="cpu", dtype="float64")
    with pytest.raises(ResultsFileError, match=r"'condition_number'.*outside \[1, inf\], e\.g\. -2 at "
                                               r"structure='kfac'"):
        load_dataset(save_dataset(kappa, tmp_path / "k.nc"))

    for name in ("b.nc", "c.nc"):  # the user deletes the edited parts; the rerun recomputes only those
        (out / name).unlink()
    assert mini_run(out, CONFIG) == (True, ["b", "c"])
    assert_intact(out, {"a.nc": before["a.nc"]})


# ------------------------------------------------------------------------------------------ missing variables
def test_a_part_missing_a_variable_is_a_named_error_in_the_report(tmp_path, capsys):
    out = tmp_path / "run"
    mini_run(out, CONFIG)
    before = digests(out)
    save_dataset(part(CONFIG, "b").drop_vars("kl_measured"), out / "b.nc")  # written by fisherlab, incomplete
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "b.nc lacks required variable(s) ['kl_measured']" in err and "AttributeError" not in err
    (out / "b.nc").unlink()
    with h5py.File(out / "c.nc", "r+") as f:  # a variable deleted by hand
        del f["cosine"]
    assert main(["report", str(out)]) == 2
    assert "c.nc" in capsys.readouterr().err
    assert_intact(out, {"a.nc": before["a.nc"]})
    (out / "c.nc").unlink()
    assert mini_run(out, CONFIG) == (True, ["b", "c"])
    assert list(load_output_folder(out)) == [out / f"{p}.nc" for p in PARTS]  # what the report reads


# --------------------------------------------------------------------------- foreign parts, deleted manifest
def test_a_part_copied_in_from_another_configuration_is_refused(tmp_path, capsys):
    mine, other = tmp_path / "mine", tmp_path / "other"
    mini_run(mine, CONFIG)
    mini_run(other, {**CONFIG, "seed": 1})
    before = digests(mine)
    shutil.copy2(other / "b.nc", mine / "b.nc")
    with pytest.raises(InputError, match=r"holds results of a different configuration \(differs in: seed\); "
                                         r"files written by another configuration: b\.nc"):
        mini_run(mine, CONFIG)
    assert main(["report", str(mine)]) == 2
    assert "b.nc was written by a run of another configuration" in capsys.readouterr().err
    (mine / MANIFEST).unlink()  # without the manifest the stamps still tell
    with pytest.raises(InputError, match=r"differs in: seed.*b\.nc"):
        mini_run(mine, CONFIG)
    assert_intact(mine, {k: v for k, v in before.items() if k != "b.nc"})
    (mine / "b.nc").unlink()
    assert mini_run(mine, CONFIG) == (True, ["b"])


def test_run_study_refuses_a_part_of_another_configuration(tmp_path, capsys, study):
    """A part written outside any claimed folder (no stamp) is still checked by its ``config`` on resume."""
    a, b = StudyConfig(**{**study, "parts": ["fidelity"]}), StudyConfig(**{**study, "parts": ["fidelity"],
                                                                            "n_samples": 12})
    run_study(a, tmp_path / "a", progress=False, log=lambda m: None)
    (tmp_path / "b").mkdir()
    shutil.copy2(tmp_path / "a" / "fidelity.nc", tmp_path / "b" / "fidelity.nc")
    with pytest.raises(InputError, match=r"b/fidelity\.nc holds results of a different configuration \(differs in: "
                                         r"n_samples\)"):
        run_study(b, tmp_path / "b", progress=False, log=lambda m: None)
    args = ["fidelity", "--out", str(tmp_path / "b"), "--model", study["model"], "--data", "synthetic-multiclass",
            "--n-samples", "12", "--parts", "fidelity", "--rules", "gd", "ngd", "--damping", "1e-2",
            "--spectrum-kinds", "true", "--no-progress"]
    assert main(args) == 2
    assert "fidelity.nc holds results of a different configuration (differs in: n_samples)" in capsys.readouterr().err
    (tmp_path / "b" / "fidelity.nc").unlink()
    assert main(args) == 0
    assert load_dataset(tmp_path / "b" / "fidelity.nc").attrs["fisherlab_run"] == json.dumps(b.to_dict(),
                                                                                               sort_keys=True)


def test_deleted_manifest_resumes_the_same_configuration_and_refuses_another(tmp_path):
    out = tmp_path / "run"
    mini_run(out, CONFIG)
    before = digests(out)
    (out / MANIFEST).unlink()
    assert mini_run(out, CONFIG) == (True, [])  # the stamps say which run wrote the parts
    assert read_manifest(out)["files"] == ["a.nc", "b.nc", "c.nc"]
    assert_intact(out, before)
    (out / MANIFEST).unlink()
    with pytest.raises(InputError, match=r"differs in: lr"):
        mini_run(out, {**CONFIG, "lr": 0.2})
    with pytest.raises(InputError, match=r"manifest fisherlab-run\.json does not list, so they are not deleted: "
                                         r"a\.nc, b\.nc, c\.nc"):
        mini_run(out, {**CONFIG, "lr": 0.2}, overwrite=True)
    assert_intact(out, before)  # nothing deleted


@pytest.mark.parametrize(("text", "match"), [
    ("{", "is not valid JSON"),
    ('{"created": "2026-01-01"}', "has no 'config' object"),
    ('{"config": {}, "files": "a.nc"}', "'files' is not a list"),
    ("[1, 2]", "has no 'config' object"),
])
def test_corrupt_or_incomplete_manifest_is_named(tmp_path, capsys, text, match):
    out = tmp_path / "run"
    mini_run(out, CONFIG)
    before = digests(out)
    (out / MANIFEST).write_text(text)
    with pytest.raises(ResultsFileError, match=rf"run manifest .*{MANIFEST}.*{match}.*delete it"):
        mini_run(out, CONFIG)
    assert main(["report", str(out)]) == 2
    assert f"run manifest {out / MANIFEST}" in capsys.readouterr().err
    (out / MANIFEST).unlink()  # the remedy the message gives
    assert mini_run(out, CONFIG) == (True, [])
    assert_intact(out, before)


# -------------------------------------------------------------------------------------------------- overwrite
def test_overwrite_deletes_only_what_the_manifest_lists(tmp_path):
    out = tmp_path / "run"
    mini_run(out, CONFIG)
    xr.Dataset({"x": ("a", np.arange(3.0))}).to_netcdf(out / "notes.nc", engine="h5netcdf")  # the user's file
    save_dataset(part({"mine": True}, "z"), out / "mine.nc")  # saved by fisherlab, but not by the run
    (out / "store").mkdir()
    (out / "store" / "keep.nc").write_bytes(b"user data")
    (out / "figures").mkdir()
    for name in ("a_rules.png", "notes_plot.png"):
        (out / "figures" / name).write_bytes(b"png")
    (out / "report.html").write_text("old report")
    user = {**digests(out), "store/keep.nc": "user data"}
    with pytest.raises(InputError, match="differs in: lr.*--overwrite"):
        mini_run(out, {**CONFIG, "lr": 0.2})
    assert mini_run(out, {**CONFIG, "lr": 0.2}, overwrite=True) == (False, list(PARTS))
    now = digests(out)
    assert now["notes.nc"] == user["notes.nc"] and now["mine.nc"] == user["mine.nc"]
    assert (out / "store" / "keep.nc").read_bytes() == b"user data"
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["notes_plot.png"]  # a.nc's figure went with it
    assert not (out / "report.html").exists()
    assert all(now[f"{p}.nc"] != user[f"{p}.nc"] for p in PARTS)
    assert json.loads(load_dataset(out / "a.nc").attrs["config"])["lr"] == 0.2


# ----------------------------------------------------------------------------------------- stale temporaries
def test_the_next_run_removes_only_stale_fisherlab_temporaries(tmp_path):
    out = tmp_path / "run"
    (out / "store").mkdir(parents=True)
    old = time.time() - 3600
    stale = [out / f".a.nc.{'0' * 32}.tmp", out / ".fisherlab-run.json.tmp", out / "store" / f".k.nc.{'f' * 32}.tmp"]
    kept = [out / ".notes.tmp", out / f".a.nc.{'1' * 32}.tmp.bak"]
    for path in (*stale, *kept):
        path.write_bytes(b"partial")
        os.utime(path, (old, old))
    fresh = out / f".b.nc.{'2' * 32}.tmp"  # newer than the claim: another writer's, not touched
    fresh.write_bytes(b"in progress")
    future = time.time() + 3600
    os.utime(fresh, (future, future))
    with contextlib.ExitStack() as stack:
        guard_output_folder(out, CONFIG)
        stack.callback(release_output_folder, out)
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in (*kept, fresh))


def test_a_resumed_study_says_when_a_kept_part_was_written_by_other_code(tmp_path, study, monkeypatch):
    """A rerun keeps the finished parts that carry its configuration; when such a part's fisherlab_version or
    git_commit attrs (read here from the file itself) differ from this process's, the 'already in' line says so;
    with the same code it says nothing more."""
    import fisherlab.results.metadata as metadata

    cfg, out = StudyConfig(**{**study, "parts": ["fidelity"]}), tmp_path / "out"
    run_study(cfg, out, progress=False, log=lambda _: None)
    with xr.open_dataset(out / "fidelity.nc") as ds:
        written = {key: str(ds.attrs[key]) for key in ("fisherlab_version", "git_commit")}
    log: list[str] = []
    monkeypatch.setattr(metadata, "code_provenance", lambda: dict(written))
    run_study(cfg, out, progress=False, log=log.append)
    assert [m for m in log if m.startswith("[fidelity] already in")] == [
        f"[fidelity] already in {out}: kept (delete {out / 'fidelity.nc'} to recompute)"]
    log.clear()
    monkeypatch.setattr(metadata, "code_provenance", lambda: {"fisherlab_version": "9.9.9",
                                                              "git_commit": "0123456789abcdef0123"})
    run_study(cfg, out, progress=False, log=log.append)
    line = next(m for m in log if m.startswith("[fidelity] already in"))
    expected = [f"{key} {written[key][:12]} (this run: {now})"
                for key, now in (("fisherlab_version", "9.9.9"), ("git_commit", "0123456789ab"))
                if written[key] != "unknown"]  # an unknown side is no difference
    assert expected and line.endswith("; written by other code: " + ", ".join(expected))
