"""The README's library example runs as written (the README stays true to the code)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section whose heading is ``section``."""
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start: end if end > 0 else None], flags=re.S)


@pytest.mark.filterwarnings("ignore::fisherlab.errors.FallbackWarning")
def test_using_the_library_example_runs(capsys) -> None:
    (code,) = python_blocks("Using the library")
    namespace: dict = {}
    exec(compile(code, "README.md (Using the library)", "exec"), namespace)  # noqa: S102
    assert "InputWhitening" in capsys.readouterr().out  # print(net) shows the local Fisher layers
    assert namespace["ds"].cosine.sel({"rule": "sngd-kfac"}).values == pytest.approx(
        namespace["ds"].cosine.sel({"rule": "kfac"}).values, abs=1e-8)
    assert isinstance(namespace["F"].solve(torch.ones(3466, dtype=torch.float64), damping=1e-3), torch.Tensor)
