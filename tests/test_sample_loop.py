"""Models that torch.func.vmap cannot batch over samples (fused nn.LSTM / nn.GRU): the per-sample loop fallback.

References: brute-force per-sample autograd Fishers (tests/reference.py), the vmap-able unrolled recurrence of the
same weights (fisherlab.models.LSTMClassifier.forward), and dense Cholesky NGD.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from torch import Tensor, nn

from fisherlab import fisher
from fisherlab.engine import FisherEngine
from fisherlab.errors import FallbackWarning
from fisherlab.models import LSTMClassifier
from fisherlab.reconstruction import reconstruct

DT = torch.float64
LAM, LR = 1e-2, 0.3
LIK = ref.RefLikelihood("categorical")


class Fused(nn.Module):
    """An LSTM classifier through the fused kernel, or a GRU one (``cell="gru"``)."""

    def __init__(self, cell: str = "lstm"):
        super().__init__()
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(2, 3, batch_first=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def problem(cell: str = "lstm") -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = Fused(cell).double().eval()
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(7, 5, 2, generator=gen, dtype=DT), torch.randint(0, 3, (7,), generator=gen)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.detach() - b).norm() / b.norm())


@pytest.mark.filterwarnings("ignore::fisherlab.errors.FallbackWarning")
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("kind", ["true", "mc", "empirical"])
def test_fused_recurrent_fishers_match_brute_force(cell: str, kind: str) -> None:
    model, X, y = problem(cell)
    engine = FisherEngine(model, (X, y), kind=kind, mc_samples=2, seed=3, chunk_size=3)
    assert engine.sample_loop
    F = fisher(model, (X, y), kind=kind, mc_samples=2, seed=3, chunk_size=3).to_dense()
    if kind == "true":
        expected = ref.true_fisher(model, X, LIK)
    elif kind == "empirical":
        expected = ref.empirical_fisher(model, X, y, LIK)
    else:
        expected = ref.mc_fisher(model, X, engine._labels, LIK)
    assert rel(F, expected) < 1e-10
    v = torch.randn(F.shape[0], 2, dtype=DT)
    assert rel(fisher(model, (X, y), kind=kind, mc_samples=2, seed=3, structure="implicit") @ v, expected @ v) < 1e-10


def test_the_fallback_says_so_once_per_engine_and_vmap_models_do_not_use_it() -> None:
    model, X, y = problem()
    engine = FisherEngine(model, (X, y))  # the vmap probe runs when per-sample rows are first needed
    with pytest.warns(FallbackWarning, match=r"(?s)loops over the samples.*nn.LSTM"):
        assert engine.sample_loop
    unrolled = LSTMClassifier(2, 3, 3).double().eval()
    assert not FisherEngine(unrolled, (X, y)).sample_loop


@pytest.mark.filterwarnings("ignore::fisherlab.errors.FallbackWarning")
def test_fused_and_unrolled_lstm_have_the_same_fisher() -> None:
    """fisherlab.models.LSTMClassifier computes the fused kernel's recurrence by hand (vmap path)."""
    _, X, y = problem()
    unrolled = LSTMClassifier(2, 3, 3).double().eval()

    class ThroughKernel(nn.Module):
        def __init__(self, inner: LSTMClassifier):
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return self.inner.forward_fused(x)

    a = fisher(unrolled, (X, y)).to_dense()
    b = fisher(ThroughKernel(unrolled), (X, y)).to_dense()
    assert rel(b, a) < 1e-12


@pytest.mark.filterwarnings("ignore::fisherlab.errors.FallbackWarning")
def test_reconstructed_fused_lstm_is_ngd() -> None:
    """Invariants 1 and 3 (full: exact NGD) and 2 (kfac, LSTM in a dense block) on the fused kernel."""
    model, X, y = problem()
    g = ref.loss_gradients(model, X, y, LIK).mean(0)
    F = ref.true_fisher(model, X, LIK)
    eye = torch.eye(len(F), dtype=DT)
    net = reconstruct(model, (X, y), structure="dense", damping=LAM)
    with torch.no_grad():
        assert rel(net(X), model(X)) < 1e-10
    assert rel(net.gd_update((X, y), LR), -LR * torch.cholesky_solve(g.unsqueeze(1), torch.linalg.cholesky(
        F + LAM * eye)).squeeze(1)) < 1e-10
    net = reconstruct(model, (X, y), structure="block", damping=LAM)
    G = F.clone()
    P_rnn = sum(p.numel() for p in model.rnn.parameters())
    G[:P_rnn, P_rnn:] = 0
    G[P_rnn:, :P_rnn] = 0
    assert rel(net.gd_update((X, y), LR), -LR * torch.linalg.solve(G + LAM * eye, g)) < 1e-9


def prelu_problem(conv: bool) -> tuple[nn.Module, Tensor, Tensor]:
    """nn.PReLU, whose batching rule fails (R > 1 rows) or gives per-sample gradients of the wrong shape (a Conv2d)."""
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.PReLU(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
        X = torch.randn(6, 1, 5, 5, dtype=DT)
    else:
        model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 3))
        X = torch.randn(6, 3, dtype=DT)
    return model.double().eval(), X, torch.randint(0, 3, (6,))


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "cnn"])
@pytest.mark.parametrize("structure", ["dense", "diag"])
def test_prelu_falls_back_to_the_sample_loop(conv: bool, structure: str) -> None:
    """diag differentiates only the PReLU weight by factor rows (the subset rows), dense all parameters; both at
    R = 2 rows per sample, where vmap fails: the engine loops instead, with a FallbackWarning, exactly."""
    model, X, y = prelu_problem(conv)
    expected = ref.true_fisher(model, X, LIK)
    with pytest.warns(FallbackWarning, match="loops over the samples"):
        F = fisher(model, (X, y), structure=structure)
    got = F.to_dense() if structure == "dense" else F.diag()
    assert rel(got, expected if structure == "dense" else expected.diagonal()) < 1e-10
