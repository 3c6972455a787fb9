"""fisherlab.progress: one on/off rule for every bar, and no inner bars under an outer one."""

import io
import re

from fisherlab import progress
from fisherlab.data import make_synthetic
from fisherlab.engine import FisherEngine
from fisherlab.models import build_model


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_one_on_off_rule(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert progress.enabled(None) is False  # not a terminal: off
    assert progress.enabled(True) is True and progress.enabled(False) is False
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert progress.enabled(None) is True
    assert progress.enabled(False) is False


def test_inner_bars_stay_hidden_under_an_outer_bar():
    with progress.bar(total=3, desc="outer", progress=False) as hidden:
        assert not hidden.shown
        assert progress.bar(total=2, inner=True, progress=True).shown  # a hidden outer bar does not count
    outer = progress.bar(total=3, desc="outer", progress=True)
    inner = progress.bar(total=2, desc="inner", progress=True, inner=True)
    nested = progress.bar(total=2, desc="part", progress=True)
    assert outer.shown and not inner.shown and nested.shown
    nested.close()
    outer.close()
    inner.close()
    after = progress.bar(total=2, desc="inner", progress=True, inner=True)
    assert after.shown
    after.close()


def test_iterating_a_bar_yields_everything_and_closes_it():
    b = progress.bar(range(5), desc="loop", progress=True)
    assert list(b) == [0, 1, 2, 3, 4] and not progress._SHOWN
    for i in progress.bar(range(5), desc="loop", progress=True):
        if i == 2:
            break
    assert not progress._SHOWN  # left early: closed all the same
    assert list(progress.bar([1, 2], progress=False)) == [1, 2]


def test_engine_chunk_bars_do_not_flash_under_an_outer_bar(capsys):
    data = make_synthetic("multiclass", n_samples=40, seed=0)
    model = build_model("mlp", data, seed=0).eval()
    engine = FisherEngine(model, data, "categorical", progress=True, chunk_size=8)
    list(engine.chunks(desc="chunks"))
    alone = capsys.readouterr().err
    assert "chunks" in alone  # shown on its own
    with progress.bar(total=1, desc="outer", progress=True) as outer:
        list(engine.chunks(desc="chunks"))
        outer.update(1)
    nested = capsys.readouterr().err
    assert "outer" in nested and "chunks" not in nested
    assert re.search(r"1/1", nested)
