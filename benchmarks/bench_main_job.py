"""The default main job, ``fisherlab fidelity``, of this tree against an earlier commit, run back to back (issue 13).

Both trees run the same command (``python -m fisherlab fidelity --out DIR --overwrite`` plus ``--args``) as a
fresh process each, alternately (base, new, base, new, ...), so that a change in machine load hits both alike;
the table gives the median of each part's seconds (the ``[part] done in`` lines of the job; ``report``: the
tables, figures and page with the import of matplotlib and seaborn, where the job prints that line; since the
report process, the seconds after the parts until the page is written, its CPU seconds those of that process,
which drew each part's figures while the later parts computed), of
``parts`` (the four computing parts together: their sum, or, where parts run side by side (a line ``beside``),
the job's ``finished in`` less its report), of the rest (imports, data; in a tree without a ``[report]`` line,
the report too), of ``after`` (report and rest: what the job spends outside the four computing parts, alike in
both trees), of the wall time and of the CPU time (user + system, all threads), the ratio new/base of the
medians, and the load average before each run; a second table gives the CPU seconds of each part where the job
prints them (``(… CPU-s``: all threads, or, beside another part, the part's own thread), the CPU time that moves
least with the machine's load. The base tree is a temporary ``git worktree`` of
``--base`` (removed at the end); the new tree is this repository, or ``--new``. Each process imports the
fisherlab of its own tree (run from it, with it first on PYTHONPATH). After the last round the Datasets of the two
last runs are compared variable by variable (max relative difference |new − base| / max(|base|, 1e-10 · max|base|)
over finite entries, so that round-off eigenvalues of a null space count in units of the largest; non-finite
entries must agree).

    python benchmarks/bench_main_job.py [--base HEAD~1] [--repeats 3] [--new PATH] [--args "--steps 20"]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PARTS = ("fidelity", "trajectory", "geometry", "spectrum", "report")
COLUMNS = (*PARTS, "parts", "rest", "after", "total", "cpu")
#: Entries of a variable below FLOOR × its largest magnitude (e.g. the round-off eigenvalues of a Fisher's null
#: space) are compared in units of FLOOR × that magnitude.
FLOOR = 1e-10
DONE = re.compile(r"^\[(\w+)\] done in ([0-9.]+) s(?: after the parts)?(?: \(([0-9.]+) CPU-s)?", re.MULTILINE)
FINISHED = re.compile(r"^finished in ([0-9.]+) s", re.MULTILINE)


def run_job(tree: Path, out: Path, args: list[str]) -> dict[str, float]:
    """Run the main job of ``tree`` into ``out``; seconds per part, ``parts``, ``rest``, ``total`` (wall), ``cpu``.

    ``cpu``: the process's user + system CPU seconds (all its threads), less sensitive to the machine's load than
    the wall time when other processes compete for the cores; ``cpu:<part>``: a part's CPU seconds as the job
    prints them (NaN where it does not), ``cpu:rest`` the remainder.
    """
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fisherlab", "fidelity", "--out", str(out), "--overwrite", *args],
                          cwd=tree, env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"the main job of {tree} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    found = DONE.findall(proc.stdout)
    parts = {name: float(sec) for name, sec, _ in found}
    cpus = {name: float(c) if c else float("nan") for name, _, c in found}
    part_cpu = {f"cpu:{p}": cpus.get(p, float("nan")) for p in PARTS}
    computing = sum(sec for name, sec in parts.items() if name != "report")
    finished = FINISHED.search(proc.stdout)
    if finished is not None and re.search(r"^\[\w+\] done in .* beside ", proc.stdout, re.MULTILINE):
        computing = float(finished.group(1)) - parts.get("report", 0.0)  # side by side: the parts' span
    return {**{p: parts.get(p, float("nan")) for p in PARTS}, "parts": computing,
            "rest": total - computing - parts.get("report", 0.0), "after": total - computing,
            "total": total, "cpu": cpu, **part_cpu, "cpu:rest": cpu - sum(cpus.values())}


def compare(base: Path, new: Path) -> list[tuple[str, str, float]]:
    """(file, variable, max relative difference) of every numeric variable of the two folders' Datasets."""
    import xarray as xr

    rows = []
    for f in sorted(base.glob("*.nc")):
        with xr.open_dataset(f) as a, xr.open_dataset(new / f.name) as b:
            for name in a.data_vars:
                x = np.asarray(a[name].values)
                if x.dtype.kind not in "fiu":
                    same = name in b and np.array_equal(x, np.asarray(b[name].values))
                    rows.append((f.stem, name, 0.0 if same else float("inf")))
                    continue
                y = np.asarray(b[name].values, dtype=float)
                x = x.astype(float)
                finite = np.isfinite(x)
                if x.shape != y.shape or not np.array_equal(finite, np.isfinite(y)):
                    rows.append((f.stem, name, float("inf")))
                    continue
                top = float(np.abs(x[finite]).max()) if finite.any() else 0.0
                scale = np.maximum(np.abs(x[finite]), max(FLOOR * top, np.finfo(float).tiny))
                diff = np.abs(y[finite] - x[finite]) / scale
                rows.append((f.stem, name, float(diff.max()) if diff.size else 0.0))
    return rows


