"""Reports: seaborn figures and a self-contained HTML page built from the Datasets saved in an output folder.

A report is derived data only: :func:`build_report` reads every ``*.nc`` file of a folder (validated by
:func:`fisherlab.results.load_dataset`) and writes ``report.html``: the title and a headline table
(:func:`fisherlab.study.headline` for a fidelity study, else each Dataset's table from ``TABLES``), then the
figures registered for each Dataset kind (``PLOTTERS``, saved as PNG and SVG under ``figures/`` and embedded as
PNG, so the page is one file) with the detailed tables, then the configuration and the provenance. Title and
headline come from the saved Datasets and the folder's run manifest only, so ``fisherlab report FOLDER`` rebuilds
the same page without recomputing anything. Where a figure or the headline shows one damping, it is the same λ
(:func:`study_damping`). ``fisherlab fidelity`` draws each Dataset's figures as soon as the study saved it, in a
process of its own (:func:`serve`), and its page keeps them: the same files as ``fisherlab report`` draws.

Importing this module changes no global state (no ``matplotlib.use``, no seaborn theme): the figures are
:class:`matplotlib.figure.Figure` objects outside pyplot, drawn under a local seaborn style, so a notebook keeps
its inline backend and its own style.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import seaborn as sns
import xarray as xr
from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import LogFormatterSciNotation, NullLocator

from fisherlab.errors import InputError
from fisherlab.results import NATS_COMMENT, guard_output_folder, load_output_folder, read_manifest
from fisherlab.results.lock import write_atomically

#: A table: header and rows of cells (strings).
Table = tuple[list[str], list[list[str]]]
#: A named figure: (file stem, figure).
Figure = tuple[str, MplFigure]
#: Draws the figures of one Dataset; the second argument is the report's damping λ (None: the plotter's choice).
Plotter = Callable[[xr.Dataset, "float | None"], list[Figure]]


# ------------------------------------------------------------------------------------------------ console
def drop_infinite_columns(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[Table, list[str]]:
    """The table without the columns that are infinite in every row (e.g. κ(λ=0) of singular Fishers).

    Returns:
        ``((header, rows), dropped)``: the kept table and the headers of the dropped columns.
    """
    cells = [[str(c) for c in r] for r in rows]
    infinite = {"inf", "-inf", "∞"}
    keep = [i for i in range(len(header)) if not cells or any(r[i] not in infinite for r in cells)]
    return ([str(header[i]) for i in keep], [[r[i] for i in keep] for r in cells]), [
        str(header[i]) for i in range(len(header)) if i not in keep]


def dropped_note(dropped: Sequence[str]) -> str:
    """The sentence saying which all-infinite columns a table left out ('' if none)."""
    return f"Left out, infinite in every row: {', '.join(dropped)}." if dropped else ""


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned plain-text table, each line ending in a newline (``''`` for an empty header).

    Columns infinite in every row are left out, and a last line says so.
    """
    if not header:
        return ""
    (header, cells), dropped = drop_infinite_columns(header, rows)
    cells = [header, *cells]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if k and i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    if dropped:
        lines.append(dropped_note(dropped))
    return "".join(f"{line}\n" for line in lines)


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print :func:`format_table`."""
    print(format_table(header, rows), end="")


def study_console(results: Mapping[str, xr.Dataset]) -> str:
    """What ``fisherlab fidelity`` prints when its parts are done, as one text.

    The fidelity table (when ``results`` holds a fidelity Dataset), then the headline
    (:func:`fisherlab.study.headline`), each after an empty line.

    Args:
        results: Datasets by any names (found by their kind), e.g. :func:`fisherlab.study.run_study`'s.
    """
    from fisherlab.study import headline

    fid = [ds for ds in results.values() if ds.attrs.get("fisherlab_kind") == "fidelity"]
    text = f"\n{format_table(*table_fidelity(fid[0]))}" if fid else ""
    return f"{text}\n{format_table(*headline(dict(results)))}"


# ----------------------------------------------------------------------------------------- output folder
def start_analysis(name: str, description: str, argv: Sequence[str] | None, *, full: Any, quick: Any
                   ) -> tuple[Any, Any]:
    """Command line shared by the scripts in ``analyses/``: parse, set threads, claim the output folder.

    Options: ``--out`` (default ``results/<name>``), ``--quick`` (the ``quick`` configuration, for tests),
    ``--seed``, ``--overwrite``, ``--threads``.

    Returns:
        ``(args, cfg)``: the parsed arguments and the chosen configuration dataclass.
    """
    import argparse
    import dataclasses

    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=Path("results") / name)
    parser.add_argument("--quick", action="store_true", help="tiny settings (tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace results of another configuration")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is far faster on a busy shared machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = quick if args.quick else full
    guard_output_folder(args.out, {"command": name, "seed": args.seed, **dataclasses.asdict(cfg)},
                        overwrite=args.overwrite)
    return args, cfg


def finish_analysis(out: Path, kind: str, plot: Callable[[xr.Dataset], list[Figure]],
                    table: Callable[[xr.Dataset], Table], *, title: str, summary: str) -> Path:
    """End of a script in ``analyses/``: register its figures and table for ``kind``, write ``out/report.html``.

    ``plot(ds)`` draws its own choice of dampings (the report's λ is not passed on). The figures it returns are
    closed once saved.

    Returns:
        The report path (also printed).
    """
    PLOTTERS[kind] = lambda ds, damping=None: plot(ds)
    TABLES[kind] = table
    path = build_report(out, title=title, summary=summary)
    print(f"report: {path}")
    return path


# ---------------------------------------------------------------------------------------------- labels
def _fmt(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else str(x)


def rule_label(rule: str) -> str:
    """How a report names a rule.

    A trajectory's ``train:<rule>`` (the update training took with its reconstructed network's metric G, refreshed
    only every few steps) reads ``<rule> (as trained, stale G)``; other names are kept.
    """
    rule = str(rule)
    return f"{rule.removeprefix('train:')} (as trained, stale G)" if rule.startswith("train:") else rule


def unit_of(var: xr.DataArray) -> str:
    """The unit a label shows for ``var``, from its attributes.

    ``nat`` for quantities in nats (units ``"1"`` with the nats ``comment``), else its ``units``; ``""`` when it
    is dimensionless or has none.
    """
    if var.attrs.get("comment") == NATS_COMMENT:
        return "nat"
    units = var.attrs.get("units")
    return "" if units in (None, "1") else str(units)


def axis_label(var: xr.DataArray, text: str | None = None) -> str:
    """Axis label of ``var``: ``text`` (default: its ``long_name``) and, when it has one, its unit in brackets."""
    text = text or str(var.attrs.get("long_name", var.name))
    unit = unit_of(var)
    return f"{text} ({unit})" if unit else text


def nearest_damping(ds: xr.Dataset, damping: float | None) -> float:
    """The value of ``ds.damping`` nearest to ``damping`` on a log scale (None: the middle value)."""
    values = np.asarray(ds.damping.values, dtype=float)
    if damping is None:
        return float(values[len(values) // 2])
    tiny = np.finfo(float).tiny
    return float(values[np.argmin(np.abs(np.log(np.maximum(values, tiny)) - np.log(max(damping, tiny))))])


def study_damping(datasets: Iterable[xr.Dataset]) -> float | None:
    """The one damping λ a report shows wherever it shows one (headline, per-layer heatmap, trajectory, geometry).

    It is the trajectory's λ when the Datasets hold a trajectory (``fisherlab fidelity`` measures it at the middle
    of its dampings), else the middle damping of a fidelity Dataset, else None.
    """
    by_kind = {ds.attrs.get("fisherlab_kind"): ds for ds in datasets}
    for kind in ("fidelity_trajectory", "fidelity"):
        if kind in by_kind and "damping" in by_kind[kind].dims:
            return nearest_damping(by_kind[kind], None)
    return None


# ------------------------------------------------------------------------------------------- figures
def new_figure(width: float, height: float) -> MplFigure:
    """A figure outside pyplot (no backend, no global figure list) with constrained layout."""
    return MplFigure(figsize=(width, height), layout="constrained")


def legend_outside(ax: Axes, title: str | None = None) -> None:
    """Move the legend of ``ax`` to the right of the axes, where it covers no data."""
    if ax.get_legend() is not None:
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=8,
                        **({"title": title} if title else {}))


def _rotate_xticks(ax: Axes, degrees: float = 45) -> None:
    """Rotated x tick labels anchored at their tick (long rule names do not collide)."""
    for label in ax.get_xticklabels():
        label.set(rotation=degrees, ha="right", rotation_mode="anchor")


#: Options of a seaborn line plot whose every (x, hue, style) holds one value: the points drawn as they are, with
#: no per-x aggregation or bootstrap of a band that a single value does not have (the same lines).
ONE_VALUE_LINES: dict[str, Any] = {"estimator": None, "errorbar": None}


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no finite {what}", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_spectrum(ds: xr.Dataset, damping: float | None = None) -> list[Figure]:
    """Eigenvalue spectra (descending, log scale) and condition number against damping, one panel per structure."""
    kinds, structures = [str(k) for k in ds.kind.values], [str(s) for s in ds.structure.values]
    df = ds.eigenvalue.to_dataframe().reset_index()
    top = df.groupby(["kind", "structure"]).eigenvalue.transform("max")
    df = df[df.eigenvalue > 1e-12 * top]
    df["rank"] = df.groupby(["kind", "structure"]).eig.transform(lambda s: s.max() - s + 1)
    cn = ds.condition_number.to_dataframe().reset_index()
    cn = cn[np.isfinite(cn.condition_number) & (cn.damping > 0)]
    figs: list[Figure] = []
    for name, frame, x, y, title in (
            ("spectrum", df, "rank", "eigenvalue", "Fisher spectra (eigenvalues above 1e-12 λ_max, descending)"),
            ("condition_number", cn, "damping", "condition_number", "condition number κ(F + λI)")):
        fig = new_figure(3.2 * len(structures) + 1.4, 3.4)
        axes = fig.subplots(1, len(structures), sharey=True, squeeze=False)[0]
        for ax, st in zip(axes, structures, strict=True):
            sub = frame[frame.structure == st]
            if sub.empty:
                _no_data(ax, y.replace("_", " "))
            else:
                sns.lineplot(sub, x=x, y=y, hue="kind", hue_order=kinds, marker="o" if x == "damping" else None,
                             ax=ax, legend=ax is axes[-1], **ONE_VALUE_LINES)
                ax.set(xscale="log", yscale="log")
            ax.set(title=st, ylabel=axis_label(ds[y], "eigenvalue" if y == "eigenvalue" else "κ(F + λI)"),
                   xlabel="rank (descending)" if x == "rank" else axis_label(ds.damping))
        legend_outside(axes[-1], "Fisher kind")
        fig.suptitle(title)
        figs.append((name, fig))
    return figs


def table_spectrum(ds: xr.Dataset) -> Table:
    """Largest eigenvalue, trace, distance to the true Fisher and κ at each damping."""
    rows = []
    for kind in ds.kind.values:
        for s in ds.structure.values:
            sel = {"kind": kind, "structure": s}
            rows.append([str(kind), str(s), _fmt(float(ds.eigenvalue.sel(sel).max())),
                         _fmt(float(ds.trace.sel(sel))), _fmt(float(ds.rel_frobenius_to_true.sel(sel))),
                         *[_fmt(float(c)) for c in ds.condition_number.sel(sel).values]])
    return (["kind", "structure", "λ_max", "trace", "‖F−F_true‖/‖F_true‖",
             *[f"κ(λ={d:g})" for d in ds.damping.values]], rows)


def plot_fidelity(ds: xr.Dataset, damping: float | None = None) -> list[Figure]:
    """Cosine to exact NGD and Fisher-norm error per rule and damping, predicted against measured KL.

    The per-layer cosine is drawn at ``damping`` (the nearest λ measured; None: the middle one).
    """
    figs: list[Figure] = []
    order = [rule_label(r) for r in ds.rule.values]
    dampings = [f"{d:g}" for d in ds.damping.values]
    df = ds[["cosine", "fisher_rel_error"]].to_dataframe().reset_index()
    df["rule"], df["λ"] = df.rule.map(rule_label), [f"{d:g}" for d in df.damping]
    fig = new_figure(13, 4.6)
    axes = fig.subplots(1, 2)
    common = {"x": "rule", "hue": "λ", "order": order, "hue_order": dampings, "palette": "viridis",
              "errorbar": None}  # one value a bar: no bootstrap interval
    sns.barplot(df, y="cosine", ax=axes[0], **common)
    low = float(np.nanmin(df.cosine)) if np.isfinite(df.cosine).any() else 0.0
    axes[0].set(title="cosine to exact NGD at the initial parameters", ylim=(min(0.0, low), 1.02),
                ylabel=axis_label(ds.cosine, "cosine to exact NGD"))
    sns.barplot(df[df.fisher_rel_error > 0], y="fisher_rel_error", ax=axes[1], legend=False, **common)
    axes[1].set(yscale="log", title="Fisher-norm relative error (log scale; exactly 0: no bar)",
                ylabel=axis_label(ds.fisher_rel_error, "Fisher-norm relative error"))
    for ax in axes:
        ax.set_xlabel("")
        _rotate_xticks(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    axes[0].get_legend().remove()
    fig.legend(handles, labels, title="damping λ", loc="outside right upper", frameon=False)
    figs.append(("fidelity_rules", fig))
    if "kl_predicted" in ds and "kl_measured" in ds:
        kl = ds[["kl_predicted", "kl_measured"]].to_dataframe().reset_index()
        kl = kl[(kl.kl_predicted > 0) & (kl.kl_measured > 0)]
        kl["rule"], kl["λ"] = kl.rule.map(rule_label), [f"{d:g}" for d in kl.damping]
        fig = new_figure(7.5, 4.6)
        ax = fig.subplots()
        if kl.empty:
            _no_data(ax, "positive KL")
        else:
            sns.scatterplot(kl, x="kl_predicted", y="kl_measured", hue="rule", hue_order=order, style="λ",
                            style_order=dampings, ax=ax)
            lo, hi = float(kl[["kl_predicted", "kl_measured"]].min().min()), float(
                kl[["kl_predicted", "kl_measured"]].max().max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = predicted")
            ax.set(xscale="log", yscale="log")
            legend_outside(ax)
        ax.set(title="predicted ½uᵀFu against measured KL, every damping",
               xlabel=axis_label(ds.kl_predicted, "predicted KL ½uᵀFu"),
               ylabel=axis_label(ds.kl_measured, "measured KL"))
        figs.append(("kl_predicted_vs_measured", fig))
    if "cosine_layer" in ds:
        lam = nearest_damping(ds, damping)
        lay = ds.cosine_layer.sel(damping=lam).to_pandas()
        lay.index = [rule_label(r) for r in lay.index]
        fig = new_figure(3.0 + 1.25 * lay.shape[1], 1.4 + 0.34 * lay.shape[0])
        ax = fig.subplots()
        sns.heatmap(lay, annot=True, fmt=".2f", vmin=-1, vmax=1, cmap="vlag", ax=ax, annot_kws={"fontsize": 9},
                    cbar_kws={"label": axis_label(ds.cosine_layer, "cosine")})
        ax.set(title=f"per-layer cosine to exact NGD (λ = {lam:g})", xlabel="layer", ylabel="")
        ax.tick_params(axis="y", labelrotation=0)  # seaborn turns crowded-looking labels vertical: keep them level
        _rotate_xticks(ax, 30)
        figs.append(("fidelity_layers", fig))
    return figs


def table_fidelity(ds: xr.Dataset) -> Table:
    """One row per rule and damping: cosine, relative and Fisher-norm errors, KL ratio, loss change."""
    rows = []
    for m in ds.rule.values:
        for d in ds.damping.values:
            sel = ds.sel({"rule": m, "damping": d})
            ratio = float(sel.kl_measured / sel.kl_predicted) if float(sel.kl_predicted) > 0 else float("nan")
            rows.append([rule_label(m), f"{d:g}", f"{float(sel.cosine):.4f}", _fmt(float(sel.rel_error)),
                         _fmt(float(sel.fisher_rel_error)), _fmt(ratio), _fmt(float(sel.loss_change))])
    return (["rule", "λ", "cosine", "rel. error", "Fisher-norm error", "KL measured/predicted",
             f"Δloss ({unit_of(ds.loss_change) or '1'})"], rows)


def _trajectory_cosine(ds: xr.Dataset, damping: float | None) -> tuple[xr.DataArray, float | None]:
    """The trajectory's cosine at the damping nearest ``damping`` (and that λ; None without a damping dim)."""
    if "damping" not in ds.cosine.dims:
        return ds.cosine, None
    lam = nearest_damping(ds, damping)
    return ds.cosine.sel(damping=lam), lam


