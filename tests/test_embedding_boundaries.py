"""Embeddings that per-layer statistics cannot read are refused by name; the user's model is never altered.

A position table read as ``position.weight[:T]`` is never *called*: the layer-wise structures (kfac, ekfac, unit,
reconstruction) would see no inputs and give it a zero block (kfac: a misleading SingularMatrixError from zero
factors). Called on ``arange(T)`` it has no per-sample dimension. Both are named errors; ``diag`` then takes its
generic path and equals diag(F) of the per-sample-loop reference. ``nn.Embedding(max_norm=...)`` renormalises its
weight rows in place in every forward pass: every entry point refuses it before any evaluation, and the user's
weights stay bit-identical.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import Tensor, nn

from fisherlab import SNGD, fisher
from fisherlab.data import SplitData
from fisherlab.errors import UnsupportedLayerError
from fisherlab.reconstruction import reconstruct
from fisherlab.train import train

DT = torch.float64
CAT = ref.RefLikelihood("categorical")


class Positions(nn.Module):
    """Token + position embeddings, mean over positions, Linear head; ``mode`` says how the table is used."""

    def __init__(self, mode: str, max_norm: float | None = None):
        super().__init__()
        self.mode = mode
        self.embed = nn.Embedding(5, 4, max_norm=max_norm)
        self.position = nn.Embedding(3, 4)
        self.unused = nn.Embedding(2, 4)  # never called, never read: its block is zero, nothing to refuse
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        pos = {"index": lambda: self.position.weight[:T], "arange": lambda: self.position(torch.arange(T)),
               "batched": lambda: self.position(torch.arange(T).expand(x.shape))}[self.mode]()
        return self.head((self.embed(x) + pos).mean(1))


def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 5, (6, 3), generator=g), torch.randint(0, 3, (6,), generator=g)


def model(mode: str, max_norm: float | None = None) -> nn.Module:
    torch.manual_seed(0)
    return Positions(mode, max_norm).to(DT).eval()


@pytest.mark.parametrize("structure", ["kfac", "ekfac", "unit"])
def test_a_table_read_without_a_call_is_refused_by_name(structure: str) -> None:
    X, y = data()
    with pytest.raises(UnsupportedLayerError, match=r"'position\.weight' of module 'position' \(Embedding\) is read "
                                                    r"by the forward pass without a call"):
        fisher(model("index"), (X, y), structure=structure, dtype=DT)


@pytest.mark.parametrize("structure", ["kfac", "input"])
def test_reconstruct_refuses_a_table_read_without_a_call(structure: str) -> None:
    X, y = data()
    with pytest.raises(UnsupportedLayerError, match="without a call"):
        reconstruct(model("index"), (X, y), structure=structure, damping=1e-3)


def test_a_table_called_without_a_batch_dimension_is_refused_by_name() -> None:
    X, y = data()
    with pytest.raises(UnsupportedLayerError, match="'position'.*per-sample dimension"):
        reconstruct(model("arange"), (X, y), structure="kfac", damping=1e-3)


@pytest.mark.parametrize("mode", ["index", "arange"])
def test_diag_is_exact_on_such_tables(mode: str) -> None:
    """diag's layer-wise path steps aside (it used to write a zero diagonal for position.weight[:T])."""
    X, y = data()
    m = model(mode)
    Fm = ref.true_fisher(m, X, CAT)
    got = fisher(m, (X, y), structure="diag", dtype=DT).to_dense()
    assert float(Fm.diagonal()[20:32].abs().min()) > 0  # position.weight has a nonzero diagonal
    ref.assert_close(got, torch.diag(Fm.diagonal()), 1e-10, "diag")


def test_an_unused_embedding_is_no_false_alarm() -> None:
    """The batched table works, and the never-used table gets zero (it is not called and not read)."""
    X, y = data()
    m = model("batched")
    expected = ref.true_fisher(m, X, CAT).diagonal()
    assert not expected[32:40].any()  # unused.weight
    got = fisher(m, (X, y), structure="unit", dtype=DT).to_dense().diagonal()
    ref.assert_close(got, expected, 1e-10, "unit diagonal")


def test_an_unused_parameter_has_zero_gradient() -> None:
    """∇L of a model with a never-called table: the autograd loss gradient, with zeros for the unused one."""
    from fisherlab.engine import FisherEngine

    X, y = data()
    m = model("batched")
    loss = torch.nn.functional.cross_entropy(m(X), y)
    params = [p for p in m.parameters()]
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss, params, allow_unused=True, materialize_grads=True)])
    value, got = FisherEngine(m, (X, y), "categorical", dtype=DT).loss_and_gradient()
    assert not expected[32:40].any()  # unused.weight
    ref.assert_close(got, expected, 1e-12, "gradient")
    assert abs(float(value) - float(loss)) < 1e-12


def _entry_points(m: nn.Module, X: Tensor, y: Tensor) -> dict:
    split = SplitData(X, y, X, y, name="toy", task="multiclass", n_outputs=3, input_shape=(3,),
                      meta={"layout": "tokens", "vocab": 5})
    return {
        "fisher dense": lambda: fisher(m, (X, y), structure="dense"),
        "fisher kfac": lambda: fisher(m, (X, y), structure="kfac"),
        "reconstruct": lambda: reconstruct(m, (X, y), structure="kfac", damping=1e-3),
        "SNGD": lambda: SNGD(m, (X, y), "categorical", lr=0.1, structure="diag", damping=1e-3),
        "train": lambda: train(m, split, rule="sgd", lr=0.1, steps=1, batch_size=3),
    }


@pytest.mark.parametrize("entry", ["fisher dense", "fisher kfac", "reconstruct", "SNGD", "train"])
def test_max_norm_is_refused_before_any_forward_pass(entry: str) -> None:
    X, y = data()
    m = model("batched", max_norm=0.5)
    with torch.no_grad():
        m.embed.weight.mul_(3.0)  # rows of norm > max_norm: a forward pass would rescale them in place
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(UnsupportedLayerError, match=r"'embed' \(Embedding\) has max_norm=0\.5"):
        _entry_points(m, X, y)[entry]()
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
