"""Exact NGD and the structured rules of a fidelity evaluation at language-model scale, on small models, float64.

The references are built here, independently of fisherlab's engine: the dense true Fisher of the token-mean loss
from the Jacobian of every token's logits (``torch.func.jacrev``), F = (1/N_tok) Σ_nt J_ntᵀ (diag p_nt − p_nt p_ntᵀ)
J_nt, solved by a float64 Cholesky factorisation; and the KFAC (expand) of the Monte-Carlo Fisher from each Linear
layer's inputs and its output gradients of the sampled-label loss (hooks and one reverse pass), with the labels
the context's Monte-Carlo engine drew (the ``mc-ngd`` rule's: same seed).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

from fisherlab import data as fdata
from fisherlab import models
from fisherlab.errors import InputError
from fisherlab.fidelity import evaluate_fidelity
from fisherlab.fidelity.rules import TRUE_ROWS_MAX, RuleContext, get_rule

D = torch.float64
DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)
LR = 1e-2


def dense_true_fisher(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """F (P, P) of the token-mean categorical loss (every token counts), from the full Jacobian of the logits."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits(flat: torch.Tensor) -> torch.Tensor:
        chunks, i = {}, 0
        for n, p in params.items():
            chunks[n] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        return torch.func.functional_call(model, chunks, (X,))

    theta = torch.cat([p.reshape(-1) for p in params.values()])
    J = torch.func.jacrev(logits)(theta)  # (N, T, C, P)
    with torch.no_grad():
        p = logits(theta).softmax(-1)  # (N, T, C)
    Lam = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
    tokens = p.shape[0] * p.shape[1]
    return torch.einsum("ntcp,ntcd,ntdq->pq", J, Lam, J) / tokens


def token_mean_gradient(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = Fn.cross_entropy(model(X).flatten(0, 1), y.flatten())
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])


# ------------------------------------------------------------------------------ multi-shift vs Cholesky
@pytest.fixture(scope="module")
def gpt_case():
    """A 1-block GPT (P = 2,105) on 4 sort-lm sequences of 6 tokens, every token counted, and its dense F."""
    split = fdata.make_sort_lm(n_samples=16, length=3, n_values=4, seed=1)
    X = split.X_train[:4].clone()
    y = torch.cat([X[:, 1:], split.y_train[:4, -1:]], dim=1)  # the next token at every position
    model = models.build_model("gpt", split, seed=2, dtype=D, d_model=12, n_layers=1, n_heads=2,
                               output="sequence")
    return {"model": model, "X": X, "y": y, "F": dense_true_fisher(model, X),
            "g": token_mean_gradient(model, X, y)}


def test_multishift_exact_ngd_against_dense_cholesky_for_four_dampings(gpt_case):
    """One multi-shift CG (products shared by the 4 dampings) to 1e-13 gives (F + λI)⁻¹∇L of the independent dense
    F to 1e-10 at every λ; the Dataset records the solver, products, iterations and residual of each damping."""
    c = gpt_case
    P = c["F"].shape[0]
    data = (c["X"], c["y"])
    ctx = RuleContext(c["model"], data, "categorical", dtype=D, ngd_solver="multishift", cg_tol=1e-13,
                      dampings=DAMPINGS)
    ds = evaluate_fidelity(c["model"], data, "categorical", rules=["gd", "ngd"], damping=DAMPINGS,
                           lr=LR, dtype=D, ngd_solver="multishift", cg_tol=1e-13, progress=False, context=ctx)
    assert ds.ngd_solver.values.tolist() == ["multishift"] * 4
    products = ds.ngd_products.values.tolist()
    assert len(set(products)) == 1 and products[0] >= int(ds.ngd_iterations.values.max())  # one shared space
    iterations = ds.ngd_iterations.values.tolist()
    assert iterations == sorted(iterations, reverse=True)  # the larger λ, the fewer iterations it needed
    eye = torch.eye(P, dtype=D)
    for j, lam in enumerate(DAMPINGS):
        L = torch.linalg.cholesky(c["F"] + lam * eye)
        ref = torch.cholesky_solve(c["g"][:, None], L)[:, 0]
        x = ctx.natural_gradient(lam)
        assert float((x - ref).norm() / ref.norm()) < 1e-10, lam  # measured 1.6e-13 … 1.3e-12 (383 products)
        residual = float(((c["F"] + lam * eye) @ x - c["g"]).norm() / c["g"].norm())
        assert residual < 1e-12
        np.testing.assert_allclose(float(ds.ngd_residual[j]), residual, rtol=1e-2, atol=1e-15)
        assert abs(float(ds.sel(rule="ngd").cosine[j]) - 1) < 1e-12
    # the dense-Fisher Cholesky path agrees with the same reference (the exact NGD the small cases use)
    chol = evaluate_fidelity(c["model"], (c["X"], c["y"]), "categorical", rules=["gd"], damping=DAMPINGS, lr=LR,
                             dtype=D, ngd_solver="cholesky", progress=False)
    np.testing.assert_allclose(chol.sel(rule="gd").cosine.values, ds.sel(rule="gd").cosine.values, rtol=1e-10)