def plot_trajectory(ds: xr.Dataset, damping: float | None = None) -> list[Figure]:
    """Cosine to exact NGD per rule and training loss along a trajectory.

    The cosine is drawn at ``damping`` (the nearest λ measured); the steps since the last refresh of G when
    recorded. A rule measured along its own training run (the user's optimizer: coordinate ``trained_with``) is
    drawn dashed, labelled ``(own run)``, and its run's loss (``training_loss``) beside the main run's.
    """
    from fisherlab.study import own_run_rules

    own = own_run_rules(ds)
    labels = {str(r): rule_label(r) + (" (own run)" if str(r) in own else "") for r in ds.rule.values}
    cos, lam = _trajectory_cosine(ds, damping)
    df = cos.drop_vars("trained_with", errors="ignore").to_dataframe().reset_index()
    df["rule"] = df.rule.map(lambda r: labels[str(r)])
    df["run"] = np.where(df.rule.isin([labels[r] for r in own]), "own run", "main run")
    fig = new_figure(12, 4.0)
    axes = fig.subplots(1, 2, width_ratios=(1.6, 1))
    sns.lineplot(df, x="step", y="cosine", hue="rule", hue_order=list(labels.values()), marker="o", ax=axes[0],
                 style="run" if own else None, style_order=["main run", "own run"] if own else None,
                 **ONE_VALUE_LINES)
    train = ds.attrs.get("train_rule", "")
    axes[0].set(title=f"cosine to exact NGD while training with {train}" + (" (or its own run)" if own else "")
                + (f" (λ = {lam:g})" if lam else ""),
                ylabel=axis_label(ds.cosine, "cosine to exact NGD"), xlabel=axis_label(ds.step))
    legend_outside(axes[0])
    axes[1].plot(ds.step.values, ds.loss.values, "k.-", label=train)
    for r in own:
        axes[1].plot(ds.step.values, ds.training_loss.sel(rule=r).values, ".--", label=labels[r])
    axes[1].set(title="training loss" + (" of each run" if own else ""), ylabel=axis_label(ds.loss, "loss"),
                xlabel=axis_label(ds.step))
    if own:
        axes[1].legend(fontsize="small")
    if "steps_since_refresh" in ds:
        twin = axes[1].twinx()
        twin.plot(ds.step.values, ds.steps_since_refresh.values, "o:", color="gray")
        twin.set_ylabel("steps since refresh of G (gray)", color="gray")
        twin.grid(False)
    return [("trajectory_cosine", fig)]


