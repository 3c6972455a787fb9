"""The sample-space (``gram``) solve at large m: K's lower triangle formed and mirrored, K + λI factorised in
float32 and refined in float64 (fisherlab/gram.py), against float64 references (dense Cholesky of the per-sample
autograd Fisher, tests/reference.py; explicit factor rows U; torch.linalg.solve of a dense SPD matrix)."""

from __future__ import annotations

import pytest
import reference as ref
import torch

import fisherlab.gram as gram_module
from fisherlab.engine import FisherEngine
from fisherlab.gram import SampleGram, build_gram
from fisherlab.models import CNN, GPT, MLP
from fisherlab.ngd import solve_ngd_all

F64 = torch.float64
DAMPINGS = [1e-4, 1e-3, 1e-2, 1e-1]


def _mlp_case():
    torch.manual_seed(0)
    model = MLP(6, [7], 3, "tanh").double().eval()
    X = torch.randn(9, 6, dtype=F64)
    y = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(3))
    return model, X, y


def _dense_solution(F: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.linalg.solve(F + lam * torch.eye(len(F), dtype=F64), g)


@pytest.mark.parametrize("case", ["mlp", "cnn", "gpt"])
def test_lower_triangle_build_is_the_full_symmetric_uut(case: str, monkeypatch) -> None:
    """Blocks of a few samples (BLOCK_BYTES small): every entry of K is UUᵀ's, and K is exactly symmetric."""
    monkeypatch.setattr(gram_module, "BLOCK_BYTES", 2048)
    torch.manual_seed(0)
    if case == "mlp":
        model, X, y = _mlp_case()
    elif case == "cnn":
        model = CNN((1, 4, 4), 3, channels=(2, 3)).double().eval()
        X, y = torch.randn(6, 1, 4, 4, dtype=F64), torch.randint(0, 3, (6,))
    else:
        model = GPT(5, 4, d_model=8, output="sequence").double().eval()
        X, y = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))
    engine = FisherEngine(model, (X, y))
    gram = build_gram(engine)
    U = torch.cat(list(engine.iter_factor_rows()))  # the P-wide rows, sample-major
    ref.assert_close(gram.K, U @ U.T, 1e-12, "K")
    assert torch.equal(gram.K, gram.K.T)
    part = gram.parts[0]
    ref.assert_close(gram.block_gram(part.indices.sort().values), U[:, part.indices] @ U[:, part.indices].T, 1e-12)


def test_float32_factor_refined_to_the_float64_solution(monkeypatch) -> None:
    """m ≥ MIXED_MIN_ROWS (lowered): float32 Cholesky + sample-space CG matches dense float64 Cholesky to 1e-10."""
    monkeypatch.setattr(gram_module, "MIXED_MIN_ROWS", 1)
    model, X, y = _mlp_case()
    lik = ref.RefLikelihood("categorical")
    F, g = ref.true_fisher(model, X, lik), ref.loss_gradients(model, X, y, lik).mean(0)
    engine = FisherEngine(model, (X, y))
    for lam, (x, info) in solve_ngd_all(engine, g, DAMPINGS, solver="gram", cg_tol=1e-12).items():
        expected = _dense_solution(F, g, lam)
        assert float((x - expected).norm() / expected.norm()) < 1e-10, (lam, info)
        assert info.solver == "gram" and info.preconditioner == "cholesky-float32" and info.converged
        assert 1 <= info.iterations <= gram_module.REFINE_MAX_ITER and info.products == 1
        own = float((F @ x + lam * x - g).norm() / g.norm())
        assert info.residual == pytest.approx(own, rel=0.5, abs=1e-13)


def test_float64_factor_takes_over_when_the_refinement_does_not_converge(monkeypatch) -> None:
    monkeypatch.setattr(gram_module, "MIXED_MIN_ROWS", 1)
    monkeypatch.setattr(gram_module, "REFINE_MAX_ITER", 0)
    model, X, y = _mlp_case()
    lik = ref.RefLikelihood("categorical")
    F, g = ref.true_fisher(model, X, lik), ref.loss_gradients(model, X, y, lik).mean(0)
    for lam, (x, info) in solve_ngd_all(FisherEngine(model, (X, y)), g, DAMPINGS, solver="gram").items():
        expected = _dense_solution(F, g, lam)
        assert float((x - expected).norm() / expected.norm()) < 1e-10
        assert info.preconditioner == "none" and info.iterations == 0


def test_sample_solve_of_an_ill_conditioned_spd_matrix(monkeypatch) -> None:
    """Eigenvalues 1e-8 … 1 (κ(K + 1e-4 I) ≈ 1e4), several columns and a zero one, against torch.linalg.solve."""
    monkeypatch.setattr(gram_module, "MIXED_MIN_ROWS", 1)
    m = 200
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(m, m, dtype=F64, generator=gen))[0]
    K = (Q * torch.logspace(-8, 0, m, dtype=F64)) @ Q.T
    K = (K + K.T) / 2
    B = torch.randn(m, 3, dtype=F64, generator=gen)
    B[:, 1] = 0
    gram = SampleGram(K, [], 1)
    for lam in DAMPINGS:
        Y = gram.sample_solve(B, lam)
        expected = torch.linalg.solve(K + lam * torch.eye(m, dtype=F64), B)
        assert gram.refined[lam] >= 1
        assert float((Y - expected).norm() / expected.norm()) < 1e-11
        assert torch.equal(Y[:, 1], torch.zeros(m, dtype=F64))
