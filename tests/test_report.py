"""The HTML report: headline table, figures a person can read, the same page on rebuild, no global side effects,
and every figure loading in a real browser (headless Chromium)."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from itertools import combinations

import numpy as np
import pytest
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from shared_runs import SMALL, main_job, report_rebuild

from fisherlab import report
from fisherlab.cli import main
from fisherlab.results import NATS_COMMENT, load_dataset
from fisherlab.study import headline


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The main job on :data:`shared_runs.MAIN_JOB` (run once per session, shared with tests/test_cli.py; the
    tests here only read it)."""
    return main_job(tmp_path_factory)


def datasets(folder):
    return {f.stem: load_dataset(f) for f in sorted(folder.glob("*.nc"))}


def drawn(fig):
    """The figure drawn on an Agg canvas (extents of its texts and legends are known after this)."""
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig


# -------------------------------------------------------------------------------------------- headline
def test_headline_is_a_table_of_the_saved_values_at_one_damping(study):
    results = datasets(study)
    fid, traj, geo = results["fidelity"], results["trajectory"], results["geometry"]
    lam = float(traj.damping.values[0])
    assert lam == 1e-2  # the middle damping: the trajectory's, and the one the whole page uses
    assert report.study_damping(results.values()) == lam
    header, rows = headline(results)
    assert header == ["rule", "cosine to NGD at start (λ=0.01)", "cosine after 4 sngd-kfac steps (λ=0.01)",
                      "κ seen by GD (λ=0.01)"]
    table = {r[0]: r[1:] for r in rows}
    for rule in fid.rule.values:
        assert table[rule][0] == f"{float(fid.cosine.sel(rule=rule, damping=lam)):.3f}"
    for rule in ("gd", "ngd", "kfac"):
        assert table[rule][1] == f"{float(traj.cosine.sel(rule=rule, damping=lam).isel(step=-1)):.3f}"
    # the update the training took: a readable label, not the internal coordinate "train:sngd-kfac"
    trained = table["sngd-kfac (as trained, stale G)"]
    assert trained[:2] == ["—", f"{float(traj.cosine.sel(rule='train:sngd-kfac', damping=lam).isel(step=-1)):.3f}"]
    assert not any(r[0].startswith("train:") for r in rows)
    # κ: gd sees the original network's Fisher, sngd-<s> the one of the network reconstructed with s
    assert table["gd"][2] == f"{float(geo.condition_number.sel(structure='original', damping=lam)):.3g}"
    assert table["sngd-kfac"][2] == f"{float(geo.condition_number.sel(structure='kfac', damping=lam)):.3g}"
    assert table["sngd-block"] == ["—", "—", f"{float(geo.condition_number.sel(structure='block', damping=lam)):.3g}"]
    assert table["ngd"][0] == "1.000" and table["ngd"][2] == "—"
    # sorted by the first column, the trained row right after its rule
    first = [float(r[1]) for r in rows if r[1] != "—"]
    assert first == sorted(first, reverse=True)
    names = [r[0] for r in rows]
    assert names.index("sngd-kfac (as trained, stale G)") == names.index("sngd-kfac") + 1


def test_headline_names_the_damping_of_each_column_and_marks_what_is_missing(study):
    results = datasets(study)
    header, rows = headline(results, damping=1e-3)  # trajectory and geometry have only λ = 0.01: they say so
    assert header[1:] == ["cosine to NGD at start (λ=0.001)", "cosine after 4 sngd-kfac steps (λ=0.01)",
                          "κ seen by GD (λ=0.01)"]
    gd = float(results["fidelity"].cosine.sel(rule="gd", damping=1e-3))
    assert dict((r[0], r[1]) for r in rows)["gd"] == f"{gd:.3f}"
    fid = results["fidelity"].copy(deep=True)
    fid["cosine"].loc[{"rule": "kfac"}] = np.nan  # a rule that could not be evaluated
    header, rows = headline({"fidelity": fid})
    assert header == ["rule", "cosine to NGD at start (λ=0.01)"]  # no trajectory: the middle damping
    assert dict(rows)["kfac"] == "n/a"
    assert rows[-1][0] == "kfac"  # unavailable rules sort last
    assert headline({"spectrum": results["spectrum"]}) == ([], [])


