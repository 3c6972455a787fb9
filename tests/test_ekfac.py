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
from fisherlab.errors import InputError, NonFiniteError, SingularMatrixError
from fisherlab.linalg.kron import kron_eig, kron_eigs
from fisherlab.structures.ekfac import EKFACFisher, _rotated_square_sum
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
@pytest.mark.parametrize("keep", [True, False], ids=["rows-kept", "second-pass"])
def test_scalings_are_the_exact_blocks_diagonal_in_the_kfac_basis(problems, name, kind, keep):
    """The scalings from the KFAC pass's kept rows and, with a budget whose quarter is one byte short of the
    rows, from a second pass."""
    problem = problems(name)
    engine = engine_for(problem, kind)
    if keep:
        E = EKFACFisher.from_engine(engine)
    else:
        rows = KFACFisher.factor_pass(engine, "expand", "error", None, keep_bytes=engine.memory_budget)[1]
        held = sum((a.numel() + g.numel()) * g.element_size() for chunk in rows for a, g in chunk.values())
        small = FisherEngine(problem.model, problem.data, problem.likelihood, kind=kind, mc_samples=MC_SAMPLES,
                             seed=MC_SEED, memory_budget=4 * held - 4)
        assert KFACFisher.factor_pass(small, "expand", "error", None, keep_bytes=held - 1)[1] is None
        if kind == "mc":  # the same sampled labels, so the same Fisher
            assert torch.equal(small._labels, engine._labels)
        E = dataclasses.replace(EKFACFisher.from_engine(small), memory_budget=engine.memory_budget)
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


def test_scaling_sum_in_sample_slices_against_a_per_sample_loop():
    """Rows kept from the KFAC pass are taken in slices of samples (working bytes for 2 samples' gradients):
    Σ_{r,n} [Q_Sᵀ G_{r,n} Q_A]² against an explicit float64 loop over rows, samples and positions."""
    g = torch.Generator().manual_seed(0)
    R, n, L, out, width = 2, 5, 3, 4, 6
    grads = torch.randn(R, n, L, out, generator=g, dtype=F64)
    inputs = torch.randn(n, L, width, generator=g, dtype=F64)
    Q_A = torch.linalg.qr(torch.randn(width, width, generator=g, dtype=F64))[0]
    Q_S = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=F64))[0]
    expected = torch.zeros(out, width, dtype=F64)
    for r in range(R):
        for i in range(n):
            G = sum(torch.outer(grads[r, i, t], inputs[i, t]) for t in range(L))
            expected += (Q_S.T @ G @ Q_A).square()
    working = 2 * R * out * width * 8
    ref.assert_close(_rotated_square_sum(inputs, grads, Q_A, Q_S, working), expected, 1e-13, "two-sample slices")
    ref.assert_close(_rotated_square_sum(inputs, grads, Q_A, Q_S, 1), expected, 1e-13, "one-sample slices")


def test_kron_eigs_of_exactly_symmetric_factors_side_by_side():
    """kron_eigs(symmetric=True) decomposes each factor as it is: Q diag(w) Qᵀ = M and QᵀQ = I in float64, and
    the same bits as kron_eig's symmetrised decomposition; a non-finite factor is refused."""
    g = torch.Generator().manual_seed(1)
    pairs = []
    for din, dout in ((7, 3), (2, 5), (9, 9)):
        B, C = (torch.randn(d, d + 2, generator=g, dtype=F64) for d in (din, dout))
        # mirrored: a GEMM's two triangles of B Bᵀ need not agree to the last bit (MKL on an AMD EPYC)
        pairs.append(tuple(torch.triu(M) + torch.triu(M, 1).T for M in (B @ B.T, C @ C.T)))
    for (A, S), e in zip(pairs, kron_eigs(pairs, symmetric=True), strict=True):
        for M, w, Q in ((A, e.a_eigvals, e.a_eigvecs), (S, e.s_eigvals, e.s_eigvecs)):
            ref.assert_close((Q * w) @ Q.T, M, 1e-12, "reconstruction")
            ref.assert_close(Q.T @ Q, torch.eye(len(M), dtype=F64), 1e-12, "orthonormal")
            assert torch.all(w[1:] >= w[:-1])
        assert all(torch.equal(x, y) for x, y in zip(e, kron_eig(A, S), strict=True))
    with pytest.raises(NonFiniteError):
        kron_eigs([(pairs[0][0], torch.full((3, 3), float("nan"), dtype=F64))], symmetric=True)
