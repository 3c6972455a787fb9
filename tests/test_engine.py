"""The Fisher engine against independent float64 references, closed forms and identities (docs/method.md).

Tolerances: float64 engine vs brute-force reference ≤ 1e-10 relative (max norm over entries, relative to the
largest reference entry); exact identities (chunking, DataLoader, same labels) ≤ 1e-12; float32 vs float64
≤ 1e-5.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
import reference as ref
import torch
from cases import MLP, Bag, SoftplusGaussian, mlp
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fisherlab import fisher, structures
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, MemoryBudgetError, NonFiniteError
from fisherlab.likelihoods import Gaussian

F64 = torch.float64
REF_RTOL = 1e-10
EXACT_RTOL = 1e-12

KINDS = ("true", "mc", "empirical", "ggn")
STRUCTURES = (("dense", {}), ("block", {"by": "tensor"}), ("block", {"by": "layer"}), ("diag", {}),
              ("implicit", {}))
MC_SEED, MC_SAMPLES = 3, 2


def block_mask(engine: FisherEngine, by: str) -> Tensor:
    """1 on the diagonal blocks of ``by`` grouping, 0 elsewhere; shape (P, P)."""
    P = engine.spec.dim
    mask = torch.zeros(P, P, dtype=F64)
    for ix in engine.spec.blocks(by).values():
        mask[ix.unsqueeze(1), ix.unsqueeze(0)] = 1
    return mask


# --------------------------------------------------------------------------------- every engine × structure
@pytest.mark.parametrize("kind", KINDS)
def test_every_structure_matches_reference(problem, kind):
    engine = problem.engine(kind, mc_samples=MC_SAMPLES, seed=MC_SEED)
    expected = problem.reference(kind, labels=engine._labels)
    assert expected.abs().max() > 1e-6  # a non-trivial reference
    for name, options in STRUCTURES:
        F = structures.build(name, engine, **options)
        what = f"{problem.case.name} {kind} {name} {options}"
        assert F.shape == expected.shape and F.kind.value == kind
        if name == "diag":
            ref.assert_close(F.diag(), expected.diagonal(), REF_RTOL, what)
        elif name == "block":
            ref.assert_close(F.to_dense(), expected * block_mask(engine, options["by"]), REF_RTOL, what)
        else:
            ref.assert_close(F.to_dense(), expected, REF_RTOL, what)


def test_front_door_equals_engine(problems):
    p = problems("cnn2d")
    F = fisher(p.model, p.data, "categorical", kind="true", structure="dense")
    ref.assert_close(F.to_dense(), p.reference("true"), REF_RTOL, "fisher()")
    assert F.meta["num_samples"] == p.case.n and F.meta["kind"] == "true"


def test_loss_gradient_and_outputs_match_reference(problem):
    engine = problem.engine("true")
    loss, grad = engine.loss_and_gradient()
    lik = problem.ref_likelihood
    z = ref.outputs(problem.model, problem.X)
    expected_loss = sum(lik.nll(z[n], problem.y[n]) for n in range(problem.case.n)) / problem.case.n
    expected_grad = ref.loss_gradients(problem.model, problem.X, problem.y, lik).mean(0)
    assert abs(float(loss - expected_loss)) <= 1e-12 * max(1.0, abs(float(expected_loss)))
    ref.assert_close(grad, expected_grad, REF_RTOL, "gradient")
    ref.assert_close(engine.outputs(), z, 1e-12, "outputs")


def test_reference_mlp_on_digits(problems):
    """The project's reference network on digits (a SplitData), last two layers, against the reference."""
    models = pytest.importorskip("fisherlab.models")
    data = pytest.importorskip("fisherlab.data")
    split = data.load_digits(dtype=F64).train_subset(12)
    model = models.reference_mlp(seed=1, dtype=F64).eval()
    names = [n for n, _ in model.named_parameters()][-4:]
    F = fisher(model, split, "categorical", params=names)
    lik = ref.RefLikelihood("categorical")
    expected = ref.true_fisher(model, split.X_train, lik, names)
    ref.assert_close(F.to_dense(), expected, REF_RTOL, "reference MLP")


# ------------------------------------------------------------------------------------------------ closed forms
def fold_bias_index(C: int, D: int) -> Tensor:
    """Flat index of the entry (c, d̃) of the folded weight [W | b] (C, D+1) in the ordering (W row-major, b).

    Entry c·(D+1) + d̃ of the result is c·D + d̃ for d̃ < D (weight W[c, d̃]) and C·D + c for d̃ = D (bias b[c]).
    """
    c, d = np.meshgrid(np.arange(C), np.arange(D + 1), indexing="ij")
    return torch.as_tensor(np.where(d < D, c * D + d, C * D + c).reshape(-1))


