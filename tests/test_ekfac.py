"""EKFAC against float64 references: the re-fitted scalings are diag(Qᵀ F_l Q) of the exact layer block F_l
(dense, per-sample autograd), so EKFAC is the Frobenius-optimal diagonal in the KFAC eigenbasis — never farther
from F_l than KFAC (George et al. 2018) — and equals F_l wherever KFAC does (one sample).
"""

from __future__ import annotations

import copy
import dataclasses

import layer_reference as lref
import pytest
import reference as ref
import torch

from fisherlab import fisher
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, SingularMatrixError
from fisherlab.structures.ekfac import EKFACFisher
from fisherlab.structures.kfac import KFACFisher
from fisherlab.structures.running import RunningFisher, ema_update

F64 = torch.float64
RTOL = 1e-10
KINDS = ("true", "mc", "empirical")
MC_SEED, MC_SAMPLES = 5, 2


def engine_for(problem, kind: str, n: int | None = None) -> FisherEngine:
    return FisherEngine(problem.model, (problem.X[:n], problem.y[:n]), problem.likelihood, kind=kind,
                        mc_samples=MC_SAMPLES, seed=MC_SEED)


def exact_fisher(problem, engine: FisherEngine) -> torch.Tensor:
    X, y = engine.data.first(engine.num_samples)
    return ref.fisher(engine.kind.value, problem.model, X, y, problem.ref_likelihood, labels=engine._labels)


def wbar_order(problem, layer: str, names: list[str]) -> torch.Tensor:
    """Index map putting a flat-ordered layer block into row-major W̄ order (from the parameter shapes)."""
    rows, cols, width = lref.wbar_coords(problem.model, layer, names)
    return torch.argsort(rows * width + cols)


@pytest.mark.parametrize("name", ["softmax", "mlp", "cnn2d", "cnn1d"])
@pytest.mark.parametrize("kind", KINDS)
def test_scalings_are_the_exact_blocks_diagonal_in_the_kfac_basis(problems, name, kind):
    problem = problems(name)
    engine = engine_for(problem, kind)
    E = EKFACFisher.from_engine(engine)
    K = KFACFisher.from_engine(engine)
    F = exact_fisher(problem, engine)
    D_e, D_k = E.to_dense(), K.to_dense()
    for layer, ix in engine.spec.blocks("layer").items():
        f = E.factors[layer]
        order = wbar_order(problem, layer, list(engine.spec.layers()[layer]))
        Fl = F[ix][:, ix][order][:, order]
        Q = torch.kron(f.Q_S, f.Q_A)
        ref.assert_close(f.scaling.reshape(-1), (Q.T @ Fl @ Q).diagonal(), RTOL, f"{name} {kind} {layer}")
        # the basis is KFAC's: Q diagonalises S ⊗ A
        kf = K.factors[layer]
        ref.assert_close(f.Q_S.T @ kf.S @ f.Q_S, torch.diag((f.Q_S.T @ kf.S @ f.Q_S).diagonal()), 1e-12, "S basis")
        err_e = lref.rel_fro(D_e[ix][:, ix], F[ix][:, ix])
        err_k = lref.rel_fro(D_k[ix][:, ix], F[ix][:, ix])
        print(f"{name} {kind} layer {layer!r}: Frobenius error EKFAC {err_e:.3f} ≤ KFAC {err_k:.3f}")
        assert err_e <= err_k + 1e-12


@pytest.mark.parametrize("name", ["softmax", "mlp", "mlp_gaussian"])
@pytest.mark.parametrize("kind", KINDS)
def test_exact_where_kfac_is_exact(problems, name, kind):
    problem = problems(name)
    engine = engine_for(problem, kind, n=1)
    E = EKFACFisher.from_engine(engine)
    F = exact_fisher(problem, engine)
    D = E.to_dense()
    for layer, ix in engine.spec.blocks("layer").items():
        ref.assert_close(D[ix][:, ix], F[ix][:, ix], 1e-9, f"{name} {kind} layer {layer}")


@pytest.fixture(scope="module")
def ekfac_cnn(problems) -> EKFACFisher:
    return problems("cnn2d").fisher("true", "ekfac")