def table_trajectory(ds: xr.Dataset) -> Table:
    """Cosine to exact NGD of each rule at each measured step (the middle damping when there are several)."""
    cos, lam = _trajectory_cosine(ds, None)
    return ([f"rule (λ = {lam:g})" if lam else "rule", *[f"step {int(s)}" for s in ds.step.values]],
            [[rule_label(m), *[f"{float(c):.3f}" for c in cos.sel(rule=m).values]] for m in ds.rule.values])


def _structure_label(structure: str) -> str:
    return "original (G = I)" if structure == "original" else str(structure)


def plot_geometry(ds: xr.Dataset, damping: float | None = None) -> list[Figure]:
    """Spectra of F + λI and of the Fisher each reconstructed network sees, G^{-1/2}(F + λI)G^{-1/2}.

    Drawn at ``damping`` (the nearest λ measured; None: the middle one).
    """
    lam = nearest_damping(ds, damping)
    ev = ds.eigenvalue.sel(damping=lam).to_dataframe().reset_index().dropna()
    ev["rank"] = ev.groupby("structure").eig.transform(lambda s: s.max() - s + 1)
    ev["structure"] = ev.structure.map(_structure_label)
    fig = new_figure(8, 4.2)
    ax = fig.subplots()
    sns.lineplot(ev, x="rank", y="eigenvalue", hue="structure",
                 hue_order=[_structure_label(s) for s in ds.structure.values], ax=ax, **ONE_VALUE_LINES)
    ax.set(xscale="log", yscale="log", xlabel="rank (descending)",
           ylabel=axis_label(ds.eigenvalue, "eigenvalue of G^-1/2 (F + λI) G^-1/2"),
           title=f"the Fisher GD sees on each reconstructed network, λ = {lam:g}")
    legend_outside(ax, "structure G")
    return [("geometry_spectra", fig)]