def from_folded(K: Tensor, C: int, D: int) -> Tensor:
    """Reorder a (C(D+1))² matrix from folded (c, d̃) ordering to the parameter ordering (W row-major, b)."""
    idx = fold_bias_index(C, D)
    out = torch.zeros_like(K)
    out[idx.unsqueeze(1), idx.unsqueeze(0)] = K
    return out


def test_fold_bias_index_layout():
    # C = 2, D = 2: parameters W00 W01 W10 W11 b0 b1; folded order W00 W01 b0 W10 W11 b1
    assert fold_bias_index(2, 2).tolist() == [0, 1, 4, 2, 3, 5]


@pytest.mark.parametrize("kind", ["true", "ggn"])
def test_linear_regression_closed_form(problems, kind):
    """Gaussian, σ = 0.7: F = I_C ⊗ X̃ᵀX̃ / (Nσ²) in folded order; the weight block is I_C ⊗ XᵀX / (Nσ²)."""
    p = problems("linreg")
    X, N, (C, D), s2 = p.X, p.case.n, p.model.weight.shape, p.case.sigma**2
    Xt = torch.cat([X, torch.ones(N, 1, dtype=F64)], 1)
    expected = from_folded(torch.kron(torch.eye(C, dtype=F64), Xt.T @ Xt) / (N * s2), C, D)
    F = p.fisher(kind).to_dense()
    ref.assert_close(F, expected, 1e-12, "linear regression")
    ref.assert_close(F[: C * D, : C * D], torch.kron(torch.eye(C, dtype=F64), X.T @ X) / (N * s2), 1e-12, "W")
    ref.assert_close(F[C * D:, C * D:], torch.eye(C, dtype=F64) / s2, 1e-12, "bias block = I/σ²")


def test_logistic_regression_closed_form(problems):
    """Bernoulli: F = (1/N) Σ p(1 − p) x̃ x̃ᵀ, x̃ = [x; 1] (the ordering of [w (1, D), b] is x̃'s)."""
    p = problems("logreg")
    w, b = p.model.weight.detach().numpy()[0], float(p.model.bias.detach())
    X = p.X.numpy()
    prob = 1 / (1 + np.exp(-(X @ w + b)))
    Xt = np.hstack([X, np.ones((len(X), 1))])
    expected = (Xt * (prob * (1 - prob))[:, None]).T @ Xt / len(X)
    ref.assert_close(p.fisher("true").to_dense(), torch.as_tensor(expected), 1e-12, "logistic regression")


def test_softmax_regression_closed_form(problems):
    """Categorical: F = (1/N) Σ (diag(p) − ppᵀ) ⊗ x̃ x̃ᵀ in folded order."""
    p = problems("softmax")
    W, b, X = p.model.weight.detach().numpy(), p.model.bias.detach().numpy(), p.X.numpy()
    C, D = W.shape
    logits = X @ W.T + b
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    Xt = np.hstack([X, np.ones((len(X), 1))])
    K = sum(np.kron(np.diag(q) - np.outer(q, q), np.outer(x, x)) for q, x in zip(prob, Xt, strict=True)) / len(X)
    expected = from_folded(torch.as_tensor(K), C, D)
    ref.assert_close(p.fisher("true").to_dense(), expected, 1e-12, "softmax regression")


# ------------------------------------------------------------------------------------------------- GGN
@pytest.mark.parametrize("name", ["linreg", "logreg", "softmax", "mlp", "mlp_gaussian", "mlp_bernoulli"])
def test_ggn_equals_true_fisher(problems, name):
    p = problems(name)
    assert p.likelihood.ggn_equals_fisher
    ref.assert_close(p.fisher("ggn").to_dense(), p.fisher("true").to_dense(), REF_RTOL, name)


