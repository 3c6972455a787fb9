"""The dense Fisher from per-layer rows (structures.dense.kronecker_blocks) against the brute-force reference.

The reference (tests/reference.py) assembles (1/N) Σ_n J_nᵀ Λ(z_n) J_n from per-sample Jacobians taken by plain
autograd loops over samples and outputs, in float64. Each case checks the path it means to take: the layer-row
path where it applies (the engine's P-wide factor rows are never formed), the Gram of the factor rows where it
does not (a layer at several locations, a layer called twice, a module without a rule, one row per sample).
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import nn

from fisherlab import layers
from fisherlab.engine import FisherEngine
from fisherlab.structures import dense
from fisherlab.structures.dense import DenseFisher, kronecker_layouts

D = torch.float64


class Reordered(nn.Module):
    """Two linear layers registered in the opposite order of their calls, the second without a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.second = nn.Linear(6, 4, bias=False)
        self.first = nn.Linear(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


class Twice(nn.Module):
    """One linear layer called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class Positions(nn.Module):
    """A linear layer applied at 3 positions of each sample (its rows are sums over them), then pooled."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(x.reshape(-1, 3, 5))).mean(1))


def _case(name: str, n: int = 23) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Model ``name``, inputs X (n, width) and class labels y (n,)."""
    torch.manual_seed(0)
    models = {
        "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4)), 5),
        "reordered": (Reordered, 5),
        "twice": (Twice, 5),
        "positions": (Positions, 15),
        "layernorm": (lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)), 5),
    }
    build, width = models[name]
    model = build().to(D)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, width, generator=g, dtype=D)
    with torch.no_grad():
        C = model(X).shape[1]
    return model, X, torch.randint(0, C, (n,), generator=g)


def _no_factor_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, *args, **kwargs):
        raise AssertionError("the layer-row path formed the engine's factor rows")

    monkeypatch.setattr(FisherEngine, "iter_factor_rows", refuse)


@pytest.mark.parametrize("name", ["mlp", "reordered"])
def test_layer_rows_path_is_the_true_fisher(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, X, y = _case(name)
    engine = FisherEngine(model, (X, y), "categorical")
    assert kronecker_layouts(engine) is not None
    _no_factor_rows(monkeypatch)
    F = DenseFisher.from_engine(engine).matrix
    assert torch.equal(F, F.T)
    ref.assert_close(F, ref.true_fisher(model, X, ref.RefLikelihood("categorical")), 1e-12, name)


def test_layer_rows_path_gaussian_several_chunks_and_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """R = C = 4 identity rows (Gaussian), the data in chunks of 5 samples and each GEMM over slices of 2."""
    model, X, _ = _case("mlp")
    Y = torch.randn(X.shape[0], 4, generator=torch.Generator().manual_seed(2), dtype=D)
    engine = FisherEngine(model, (X, Y), "gaussian")
    _no_factor_rows(monkeypatch)
    monkeypatch.setattr(layers, "_rows_chunk_size", lambda engine, scalars: 5)
    widest = max(f.out_features ** 2 + f.width ** 2 for f in kronecker_layouts(engine).values())
    monkeypatch.setattr(dense, "DEFAULT_CHUNK_BYTES", 2 * widest * 8)
    F = DenseFisher.from_engine(engine).matrix
    ref.assert_close(F, ref.true_fisher(model, X, ref.RefLikelihood("gaussian")), 1e-12, "gaussian")


@pytest.mark.parametrize("name", ["twice", "positions", "layernorm"])
def test_factor_rows_where_layer_rows_do_not_apply(name: str) -> None:
    model, X, y = _case(name)
    engine = FisherEngine(model, (X, y), "categorical")
    if name == "layernorm":
        assert kronecker_layouts(engine) is None  # a module without a rule
    else:
        assert dense.kronecker_blocks(engine) is None  # called twice / at 3 locations: found on the rows
    F = DenseFisher.from_engine(engine).matrix
    ref.assert_close(F, ref.true_fisher(model, X, ref.RefLikelihood("categorical")), 1e-12, name)


def test_one_row_per_sample_uses_factor_rows() -> None:
    model, X, y = _case("mlp")
    engine = FisherEngine(model, (X, y), "categorical", kind="empirical")
    assert kronecker_layouts(engine) is None
    F = DenseFisher.from_engine(engine).matrix
    ref.assert_close(F, ref.empirical_fisher(model, X, y, ref.RefLikelihood("categorical")), 1e-12, "empirical")