# ------------------------------------------------------------------------------ Nyström-preconditioned CG
def test_auto_reuses_the_lowrank_sketch_as_nystrom_preconditioner_against_dense_cholesky():
    """16 sequences of 6 tokens (m = 384 output rows > the sketch's rank 256, so it is not exact) with neither the
    dense F nor the sample Gram within the budget: ``auto`` with the ``lowrank`` rule solves each damping by CG
    preconditioned with that rule's sketch (built once, 0 products of its own recorded), to (F + λI)⁻¹∇L of the
    independent dense F within 1e-10; without the rule it keeps multi-shift, which takes more products."""
    split = fdata.make_sort_lm(n_samples=48, length=3, n_values=4, seed=1)
    X = split.X_train[:16].clone()
    y = torch.cat([X[:, 1:], split.y_train[:16, -1:]], dim=1)
    model = models.build_model("gpt", split, seed=2, dtype=D, d_model=12, n_layers=1, n_heads=2,
                               output="sequence")
    P = sum(p.numel() for p in model.parameters())
    F, g = dense_true_fisher(model, X), token_mean_gradient(model, X, y)
    kwargs = dict(damping=DAMPINGS, lr=LR, dtype=D, memory_budget=40 * 2**20, cg_tol=1e-12, progress=False)
    data = (X, y)
    ctx = RuleContext(model, data, "categorical", dtype=D, memory_budget=40 * 2**20, cg_tol=1e-12,
                      dampings=DAMPINGS)
    ds = evaluate_fidelity(model, data, "categorical", rules=["gd", "ngd", "lowrank"], context=ctx, **kwargs)
    assert ds.ngd_solver.values.tolist() == ["pcg-nystrom"] * 4
    assert ds.ngd_preconditioner.values.tolist() == ["lowrank"] * 4
    assert ds.ngd_preconditioner_products.values.tolist() == [0] * 4  # the lowrank rule's sketch
    assert ctx.structure("lowrank").meta["rank"] == 256 and int(torch.linalg.matrix_rank(F)) > 256
    eye = torch.eye(P, dtype=D)
    for j, lam in enumerate(DAMPINGS):
        ref = torch.cholesky_solve(g[:, None], torch.linalg.cholesky(F + lam * eye))[:, 0]
        x = ctx.natural_gradient(lam)
        assert float((x - ref).norm() / ref.norm()) < 1e-10, lam
        residual = float(((F + lam * eye) @ x - g).norm() / g.norm())
        assert residual <= 1e-12 * (1 + 1e-6)
        np.testing.assert_allclose(float(ds.ngd_residual[j]), residual, rtol=1e-2, atol=1e-15)
    plain = evaluate_fidelity(model, data, "categorical", rules=["gd", "ngd"], **kwargs)
    assert plain.ngd_solver.values.tolist() == ["multishift"] * 4
    assert int(ds.ngd_products.sum()) < int(plain.ngd_products[0])
    np.testing.assert_allclose(plain.sel(rule="gd").cosine.values, ds.sel(rule="gd").cosine.values, rtol=1e-9)


# ------------------------------------------------------------------------------ MC KFAC on sequence outputs
V, T, H, C = 15, 20, 6, 15  # T·(C − 1) = 280 > TRUE_ROWS_MAX true output rows a sequence


class CausalMean(nn.Module):
    """h_t ← mean_{s ≤ t} h_s over the positions (no parameters): each token sees the ones before it."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        counts = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)
        return h.cumsum(1) / counts[None, :, None]


def tiny_lm() -> nn.Sequential:
    """One-hot tokens (N, T, V) → Linear(V, H) → tanh → causal mean → Linear(H, C): logits (N, T, C), P = 201."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(V, H), nn.Tanh(), CausalMean(), nn.Linear(H, C)).to(D)