def table_geometry(ds: xr.Dataset) -> Table:
    """Condition number of the Fisher each structure's reconstructed network sees, per damping."""
    return (["structure G", *[f"κ(λ={float(d):g})" for d in ds.damping.values]],
            [[_structure_label(st), *[_fmt(float(c)) for c in ds.condition_number.sel(structure=st).values]]
             for st in ds.structure.values])


def plot_training(ds: xr.Dataset, damping: float | None = None) -> list[Figure]:
    """Training loss against steps and wall time, per rule."""
    df = ds.loss.to_dataframe().reset_index()
    hue = "rule" if "rule" in df else None
    if hue:
        df["rule"] = df.rule.map(rule_label)
    panels = [("step", axis_label(ds.step) if "step" in ds.coords else "step")]
    if "wall_time" in ds:
        df["wall_time"] = ds.wall_time.to_dataframe().reset_index()["wall_time"].values
        panels.append(("wall_time", axis_label(ds.wall_time, "wall time")))
    fig = new_figure(5.5 * len(panels) + 1.5, 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (x, xlabel) in zip(axes, panels, strict=True):
        sns.lineplot(df, x=x, y="loss", hue=hue, ax=ax, legend=ax is axes[-1])
        ax.set(yscale="log", xlabel=xlabel, ylabel=axis_label(ds.loss, "training loss"))
    legend_outside(axes[-1])
    return [("training_loss", fig)]


def plot_spectral_density(ds: xr.Dataset, damping: float | None = None) -> list[Figure]:
    """SLQ density of log10 λ per Fisher kind (the null fraction in the legend)."""
    df = ds.density.to_dataframe().reset_index()
    df["kind"] = [f"{k} (null {float(ds.null_fraction.sel({'kind': k})):.2f})" for k in df.kind]
    fig = new_figure(7.5, 3.8)
    ax = fig.subplots()
    sns.lineplot(df, x="log10_eigenvalue", y="density", hue="kind", ax=ax)
    top = float(df.density.max())
    ax.set(xlabel=axis_label(ds.log10_eigenvalue, "log10 eigenvalue"), ylabel="density per decade (log scale)",
           yscale="log", ylim=(1e-4 * top, 2 * top) if top > 0 else None,
           title=f"SLQ spectral density ({ds.sizes['probe']} probes, {ds.sizes['node']} Lanczos steps)")
    legend_outside(ax, "Fisher kind")
    return [("spectral_density", fig)]


def table_spectral_density(ds: xr.Dataset) -> Table:
    """Per Fisher kind: λ_max (Ritz), trace ± standard error, fraction of (numerically) null eigenvalues."""
    rows = []
    for k in ds.kind.values:
        at = ds.sel({"kind": k})
        rows.append([str(k), _fmt(float(at.lambda_max)), f"{_fmt(float(at.trace))} ± {_fmt(float(at.trace_stderr))}",
                     f"{float(at.null_fraction):.3f}"])
    return ["kind", "λ_max (Ritz)", "trace (SLQ)", "null fraction"], rows


#: Figures drawn for each Dataset kind (``fisherlab_kind``), in the order the report shows the kinds.
PLOTTERS: dict[str, Plotter] = {
    "fidelity": plot_fidelity, "fidelity_trajectory": plot_trajectory, "geometry": plot_geometry,
    "spectrum": plot_spectrum, "spectral_density": plot_spectral_density, "training": plot_training,
}
#: Table of each Dataset kind (in a fidelity study's report, below its figures; else the report's headline).
TABLES: dict[str, Callable[[xr.Dataset], Table]] = {
    "spectrum": table_spectrum, "fidelity": table_fidelity, "fidelity_trajectory": table_trajectory,
    "geometry": table_geometry, "spectral_density": table_spectral_density,
}
#: Section heading of each Dataset kind.
SECTIONS: dict[str, str] = {
    "fidelity": "Fidelity at the initial parameters", "fidelity_trajectory": "Fidelity along training",
    "geometry": "Geometry each reconstructed network sees", "spectrum": "Fisher spectra",
    "spectral_density": "Spectral density (stochastic Lanczos quadrature)", "training": "Training",
}


# ------------------------------------------------------------------------------------------------ HTML
def _html_table(table: Table, *, html_id: str | None = None) -> str:
    """The table as HTML (columns infinite in every row left out, with a note saying so)."""
    (header, rows), dropped = drop_infinite_columns(*table)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    ident = f' id="{html_id}"' if html_id else ""
    note = f'<p class="muted">{html.escape(dropped_note(dropped))}</p>' if dropped else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
code,pre{background:#f6f6f6;padding:2px 4px}pre{padding:8px;overflow-x:auto;font-size:12px}.muted{color:#777}
details{margin:0.5em 0 1.5em}summary{cursor:pointer;color:#555}figure{margin:1em 0}"""


def _theme() -> dict[str, Any]:
    """Matplotlib settings of the report's figures (seaborn's whitegrid style), applied only while the report draws."""
    from cycler import cycler

    return {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook"),
            "axes.prop_cycle": cycler(color=sns.color_palette("deep")),
            "svg.hashsalt": "fisherlab"}  # the SVGs' element ids from their content: the same figure, the same file


def _close(fig: MplFigure) -> None:
    """Close a figure pyplot holds (a plotter of ``analyses/`` may draw with pyplot); others need nothing."""
    if getattr(fig.canvas, "manager", None) is not None:
        import matplotlib.pyplot as plt

        plt.close(fig)


def _drop_invisible_minor_ticks(fig: MplFigure) -> None:
    """Remove the minor ticks of log axes that would draw nothing: no tick marks, no minor grid and no labels.

    A log axis gets a minor tick at every 2…9 × 10^k, and each tick is laid out (texts, transforms) in every
    layout and rendering pass even when the style hides it. Under the report's theme (seaborn's whitegrid: no
    tick marks, major grid only) an axis spanning more than one decade shows none of them — its formatter labels
    only the powers of ten there — yet they were half the cost of a log-log figure. An axis spanning one decade or
    less keeps them: its minor labels are the only ones it has.
    """
    from matplotlib import rcParams

    if rcParams["axes.grid"] and rcParams["axes.grid.which"] != "major":
        return
    for ax in fig.axes:
        for axis, sides in ((ax.xaxis, ("xtick.bottom", "xtick.top")), (ax.yaxis, ("ytick.left", "ytick.right"))):
            if axis.get_scale() != "log" or any(rcParams[side] for side in sides):
                continue
            low, high = sorted(abs(v) for v in axis.get_view_interval())
            if low > 0 and np.log10(high / low) > 1:
                axis.set_minor_locator(NullLocator())


#: Digits, sign and point as superscripts (the exponent of a plain-text log tick label).
_SUPERSCRIPT = str.maketrans("0123456789-.", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻·")
#: A label of :class:`~matplotlib.ticker.LogFormatterSciNotation`: ``$\mathdefault{...}$``.
_MATHDEFAULT = re.compile(r"^\$\\mathdefault\{(.*)\}\$$")


class PlainLogFormatter(LogFormatterSciNotation):
    """The labels of :class:`~matplotlib.ticker.LogFormatterSciNotation` as plain text: 10⁻³, 2×10⁻³, 10⁰.

    The same ticks are labelled (its ``labelOnlyBase``, ``minor_thresholds`` and sublabel rules); only the text
    differs, unicode superscripts and × instead of mathtext, so that laying a label out needs no mathtext parse
    (each parse cost more than the rest of the label's layout; a log-log figure has dozens of labels, laid out
    once per layout pass and once per saved file).
    """

    def __call__(self, x: float, pos: int | None = None) -> str:
        """The label of tick value ``x`` (``''`` where the mathtext formatter gives none)."""
        label = super().__call__(x, pos)
        match = _MATHDEFAULT.match(label)
        if match is None:
            return label
        body = match.group(1).replace(r"\times", "×")
        body = re.sub(r"\^\{([^}]*)\}", lambda m: m.group(1).translate(_SUPERSCRIPT), body)
        return body.replace("-", "−")  # the mantissa's sign, as mathtext draws it


def plain_log_labels(fig: MplFigure) -> None:
    """Give every log axis of ``fig`` labelled by mathtext (matplotlib's default) a :class:`PlainLogFormatter`."""
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() != "log":
                continue
            for get, set_ in ((axis.get_major_formatter, axis.set_major_formatter),
                              (axis.get_minor_formatter, axis.set_minor_formatter)):
                old = get()
                if type(old) is LogFormatterSciNotation:
                    set_(PlainLogFormatter(base=old._base, labelOnlyBase=old.labelOnlyBase,
                                           minor_thresholds=old.minor_thresholds, linthresh=old._linthresh))


def save_figure(fig: MplFigure, stem: Path, *, dpi: float = 110) -> None:
    """Save ``fig`` as ``stem.svg`` and ``stem.png`` (``dpi``), both cropped to its tight bounding box, and close it.

    The layout (constrained) and the tight box are computed once, by one draw without rendering, and then frozen:
    each file costs one rendering pass instead of two layouts, a tight-box search and a rendering pass each.
    Minor ticks that draw nothing are dropped first (:func:`_drop_invisible_minor_ticks`), and log axes are
    labelled in plain text (:func:`plain_log_labels`).
    """
    from matplotlib import rcParams

    _drop_invisible_minor_ticks(fig)
    plain_log_labels(fig)
    fig.draw_without_rendering()
    box = fig.get_tightbbox().padded(rcParams["savefig.pad_inches"])
    fig.set_layout_engine(None)  # keep the positions just computed (no layout engine: no layout draw per file)
    write_atomically(stem.with_suffix(".svg"), lambda tmp: fig.savefig(tmp, format="svg", bbox_inches=box,
                                                                       metadata={"Date": None}))
    write_atomically(stem.with_suffix(".png"), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches=box))
    _close(fig)


class Drawn(NamedTuple):
    """The figures :func:`draw_figures` saved for one Dataset file, and what they were drawn from."""

    damping: float | None  #: the report's λ they were drawn at
    stamp: tuple[int, int]  #: the file's (modification time in ns, size) when it was read
    stems: list[str]  #: the figures, ``figures/<stem>.png`` and ``.svg``


def file_stamp(path: Path) -> tuple[int, int]:
    """``(st_mtime_ns, st_size)`` of ``path``: a Dataset file rewritten since is another file."""
    st = path.stat()
    return st.st_mtime_ns, st.st_size


def draw_figures(path: Path, ds: xr.Dataset, damping: float | None) -> Drawn:
    """Draw the figures of Dataset file ``path`` (read as ``ds``) at the report's λ ``damping``, and save them.

    Each figure of ``PLOTTERS`` of its kind (none for another kind) becomes ``figures/<file stem>_<name>.png`` and
    ``.svg`` beside the file, under the report's theme.
    """
    stamp = file_stamp(path)
    figdir = path.parent / "figures"
    figdir.mkdir(exist_ok=True)
    stems = []
    with rc_context(_theme()):
        for name, fig in PLOTTERS.get(ds.attrs["fisherlab_kind"], lambda _ds, _d: [])(ds, damping):
            stems.append(f"{path.stem}_{name}")
            save_figure(fig, figdir / stems[-1])
    return Drawn(damping, stamp, stems)


def run_config(folder: Path, datasets: Iterable[xr.Dataset]) -> dict[str, Any]:
    """The configuration of the run that wrote ``folder``: its manifest, else the first Dataset's ``config``."""
    manifest = read_manifest(folder)  # a corrupt manifest: ResultsFileError naming it
    if manifest is not None:
        return manifest["config"]
    for ds in datasets:
        if isinstance(ds.attrs.get("config"), str):
            return json.loads(ds.attrs["config"])
    return {}


def report_title(config: dict[str, Any], datasets: Sequence[xr.Dataset], folder: Path) -> str:
    """The report's title, from the run's configuration (command, model, data) or the Datasets' ``title``."""
    command = config.get("command")
    on = f": {config['model']} on {config['data']}" if "model" in config and "data" in config else ""
    if command == "fidelity":
        return f"fisherlab fidelity study{on}"
    if command == "spectra":
        return f"fisherlab spectra{' (SLQ spectral density)' if config.get('slq') else ''}{on}"
    if command:
        return f"fisherlab {command}{on}"
    titles = {str(ds.attrs["title"]) for ds in datasets if "title" in ds.attrs}
    return titles.pop() if len(titles) == 1 else f"fisherlab report: {folder.name}"


def _headline_note(damping: float | None, datasets: Sequence[xr.Dataset]) -> str:
    """What the headline's columns and marks mean, and which damping the page shows, as an HTML list."""
    by_kind = {ds.attrs.get("fisherlab_kind"): ds for ds in datasets}
    kinds = set(by_kind)
    notes = []
    if damping is not None:
        source = "the trajectory's damping" if "fidelity_trajectory" in kinds else "the middle damping"
        notes.append(f"λ = {damping:g} ({source}) wherever the page shows one damping; the bar chart and the KL "
                     "plot of the fidelity part show every damping.")
        for kind, part in (("fidelity", "fidelity part"), ("geometry", "geometry part")):
            if kind in by_kind and "damping" in by_kind[kind].dims:
                near = nearest_damping(by_kind[kind], damping)
                if not np.isclose(near, damping, rtol=1e-9, atol=0.0):
                    notes.append(f"The {part} has no λ = {damping:g}: its column and figures show the nearest "
                                 f"damping it measured, λ = {near:g}.")
    if "fidelity_trajectory" in kinds:
        notes.append("“as trained, stale G”: the update the training took, with its reconstructed network's metric "
                     "G refreshed only every few steps.")
    if "geometry" in kinds:
        notes.append("κ: condition number of G^-1/2 (F + λI) G^-1/2, the Fisher plain GD sees on the network "
                     "reconstructed with the rule's structure G (gd: the original network, G = I).")
    notes.append("—: not measured by that part; n/a: the rule could not be evaluated.")
    return '<ul class="muted">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"


def _config_text(config: dict[str, Any]) -> str:
    """The configuration, one option per line."""
    return "\n".join(f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in config.items())


def build_report(folder: str | Path, *, title: str | None = None, summary: str = "",
                 drawn: Mapping[str, Drawn] | None = None) -> Path:
    """Draw the figures of every Dataset in ``folder`` and write ``folder/report.html``.

    The page: title, headline table (``<table id="headline">``: :func:`fisherlab.study.headline` for a fidelity
    study, else the table of each Dataset), one section of figures per Dataset (with its detailed table for a
    fidelity study), then the configuration and the provenance. The same folder gives the same page (and the same
    figure files).

    Args:
        folder: Output folder holding ``*.nc`` files written by fisherlab.
        title: Page title (default: :func:`report_title`, from the folder's run manifest).
        summary: HTML paragraph placed under the title (what the study shows).
        drawn: The figures :func:`draw_figures` already saved, by Dataset file name: kept where they were drawn at
            this report's damping from the file as it is now (and exist), else drawn again.

    Returns:
        Path of the report.

    Raises:
        ResultsFileError: If a netCDF file is corrupt, foreign, changed after it was written, lacks a variable of its
            kind, or the run manifest is corrupt (each named).
        InputError: If the folder holds no Dataset, or a file written by a run of another configuration.
    """
    from fisherlab.study import headline

    folder = Path(folder)
    files = sorted(folder.glob("*.nc"))
    if not files:
        raise InputError(f"{folder} holds no results (*.nc); run a study into it first")
    order = list(PLOTTERS)
    loaded = load_output_folder(folder, files)  # each with its kind's variables, none from another run
    loaded = dict(sorted(loaded.items(), key=lambda item: (
        order.index(item[1].attrs["fisherlab_kind"]) if item[1].attrs["fisherlab_kind"] in order else len(order),
        item[0].name)))
    datasets = list(loaded.values())
    config = run_config(folder, datasets)
    title = title or report_title(config, datasets, folder)
    damping = study_damping(datasets)
    top = headline({f.stem: ds for f, ds in loaded.items()}, damping=damping)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if summary:
        parts.append(f"<p>{summary}</p>")
    parts.append("<h2>Headline</h2>")
    if top[0]:
        parts += [_html_table(top, html_id="headline"), _headline_note(damping, datasets)]
    else:
        tables = [(f, TABLES[ds.attrs["fisherlab_kind"]](ds)) for f, ds in loaded.items()
                  if ds.attrs["fisherlab_kind"] in TABLES]
        for k, (f, table) in enumerate(tables):
            parts.append(f'<p class="muted">from {html.escape(f.name)}</p>' if len(tables) > 1 else "")
            parts.append(_html_table(table, html_id="headline" if k == 0 else None))
    figdir = folder / "figures"
    provenance_rows = []
    for f, ds in loaded.items():
        kind = ds.attrs["fisherlab_kind"]
        heading = SECTIONS.get(kind, str(ds.attrs.get("title", kind)))
        parts.append(f'<h2>{html.escape(heading)} <span class="muted">— from <code>{html.escape(f.name)}'
                     "</code></span></h2>")
        done = (drawn or {}).get(f.name)
        if done is None or done.damping != damping or done.stamp != file_stamp(f) or not all(
                (figdir / f"{stem}{suffix}").is_file() for stem in done.stems for suffix in (".png", ".svg")):
            done = draw_figures(f, ds, damping)
        for stem in done.stems:
            data = base64.b64encode((figdir / f"{stem}.png").read_bytes()).decode()
            parts.append(f'<figure><img alt="{stem}" src="data:image/png;base64,{data}"/>'
                         f'<figcaption class="muted">figures/{stem}.svg</figcaption></figure>')
        if top[0] and kind in TABLES:
            parts.append(f"<details><summary>table: every value of {html.escape(f.name)}</summary>"
                         f"{_html_table(TABLES[kind](ds))}</details>")
        provenance_rows.append([f.name, kind, *[str(ds.attrs.get(k, "")) for k in
                                                ("seed", "device", "dtype", "torch_version",
                                                 "fisherlab_version", "git_commit", "created")]])
    parts.append("<h2>Configuration</h2><pre>" + html.escape(_config_text(config)) + "</pre>")
    parts.append("<h2>Provenance</h2>" + _html_table(
        (["Dataset", "kind", "seed", "device", "dtype", "torch", "fisherlab", "commit", "created"], provenance_rows)))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = folder / "report.html"
    write_atomically(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out


# --------------------------------------------------------------------------------------- report process
def serve(requests: IO[str] | None = None, replies: IO[str] | None = None) -> int:
    """The report process of ``fisherlab fidelity`` (:class:`fisherlab.cli.ReportProcess` starts it).

    Reads JSON lines from ``requests`` (default standard input): first ``{"folder": F, "damping": λ}`` (λ: the
    report's damping the study will have, :func:`study_damping`, or null), then ``{"saved": NAME}`` each time the
    study saved Dataset ``F/NAME`` (its figures are drawn at once, :func:`draw_figures`, while the study computes
    on), and at the end ``{"finish": true}``: it writes ``report.html`` (:func:`build_report`, keeping the figures
    drawn) and answers one JSON line on ``replies`` (default standard output), ``{"report": path, "console":
    text, "cpu": seconds}`` (``console``: :func:`study_console` of the saved Datasets; ``cpu``: this process's
    CPU time). Without a ``finish`` (the study stopped: Ctrl-C, an error) it ends at the end of its input, writing
    nothing.

    Returns:
        The exit status: 0, or 130 when interrupted. An error (a Dataset it cannot read, a figure that fails)
        ends the process with its traceback; the study draws the report itself then.
    """
    import resource
    import sys

    from fisherlab.results import load_dataset

    requests = sys.stdin if requests is None else requests
    replies = sys.stdout if replies is None else replies
    try:
        start = json.loads(requests.readline() or "null")
        if start is None:
            return 0
        folder, damping = Path(start["folder"]), start["damping"]
        drawn: dict[str, Drawn] = {}
        saved: dict[str, xr.Dataset] = {}
        for line in requests:
            request = json.loads(line)
            if "saved" in request:
                path = folder / request["saved"]
                saved[path.name] = load_dataset(path)
                drawn[path.name] = draw_figures(path, saved[path.name], damping)
            elif request.get("finish"):
                report = build_report(folder, drawn=drawn)
                console = study_console(saved)
                usage = resource.getrusage(resource.RUSAGE_SELF)
                replies.write(json.dumps({"report": str(report), "console": console,
                                          "cpu": usage.ru_utime + usage.ru_stime}) + "\n")
                replies.flush()
                return 0
        return 0
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the study says what is kept
        return 130
