"""The sample-space (``gram``) exact-NGD solve against float64 brute-force references (dense Cholesky of the
per-sample autograd Fisher, tests/reference.py and the sequence reference of test_sequence_likelihood.py)."""

from __future__ import annotations

import pytest
import reference as ref
import torch
from test_sequence_likelihood import TinyCausalLM, make_data
from test_sequence_likelihood import reference as sequence_reference
from torch import nn

import fisherlab.gram as gram_module
from fisherlab import fisher
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, MemoryBudgetError
from fisherlab.gram import build_gram, gram_bytes
from fisherlab.models import CNN, GPT, MLP
from fisherlab.ngd import solve_ngd, solve_ngd_all

F64 = torch.float64
DAMPINGS = [1e-4, 1e-3, 1e-2, 1e-1]
KINDS = ("true", "empirical", "mc", "ggn")


def _mlp():
    torch.manual_seed(0)
    return MLP(6, [7], 3, "tanh").double().eval(), torch.randn(5, 6, dtype=F64)


def _cnn():
    torch.manual_seed(0)
    return CNN((1, 4, 4), 3, channels=(2, 3)).double().eval(), torch.randn(5, 1, 4, 4, dtype=F64)


def _normed():
    """LayerNorm and an eval-mode BatchNorm: parameters outside the layer rules (explicit rows)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(7)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    model = nn.Sequential(nn.Linear(6, 7), bn, nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 3))
    return model.double().eval(), torch.randn(5, 6, dtype=F64)


CASES = {"mlp": _mlp, "cnn": _cnn, "normed": _normed}


def _expected(F: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.cholesky_solve(g[:, None], torch.linalg.cholesky(F + lam * torch.eye(len(F), dtype=F64)))[:, 0]


def _residual(F: torch.Tensor, x: torch.Tensor, g: torch.Tensor, lam: float) -> float:
    return float((F @ x + lam * x - g).norm() / g.norm())


def _check(engine: FisherEngine, F: torch.Tensor, g: torch.Tensor, solver: str = "gram") -> None:
    assert engine.num_samples * engine.rows_per_sample < engine.spec.dim  # sample space is the smaller one
    got = solve_ngd_all(engine, g, DAMPINGS, solver=solver)
    for lam, (x, info) in got.items():
        expected = _expected(F, g, lam)
        assert float((x - expected).norm() / expected.norm()) < 1e-10, (lam, info)
        assert info.solver == "gram" and info.products == 1 and info.iterations == 0 and info.converged
        assert info.residual == pytest.approx(_residual(F, x, g, lam), rel=0.5, abs=1e-13)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_gram_is_exact_ngd(case: str, kind: str) -> None:
    model, X = CASES[case]()
    y = torch.randint(0, 3, (X.shape[0],), generator=torch.Generator().manual_seed(3))
    engine = FisherEngine(model, (X, y), kind=kind, mc_samples=2)
    lik = ref.RefLikelihood("categorical")
    F = ref.fisher(kind, model, X, y, lik, labels=engine._labels)
    _check(engine, F, ref.loss_gradients(model, X, y, lik).mean(0), solver="auto")


@pytest.mark.parametrize("explicit", [False, True])
def test_closed_form_and_explicit_rows_agree_with_the_reference(explicit: bool, monkeypatch) -> None:
    """L > 1 layers (convolutions) both ways: Σ_{l,l'} (δ·δ)(ā·ā), and explicit per-sample gradients."""
    monkeypatch.setattr(gram_module, "_explicit", lambda *a: explicit)
    model, X = _cnn()
    y = torch.randint(0, 3, (X.shape[0],), generator=torch.Generator().manual_seed(3))
    lik = ref.RefLikelihood("categorical")
    engine = FisherEngine(model, (X, y))
    K = build_gram(engine).K
    U = torch.cat(list(engine.iter_factor_rows()))  # the P-wide rows, sample-major, only to check K = UUᵀ
    ref.assert_close(K.tril(), (U @ U.T).tril(), 1e-12, "K")
    _check(engine, ref.true_fisher(model, X, lik), ref.loss_gradients(model, X, y, lik).mean(0))


@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("explicit", [False, True])
def test_gram_on_a_padded_sequence_model(kind: str, explicit: bool, monkeypatch) -> None:
    """fisherlab's GPT (Embedding one-hot rows, positions, LayerNorm outside the rules), ignore_index padding."""
    monkeypatch.setattr(gram_module, "_explicit", lambda *a: explicit)
    torch.manual_seed(0)
    model = GPT(5, 4, d_model=8, output="sequence").double().eval()
    X = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(2))
    y[1, 2:] = y[2, 3:] = -100
    engine = FisherEngine(model, (X, y), kind=kind)
    lik = ref.RefLikelihood("categorical")
    F = sequence_reference(kind, model, X, y, lik)
    mask = y != -100
    g = engine.loss_and_gradient()[1]
    # g by the reference too: the token-mean gradient
    params = ref.selected(model)
    loss = sum(lik.nll(model(X[n: n + 1])[0][t], y[n, t]) for n in range(3) for t in range(4) if mask[n, t])
    ref.assert_close(g, torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss / mask.sum(), params)]), 1e-12)
    _check(engine, F, g)


