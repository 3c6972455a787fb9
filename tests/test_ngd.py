"""The shared exact-NGD solve against a float64 brute-force reference (per-sample autograd Fisher, dense solve)."""

from __future__ import annotations

import math

import pytest
import torch

import fisherlab.ngd as ngd_module
import reference as ref
from fisherlab import fisher
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError
from fisherlab.linalg import cg
from fisherlab.models import MLP
from fisherlab.ngd import solve_ngd

LAM = 0.1


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(1)
    model = MLP(6, [5], 3).double().eval()
    X, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    lik = ref.RefLikelihood("categorical")
    g = ref.loss_gradients(model, X, y, lik).mean(0)
    F = ref.true_fisher(model, X, lik)
    expected = torch.linalg.solve(F + LAM * torch.eye(len(F), dtype=torch.float64), g)
    return model, X, y, g, F, expected


@pytest.mark.parametrize("solver", ["woodbury", "cholesky", "cg", "auto", "auto-small-budget"])
def test_every_solver_is_exact_ngd(problem, solver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, X, y, g, F, expected = problem
    calls = []
    monkeypatch.setattr(ngd_module, "cg", lambda *a, **k: calls.append(1) or cg(*a, **k))
    budget = 8000 if solver == "auto-small-budget" else None  # the factor rows U would take > budget / 4: CG
    engine = FisherEngine(model, (X, y), memory_budget=budget)
    got, info = solve_ngd(engine, g, LAM, solver=solver.removesuffix("-small-budget"), cg_tol=1e-12)
    assert bool(calls) == (solver in ("cg", "auto-small-budget"))
    assert float((got - expected).norm() / expected.norm()) < 1e-9
    assert info.solver == {"auto": "woodbury", "auto-small-budget": "cg"}.get(solver, solver)
    if info.solver != "woodbury":  # the recorded residual, checked against the reference Fisher
        own = float((F @ got + LAM * got - g).norm() / g.norm())
        assert info.residual == pytest.approx(own, rel=1e-3, abs=1e-14)
        assert info.converged


@pytest.mark.parametrize("structure", ["dense", "implicit"])
def test_a_given_fisher_is_used_as_it_is(problem, structure: str) -> None:
    """The rules' path: the context's dense (Cholesky) or implicit (CG) Fisher."""
    model, X, y, g, F, expected = problem
    engine = FisherEngine(model, (X, y))
    built = fisher(model, (X, y), structure=structure)
    got, info = solve_ngd(engine, g, LAM, fisher=built, cg_tol=1e-12)
    assert info.solver == ("cholesky" if structure == "dense" else "cg")
    assert float((got - expected).norm() / expected.norm()) < 1e-9
    assert (info.iterations > 0) == (structure == "implicit") and math.isnan(info.tol) == (structure == "dense")


def test_bad_solver_and_damping(problem) -> None:
    model, X, y, g, *_ = problem
    engine = FisherEngine(model, (X, y))
    with pytest.raises(InputError, match="unknown NGD solver 'lu'"):
        solve_ngd(engine, g, LAM, solver="lu")
    with pytest.raises(InputError, match="Woodbury NGD solve needs damping > 0"):
        solve_ngd(engine, g, 0.0, solver="woodbury")
    with pytest.raises(InputError, match="damping must be ≥ 0"):
        solve_ngd(engine, g, -1.0)
