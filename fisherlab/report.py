"""Reports: seaborn figures and a self-contained HTML page built from the Datasets saved in an output folder.

A report is derived data only: :func:`build_report` reads every ``*.nc`` file of a folder (validated by
:func:`fisherlab.results.load_dataset`), draws the figures registered for each Dataset kind (``PLOTTERS``),
writes them as PNG and SVG under ``figures/``, and writes ``report.html`` with what was run, the headline
tables (``TABLES``), the figures (PNG embedded, so the page is one file) and the provenance. ``fisherlab report
FOLDER`` rebuilds it without recomputing anything.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import xarray as xr  # noqa: E402

from fisherlab.errors import InputError  # noqa: E402
from fisherlab.results import MANIFEST, guard_output_folder, load_dataset  # noqa: E402

Table = tuple[list[str], list[list[str]]]
Figure = tuple[str, plt.Figure]


# ------------------------------------------------------------------------------------------------ console
def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned plain-text table."""
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print("  ".join(c.rjust(w) if k else c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


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

    Returns:
        The report path (also printed).
    """
    PLOTTERS[kind], TABLES[kind] = plot, table
    path = build_report(out, title=title, summary=summary)
    plt.close("all")
    print(f"report: {path}")
    return path


# --------------------------------------------------------------------------------------------- plotters
def _fmt(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else str(x)


def plot_spectrum(ds: xr.Dataset) -> list[Figure]:
    """Eigenvalue spectra (descending, log scale) and condition number against damping."""
    df = ds.eigenvalue.to_dataframe().reset_index()
    top = df.groupby(["fisher_kind", "structure"]).eigenvalue.transform("max")
    df = df[df.eigenvalue > 1e-12 * top]
    df["rank"] = df.groupby(["fisher_kind", "structure"]).eig.transform(lambda s: s.max() - s + 1)
    g = sns.relplot(df, x="rank", y="eigenvalue", hue="fisher_kind", col="structure", kind="line", height=3.2)
    g.set(xscale="log", yscale="log")
    g.figure.suptitle("Fisher spectra (eigenvalues above 1e-12 λ_max, descending)", y=1.03)
    cn = ds.condition_number.to_dataframe().reset_index()
    cn = cn[np.isfinite(cn.condition_number) & (cn.damping > 0)]
    h = sns.relplot(cn, x="damping", y="condition_number", hue="fisher_kind", col="structure", kind="line",
                    marker="o", height=3.2)
    h.set(xscale="log", yscale="log")
    h.figure.suptitle("condition number κ(F + λI)", y=1.03)
    return [("spectrum", g.figure), ("condition_number", h.figure)]


def table_spectrum(ds: xr.Dataset) -> Table:
    """Largest eigenvalue, trace, distance to the true Fisher and κ at each damping."""
    rows = []
    for kind in ds.fisher_kind.values:
        for s in ds.structure.values:
            sel = {"fisher_kind": kind, "structure": s}
            rows.append([kind, s, _fmt(float(ds.eigenvalue.sel(sel).max())), _fmt(float(ds.trace.sel(sel))),
                         _fmt(float(ds.rel_frobenius_to_true.sel(sel))),
                         *[_fmt(float(c)) for c in ds.condition_number.sel(sel).values]])
    return (["fisher", "structure", "λ_max", "trace", "‖F−F_true‖/‖F_true‖",
             *[f"κ(λ={d:g})" for d in ds.damping.values]], rows)


def plot_fidelity(ds: xr.Dataset) -> list[Figure]:
    """Cosine to exact NGD and Fisher-norm error per rule and damping; predicted against measured KL."""
    figs: list[Figure] = []
    df = ds[["cosine", "fisher_rel_error"]].to_dataframe().reset_index()
    df["damping"] = [f"λ={d:g}" for d in df.damping]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    sns.barplot(df, x="method", y="cosine", hue="damping", palette="viridis", ax=axes[0])
    axes[0].set_title("cosine similarity to exact NGD")
    axes[0].set_ylim(min(0.0, float(df.cosine.min())), 1.02)
    sns.barplot(df, x="method", y="fisher_rel_error", hue="damping", palette="viridis", ax=axes[1], legend=False)
    axes[1].set_yscale("log")
    axes[1].set_title("Fisher-norm relative error")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
        ax.set_xlabel("")
    sns.move_legend(axes[0], "lower left", fontsize=7, ncols=2)
    fig.tight_layout()
    figs.append(("fidelity_methods", fig))
    if "kl_predicted" in ds and "kl_measured" in ds:
        kl = ds[["kl_predicted", "kl_measured"]].to_dataframe().reset_index()
        kl = kl[(kl.kl_predicted > 0) & (kl.kl_measured > 0)]
        fig, ax = plt.subplots(figsize=(5, 4.2))
        sns.scatterplot(kl, x="kl_predicted", y="kl_measured", hue="method", style="damping", ax=ax)
        lo, hi = float(kl[["kl_predicted", "kl_measured"]].min().min()), float(kl[["kl_predicted",
                                                                                   "kl_measured"]].max().max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xscale="log", yscale="log", title="predicted ½uᵀFu vs measured KL")
        ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
        fig.tight_layout()
        figs.append(("kl_predicted_vs_measured", fig))
    if "cosine_layer" in ds:
        lay = ds.cosine_layer.isel(damping=0).to_pandas()
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * lay.shape[1], 0.5 + 0.35 * lay.shape[0]))
        sns.heatmap(lay, annot=True, fmt=".2f", vmin=-1, vmax=1, cmap="vlag", ax=ax)
        ax.set_title(f"per-layer cosine to exact NGD (λ = {float(ds.damping[0]):g})")
        fig.tight_layout()
        figs.append(("fidelity_layers", fig))
    return figs


def table_fidelity(ds: xr.Dataset) -> Table:
    """One row per rule and damping: cosine, relative and Fisher-norm errors, KL ratio, loss change."""
    rows = []
    for m in ds.method.values:
        for d in ds.damping.values:
            sel = ds.sel({"method": m, "damping": d})
            ratio = float(sel.kl_measured / sel.kl_predicted) if float(sel.kl_predicted) > 0 else float("nan")
            rows.append([m, f"{d:g}", f"{float(sel.cosine):.4f}", _fmt(float(sel.rel_error)),
                         _fmt(float(sel.fisher_rel_error)), _fmt(ratio), _fmt(float(sel.loss_change))])
    return (["rule", "λ", "cosine", "rel. error", "Fisher-norm error", "KL measured/predicted", "Δloss"], rows)


def plot_trajectory(ds: xr.Dataset) -> list[Figure]:
    """Cosine to exact NGD and training loss along a trajectory, per rule (and staleness when recorded)."""
    cos = ds.cosine.isel(damping=0) if "damping" in ds.cosine.dims else ds.cosine
    df = cos.to_dataframe().reset_index()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.lineplot(df, x="step", y="cosine", hue="method", marker="o", ax=axes[0])
    axes[0].set_title("cosine to exact NGD along the trajectory")
    axes[0].legend(fontsize=7)
    if "steps_since_refresh" in ds:
        axes[1].plot(ds.step.values, ds.steps_since_refresh.values, "o-", color="gray", label="steps since refresh")
        axes[1].set_ylabel("steps since refresh")
        twin = axes[1].twinx()
        twin.plot(ds.step.values, ds.loss.values, "k.-", label="loss")
        twin.set_ylabel("training loss")
    else:
        axes[1].plot(ds.step.values, ds.loss.values, "k.-")
        axes[1].set_ylabel("training loss")
    axes[1].set_xlabel("step")
    fig.tight_layout()
    return [("trajectory_cosine", fig)]


def table_trajectory(ds: xr.Dataset) -> Table:
    """Cosine to exact NGD of each rule at each measured step."""
    cos = ds.cosine.isel(damping=0) if "damping" in ds.cosine.dims else ds.cosine
    return (["rule", *[f"step {int(s)}" for s in ds.step.values]],
            [[str(m), *[f"{float(c):.3f}" for c in cos.sel({"method": m}).values]] for m in ds.method.values])


def plot_geometry(ds: xr.Dataset) -> list[Figure]:
    """Spectra of F + λI and of the Fisher each reconstructed network sees, G^{-1/2}(F + λI)G^{-1/2}."""
    ev = ds.eigenvalue.isel(damping=0).to_dataframe().reset_index().dropna()
    ev["rank"] = ev.groupby("structure").eig.transform(lambda s: s.max() - s + 1)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.lineplot(ev, x="rank", y="eigenvalue", hue="structure", ax=ax)
    ax.set(xscale="log", yscale="log",
           title=f"spectrum of G^-1/2 (F + λI) G^-1/2, λ = {float(ds.damping[0]):g} (original: G = I)")
    fig.tight_layout()
    return [("geometry_spectra", fig)]


def table_geometry(ds: xr.Dataset) -> Table:
    """Condition number of the Fisher each structure's reconstructed network sees, per damping."""
    return (["structure G", *[f"κ(λ={float(d):g})" for d in ds.damping.values]],
            [[str(st), *[_fmt(float(c)) for c in ds.condition_number.sel(structure=st).values]]
             for st in ds.structure.values])


def plot_training(ds: xr.Dataset) -> list[Figure]:
    """Training loss against steps and wall time, per method."""
    df = ds.loss.to_dataframe().reset_index()
    if "wall_time" in ds:
        df["wall_time"] = ds.wall_time.to_dataframe().reset_index()["wall_time"].values
    fig, axes = plt.subplots(1, 2 if "wall_time" in df else 1, figsize=(11, 3.8), squeeze=False)
    sns.lineplot(df, x="step", y="loss", hue="method" if "method" in df else None, ax=axes[0, 0])
    if "wall_time" in df:
        sns.lineplot(df, x="wall_time", y="loss", hue="method" if "method" in df else None, ax=axes[0, 1])
        axes[0, 1].set_xlabel("wall time (s)")
    for ax in axes[0]:
        ax.set_yscale("log")
    fig.tight_layout()
    return [("training_loss", fig)]


def plot_spectral_density(ds: xr.Dataset) -> list[Figure]:
    """SLQ density of log10 λ per Fisher kind (the null fraction in the legend)."""
    df = ds.density.to_dataframe().reset_index()
    df["fisher"] = [f"{k} (null {float(ds.null_fraction.sel({'fisher_kind': k})):.2f})" for k in df.fisher_kind]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sns.lineplot(df, x="log10_eigenvalue", y="density", hue="fisher", ax=ax)
    top = float(df.density.max())
    ax.set(xlabel="log10 eigenvalue", ylabel="density (per decade, log scale)", yscale="log",
           ylim=(1e-4 * top, 2 * top) if top > 0 else None,
           title=f"SLQ spectral density ({ds.sizes['probe']} probes, {ds.sizes['node']} Lanczos steps)")
    return [("spectral_density", fig)]


def table_spectral_density(ds: xr.Dataset) -> Table:
    """Per Fisher kind: λ_max (Ritz), trace ± standard error, fraction of (numerically) null eigenvalues."""
    rows = []
    for k in ds.fisher_kind.values:
        at = ds.sel({"fisher_kind": k})
        rows.append([str(k), _fmt(float(at.lambda_max)), f"{_fmt(float(at.trace))} ± {_fmt(float(at.trace_stderr))}",
                     f"{float(at.null_fraction):.3f}"])
    return ["fisher", "λ_max (Ritz)", "trace (SLQ)", "null fraction"], rows


#: Figures drawn for each Dataset kind (``fisherlab_kind``).
PLOTTERS: dict[str, Callable[[xr.Dataset], list[Figure]]] = {
    "spectrum": plot_spectrum, "fidelity": plot_fidelity, "fidelity_trajectory": plot_trajectory,
    "geometry": plot_geometry, "training": plot_training, "spectral_density": plot_spectral_density,
}
#: Headline table of each Dataset kind.
TABLES: dict[str, Callable[[xr.Dataset], Table]] = {
    "spectrum": table_spectrum, "fidelity": table_fidelity, "fidelity_trajectory": table_trajectory,
    "geometry": table_geometry, "spectral_density": table_spectral_density,
}


# ------------------------------------------------------------------------------------------------ HTML
def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
code,pre{background:#f6f6f6;padding:2px 4px}pre{padding:8px;overflow-x:auto;font-size:12px}.muted{color:#777}"""


def build_report(folder: str | Path, *, title: str | None = None, summary: str = "") -> Path:
    """Draw the figures of every Dataset in ``folder`` and write ``folder/report.html``.

    Args:
        folder: Output folder holding ``*.nc`` files written by fisherlab.
        title: Page title (default: from the folder's run manifest).
        summary: HTML paragraph placed under the title (what the study shows).

    Returns:
        Path of the report.

    Raises:
        ResultsFileError: If a netCDF file is corrupt or foreign.
        InputError: If the folder holds no Dataset.
    """
    folder = Path(folder)
    files = sorted(folder.glob("*.nc"))
    if not files:
        raise InputError(f"{folder} holds no results (*.nc); run a study into it first")
    figdir = folder / "figures"
    figdir.mkdir(exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook")
    manifest = folder / MANIFEST
    config = json.loads(manifest.read_text())["config"] if manifest.is_file() else {}
    parts = [f"<h1>{html.escape(title or 'fisherlab report: ' + str(config.get('command', folder.name)))}</h1>"]
    if summary:
        parts.append(f"<p>{summary}</p>")
    parts.append("<h2>What was run</h2><pre>" + html.escape(json.dumps(config, indent=1)) + "</pre>")
    provenance_rows = []
    for f in files:
        ds = load_dataset(f)
        kind = ds.attrs["fisherlab_kind"]
        parts.append(f"<h2>{html.escape(kind)} — from <code>{html.escape(f.name)}</code></h2>")
        if kind in TABLES:
            parts.append(_html_table(TABLES[kind](ds)))
        for name, fig in PLOTTERS.get(kind, lambda _: [])(ds):
            stem = f"{f.stem}_{name}"
            fig.savefig(figdir / f"{stem}.svg", bbox_inches="tight")
            fig.savefig(figdir / f"{stem}.png", dpi=110, bbox_inches="tight")
            plt.close(fig)
            data = base64.b64encode((figdir / f"{stem}.png").read_bytes()).decode()
            parts.append(f'<figure><img alt="{stem}" src="data:image/png;base64,{data}"/>'
                         f'<figcaption class="muted">figures/{stem}.svg (from {html.escape(f.name)})'
                         "</figcaption></figure>")
        provenance_rows.append([f.name, kind, *[str(ds.attrs.get(k, "")) for k in
                                                ("seed", "device", "dtype", "torch_version", "fisherlab_version",
                                                 "git_commit", "created")]])
    parts.append("<h2>Provenance</h2>" + _html_table(
        (["Dataset", "kind", "seed", "device", "dtype", "torch", "fisherlab", "commit", "created"], provenance_rows)))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(folder.name)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    out = folder / "report.html"
    tmp = folder / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