def test_recorded_residual_is_measured_and_refinement_reaches_the_tolerance(monkeypatch) -> None:
    """A perturbed sample-space solve: the recorded residual is the true one; CG refines it to ``cg_tol``."""
    model, X = _mlp()
    y = torch.randint(0, 3, (X.shape[0],), generator=torch.Generator().manual_seed(3))
    lik = ref.RefLikelihood("categorical")
    F, g = ref.true_fisher(model, X, lik), ref.loss_gradients(model, X, y, lik).mean(0)
    solve = gram_module.SampleGram.solve
    monkeypatch.setattr(gram_module.SampleGram, "solve", lambda self, G, lam: solve(self, G, lam) * (1 + 1e-3))
    engine = FisherEngine(model, (X, y))
    for lam, (x, info) in solve_ngd_all(engine, g, DAMPINGS, solver="gram", cg_tol=1.0).items():
        own = _residual(F, x, g, lam)
        assert own > 1e-5 and info.residual == pytest.approx(own, rel=1e-8)
        assert info.iterations == 0 and info.products == 1
    for lam, (x, info) in solve_ngd_all(engine, g, DAMPINGS, solver="gram", cg_tol=1e-10).items():
        own = _residual(F, x, g, lam)
        assert own <= 1e-10 and info.converged and info.iterations >= 1 and info.products > 1
        assert info.residual == pytest.approx(own, rel=1e-3, abs=1e-15)


def test_auto_takes_gram_and_falls_back() -> None:
    model, X = _mlp()
    y = torch.randint(0, 3, (X.shape[0],))
    engine = FisherEngine(model, (X, y))
    g = engine.loss_and_gradient()[1]
    implicit = fisher(model, (X, y), structure="implicit")
    dense = fisher(model, (X, y), structure="dense")

    def solvers(e, lams, **kw):
        return {i.solver for _, i in solve_ngd_all(e, g, lams, **kw).values()}

    assert solvers(engine, DAMPINGS) == {"gram"} and solvers(engine, DAMPINGS, fisher=implicit) == {"gram"}
    assert solve_ngd(engine, g, 0.1)[1].solver == "gram"
    assert solvers(engine, DAMPINGS, fisher=dense) == {"cholesky"}  # a dense Fisher given is used as it is
    assert solvers(engine, [0.0, 0.1], fisher=implicit) == {"multishift"}  # λ = 0: no Woodbury
    small = FisherEngine(model, (X, y), memory_budget=gram_bytes(engine) - 1)
    assert solvers(small, DAMPINGS, fisher=implicit) == {"multishift"}
    with pytest.raises(MemoryBudgetError, match="sample-space Gram"):
        solve_ngd_all(small, g, DAMPINGS, solver="gram")
    with pytest.raises(InputError, match="needs damping > 0"):
        solve_ngd_all(engine, g, [0.0, 0.1], solver="gram")
    many = (torch.randn(40, 6, dtype=F64), torch.randint(0, 3, (40,)))
    wide = FisherEngine(model, many)  # m = 80 ≥ P = 73
    assert solvers(wide, DAMPINGS, fisher=fisher(model, many, structure="implicit")) == {"multishift"}
    # a layer called on an input without the batch dimension: no layer rows, so CG
    torch.manual_seed(0)
    lm = TinyCausalLM().double().eval()
    Xs, ys, _ = make_data()
    lm_engine = FisherEngine(lm, (Xs[:1], ys[:1]))
    lm_g = lm_engine.loss_and_gradient()[1]
    assert {i.solver for _, i in solve_ngd_all(lm_engine, lm_g, DAMPINGS[:2]).values()} != {"gram"}