def phases(base: Path, new: Path, top: int = 8) -> None:
    """Print the ``timings`` attribute (seconds per phase) of each part of the last runs, the longest first."""
    import json

    import xarray as xr

    for f in sorted(base.glob("*.nc")):
        with xr.open_dataset(f) as a, xr.open_dataset(new / f.name) as b:
            if "timings" not in a.attrs or "timings" not in b.attrs:
                continue
            ta, tb = json.loads(a.attrs["timings"]), json.loads(b.attrs["timings"])
        print(f"   {f.stem}: " + ", ".join(f"{k} {ta.get(k, 0.0):.1f} → {tb.get(k, 0.0):.1f}"
                                         for k in sorted(set(ta) | set(tb), key=lambda k: -ta.get(k, 0.0))[:top]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD~1", help="git revision of the base tree (default HEAD~1)")
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the new tree (default: this repository)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tree (default 3)")
    parser.add_argument("--args", default="", help="extra options of fisherlab fidelity, one string")
    opts = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    extra = shlex.split(opts.args)
    with tempfile.TemporaryDirectory(prefix="bench_main_job_") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(base), opts.base], check=True,
                       capture_output=True)
        try:
            commit = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], check=True,
                                    capture_output=True, text=True).stdout.strip()
            print(f"== fisherlab fidelity {' '.join(extra)}: base {opts.base} ({commit}) vs {opts.new}")
            print(f"   {os.cpu_count()} cores, {opts.repeats} runs each, alternating")
            times: dict[str, list[dict[str, float]]] = {"base": [], "new": []}
            for k in range(opts.repeats):
                for label, tree in (("base", base), ("new", opts.new)):
                    load = os.getloadavg()[0]
                    out = Path(tmp) / f"out_{label}"
                    shutil.rmtree(out, ignore_errors=True)  # every run computes every part (none reused)
                    t = run_job(tree, out, extra)
                    times[label].append(t)
                    print(f"   run {k + 1} {label:4s} load {load:4.1f}: "
                          + "  ".join(f"{p} {t[p]:6.1f}" for p in COLUMNS), flush=True)
            for unit, columns in (("s", COLUMNS), ("CPU-s", (*[f"cpu:{p}" for p in PARTS], "cpu:rest", "cpu"))):
                print(f"\n{'part':12s} {'base ' + unit:>10s} {'new ' + unit:>10s} {'new/base':>9s}   (medians)")
                for p in columns:
                    b = statistics.median(t[p] for t in times["base"])
                    n = statistics.median(t[p] for t in times["new"])
                    print(f"{p:12s} {b:10.1f} {n:10.1f} {n / b:9.2f}")
            rows = compare(Path(tmp) / "out_base", Path(tmp) / "out_new")
            worst = max(rows, key=lambda r: r[2])
            print(f"\nDatasets, max relative difference new vs base per variable (worst: {worst[0]}.{worst[1]} "
                  f"{worst[2]:.2e}):")
            for f, name, d in rows:
                print(f"   {f:10s} {name:28s} {d:.2e}")
            print("\nlongest phases of the last runs (Dataset attribute timings, s, base → new):")
            phases(Path(tmp) / "out_base", Path(tmp) / "out_new")
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(base)], check=False,
                           capture_output=True)


if __name__ == "__main__":
    main()
