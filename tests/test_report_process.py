"""The report of ``fisherlab fidelity`` drawn in a process of its own while the study computes (cli.ReportProcess,
report.serve): the same files as ``fisherlab report`` draws afterwards, figures drawn as each part is saved, and a
report that fails or is interrupted loses no result."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fisherlab import cli, report
from fisherlab.cli import ReportProcess, main
from fisherlab.results import load_dataset

#: A small study with parts side by side (spectrum beside geometry, two threads); the report's λ is 1e-2.
STUDY = ["--data", "synthetic-multiclass", "--n-samples", "24", "--no-progress", "--rules", "gd", "ngd", "kfac",
         "--damping", "1e-3", "1e-2", "1e-1", "--parts", "fidelity", "geometry", "spectrum",
         "--geometry-structures", "block", "--spectrum-kinds", "true", "empirical"]
PARTS = ("fidelity", "geometry", "spectrum")


def files(folder: Path) -> dict[str, bytes]:
    """The report's files: report.html and every figure, by path in ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in [folder / "report.html", *sorted((folder / "figures").iterdir())]}


def datasets_only(folder: Path, dest: Path) -> Path:
    """A copy of ``folder`` without its report (page and figures)."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("figures", "report.html"))
    return dest


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """``fisherlab fidelity`` on :data:`STUDY` with two threads (its parts after the first side by side): the
    folder and what it printed."""
    out = tmp_path_factory.mktemp("process") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main(["fidelity", "--out", str(out), *STUDY]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, printed.getvalue()


@pytest.mark.slow  # the module's study: 14-17 s (load 4-5, 2 cores)
def test_report_drawn_beside_the_study_is_the_report_rebuilt_afterwards(study, tmp_path):
    out, printed = study
    assert "in a process of its own" in printed and "one thread beside geometry" in printed
    assert "drawing the report here" not in printed
    rebuilt = datasets_only(out, tmp_path / "rebuilt")
    assert main(["report", str(rebuilt)]) == 0
    drawn, again = files(out), files(rebuilt)
    assert sorted(drawn) == sorted(again) and len(drawn) == 1 + 2 * 6  # fidelity 3, geometry 1, spectrum 2
    assert not [name for name in drawn if drawn[name] != again[name]]  # byte for byte, SVGs included


@pytest.mark.slow  # the module's study, then 3-12 s (load 4-5)
def test_figures_are_drawn_when_their_dataset_is_saved(study, tmp_path):
    """Each ``saved`` Dataset's figures appear before the page is asked for; the page then keeps them."""
    folder = datasets_only(study[0], tmp_path / "run")
    drawer = ReportProcess()
    try:
        drawer.open(folder, 1e-2)
        drawer.saved(folder / "fidelity.nc")
        deadline = time.monotonic() + 120
        while not (folder / "figures" / "fidelity_fidelity_rules.svg").is_file():
            assert time.monotonic() < deadline and drawer._proc.poll() is None
            time.sleep(0.05)
        assert not (folder / "report.html").exists()
        for part in PARTS[1:]:
            drawer.saved(folder / f"{part}.nc")
        reply = drawer.finish()
    finally:
        drawer.close()
    assert reply is not None and Path(reply["report"]) == folder / "report.html" and reply["cpu"] > 0
    assert files(folder) == files(study[0])
    assert drawer._proc.returncode == 0


@pytest.mark.slow  # the module's study, then 5-19 s (load 4-5)
def test_figures_drawn_from_another_damping_or_file_are_drawn_again(study, tmp_path):
    """build_report keeps a drawn figure only if it was drawn at the page's λ from the file as it is now."""
    folder = datasets_only(study[0], tmp_path / "run")
    path = folder / "geometry.nc"
    record = report.draw_figures(path, load_dataset(path), 1e-2)
    assert record.stems == ["geometry_geometry_spectra"] and record.damping == 1e-2
    png = folder / "figures" / "geometry_geometry_spectra.png"
    right = png.read_bytes()
    png.write_bytes(b"kept")  # a figure that was kept embeds these bytes
    report.build_report(folder, drawn={"geometry.nc": record})
    assert png.read_bytes() == b"kept"
    for stale in (record._replace(damping=1e-1), record._replace(stamp=(0, 0))):
        png.write_bytes(b"kept")
        report.build_report(folder, drawn={"geometry.nc": stale})
        assert png.read_bytes() == right
    assert files(folder) == files(study[0])