# ---------------------------------------------------------------------------------------------- page
def test_report_opens_with_title_and_headline_then_figures_then_configuration(study):
    page = (study / "report.html").read_text()
    assert re.search(r"<h1>fisherlab fidelity study: mlp on synthetic-multiclass</h1>", page)
    assert re.search(r"<title>fisherlab fidelity study: mlp on synthetic-multiclass</title>", page)
    positions = [page.index(s) for s in ('<table id="headline">', "<img", "<h2>Configuration</h2>",
                                          "<h2>Provenance</h2>")]
    assert positions == sorted(positions)
    assert "λ = 0.01 (the trajectory&#x27;s damping) wherever the page shows one damping" in page
    assert "train:" not in page.split("<h2>Configuration</h2>")[0]
    assert page.count("<img") == len(list((study / "figures").glob("*.png")))


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """One rebuild of the study's page by ``fisherlab report``, with a figure of the user's open: the page before
    and after, pyplot's figure numbers and matplotlib's rcParams around it (one report build, once per session,
    serves the two tests below and tests/test_cli.py; each is most of a minute of figure layout on the loaded
    machine)."""
    return report_rebuild(tmp_path_factory)


def test_report_command_rebuilds_the_same_page(rebuilt):
    assert rebuilt["status"] == 0
    assert rebuilt["again"] == rebuilt["first"]  # title and headline included: nothing from the run


def test_spectra_command_writes_a_report(tmp_path, capsys):
    out = tmp_path / "spectra"
    assert main(["spectra", "--out", str(out), *SMALL, "--kinds", "true", "empirical"]) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert "<h1>fisherlab spectra: mlp on synthetic-multiclass</h1>" in page
    spec = load_dataset(out / "spectrum.nc")
    header, rows = report.table_spectrum(spec)
    assert f'<table id="headline"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}' in page
    assert page.count("<img") == 2


def test_columns_infinite_in_every_row_are_left_out_and_said_so(capsys):
    header = ["kind", "κ(λ=0)", "κ(λ=0.1)", "κ(λ=1)"]
    rows = [["true", "inf", "12.5", "inf"], ["mc", "inf", "inf", "3"]]
    assert report.drop_infinite_columns(header, rows) == (
        (["kind", "κ(λ=0.1)", "κ(λ=1)"], [["true", "12.5", "inf"], ["mc", "inf", "3"]]), ["κ(λ=0)"])
    page = report._html_table((header, rows))
    assert "κ(λ=0)</th>" not in page and "Left out, infinite in every row: κ(λ=0)." in page
    report.print_table(header, rows)
    out = capsys.readouterr().out
    assert "κ(λ=0) " not in out.splitlines()[0] and out.rstrip().endswith("κ(λ=0).")


# ------------------------------------------------------------------------------------------- figures
def all_figures(results):
    lam = report.study_damping(results.values())
    return [(name, drawn(fig)) for ds in results.values()
            for name, fig in report.PLOTTERS[ds.attrs["fisherlab_kind"]](ds, lam)]


@pytest.fixture(scope="module")
def figures(study):
    """Every figure of the study's page as (name, figure), drawn at the page's damping (λ = 0.01) once for the two
    tests below."""
    return all_figures(datasets(study))


def test_line_plots_drawn_without_aggregation_match_seaborns_aggregated_lines(study, monkeypatch):
    """ONE_VALUE_LINES (no per-x estimator or band) draws the very pixels of seaborn's default mean-and-CI lines,
    because every (x, hue) of the report's line plots holds one value."""
    from matplotlib import rc_context

    results = datasets(study)
    lam = report.study_damping(results.values())

    def pixels():
        with rc_context(report._theme()):
            return {name: np.asarray(drawn(fig).canvas.buffer_rgba()).copy()
                    for kind in ("spectrum", "geometry", "fidelity_trajectory")
                    for ds in results.values() if ds.attrs["fisherlab_kind"] == kind
                    for name, fig in report.PLOTTERS[kind](ds, lam)}

    fast = pixels()
    monkeypatch.setattr(report, "ONE_VALUE_LINES", {})
    aggregated = pixels()
    assert set(fast) == {"spectrum", "condition_number", "geometry_spectra", "trajectory_cosine"}
    for name in fast:
        np.testing.assert_array_equal(fast[name], aggregated[name], err_msg=name)