def softplus_problem(residual: float) -> tuple[nn.Module, Tensor, Tensor]:
    """MLP with targets y = softplus(z) − residual − U(0, 1) (so every residual is ≥ ``residual``)."""
    model, X, _ = dataclasses.replace(MLP, make_model=lambda: mlp(5, 4, 2)).build()
    with torch.no_grad():
        z = model(X)
    noise = torch.rand(z.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    y = torch.nn.functional.softplus(z) - residual - noise
    return model, X, y


def test_noncanonical_likelihood_ggn_differs_from_fisher():
    model, X, y = softplus_problem(residual=0.5)
    lik = SoftplusGaussian(sigma=0.9)
    assert not lik.ggn_equals_fisher
    rlik = ref.RefLikelihood("softplus_gaussian", 0.9)
    G = fisher(model, (X, y), lik, kind="ggn").to_dense()
    F = fisher(model, (X, y), lik, kind="true").to_dense()
    ref.assert_close(G, ref.ggn(model, X, y, rlik), REF_RTOL, "softplus GGN")
    ref.assert_close(F, ref.true_fisher(model, X, rlik), REF_RTOL, "softplus Fisher")
    assert ref.rel_err(G, F) > 0.05
    # with non-negative residuals ∇²ℓ ⪰ Λ, so GGN − F is PSD
    assert float(torch.linalg.eigvalsh(G - F)[0]) >= -1e-12 * float(F.abs().max())


def test_ggn_of_nonconvex_loss_is_refused():
    model, X, y = softplus_problem(residual=-20.0)  # residuals ≪ 0: the loss Hessian is indefinite
    with pytest.raises(InputError, match="not PSD"):
        fisher(model, (X, y), SoftplusGaussian(), kind="ggn")


# ------------------------------------------------------------------------------------------- Monte Carlo
def test_mc_converges_at_inverse_sqrt_rate(problems):
    """E‖F_S − F‖/‖F‖ ∝ S^(−1/2): the log-log slope over S = 16 … 1024 (6 seeds each) lies in [−0.7, −0.3]."""
    p = problems("softmax")
    F = p.fisher("true").to_dense()
    sizes = [16, 64, 256, 1024]
    errors = []
    for S in sizes:
        errs = [torch.linalg.norm(p.fisher("mc", engine_kw={"mc_samples": S, "seed": s}).to_dense() - F)
                for s in range(6)]
        errors.append(float(torch.stack(errs).mean() / torch.linalg.norm(F)))
    slope = np.polyfit(np.log(sizes), np.log(errors), 1)[0]
    assert -0.7 <= slope <= -0.3, (slope, errors)
    assert errors[-1] < 0.1


@pytest.mark.parametrize("name", ["mlp", "mlp_gaussian", "mlp_bernoulli"])
def test_empirical_with_model_labels_equals_mc(problems, name):
    p = problems(name)
    for seed in (0, 1):
        labels = p.engine("mc", seed=seed)._labels  # (N, 1) or (N, 1, C), drawn by the engine's own generator
        F_mc = p.fisher("mc", engine_kw={"seed": seed}).to_dense()
        F_emp = fisher(p.model, (p.X, labels[:, 0]), p.likelihood, kind="empirical").to_dense()
        ref.assert_close(F_emp, F_mc, EXACT_RTOL, f"{name} seed {seed}")


def test_mc_seeds(problems):
    p = problems("mlp_gaussian")
    a, b = (p.fisher("mc", engine_kw={"seed": 7, "mc_samples": 3}).to_dense() for _ in range(2))
    c = p.fisher("mc", engine_kw={"seed": 8, "mc_samples": 3}).to_dense()
    assert torch.equal(a, b)
    assert ref.rel_err(c, a) > 1e-2


# ------------------------------------------------------------------------------------------- empirical
def test_empirical_with_observed_labels_differs_from_true(problems):
    p = problems("mlp")
    emp, true = p.fisher("empirical").to_dense(), p.fisher("true").to_dense()
    assert torch.linalg.norm(emp - true) > 0.2 * torch.linalg.norm(true)


def test_empirical_vanishes_at_interpolating_linear_fit():
    """N = 3 < D + 1 = 5: least squares interpolates, residuals vanish, so does the empirical Fisher."""
    gen = torch.Generator().manual_seed(0)
    X, Y = torch.randn(3, 4, generator=gen, dtype=F64), torch.randn(3, 2, generator=gen, dtype=F64)
    Xt = torch.cat([X, torch.ones(3, 1, dtype=F64)], 1)
    theta = torch.linalg.pinv(Xt) @ Y  # (D+1, C), exact fit
    model = nn.Linear(4, 2).double()
    with torch.no_grad():
        model.weight.copy_(theta[:4].T)
        model.bias.copy_(theta[4])
    assert (model(X) - Y).abs().max() < 1e-12
    lik = Gaussian(0.5)
    emp = fisher(model, (X, Y), lik, kind="empirical").to_dense()
    true = fisher(model, (X, Y), lik, kind="true").to_dense()
    assert emp.abs().max() < 1e-20
    assert torch.trace(true) > 1.0  # tr F = C tr(X̃ᵀX̃)/(Nσ²) > 0
    ref.assert_close(torch.trace(true), 2 * torch.trace(Xt.T @ Xt) / (3 * 0.25), 1e-12, "tr F")


def test_empirical_vanishes_when_targets_are_outputs(problems):
    p = problems("mlp_gaussian")
    with torch.no_grad():
        y = p.model(p.X)
    emp = fisher(p.model, (p.X, y), p.likelihood, kind="empirical").to_dense()
    assert emp.abs().max() == 0
    assert p.fisher("true").to_dense().abs().max() > 1e-3


# ---------------------------------------------------------------------------------- chunking, data, dtype
@pytest.mark.parametrize("kind", ["true", "mc", "empirical", "ggn"])
@pytest.mark.parametrize("name", ["mlp", "mlp_gaussian", "mlp_bernoulli"])
def test_chunking_invariance(problems, name, kind):
    p = problems(name)
    mats = [p.fisher(kind, engine_kw={"chunk_size": c, "mc_samples": 3, "seed": 5}).to_dense()
            for c in (1, 7, p.case.n)]
    for c, F in zip((1, 7), mats[:2], strict=True):
        ref.assert_close(F, mats[-1], EXACT_RTOL, f"chunk_size {c}")


def test_implicit_chunking_invariance(problems):
    p = problems("cnn1d")
    V = torch.randn(p.engine().spec.dim, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = [p.fisher("mc", "implicit", engine_kw={"chunk_size": c, "seed": 2}) @ V for c in (1, 4, p.case.n)]
    ref.assert_close(out[0], out[2], EXACT_RTOL, "chunk 1")
    ref.assert_close(out[1], out[2], EXACT_RTOL, "chunk 4")


@pytest.mark.parametrize("kind", ["true", "mc"])
def test_dataloader_equals_tensors(problems, kind):
    p = problems("mlp_bernoulli")
    loader = DataLoader(TensorDataset(p.X, p.y), batch_size=3, shuffle=False)
    a = fisher(p.model, loader, "bernoulli", kind=kind, seed=4, mc_samples=2).to_dense()
    b = fisher(p.model, p.data, "bernoulli", kind=kind, seed=4, mc_samples=2).to_dense()
    ref.assert_close(a, b, EXACT_RTOL, "DataLoader")


def test_float32_agrees_with_float64(problems):
    p = problems("mlp")
    F32 = p.fisher("true", engine_kw={"dtype": torch.float32})
    assert F32.dtype == torch.float32 and F32.to_dense().dtype == torch.float32
    ref.assert_close(F32.to_dense(), p.reference("true"), 1e-5, "float32")
    v = torch.randn(F32.shape[0], dtype=F64)
    ref.assert_close(p.fisher("true", "implicit", engine_kw={"dtype": torch.float32}) @ v,
                     p.reference("true") @ v, 1e-5, "float32 implicit")


def test_float32_model_computed_in_float64(problems):
    p = problems("mlp")
    model32 = copy.deepcopy(p.model).float()
    F = fisher(model32, (p.X.float(), p.y), "categorical", dtype=F64)
    assert F.dtype == F64
    expected = ref.true_fisher(copy.deepcopy(model32).double(), p.X.float().double(), p.ref_likelihood)
    ref.assert_close(F.to_dense(), expected, REF_RTOL, "float32 model in float64")


@pytest.mark.parametrize("name", ["mlp", "mlp_bernoulli", "linreg_single"])
def test_targets_are_canonicalized_in_every_chunk(problems, name):
    """int32 labels, integer/bool 0-1 targets, and flat (N,) targets of a 1-output regression equal the canonical
    targets (int64 labels, float (N, C) targets) in every chunk, not only the first."""
    if name == "linreg_single":
        p = problems("linreg")
        model, X, y = nn.Linear(4, 1).double(), p.X, p.y[:, :1]
        variants, lik = [y[:, 0]], Gaussian(0.7)
    else:
        p = problems(name)
        model, X, y, lik = p.model, p.X, p.y, p.likelihood
        variants = [y.int()] if name == "mlp" else [y.long(), y.bool()]
    for kind in ("empirical", "ggn"):
        expected = fisher(model, (X, y), lik, kind=kind).to_dense()
        for other in variants:
            got = fisher(model, (X, other), lik, kind=kind, chunk_size=3).to_dense()
            ref.assert_close(got, expected, EXACT_RTOL, f"{name} {kind} targets {other.dtype} {tuple(other.shape)}")


# ------------------------------------------------------------------------------------- the model is untouched
def snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
        "dtypes": {k: v.dtype for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: q.requires_grad for n, q in model.named_parameters()},
        "grads": {n: q.grad for n, q in model.named_parameters()},
    }


def assert_same_snapshot(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    assert before["dtypes"] == after["dtypes"]
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert all(g is None for g in after["grads"].values())


def test_model_is_not_modified(problems):
    p = problems("resnet_bn")
    before = snapshot(p.model)
    for kind in KINDS:
        for name, options in STRUCTURES:
            F = p.fisher(kind, name, engine_kw={"dtype": torch.float32}, **options)
            F @ torch.ones(F.shape[0])
    p.engine("empirical").loss_and_gradient()
    assert_same_snapshot(before, p.model)


def test_train_mode_model_without_batch_coupling_stays_in_train_mode():
    model, X, y = MLP.build()
    model.train()
    before = snapshot(model)
    F = fisher(model, (X, y), "categorical")
    assert_same_snapshot(before, model)
    assert model.training
    ref.assert_close(F.to_dense(), ref.true_fisher(model, X, ref.RefLikelihood("categorical")), REF_RTOL, "train")


# ------------------------------------------------------------------------------------------------- memory
def test_dense_refuses_above_budget_with_number_and_alternatives(problems):
    p = problems("mlp")  # P = 99: dense float64 needs 99² · 8 B = 78,408 B = 76.6 KiB
    budget = 24_000  # 23.4 KiB: fits one chunk (2 · 2 rows · 99 · 8 B) and the tensor blocks (2,601 · 8 B)
    engine = p.engine("true", memory_budget=budget)
    assert engine.chunk_size < p.case.n  # the default chunk shrinks with the budget
    with pytest.raises(MemoryBudgetError, match=r"(?s)76\.6 KiB.*23\.4 KiB.*block.*implicit"):
        structures.build("dense", engine)
    blocks = structures.build("block", engine, by="tensor")
    ref.assert_close(blocks.diag(), p.reference("true").diagonal(), REF_RTOL, "block under budget")
    implicit = structures.build("implicit", engine)
    with pytest.raises(MemoryBudgetError, match="76.6 KiB"):
        implicit.to_dense()
    big_chunks = p.engine("true", memory_budget=budget, chunk_size=8)  # rows are checked where they are formed
    v = torch.randn(p.reference("true").shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref.assert_close(big_chunks.matmat(v), p.reference("true") @ v, REF_RTOL, "F·v forms no rows")
    with pytest.raises(MemoryBudgetError, match="chunk of factor rows.*smaller chunk_size"):
        structures.build("block", big_chunks, by="tensor")


def test_chunk_memory_bound_follows_budget():
    model, X, y = dataclasses.replace(MLP, n=64).build()
    budget = 100_000  # fits the dense 99×99 matrix (78,408 B); chunks of factor rows get budget/4
    engine = FisherEngine(model, (X, y), "categorical", memory_budget=budget)
    default = FisherEngine(model, (X, y), "categorical")
    assert 1 < engine.chunk_size < default.chunk_size
    sizes = [U.nbytes for U in engine.iter_factor_rows()]
    assert len(sizes) == math.ceil(64 / engine.chunk_size)
    assert max(sizes) <= budget / 4
    ref.assert_close(structures.build("dense", engine).to_dense(), structures.build("dense", default).to_dense(),
                     EXACT_RTOL, "budgeted chunks")



def test_diagonal_of_a_module_called_twice_uses_factor_rows():
    """The layer-wise diagonal cannot read a Linear called twice per forward; the factor-row way covers it."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(self.lin(torch.tanh(self.lin(x))))

    torch.manual_seed(0)
    model = Twice().to(F64).eval()
    X, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    expected = ref.true_fisher(model, X, ref.RefLikelihood("categorical")).diagonal()
    ref.assert_close(fisher(model, (X, y), structure="diag").diag(), expected, REF_RTOL, "diag, shared module")


def test_factor_rows_of_a_subset_of_parameters(problems):
    """iter_factor_rows(names=...) gives the columns of those parameters: the Fisher's sub-matrix over them."""
    p = problems("resnet_bn")
    engine = p.engine("true")
    names = [n for n in engine.spec.names if "bn" in n or "head" in n or n.startswith("stem.1")]
    ix = torch.cat([torch.arange(engine.spec.slice(n).start, engine.spec.slice(n).stop) for n in names])
    sub = sum(U.T @ U for U in engine.iter_factor_rows(names=list(reversed(names))))  # any order: spec order back
    ref.assert_close(sub, p.reference("true")[ix][:, ix], REF_RTOL, "sub-matrix")
    with pytest.raises(InputError, match="unknown parameter names"):
        next(engine.iter_factor_rows(names=["nope"]))


def test_masked_token_fisher_apply_equals_brute_force_blocks():
    """TokenLikelihood.fisher_apply with targets: c m_nt (diag p − p pᵀ) w_nt per token, against an explicit loop."""
    from fisherlab.likelihoods import TokenLikelihood, get_likelihood

    n, T, C = 3, 4, 5
    gen = torch.Generator().manual_seed(4)
    z, w = torch.randn(n, T * C, generator=gen, dtype=F64), torch.randn(n, T * C, generator=gen, dtype=F64)
    y = torch.randint(0, C, (n, T), generator=gen)
    y[1, 1:] = -100
    tok = TokenLikelihood(get_likelihood("categorical"), T, C, num_sequences=n, num_tokens=int((y != -100).sum()))
    expected = torch.zeros(n, T, C, dtype=F64)
    for i in range(n):
        for t in range(T):
            if y[i, t] != -100:
                p = torch.softmax(z[i, t * C:(t + 1) * C], 0)
                expected[i, t] = tok.scale * (torch.diag(p) - torch.outer(p, p)) @ w[i, t * C:(t + 1) * C]
    ref.assert_close(tok.fisher_apply(z, w, y), expected.reshape(n, T * C), EXACT_RTOL, "masked fisher_apply")


def test_implicit_products_follow_parameter_changes(problems):
    """The outputs matmat keeps between calls are rebuilt when a parameter is modified in place."""
    p = problems("mlp")
    model = copy.deepcopy(p.model)  # the engine's parameters may share the model's storage: keep the session's
    engine = FisherEngine(model, p.data, p.likelihood)
    v = torch.randn(engine.spec.dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    engine.matmat(v)
    with torch.no_grad():
        next(iter(engine.params.values())).mul_(1.5)
    fresh = FisherEngine(copy.deepcopy(model), p.data, p.likelihood)
    fresh.params = {k: t.clone() for k, t in engine.params.items()}
    ref.assert_close(engine.matmat(v), fresh.matmat(v), EXACT_RTOL, "after an in-place change")


@pytest.mark.parametrize("kind", ["true", "mc", "ggn"])
@pytest.mark.parametrize("kept", ["graphs and states", "states only", "nothing"])
def test_products_on_the_kept_linearisation_equal_the_reference(problems, monkeypatch, kind, kept):
    """Successive F·v and F·V (several chunks) equal the per-sample reference, whatever matmat keeps between calls:
    the graphs and output states (tangents by forward mode alone), the states only (a vjp of a jvp), or nothing."""
    p = problems("cnn1d")

    def engine() -> FisherEngine:
        return FisherEngine(p.model, p.data, p.likelihood, kind=kind, seed=2, mc_samples=2, chunk_size=3)

    probe = engine()
    probe.matmat(torch.zeros(probe.spec.dim, dtype=F64))
    states = sum(lin.state.numel() * lin.state.element_size() for lin in probe._output_cache[1])
    assert probe.activation_bytes() * p.case.n > 0
    monkeypatch.setattr("fisherlab.engine.MATMAT_CACHE_BYTES",
                        {"graphs and states": 2**40, "states only": states, "nothing": 0}[kept])
    e = engine()
    gen = torch.Generator().manual_seed(3)
    for V in (torch.randn(e.spec.dim, generator=gen, dtype=F64), torch.randn(e.spec.dim, 3, generator=gen, dtype=F64),
              torch.randn(e.spec.dim, generator=gen, dtype=F64)):
        expected = p.reference(kind, labels=e._labels if kind == "mc" else None) @ V
        ref.assert_close(e.matmat(V), expected, REF_RTOL, f"{kind}, kept: {kept}")
    cache = e._output_cache
    assert (cache is None) == (kept == "nothing")
    if cache is not None:
        assert len(cache[1]) > 1 and all((lin.vjp_fn is not None) == (kept == "graphs and states") for lin in cache[1])


def allocated_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated while ``fn()`` runs above those alive at its start: the running sum of the
    allocation and free events the torch profiler records (``profile_memory``), a count, not a timing."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def working_bytes_problems() -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    """An MLP (its P-wide tensors dominate) and a small GPT (its activations do), float64, 8 samples each."""
    from fisherlab.models import GPT

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 11, (8, 12), generator=gen)
    return {"mlp": (mlp(20, 64, 5).double(), torch.randn(8, 20, generator=gen, dtype=F64),
                    torch.randint(0, 5, (8,), generator=gen)),
            "gpt": (GPT(11, 12, d_model=16, n_layers=2, n_heads=2, output="sequence").double().eval(), tokens,
                    torch.randint(0, 11, (8, 12), generator=gen))}


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_a_chunk_works_within_the_bytes_it_is_sized_for(name: str) -> None:
    """The peak tensor bytes one chunk of a product allocates (profiler events, every path, 1 and 3 columns) stay
    within product_bytes, and the gradient's within gradient_bytes; on the GPT the estimate of the vjp of a jvp (the
    path that sizes the chunks) is within 2× of its peak."""
    model, X, y = working_bytes_problems()[name]
    engine = FisherEngine(model, (X, y), chunk_size=X.shape[0])
    list(engine.chunks())  # the first pass (its checks are no part of a later chunk)
    gen = torch.Generator().manual_seed(2)
    for k in (1, 3):
        V = torch.randn(engine.spec.dim, k, generator=gen, dtype=F64)
        _, lin = engine._chunk_product(X, y, None, None, V, True)
        for path, kept, keep in (("vjp of jvp", None, False), ("recording", None, True), ("kept", lin, False)):
            chunk = partial(engine._chunk_product, X, y, None, kept, V, keep)
            chunk()  # warm: lazily built state of torch and the engine
            peak, estimate = allocated_peak(chunk), engine.product_bytes(X.shape[0], k, path)
            assert 0 < peak <= estimate, f"{name}, {path}, k = {k}: {peak} B > {estimate} B"
            if name == "gpt" and path == "vjp of jvp":  # the path the chunks are sized by (matmat_chunk_size)
                assert estimate <= 2 * peak, f"{name}, {path}, k = {k}: {estimate} B > 2 × {peak} B"
    engine.loss_and_gradient()
    peak, estimate = allocated_peak(engine.loss_and_gradient), engine.gradient_bytes(X.shape[0])
    assert 0 < peak <= estimate, f"{name}, gradient: {peak} B > {estimate} B"


def test_rows_per_sample_of_a_sequence_model_is_the_width_of_its_block_diagonal_factor():
    """R of the true Fisher from one token's factor × T equals the width of the (T·C × T·R) factor itself."""
    from fisherlab.models import GPT

    torch.manual_seed(0)
    model = GPT(7, 5, output="sequence").double().eval()
    X = torch.randint(0, 7, (3, 5))
    engine = FisherEngine(model, (X, X))
    z = torch.zeros(1, engine.num_outputs, dtype=torch.float64)
    assert engine.rows_per_sample == engine.likelihood.fisher_factor(z).shape[-1] == 5 * 6


# ------------------------------------------------------------------------------------------- the first pass
FIRST_PASS_N, FIRST_PASS_CHUNK = 13, 5  # label pieces of 5, 5, 3 samples


def first_pass_problem() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(FIRST_PASS_N, 4, generator=gen, dtype=F64)
    return mlp(4, 6, 3).double(), X, torch.randint(0, 3, (FIRST_PASS_N,), generator=gen)


def mc_engine(model: nn.Module, X: Tensor, y: Tensor) -> FisherEngine:
    return FisherEngine(model, (X, y), kind="mc", mc_samples=MC_SAMPLES, seed=MC_SEED, chunk_size=FIRST_PASS_CHUNK)


#: Computations that can make an engine's first pass over the data, each in its own chunking.
FIRST_PASSES = {
    "kfac (one chunk)": lambda e: structures.KFACFisher.from_engine(e).to_dense(),
    "kfac (chunks of 2, within label pieces)": lambda e: structures.KFACFisher.from_engine(e, chunk_size=2).to_dense(),
    "kfac (chunks of 7)": lambda e: structures.KFACFisher.from_engine(e, chunk_size=7).to_dense(),
    "diag": lambda e: structures.DiagonalFisher.from_engine(e).diagonal,
    "dense": lambda e: structures.DenseFisher.from_engine(e).matrix,
    "implicit": lambda e: e.matmat(torch.eye(e.spec.dim, dtype=F64)),
    "gradient": lambda e: e.loss_and_gradient()[1],
    "outputs": lambda e: e.outputs(),
}


@pytest.mark.parametrize("first", FIRST_PASSES)
def test_first_pass_draws_the_labels_of_seeded_pieces_whatever_computation_makes_it(first):
    """The MC labels are those of one generator seeded with ``seed`` drawn piece by piece of chunk_size samples
    (drawn here from the model itself), whichever computation makes the first pass and in which chunks; what that
    pass computes equals the same computation on a later pass, and the MC Fisher the reference's at those labels."""
    model, X, y = first_pass_problem()
    gen = torch.Generator().manual_seed(MC_SEED)
    with torch.no_grad():
        expected = torch.cat([torch.multinomial(torch.softmax(model(x), -1), MC_SAMPLES, replacement=True,
                                                generator=gen) for x in X.split(FIRST_PASS_CHUNK)])
    engine = mc_engine(model, X, y)
    on_first_pass = FIRST_PASSES[first](engine)
    assert torch.equal(engine._labels, expected)
    ref.assert_close(on_first_pass, FIRST_PASSES[first](engine), EXACT_RTOL, f"{first}: first and later pass")
    F = structures.DenseFisher.from_engine(engine).matrix
    ref.assert_close(F, ref.mc_fisher(model, X, expected, ref.RefLikelihood("categorical")), REF_RTOL, "mc Fisher")


def test_an_interrupted_first_pass_is_continued_by_the_next():
    """A first pass left after its first chunk (a consumer that stopped, or failed) leaves the next to go on."""
    model, X, y = first_pass_problem()
    whole = mc_engine(model, X, y)
    expected = structures.DenseFisher.from_engine(whole).matrix
    engine = mc_engine(model, X, y)
    x, y0, chunk = next(iter(engine.chunks(chunk_size=7)))
    engine.output_factor(engine.forward(engine.params, x), y0, chunk)  # checks the first block (5 samples)
    ref.assert_close(structures.DenseFisher.from_engine(engine).matrix, expected, EXACT_RTOL, "continued")
    assert torch.equal(engine._labels, whole._labels)


@pytest.mark.parametrize("structure", ["kfac", "diag", "dense", "implicit"])
def test_the_first_pass_is_the_only_pass_over_the_data(structure):
    """fisher(..., kind="mc") evaluates the model on each sample once, plus probes on its first samples (the
    construction's, the layer rows' or the vmap probe's, the implicit product's activation count)."""
    model, X, y = first_pass_problem()
    evaluated = []
    model.register_forward_hook(lambda m, inputs, out: evaluated.append(inputs[0].shape[0]))
    F = fisher(model, (X, y), kind="mc", structure=structure, chunk_size=FIRST_PASS_CHUNK)
    if structure == "implicit":  # the first product records each chunk's graph (kept) and runs forward mode apart
        F @ torch.ones(F.spec.dim, dtype=F64)
        assert F.engine._output_cache[1][0].vjp_fn is not None
        assert FIRST_PASS_N <= sum(evaluated) - FIRST_PASS_N <= FIRST_PASS_N + 6, evaluated
        evaluated.clear()
        F @ torch.ones(F.spec.dim, dtype=F64)  # on the kept graphs: forward mode alone
        assert sum(evaluated) == FIRST_PASS_N, evaluated
        return
    assert FIRST_PASS_N <= sum(evaluated) <= FIRST_PASS_N + 6, evaluated


class LogOfFirstInput(nn.Module):
    """Finite parameters, but outputs log(x₀): NaN for a sample with a negative first input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3).to(F64)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) + torch.log(x[:, :1])


@pytest.mark.parametrize("kind", ["true", "mc"])
@pytest.mark.parametrize("first", [*FIRST_PASSES, "labels"])
def test_bad_late_samples_are_named_by_the_first_pass(first, kind):
    """A late sample whose outputs are NaN, or that the model cannot take, passes construction and is named by
    whichever computation makes the first pass (NonFiniteError / InputError with its index)."""
    run = (lambda e: e._labels) if first == "labels" else FIRST_PASSES[first]
    X, y = first_pass_problem()[1:]
    X[:, 0] = X[:, 0].abs() + 0.1
    X[9, 0] = -1.0
    tokens = torch.randint(0, 10, (FIRST_PASS_N, 3), generator=torch.Generator().manual_seed(2))
    tokens[10, 1] = 12
    for model, data, error, match in [(LogOfFirstInput(), (X, y), NonFiniteError, "outputs for sample 9 contain NaN"),
                                      (Bag(), (tokens, y), InputError, "could not be evaluated on sample 10 .*index")]:
        engine = FisherEngine(model, data, kind=kind, chunk_size=FIRST_PASS_CHUNK)
        if first == "labels" and kind == "true":
            assert engine._labels is None
            continue
        with pytest.raises(error, match=match):
            run(engine)