@pytest.mark.slow  # a study each: 4-18 s (load 4-5)
@pytest.mark.parametrize("failure", ["dies", "cannot start", "stray line"])
def test_a_failed_report_process_leaves_the_report_to_the_command(tmp_path, capsys, monkeypatch, failure):
    """The process dies at once, cannot start, or prints something else than its reply last: the command draws
    the report itself (the same files as ``fisherlab report``) and says so."""
    if failure == "dies":
        monkeypatch.setattr(cli, "REPORT_PROCESS", "import sys; sys.exit('no display for the report')")
        why = "no display for the report"
    elif failure == "stray line":
        monkeypatch.setattr(cli, "REPORT_PROCESS", "import sys; sys.stdin.read(); print('stray')")
        why = "its last line of output is not its reply: 'stray'"
    else:
        monkeypatch.setattr(cli.sys, "executable", str(tmp_path / "no-python"))
        why = f"cannot start it: [Errno 2] No such file or directory: '{tmp_path / 'no-python'}'"
    out = tmp_path / "run"
    assert main(["fidelity", "--out", str(out), *STUDY]) == 0
    monkeypatch.undo()
    captured = capsys.readouterr()
    assert f"the report process failed ({why}); drawing the report here" in captured.err
    assert "all threads; with the import of matplotlib and seaborn" in captured.out
    rebuilt = datasets_only(out, tmp_path / "rebuilt")
    assert main(["report", str(rebuilt)]) == 0
    assert files(rebuilt) == files(out)


@pytest.mark.slow  # a study: 13-22 s (load 4-5)
def test_a_report_that_fails_keeps_every_dataset(tmp_path, monkeypatch):
    """A figure that raises, in the report process and then in the command: the error comes out, every part is
    saved and loads, and ``fisherlab report`` draws the report once the figure works."""

    def broken(ds, damping=None):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(report, "PLOTTERS", {**report.PLOTTERS, "geometry": broken})  # the command's own drawing
    monkeypatch.setattr(cli, "REPORT_PROCESS", cli.REPORT_PROCESS.replace(  # and the process's
        "from fisherlab.report import serve;", "import fisherlab.report as r; r.PLOTTERS['geometry'] = None; "
                                               "from fisherlab.report import serve;"))
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="figure failed"):
        main(["fidelity", "--out", str(out), *STUDY])
    assert not (out / "report.html").exists()
    for part in PARTS:
        assert load_dataset(out / f"{part}.nc").attrs["fisherlab_kind"] == part
    monkeypatch.undo()
    assert main(["report", str(out)]) == 0 and (out / "report.html").is_file()


@pytest.fixture
def started(monkeypatch) -> list[ReportProcess]:
    """The report processes the commands start (each recorded)."""
    processes: list[ReportProcess] = []

    def recorded():
        processes.append(ReportProcess())
        return processes[-1]

    monkeypatch.setattr(cli, "report_process", recorded)
    return processes