def test_legends_cover_no_axes(figures):
    assert {name for name, _ in figures} >= {"fidelity_rules", "kl_predicted_vs_measured", "fidelity_layers",
                                             "trajectory_cosine", "geometry_spectra", "spectrum",
                                             "condition_number"}
    renderer_checked = 0
    for name, fig in figures:
        legends = [*fig.legends, *[ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]]
        for legend in legends:
            box = legend.get_window_extent()
            for ax in fig.axes:
                assert not box.overlaps(ax.get_window_extent()), (name, legend.get_title().get_text())
            renderer_checked += 1
    assert renderer_checked >= 6


def test_heatmap_labels_do_not_overlap_and_use_the_report_damping(study, figures):
    results = datasets(study)
    ax = dict(figures)["fidelity_layers"].axes[0]
    assert ax.get_title() == "per-layer cosine to exact NGD (λ = 0.01)"
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        boxes = [t.get_window_extent() for t in labels]
        assert len(boxes) >= 3
        assert not any(a.overlaps(b) for a, b in combinations(boxes, 2))
    cells = [float(t.get_text()) for t in ax.texts]  # the annotations are the Dataset's values at λ = 0.01
    np.testing.assert_allclose(cells, results["fidelity"].cosine_layer.sel(damping=1e-2).values.ravel(), atol=5e-3)


def test_axis_labels_carry_the_units_of_the_attrs(study):
    fid = datasets(study)["fidelity"]
    assert fid.kl_measured.attrs["comment"] == NATS_COMMENT
    kl = dict(report.plot_fidelity(fid))["kl_predicted_vs_measured"].axes[0]
    assert kl.get_xlabel() == "predicted KL ½uᵀFu (nat)" and kl.get_ylabel() == "measured KL (nat)"
    trajectory = dict(report.plot_trajectory(datasets(study)["trajectory"]))["trajectory_cosine"]
    assert trajectory.axes[1].get_ylabel() == "loss (nat)"
    assert trajectory.axes[0].get_ylabel() == "cosine to exact NGD"  # units "1": nothing to add
    seconds = xr.DataArray([1.0], name="wall_time", attrs={"long_name": "wall time", "units": "s"})
    assert report.axis_label(seconds) == "wall time (s)"


def _log_figure():
    """Two log-log panels under the report's theme: one spanning 8 decades, one within a decade."""
    fig = report.new_figure(7, 3)
    wide, narrow = fig.subplots(1, 2)
    wide.plot(np.logspace(-6, 2, 30), np.logspace(0, -8, 30))
    narrow.plot([2.0, 3.0, 5.0], [1.5, 2.5, 4.0])
    for ax in (wide, narrow):
        ax.set(xscale="log", yscale="log")
    return fig, wide, narrow


def test_dropping_invisible_minor_ticks_changes_no_pixel(tmp_path, monkeypatch):
    from matplotlib import rc_context
    from PIL import Image

    with rc_context(report._theme()):
        with monkeypatch.context() as m:  # the same figure saved with every minor tick matplotlib makes
            m.setattr(report, "_drop_invisible_minor_ticks", lambda fig: None)
            report.save_figure(_log_figure()[0], tmp_path / "as_matplotlib_draws_it")
        fig, wide, narrow = _log_figure()
        report.save_figure(fig, tmp_path / "saved")
    assert len(wide.xaxis.get_minor_locator().tick_values(1e-6, 1e2)) == 0  # the wide axes lost theirs ...
    assert len(narrow.xaxis.get_minor_locator().tick_values(2.0, 5.0)) > 0  # ... the one-decade axes keep theirs
    assert any(t.get_text() for t in narrow.xaxis.get_minorticklabels())  # they carry its only labels
    want, got = (np.asarray(Image.open(tmp_path / name).convert("RGB"))
                 for name in ("as_matplotlib_draws_it.png", "saved.png"))
    np.testing.assert_array_equal(got, want)