@pytest.fixture(scope="module")
def lm_case():
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (4, T), generator=gen)
    X = Fn.one_hot(ids, V).to(D)
    y = torch.randint(0, C, (4, T), generator=gen)
    return {"model": tiny_lm(), "X": X, "y": y}


def mc_kfac_update(model: nn.Sequential, X: torch.Tensor, labels: torch.Tensor, g: torch.Tensor,
                   lam: float, lr: float) -> torch.Tensor:
    """−η (K + λI)⁻¹ g, K the expand KFAC of the Monte-Carlo Fisher (one label per token), π-split damping.

    Per Linear layer with combined weight W̄ = [W b] (out, in + 1): A = (1/(N·T)) Σ_nt ā_nt ā_ntᵀ (ā = [a, 1]),
    S = (1/N_tok) Σ_nt δ_nt δ_ntᵀ with δ_nt the gradient of Σ_nt CE(z_nt, ŷ_nt) at the layer's output; the step
    of the layer is (S + √λ/π I)⁻¹ Ḡ (A + π√λ I)⁻¹, π² = (tr A/dim A)/(tr S/dim S) (Martens & Grosse 2015).
    """
    layers = [m for m in model if isinstance(m, nn.Linear)]
    inputs, outputs = {}, {}

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs[module], outputs[module] = args[0], out

    hooks = [m.register_forward_hook(keep) for m in layers]
    z = model(X)
    for h in hooks:
        h.remove()
    loss = Fn.cross_entropy(z.flatten(0, 1), labels.flatten(), reduction="sum")
    deltas = torch.autograd.grad(loss, [outputs[m] for m in layers])
    N, tokens = X.shape[0], X.shape[0] * X.shape[1]
    steps, offset = [], 0
    for m, delta in zip(layers, deltas, strict=True):
        a = torch.cat([inputs[m], torch.ones_like(inputs[m][..., :1])], -1).detach().flatten(0, 1)  # (N·T, in + 1)
        d = delta.flatten(0, 1)  # (N·T, out)
        A, S = a.T @ a / (N * X.shape[1]), d.T @ d / tokens
        pi = math.sqrt((float(A.trace()) / A.shape[0]) / (float(S.trace()) / S.shape[0]))
        out, width = m.weight.shape[0], m.weight.shape[1] + 1
        n_w, n_b = m.weight.numel(), m.bias.numel()
        G = torch.cat([g[offset:offset + n_w].view(out, width - 1), g[offset + n_w:offset + n_w + n_b, None]], 1)
        step = torch.linalg.solve(S + math.sqrt(lam) / pi * torch.eye(out, dtype=D),
                                  torch.linalg.solve(A + pi * math.sqrt(lam) * torch.eye(width, dtype=D), G.T).T)
        steps += [step[:, :-1].reshape(-1), step[:, -1]]
        offset += n_w + n_b
    return -lr * torch.cat(steps)


def test_auto_takes_the_mc_kfac_on_long_sequences_against_an_independent_kfac(lm_case):
    """With T·(C − 1) > TRUE_ROWS_MAX rows a sequence and no room for the dense F, ``structure_kind="auto"`` builds
    the kfac rule from the Monte-Carlo Fisher (recorded in ``rule_kinds``); its update equals the independent
    MC KFAC step with the labels the ``mc-ngd`` rule's engine drew, and exact NGD stays the true Fisher's."""
    c = lm_case
    model, X, y = c["model"], c["X"], c["y"]
    assert T * (C - 1) > TRUE_ROWS_MAX
    P = sum(p.numel() for p in model.parameters())
    budget = 3 * P * P * 8  # below the 4 dense P×P copies of a Cholesky solve: exact NGD is matrix-free
    kwargs = dict(dtype=D, memory_budget=budget, ngd_solver="auto", cg_tol=1e-12, dampings=DAMPINGS, seed=5)
    data = (X, y)
    ctx = RuleContext(model, data, "categorical", **kwargs)
    ds = evaluate_fidelity(model, data, "categorical", rules=["gd", "ngd", "kfac", "mc-ngd"], damping=DAMPINGS,
                           lr=LR, progress=False, context=ctx, **{k: v for k, v in kwargs.items() if k != "dampings"})
    assert json.loads(ds.attrs["rule_kinds"]) == {"gd": "", "ngd": "true", "kfac": "mc", "mc-ngd": "mc"}
    assert ds.attrs["structure_kind"] == "auto"
    assert set(ds.ngd_solver.values.tolist()) == {"multishift"}
    labels = ctx.engine("mc")._labels  # (N, S = 1, T): the labels the context drew with seed 5
    assert tuple(labels.shape) == (X.shape[0], 1, T)
    g = token_mean_gradient(model, X, y)
    F = dense_true_fisher(model, X)
    for j, lam in enumerate(DAMPINGS):
        ref = mc_kfac_update(model, X, labels[:, 0], g, lam, LR)
        u = get_rule("kfac")(ctx, lam, LR)
        assert float((u - ref).norm() / ref.norm()) < 1e-10, lam  # measured ≤ 1.2e-15
        v = -LR * torch.linalg.solve(F + lam * torch.eye(P, dtype=D), g)
        np.testing.assert_allclose(float(ds.sel(rule="kfac").cosine[j]), float(u @ v / (u.norm() * v.norm())),
                                   rtol=1e-8)
    # not vacuous: the true Fisher's KFAC takes another step
    true = RuleContext(model, data, "categorical", **{**kwargs, "structure_kind": "true"})
    u_true = get_rule("kfac")(true, DAMPINGS[-1], LR)
    assert float((u_true - get_rule("kfac")(ctx, DAMPINGS[-1], LR)).norm() / u_true.norm()) > 1e-2


