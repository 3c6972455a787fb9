"""The report of ``fisherlab fidelity`` drawn in a process of its own while the study computes (cli.ReportProcess,
report.serve): the same files as ``fisherlab report`` draws afterwards, figures drawn as each part is saved, and a
report that fails or is interrupted loses no result."""

from __future__ import annotations

import contextlib
import io
import shutil
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


def test_report_drawn_beside_the_study_is_the_report_rebuilt_afterwards(study, tmp_path):
    out, printed = study
    assert "in a process of its own" in printed and "one thread beside geometry" in printed
    assert "drawing the report here" not in printed
    rebuilt = datasets_only(out, tmp_path / "rebuilt")
    assert main(["report", str(rebuilt)]) == 0
    drawn, again = files(out), files(rebuilt)
    assert sorted(drawn) == sorted(again) and len(drawn) == 1 + 2 * 6  # fidelity 3, geometry 1, spectrum 2
    assert not [name for name in drawn if drawn[name] != again[name]]  # byte for byte, SVGs included


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


@pytest.mark.parametrize("failure", ["dies", "cannot start"])
def test_a_failed_report_process_leaves_the_report_to_the_command(tmp_path, capsys, monkeypatch, failure):
    """The process dies at once, or cannot start: the command draws the report itself (the same files as
    ``fisherlab report``) and says so."""
    if failure == "dies":
        monkeypatch.setattr(cli, "REPORT_PROCESS", "import sys; sys.exit('no display for the report')")
        why = "no display for the report"
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


def test_a_refused_option_kills_the_report_process(tmp_path, capsys, started):
    """The process starts before the options are checked (its imports beside the command's); a refused option
    ends it at once, and claims no folder."""
    out = tmp_path / "run"
    assert main(["fidelity", "--out", str(out), *STUDY, "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert started[0]._proc.returncode == -9 and not out.exists()  # killed, not left to finish its imports