def test_operations_against_dense(ekfac_cnn):
    E = ekfac_cnn
    D = E.to_dense()
    V = torch.randn(E.spec.dim, 4, dtype=F64)
    ref.assert_close(E @ V, D @ V, RTOL, "matmat")
    ref.assert_close(E.diag(), D.diagonal(), RTOL, "diag")
    assert float(E.trace()) == pytest.approx(float(D.trace()), rel=1e-12)
    ref.assert_close(E.eigvalsh(), torch.linalg.eigvalsh(D), 1e-10, "eigvalsh")
    lam = 1e-3
    ref.assert_close(E.solve(V, lam), torch.linalg.solve(D + lam * torch.eye(len(D), dtype=F64), V), 1e-9, "solve")
    with pytest.raises(SingularMatrixError, match="damping"):
        E.solve(V, 0.0)


def test_damped_solve_of_a_wide_float32_block_is_not_refused(ekfac_cnn):
    """Scalings with zeros and a large maximum: n·eps·max exceeds λ in float32, yet (D + λ)⁻¹ is an exact division."""
    E = copy.deepcopy(ekfac_cnn)
    f = next(iter(E.factors.values()))
    scaling = torch.zeros_like(f.scaling)
    scaling[0, 0] = 1e7
    E.factors[f.layer] = dataclasses.replace(f, scaling=scaling)
    V = torch.randn(E.spec.dim, 2, dtype=F64)
    assert scaling.numel() * torch.finfo(torch.float32).eps * 1e7 > 1e-2
    D = E.to_dense()
    expected = torch.linalg.solve(D + 1e-2 * torch.eye(len(D), dtype=F64), V)
    ref.assert_close(E.solve(V, 1e-2), expected, 1e-6, "damped solve")  # κ = 1e9: both agree to κ·eps


def test_front_door_unsupported_block_and_chunking(problems):
    problem = problems("lstm")
    E = problem.fisher("true", "ekfac", unsupported="block")
    F = problem.reference("true")
    ix = E.index["cell"]
    ref.assert_close(E.to_dense()[ix][:, ix], F[ix][:, ix], RTOL, "exact LSTM block")
    cnn = problems("cnn1d")
    a = cnn.fisher("mc", "ekfac", engine_kw={"seed": 1}).to_dense()
    b = EKFACFisher.from_engine(cnn.engine("mc", seed=1), chunk_size=1).to_dense()
    ref.assert_close(b, a, 1e-12, "chunk_size=1")


def test_running_average_in_a_shared_basis(problems):
    problem = problems("mlp")
    model, X, y = problem.model, problem.X, problem.y
    first = fisher(model, (X[:4], y[:4]), "categorical", structure="ekfac")
    second = fisher(model, (X[4:], y[4:]), "categorical", structure="ekfac")
    with pytest.raises(InputError, match="basis"):
        ema_update(first, second, 0.5)
    engine = FisherEngine(model, (X[4:], y[4:]), "categorical")
    second = EKFACFisher.from_engine(engine, basis=first)
    running = RunningFisher(0.8)
    running.update(first)
    avg = running.update(second)
    F2 = ref.true_fisher(model, X[4:], ref.RefLikelihood("categorical"))
    for layer, ix in engine.spec.blocks("layer").items():
        f1, f2, fa = first.factors[layer], second.factors[layer], avg.factors[layer]
        assert torch.equal(f2.Q_A, f1.Q_A) and torch.equal(fa.Q_S, f1.Q_S)
        order = wbar_order(problem, layer, list(engine.spec.layers()[layer]))
        Q = torch.kron(f1.Q_S, f1.Q_A)
        Fl = F2[ix][:, ix][order][:, order]
        ref.assert_close(f2.scaling.reshape(-1), (Q.T @ Fl @ Q).diagonal(), RTOL, f"scalings in given basis {layer}")
        ref.assert_close(fa.scaling, 0.8 * f1.scaling + 0.2 * f2.scaling, 1e-14, f"EMA {layer}")
        ref.assert_close(fa.A, 0.8 * f1.A + 0.2 * f2.A, 1e-14, f"EMA A {layer}")