def test_structure_kind_settings(lm_case):
    """The dense F within budget keeps the true Fisher under auto; an explicit kind applies to every row
    structure (kfac-reduce, ekfac, sngd-kfac), never to exact NGD or lowrank; an unknown kind is refused."""
    c = lm_case
    data = (c["X"], c["y"])
    fits = RuleContext(c["model"], data, "categorical", dtype=D)
    assert fits.dense_fits() and fits.structure_kind_for("kfac") == "true"
    mc = RuleContext(c["model"], data, "categorical", dtype=D, structure_kind="mc")
    kinds = {name: get_rule(name).fisher_kind(mc) for name in
             ("kfac-reduce", "ekfac", "sngd-kfac", "diag", "lowrank", "ngd", "adam")}
    assert kinds == {"kfac-reduce": "mc", "ekfac": "mc", "sngd-kfac": "mc", "diag": "mc", "lowrank": "true",
                     "ngd": "true", "adam": ""}
    # sngd-kfac's network is reconstructed with the context's MC KFAC: its step is the kfac rule's (invariant 2)
    u, v = get_rule("sngd-kfac")(mc, 1e-2, LR), get_rule("kfac")(mc, 1e-2, LR)
    assert float((u - v).norm() / v.norm()) < 1e-9
    with pytest.raises(InputError, match="structure kind"):
        RuleContext(c["model"], data, "categorical", structure_kind="gauss")


def test_fisher_metrics_from_one_product_against_explicit_quadratic_forms():
    """fisher_rel_error and kl_predicted of k updates from one product F [U v] (k + 1 columns, counted) equal the
    explicit √((u−v)ᵀF(u−v)) / √(vᵀFv) and ½uᵀFu; u = v gives 0; vᵀFv = 0 gives NaN, as the metrics module."""
    from fisherlab.fidelity.metrics import fisher_metrics

    gen = torch.Generator().manual_seed(6)
    J = torch.randn(7, 30, generator=gen, dtype=D)
    F = J.T @ J / 7
    U = torch.randn(30, 4, generator=gen, dtype=D)
    v = torch.randn(30, generator=gen, dtype=D)
    U[:, 0] = v
    columns = []

    def product(W: torch.Tensor) -> torch.Tensor:
        columns.append(W.shape[1])
        return F @ W

    err, kl = fisher_metrics(U, v, product)
    assert columns == [5]
    for i in range(4):
        d = U[:, i] - v
        np.testing.assert_allclose(float(err[i]), math.sqrt(float(d @ F @ d) / float(v @ F @ v)), rtol=1e-12,
                                   atol=1e-15)
        np.testing.assert_allclose(float(kl[i]), 0.5 * float(U[:, i] @ F @ U[:, i]), rtol=1e-12)
    assert float(err[0]) == 0.0
    null = torch.linalg.eigh(F).eigenvectors[:, 0]  # F has rank 7 < 30: vᵀFv = 0
    assert bool(torch.isnan(fisher_metrics(U, null, F)[0]).all())
