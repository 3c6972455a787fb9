"""The pytest plugin costs an unrelated project (fisherlab installed, no fisherlab test) almost nothing.

The plugin is the ``pytest11`` entry point ``fisherlab``: it loads in every pytest run of every project of an
environment where fisherlab is installed, so it must not import torch, xarray or numpy before its fixture runs.
"""

import os
import re
import subprocess
import sys

BUDGET_S = 0.3  # the plugin's import cost per pytest run (torch alone takes seconds)
HEAVY = ("torch", "xarray", "numpy", "scipy", "matplotlib")
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def _importtime(args, cwd):
    """``{module: (self_s, cumulative_s, depth)}`` of ``python -X importtime *args`` run in ``cwd``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    r = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = {}
    for line in r.stderr.splitlines():
        m = LINE.match(line)
        if m:
            out[m[4]] = (int(m[1]) / 1e6, int(m[2]) / 1e6, len(m[3]) // 2)
    return out


def _empty_project(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_trivial.py").write_text("def test_trivial():\n    assert 1 + 1 == 2\n")
    return tmp_path


def test_plugin_import_and_what_it_pulls_in_is_cheap(tmp_path):
    times = _importtime(["-c", "import pytest\nimport fisherlab.pytest_plugin"], _empty_project(tmp_path))
    _, cumulative, depth = times["fisherlab.pytest_plugin"]
    assert depth == 0
    assert cumulative < BUDGET_S, f"importing fisherlab.pytest_plugin took {cumulative:.2f} s"
    assert not [m for m in times if m.split(".")[0] in HEAVY]


def test_pytest_run_of_an_unrelated_project_pays_almost_nothing(tmp_path):
    project = _empty_project(tmp_path)
    pytest_args = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
    # the plugin's option is accepted only when the plugin is loaded: this run has it active
    with_plugin = _importtime([*pytest_args, "--fisherlab-update-golden"], project)
    without = _importtime([*pytest_args, "-p", "no:fisherlab"], project)
    extra = {m: t[0] for m, t in with_plugin.items() if m not in without}
    assert sum(extra.values()) < BUDGET_S, f"the plugin pulled in {sorted(extra)}"
    assert not [m for m in with_plugin if m.split(".")[0] in HEAVY], "torch/xarray/numpy loaded by a plain run"