@pytest.mark.slow  # a study and its rerun: 7-11 s (load 4-5)
def test_interrupted_study_ends_its_report_process_and_keeps_the_finished_parts(tmp_path, monkeypatch, capsys,
                                                                                started):
    """Ctrl-C after the first part: the report process ends with the command (status 130), the saved part stays,
    and the rerun resumes from it."""
    saved = ReportProcess.saved

    def interrupt(self, path):  # the first part is saved, and told, when Ctrl-C comes
        saved(self, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(ReportProcess, "saved", interrupt)
    out = tmp_path / "run"
    assert main(["fidelity", "--out", str(out), *STUDY]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert started[0]._proc.returncode is not None  # ended, not left running
    assert sorted(p.name for p in out.glob("*.nc")) == ["fidelity.nc"]
    monkeypatch.undo()
    monkeypatch.setattr(cli, "report_process", lambda: None)
    assert main(["fidelity", "--out", str(out), *STUDY]) == 0
    assert "[fidelity] already in" in capsys.readouterr().out


@pytest.mark.skipif(os.name != "posix", reason="killed by SIGKILL on POSIX only")
def test_a_refused_option_kills_the_report_process(tmp_path, capsys, started):
    """The process starts before the options are checked (its imports beside the command's); a refused option
    ends it at once, and claims no folder."""
    out = tmp_path / "run"
    assert main(["fidelity", "--out", str(out), *STUDY, "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert started[0]._proc.returncode == -signal.SIGKILL and not out.exists()  # killed, not left to finish its imports


# ------------------------------------------------------------------ the process and its protocol, without drawing
def _child(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -X dev -W error -c code args``: every warning an error, ResourceWarnings shown."""
    return subprocess.run([sys.executable, "-X", "dev", "-W", "error", "-c", code, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_a_report_process_that_ended_on_its_own_is_closed_with_its_pipes():
    """The process ends before the command finishes (its own error), and finish is never called: close still
    closes its pipes (no ResourceWarning for an unclosed file, under warnings as errors)."""
    result = _child("import gc, sys\n"
                    "from fisherlab import cli\n"
                    "cli.REPORT_PROCESS = 'import sys; sys.exit(3)'\n"
                    "drawer = cli.ReportProcess()\n"
                    "assert drawer._proc.wait(60) == 3\n"
                    "drawer.close()\n"
                    "del drawer; gc.collect(); print('closed')")
    assert result.returncode == 0 and result.stdout == "closed\n", result.stderr
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("last", ["a stray line", "[1, 2]"])
def test_a_last_line_that_is_not_a_reply_is_a_failed_report(monkeypatch, last):
    """A reply, then something else printed last: finish says so (the command draws the report itself)."""
    monkeypatch.setattr(cli, "REPORT_PROCESS", "import sys; sys.stdin.read(); "
                        f"print('{{\"report\": \"r\", \"console\": \"\", \"cpu\": 1}}'); print({last!r})")
    drawer = ReportProcess()
    try:
        assert drawer.finish() is None
    finally:
        drawer.close()
    assert drawer.error == f"its last line of output is not its reply: {last!r}"
    assert drawer._proc.returncode == 0


def test_no_file_for_its_errors_is_a_process_that_cannot_start(monkeypatch):
    """tempfile.TemporaryFile fails (a full disk): the command is told, not crashed; nothing runs."""
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    drawer = ReportProcess()
    drawer.open(Path("run"), None)
    drawer.saved(Path("run/fidelity.nc"))
    assert drawer.finish() is None
    drawer.close()
    assert drawer.error == "cannot start it: [Errno 28] No space left on device" and drawer._proc is None


@pytest.mark.parametrize("rank", ["1", "3"])
def test_only_rank_0_has_a_report_process(monkeypatch, rank):
    """torchrun's RANK: report_process() is None on another rank, a process on rank 0 or without RANK."""
    monkeypatch.setenv("RANK", rank)
    assert cli.report_process() is None
    for lead in ("0", ""):
        monkeypatch.setenv("RANK", lead)
        drawer = cli.report_process()
        assert isinstance(drawer, ReportProcess)
        drawer.close()
    monkeypatch.delenv("RANK")
    drawer = cli.report_process()
    assert isinstance(drawer, ReportProcess)
    drawer.close()


def _sys_path_and_package(cwd: Path, find: str) -> tuple[list[str], str]:
    """The child's sys.path after ``find`` and the fisherlab it would import, run in ``cwd``."""
    package = str(Path(cli.__file__).resolve().parents[1])
    result = _child(find + "import importlib.util, json\n"
                    "print(json.dumps([sys.path, importlib.util.find_spec('fisherlab').origin]))", package, cwd=cwd)
    assert result.returncode == 0, result.stderr
    path, imported = json.loads(result.stdout)
    return path, imported


def test_the_report_process_puts_the_package_first_on_its_path_only_where_needed(tmp_path):
    """Where ``fisherlab`` resolves to this package anyway (installed, or on PYTHONPATH) the child's sys.path is a
    plain child's (no folder ahead of the standard library); where it would resolve to another copy (a
    ``fisherlab`` folder in the working directory) this package's folder goes first and this package is imported."""
    own = Path(cli.__file__).resolve().with_name("__init__.py")
    plain, imported = _sys_path_and_package(tmp_path, "import sys\n")
    if Path(imported).resolve() != own:
        pytest.skip("fisherlab is not importable by a plain child here (not installed)")
    assert _sys_path_and_package(tmp_path, cli.FIND_PACKAGE) == (plain, imported)
    (tmp_path / "fisherlab").mkdir()
    (tmp_path / "fisherlab" / "__init__.py").write_text("raise ImportError('another fisherlab')\n")
    path, imported = _sys_path_and_package(tmp_path, cli.FIND_PACKAGE)
    assert Path(imported).resolve() == own and path[0] == str(own.parents[1])


@pytest.fixture
def drawing(monkeypatch, tmp_path) -> list[tuple]:
    """serve's loading and drawing stubbed out (each call recorded, in order), for the protocol alone."""
    calls: list[tuple] = []
    monkeypatch.setattr("fisherlab.results.load_dataset", lambda path: calls.append(("load", path)) or path.stem)
    monkeypatch.setattr(report, "draw_figures", lambda path, ds, damping: calls.append(("draw", ds, damping))
                        or f"drawn {ds}")
    monkeypatch.setattr(report, "build_report", lambda folder, drawn: calls.append(("page", folder, drawn))
                        or folder / "report.html")
    monkeypatch.setattr(report, "study_console", lambda saved: calls.append(("console", saved)) or "the tables")
    return calls


def _requests(folder: Path, *lines: dict) -> io.StringIO:
    return io.StringIO("".join(json.dumps(r) + "\n" for r in [{"folder": str(folder), "damping": 0.01}, *lines]))


def test_serve_draws_each_saved_dataset_and_answers_finish_with_one_line(tmp_path, drawing):
    replies = io.StringIO()
    requests = _requests(tmp_path, {"saved": "fidelity.nc"}, {"saved": "spectrum.nc"}, {"finish": True},
                         {"saved": "after.nc"})
    assert report.serve(requests, replies) == 0
    assert drawing == [("load", tmp_path / "fidelity.nc"), ("draw", "fidelity", 0.01),
                       ("load", tmp_path / "spectrum.nc"), ("draw", "spectrum", 0.01),
                       ("page", tmp_path, {"fidelity.nc": "drawn fidelity", "spectrum.nc": "drawn spectrum"}),
                       ("console", {"fidelity.nc": "fidelity", "spectrum.nc": "spectrum"})]
    lines = replies.getvalue().splitlines()
    assert len(lines) == 1 and replies.getvalue().endswith("\n")
    reply = json.loads(lines[0])
    assert reply.keys() == {"report", "console", "cpu"} and reply["cpu"] > 0
    assert (reply["report"], reply["console"]) == (str(tmp_path / "report.html"), "the tables")
    assert requests.readline() != ""  # it returned at finish: the request after it is not read


@pytest.mark.parametrize("requests", ["", "folder", "saved"])
def test_serve_without_finish_writes_nothing(tmp_path, drawing, requests):
    """Its input ends before a finish (the study stopped): nothing is written, status 0; what was saved is drawn
    (each figure is written whole, results.lock.write_atomically), the page is not."""
    lines = {"": io.StringIO(), "folder": _requests(tmp_path), "saved": _requests(tmp_path, {"saved": "a.nc"})}
    replies = io.StringIO()
    assert report.serve(lines[requests], replies) == 0
    assert replies.getvalue() == ""
    assert [c[0] for c in drawing] == (["load", "draw"] if requests == "saved" else [])


class _Interrupted(io.StringIO):
    """Requests whose reading is interrupted (Ctrl-C) after ``lines`` lines."""

    def __init__(self, text: str, lines: int):
        super().__init__(text)
        self.left = lines

    def readline(self, *args) -> str:
        self.left -= 1
        if self.left < 0:
            raise KeyboardInterrupt
        return super().readline(*args)

    def __next__(self) -> str:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


def _ctrl_c(*args):
    raise KeyboardInterrupt


@pytest.mark.parametrize("lines", [0, 1, 2])
def test_serve_interrupted_returns_130_and_writes_nothing(tmp_path, monkeypatch, drawing, lines):
    """Ctrl-C while it waits for the folder, for a request, or while it draws: status 130, no reply."""
    requests = _Interrupted(_requests(tmp_path, {"saved": "a.nc"}, {"finish": True}).getvalue(), lines)
    if lines == 2:  # the Dataset's drawing is interrupted
        monkeypatch.setattr(report, "draw_figures", _ctrl_c)
    replies = io.StringIO()
    assert report.serve(requests, replies) == 130
    assert replies.getvalue() == "" and not [c for c in drawing if c[0] == "page"]
