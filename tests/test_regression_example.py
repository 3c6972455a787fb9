"""The README's regression-test file for one's own optimizer runs as written, with pytest, in a fresh folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "Regression tests for your own optimizer"


def example() -> str:
    """The one ```python block of the README section."""
    text = README.read_text()
    start = text.index(f"## {SECTION}")
    end = text.find("\n## ", start + 1)
    (code,) = re.findall(r"```python\n(.*?)```", text[start: end if end > 0 else None], flags=re.S)
    return code


#: Runs pytest on the example once per argument list of ``sys.argv[1]`` (JSON), printing a marker after each run.
RUNS = """
import json, sys
import pytest
for i, args in enumerate(json.loads(sys.argv[1])):
    code = pytest.main(["-q", "-p", "no:cacheprovider", "test_my_optimizer.py", *args])
    print(f"== run {i} exit {int(code)}", flush=True)
"""


def pytest_runs(folder: Path, *runs: list[str]) -> list[str]:
    """The output of each pytest run of ``runs`` (argument lists), in turn in one fresh Python process in ``folder``.

    One process for all runs: the first run of a fresh process is what a user sees; later runs only repeat the
    session (the imports of torch and fisherlab are not paid again).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNS, json.dumps(runs)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)
    outputs = re.split(r"^== run \d+ exit (\d+)\n", proc.stdout, flags=re.M)
    assert proc.returncode == 0 and len(outputs) == 2 * len(runs) + 1, proc.stdout + proc.stderr
    for out, code in zip(outputs[0::2], outputs[1::2], strict=False):
        assert code == "0", out + proc.stderr
    return outputs[0::2][:-1]


@pytest.mark.slow
def test_readme_regression_file_runs_with_pytest(tmp_path: Path) -> None:
    (tmp_path / "test_my_optimizer.py").write_text(example())
    # the first run writes the golden curve, the second compares with it
    first, again = pytest_runs(tmp_path, ["--fisherlab-update-golden"], [])
    assert "3 passed" in first
    assert (tmp_path / "data" / "golden" / "my_optimizer_curve.nc").is_file()
    assert "3 passed" in again