def _label_value(label: str) -> float:
    """The number a plain-text log label such as ``2×10⁻³`` or ``−10⁵`` reads as."""
    digits = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻·−", "0123456789-.-")
    mantissa, _, power = label.partition("10")
    coeff = mantissa.rstrip("×").translate(digits)
    return float(coeff if coeff not in ("", "-") else coeff + "1") * 10.0 ** int(power.translate(digits) or 0)


def test_log_axes_are_labelled_in_plain_text_at_the_ticks_matplotlib_labels(tmp_path):
    from matplotlib import rc_context
    from matplotlib.ticker import LogFormatterSciNotation

    with rc_context(report._theme()):
        fig, wide, narrow = _log_figure()
        report.save_figure(fig, tmp_path / "saved")
    for axis in (wide.xaxis, wide.yaxis, narrow.xaxis, narrow.yaxis):
        for which, get, formatter in (("major", axis.get_majorticklabels, axis.get_major_formatter()),
                                      ("minor", axis.get_minorticklabels, axis.get_minor_formatter())):
            assert isinstance(formatter, report.PlainLogFormatter)
            ticks = [t for t in get() if t.get_visible()]
            reference = LogFormatterSciNotation(labelOnlyBase=formatter.labelOnlyBase,
                                                minor_thresholds=formatter.minor_thresholds)
            reference.set_axis(axis)
            reference.set_locs([t.get_position()[axis.axis_name == "y"] for t in ticks])
            for t in ticks:
                value = t.get_position()[axis.axis_name == "y"]
                text = t.get_text()
                assert "$" not in text
                assert bool(text) == bool(reference(value)), (which, value, text)
                if text:
                    assert _label_value(text) == pytest.approx(value, rel=1e-12), (text, value)
    assert "10⁻⁶" in [t.get_text() for t in wide.xaxis.get_majorticklabels()]
    assert "−10⁻³" == report.PlainLogFormatter()(-1e-3)


# -------------------------------------------------------------------------------------------- globals
def test_importing_the_report_changes_no_matplotlib_state():
    code = ("import matplotlib, sys\n"
            "before = dict(matplotlib.rcParams)\n"
            "import fisherlab, fisherlab.report\n"
            "after = dict(matplotlib.rcParams)\n"
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
            "assert before == after, {k for k in before if before[k] != after[k]}\n")
    env = {**os.environ, "MPLBACKEND": "svg"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_building_a_report_leaves_pyplot_and_style_alone(rebuilt):
    assert rebuilt["status"] == 0
    assert rebuilt["mine"] in rebuilt["fignums"] and rebuilt["fignums"] == rebuilt["open_before"]
    assert rebuilt["style_after"] == rebuilt["style"]


# ------------------------------------------------------------------------------------------- browser
CHECK = """<script>window.addEventListener("load", () => {
  const head = document.querySelector("table#headline");
  const out = {images: [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]),
               headline: head ? [...head.rows].map(r => [...r.cells].map(c => c.textContent)) : null};
  const pre = document.createElement("pre");
  pre.id = "fisherlab-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


def chromium() -> str | None:
    """A headless-capable Chromium on PATH (Debian's package: chromium)."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def test_report_loads_in_headless_chromium(study, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/setup installs it)")
    page = (study / "report.html").read_text()
    probe = tmp_path / "report.html"
    probe.write_text(page.replace("</body>", CHECK + "</body>"), encoding="utf-8")
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
                           probe.as_uri()], capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="fisherlab-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, (proc.returncode, proc.stderr[-2000:])
    result = json.loads(html.unescape(found.group(1)))
    images = result["images"]
    assert len(images) == page.count("<img") >= 7
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in images), images
    header, *rows = result["headline"]
    assert header[0] == "rule" and header[1] == "cosine to NGD at start (λ=0.01)"
    assert ["sngd-kfac (as trained, stale G)", "—"] == rows[[r[0] for r in rows].index(
        "sngd-kfac (as trained, stale G)")][:2]
