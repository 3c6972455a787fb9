"""The shared exact-NGD solve against a float64 brute-force reference (per-sample autograd Fisher, dense solve)."""

from __future__ import annotations

import json
import math

import pytest
import reference as ref
import torch

import fisherlab.ngd as ngd_module
from fisherlab import evaluate_fidelity, fisher
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError
from fisherlab.linalg import cg
from fisherlab.models import CNN, MLP
from fisherlab.ngd import solve_ngd, solve_ngd_all

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


@pytest.mark.parametrize("solver", ["woodbury", "gram", "cholesky", "cg", "auto", "auto-small-budget"])
def test_every_solver_is_exact_ngd(problem, solver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, X, y, g, F, expected = problem
    calls = []
    monkeypatch.setattr(ngd_module, "cg", lambda *a, **k: calls.append(1) or cg(*a, **k))
    budget = 3000 if solver == "auto-small-budget" else None  # neither the Gram (3.6 kB) nor U fits: CG
    engine = FisherEngine(model, (X, y), memory_budget=budget)
    got, info = solve_ngd(engine, g, LAM, solver=solver.removesuffix("-small-budget"), cg_tol=1e-12)
    assert bool(calls) == (solver in ("cg", "auto-small-budget"))
    assert float((got - expected).norm() / expected.norm()) < 1e-9
    assert info.solver == {"auto": "gram", "auto-small-budget": "cg"}.get(solver, solver)
    if info.solver != "woodbury":  # the recorded residual, checked against the reference Fisher
        own = float((F @ got + LAM * got - g).norm() / g.norm())
        assert info.residual == pytest.approx(own, rel=1e-3, abs=1e-14)
        assert info.converged


@pytest.mark.parametrize("structure", ["dense", "implicit"])
def test_a_given_fisher_is_used_as_it_is(problem, structure: str) -> None:
    """The rules' path: the context's dense Fisher (Cholesky), or its implicit one (the sample-space solve)."""
    model, X, y, g, F, expected = problem
    engine = FisherEngine(model, (X, y))
    built = fisher(model, (X, y), structure=structure)
    got, info = solve_ngd(engine, g, LAM, fisher=built, cg_tol=1e-12)
    assert info.solver == ("cholesky" if structure == "dense" else "gram")
    assert float((got - expected).norm() / expected.norm()) < 1e-9
    assert info.iterations == 0 and info.products == (structure == "implicit")  # gram: its residual check
    assert math.isnan(info.tol) == (structure == "dense")


def test_bad_solver_and_damping(problem) -> None:
    model, X, y, g, *_ = problem
    engine = FisherEngine(model, (X, y))
    with pytest.raises(InputError, match="unknown NGD solver 'lu'"):
        solve_ngd(engine, g, LAM, solver="lu")
    with pytest.raises(InputError, match="Woodbury NGD solve needs damping > 0"):
        solve_ngd(engine, g, 0.0, solver="woodbury")
    with pytest.raises(InputError, match="damping must be ≥ 0"):
        solve_ngd(engine, g, -1.0)


# ------------------------------------------------------------------ several dampings, preconditioned CG

DAMPINGS = [1e-2, 1e-1, 1.0, 1e-3]


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def net_problem(request):
    """A small float64 MLP or CNN, its gradient and its true Fisher by per-sample autograd (the reference)."""
    torch.manual_seed(2)
    if request.param == "mlp":
        model, X = MLP(6, [7], 3).double().eval(), torch.randn(10, 6, dtype=torch.float64)
    else:
        model, X = CNN((1, 4, 4), 3, channels=(2, 3)).double().eval(), torch.randn(10, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    lik = ref.RefLikelihood("categorical")
    return model, X, y, ref.loss_gradients(model, X, y, lik).mean(0), ref.true_fisher(model, X, lik)


def _residual(F: torch.Tensor, x: torch.Tensor, g: torch.Tensor, lam: float) -> float:
    return float((F @ x + lam * x - g).norm() / g.norm())


def test_multishift_matches_cholesky_and_separate_cg(net_problem) -> None:
    model, X, y, g, F = net_problem
    engine = FisherEngine(model, (X, y))
    got = solve_ngd_all(engine, g, DAMPINGS, solver="multishift", cg_tol=1e-13)
    separate = {lam: solve_ngd(engine, g, lam, solver="cg", cg_tol=1e-13) for lam in DAMPINGS}
    assert list(got) == DAMPINGS
    eye = torch.eye(len(F), dtype=torch.float64)
    for lam, (x, info) in got.items():
        expected = torch.cholesky_solve(g[:, None], torch.linalg.cholesky(F + lam * eye))[:, 0]
        assert float((x - expected).norm() / expected.norm()) < 1e-10
        assert float((x - separate[lam][0]).norm() / expected.norm()) < 1e-10
        assert info.solver == "multishift" and info.preconditioner == "none" and info.converged
        assert info.residual == pytest.approx(_residual(F, x, g, lam), rel=1e-3, abs=1e-15)
    products = {info.products for _, info in got.values()}
    assert len(products) == 1  # one shared solve: every damping records its total
    assert products.pop() < sum(info.products for _, info in separate.values())


@pytest.mark.parametrize("solver", ["pcg-kfac", "pcg-diag", "pcg-nystrom"])
def test_preconditioned_cg_reaches_the_unpreconditioned_residual(net_problem, solver: str) -> None:
    model, X, y, g, F = net_problem
    engine = FisherEngine(model, (X, y))
    for tol in (1e-4, 1e-9):
        got = solve_ngd_all(engine, g, DAMPINGS, solver=solver, cg_tol=tol)
        for lam, (x, info) in got.items():
            own = _residual(F, x, g, lam)  # independently, with the reference Fisher
            assert own <= tol * (1 + 1e-6) and info.converged
            assert info.residual == pytest.approx(own, rel=1e-3, abs=1e-15)
            name = {"pcg-nystrom": "lowrank"}.get(solver, solver.removeprefix("pcg-"))
            assert info.preconditioner == name and info.products > info.iterations > 0


def test_nystrom_pcg_against_dense_cholesky_for_four_dampings(net_problem, monkeypatch) -> None:
    """CG preconditioned by a rank-5 Nyström sketch (below rank F = 20: not exact) gives (F + λI)⁻¹g of the
    per-sample reference F to 1e-10 at 4 dampings; its residual, recomputed with a fresh engine's product and with
    the reference, is the recorded one; it takes fewer products than plain CG; the sketch's 5 products are recorded
    when the solve builds it."""
    model, X, y, g, F = net_problem
    engine = FisherEngine(model, (X, y))
    sketch = fisher(model, (X, y), structure="lowrank", rank=5)
    assert int(torch.linalg.matrix_rank(F)) > 5
    calls = []
    monkeypatch.setattr(sketch, "precondition",
                        lambda r, lam: calls.append(lam) or type(sketch).precondition(sketch, r, lam))
    got = solve_ngd_all(engine, g, DAMPINGS, solver="pcg-nystrom", preconditioner=sketch, cg_tol=1e-13)
    plain = solve_ngd_all(engine, g, DAMPINGS, solver="cg", cg_tol=1e-13)
    assert set(calls) == set(DAMPINGS)
    fresh = FisherEngine(model, (X, y))
    eye = torch.eye(len(F), dtype=torch.float64)
    for lam, (x, info) in got.items():
        expected = torch.cholesky_solve(g[:, None], torch.linalg.cholesky(F + lam * eye))[:, 0]
        assert float((x - expected).norm() / expected.norm()) < 1e-10, lam
        own = float((fresh.matmat(x) + lam * x - g).norm() / g.norm())
        assert own <= 1e-13 * (1 + 1e-6) and info.converged
        assert info.residual == pytest.approx(own, rel=1e-3, abs=1e-15)
        assert info.residual == pytest.approx(_residual(F, x, g, lam), rel=1e-3, abs=1e-15)
        assert info.solver == "pcg-nystrom" and info.preconditioner == "lowrank"
        assert info.preconditioner_products == 0  # given: built elsewhere
    assert sum(i.products for _, i in got.values()) < sum(i.products for _, i in plain.values())
    built = solve_ngd_all(engine, g, DAMPINGS, solver="pcg-nystrom", cg_tol=1e-10)
    assert {i.preconditioner_products for _, i in built.values()} == {min(len(F), 10 * 2)}  # default rank N·R


class _Scale(torch.nn.Module):
    """x ⊙ w, a module without a KFAC layer rule."""

    def __init__(self, width: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_kfac_preconditioner_given_is_used_and_diag_is_the_fallback(problem, monkeypatch) -> None:
    model, X, y, g, F, _ = problem
    engine = FisherEngine(model, (X, y))
    kfac = fisher(model, (X, y), structure="kfac")
    calls = []
    monkeypatch.setattr(kfac, "solve", lambda v, lam: calls.append(lam) or type(kfac).solve(kfac, v, lam))
    x, info = solve_ngd(engine, g, LAM, solver="pcg-kfac", preconditioner=kfac, cg_tol=1e-10)
    assert calls and set(calls) == {LAM} and info.preconditioner == "kfac"
    assert _residual(F, x, g, LAM) <= 1e-10
    scaled = torch.nn.Sequential(torch.nn.Linear(6, 5), _Scale(5), torch.nn.Linear(5, 3)).double()
    rhs = torch.randn(sum(p.numel() for p in scaled.parameters()), dtype=torch.float64)
    x, info = solve_ngd(FisherEngine(scaled, (X, y)), rhs, LAM, solver="pcg-kfac")
    assert info.preconditioner == "diag" and info.converged  # KFAC has no rule for _Scale


def test_solve_ngd_all_auto_and_context(problem) -> None:
    model, X, y, g, F, _ = problem
    engine = FisherEngine(model, (X, y))
    implicit = fisher(model, (X, y), structure="implicit")
    assert {i.solver for _, i in solve_ngd_all(engine, g, DAMPINGS, fisher=implicit).values()} == {"gram"}
    small = FisherEngine(model, (X, y), memory_budget=2000)  # the sample-space Gram does not fit: CG
    assert {i.solver for _, i in solve_ngd_all(small, g, DAMPINGS, fisher=implicit).values()} == {"multishift"}
    assert {i.solver for _, i in solve_ngd_all(small, g, [LAM], fisher=implicit).values()} == {"cg"}
    dense = fisher(model, (X, y), structure="dense")
    assert {i.solver for _, i in solve_ngd_all(engine, g, DAMPINGS, fisher=dense).values()} == {"cholesky"}
    # the fidelity Dataset records solver, preconditioner, products and seconds per damping
    P = F.shape[0]
    for solver, precond in (("auto", "none"), ("pcg-kfac", "kfac"), ("pcg-diag", "diag")):
        ds = evaluate_fidelity(model, (X, y), rules=["gd", "ngd"], damping=DAMPINGS, dtype=torch.float64,
                               memory_budget=3 * P * P * 8, cg_tol=1e-10, ngd_solver=solver)
        expected_solver = "gram" if solver == "auto" else solver
        assert list(ds["ngd_solver"].values) == [expected_solver] * 4 and ds.attrs["ngd_solver"] == expected_solver
        assert list(ds["ngd_preconditioner"].values) == [precond] * 4
        assert (ds["ngd_products"].values > 0).all() and (ds["ngd_residual"].values <= 1e-10).all()
        assert len(json.loads(ds.attrs["ngd_seconds"])) == 4
        for lam in DAMPINGS:
            expected = torch.linalg.solve(F + lam * torch.eye(P, dtype=torch.float64), g)
            cos = float(ds["cosine"].sel(rule="gd", damping=lam))
            assert cos == pytest.approx(float(g @ expected / (g.norm() * expected.norm())), abs=1e-8)
    with pytest.raises(InputError, match="unknown NGD solver"):
        evaluate_fidelity(model, (X, y), rules=["gd"], damping=LAM, ngd_solver="lu")
