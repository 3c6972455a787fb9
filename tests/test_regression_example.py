"""The README's regression-test file for one's own optimizer runs as written, with pytest, in a fresh folder."""

from __future__ import annotations

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


def pytest_in(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_optimizer.py",
                           *args], cwd=folder, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_readme_regression_file_runs_with_pytest(tmp_path: Path) -> None:
    (tmp_path / "test_my_optimizer.py").write_text(example())
    first = pytest_in(tmp_path, "--fisherlab-update-golden")  # writes the golden curve
    assert first.returncode == 0, first.stdout + first.stderr
    assert "3 passed" in first.stdout
    assert (tmp_path / "data" / "golden" / "my_optimizer_curve.nc").is_file()
    again = pytest_in(tmp_path)  # compares with it
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 passed" in again.stdout
