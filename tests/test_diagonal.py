"""The diagonal Fisher against the diagonal of the float64 brute-force reference (tests/reference.py), 1e-12.

Both ways of the structure are covered: layer-wise squares for Linear/Conv layers (one location per sample, and
several: a convolution), factor rows for parameters without a layer rule (a user module's bare weight and
log-scale), factor rows for a whole model whose Linear layer is called twice per forward pass, and parameter
selections that keep a layer's weight or its bias only (each written to its own slice of the flat vector).
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import nn

from fisherlab import fisher, structures
from fisherlab.engine import FisherEngine

RTOL = 1e-12
KINDS = ("true", "mc", "empirical", "ggn")
F64 = torch.float64


class Twice(nn.Module):
    """A Linear layer called twice per forward pass: no per-layer reading, so every parameter takes factor rows."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin(torch.tanh(self.lin(x))))


def reference_diagonal(problem, engine: FisherEngine, kind: str, names: list[str] | None = None) -> torch.Tensor:
    """diag of the reference Fisher of ``kind`` (MC: at the engine's own labels)."""
    labels = engine._labels if kind == "mc" else None
    return problem.reference(kind, labels=labels, names=names).diagonal()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["mlp", "cnn2d", "custom"])
def test_diagonal_matches_reference(problems, case, kind):
    """mlp: Linear layers (L = 1); cnn2d: a Conv2d (L = 64 locations); custom: parameters without a layer rule."""
    p = problems(case)
    engine = p.engine(kind, mc_samples=2, seed=5)
    ref.assert_close(structures.build("diag", engine).diag(), reference_diagonal(p, engine, kind), RTOL,
                     f"{case} {kind}")


@pytest.mark.parametrize("kind", KINDS)
def test_diagonal_of_a_module_called_twice(kind):
    """The fallback for a whole model: every parameter's diagonal from its factor rows."""
    torch.manual_seed(0)
    model = Twice().to(F64).eval()
    X, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    engine = FisherEngine(model, (X, y), "categorical", kind=kind, mc_samples=2, seed=1)
    lik = ref.RefLikelihood("categorical")
    expected = ref.fisher(kind, model, X, y, lik, labels=engine._labels if kind == "mc" else None).diagonal()
    ref.assert_close(structures.build("diag", engine).diag(), expected, RTOL, f"shared module {kind}")


@pytest.mark.parametrize("case", ["mlp", "cnn2d"])
def test_weight_only_and_bias_only_selections(problems, case):
    """A layer's weight without its bias and another layer's bias without its weight land in their own slices."""
    p = problems(case)
    weights = [n for n, _ in p.model.named_parameters() if n.endswith("weight")]
    biases = [n for n, _ in p.model.named_parameters() if n.endswith("bias")]
    names = [n for n, _ in p.model.named_parameters() if n in (weights[0], biases[-1])]
    engine = p.engine("true", params=names)
    ref.assert_close(structures.build("diag", engine).diag(), p.reference("true", names=names).diagonal(), RTOL,
                     f"{case} {names}")


@pytest.mark.parametrize("case", ["mlp", "cnn2d"])
def test_small_budget_takes_several_chunks_with_the_same_result(problems, case, monkeypatch):
    """A budget too small for one chunk: the chunks' sums give the reference diagonal all the same."""
    p = problems(case)
    engine = p.engine("true", memory_budget=4 * 2**10)
    seen: list[int] = []
    chunks = engine.chunks

    def counting(*args, **kwargs):
        for x, y, labels in chunks(*args, **kwargs):
            seen.append(x.shape[0])
            yield x, y, labels

    monkeypatch.setattr(engine, "chunks", counting)
    ref.assert_close(structures.build("diag", engine).diag(), p.reference("true").diagonal(), RTOL, case)
    assert len(seen) > 1 and sum(seen) == p.case.n


def test_linear_layers_are_not_chunked_for_per_sample_gradients(monkeypatch):
    """With one location per sample the squares need no per-sample gradients (out × width each): a budget that
    holds the rows of all samples, but not that many per-sample gradients of the 256 × 257 layer, is one chunk."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3)).to(F64).eval()
    X, y = torch.randn(40, 256, dtype=F64), torch.randint(0, 3, (40,))
    budget = 4 * 40 * 3 * 3 * 2000 * 8  # rows of 40 samples (R = 2) fit in budget / 4; 40 × 256² scalars do not
    engine = FisherEngine(model, (X, y), "categorical", memory_budget=budget)
    seen: list[int] = []
    chunks = engine.chunks

    def counting(*args, **kwargs):
        for x, yy, labels in chunks(*args, **kwargs):
            seen.append(x.shape[0])
            yield x, yy, labels

    monkeypatch.setattr(engine, "chunks", counting)
    D = structures.build("diag", engine).diag()
    assert seen == [40]
    lik = ref.RefLikelihood("categorical")
    J = ref.jacobians(model, X)  # (N, C, P): P = 66,563 is too many for the dense reference
    Lam = torch.stack([lik.output_fisher(z) for z in ref.outputs(model, X)])
    ref.assert_close(D, torch.einsum("ncp,ncd,ndp->p", J, Lam, J) / len(X), RTOL, "one chunk")
    assert 40 * 256 * 257 * 8 > budget // 4  # the per-sample gradients would not have fit


def test_front_door(problems):
    """fisher(..., structure="diag") is the same diagonal."""
    p = problems("cnn2d")
    D = fisher(p.model, p.data, "categorical", kind="true", structure="diag").diag()
    ref.assert_close(D, p.reference("true").diagonal(), RTOL, "fisher()")


class Bag(nn.Module):
    """Embedding of token ids (n, T) → mean over positions → tanh → Linear: W̄ of the embedding is its weightᵀ."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x).mean(1)))


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_embedding(kind):
    """Token ids with repeats inside a sample: the embedding's diagonal in the weight's own (row-major) order."""
    torch.manual_seed(0)
    model = Bag().to(F64).eval()
    X, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6,))
    expected = ref.fisher(kind, model, X, y, ref.RefLikelihood("categorical")).diagonal()
    ref.assert_close(fisher(model, (X, y), kind=kind, structure="diag").diag(), expected, RTOL, f"embedding {kind}")
