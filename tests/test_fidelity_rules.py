"""Update rules and evaluate_fidelity against independent dense float64 references.

References come from tests/reference.py (per-sample autograd loops, textbook likelihood formulas) and numpy
solves written here; nothing of the engine or the structures is reused by the references.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import reference as ref
import torch
from torch import nn

from fisherlab.errors import InputError, MemoryBudgetError, NonFiniteError
from fisherlab.fidelity import RULES, evaluate_fidelity, register_rule
from fisherlab.fidelity.rules import RuleContext
from fisherlab.models import MLP
from fisherlab.testing import assert_tracks_ngd

D = torch.float64
DAMPINGS = [1e-3, 1e-1]
LR = 0.05


def make_problem(seed: int = 0, n: int = 24, widths=(5,), d_in: int = 8, classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(d_in, list(widths), classes, "tanh").double().eval()
    X = torch.randn(n, d_in, generator=g, dtype=D)
    y = torch.randint(0, classes, (n,), generator=g)
    return model, X, y


@pytest.fixture(scope="module")
def problem():
    model, X, y = make_problem()
    lik = ref.RefLikelihood("categorical")
    F = ref.true_fisher(model, X, lik)
    G = ref.loss_gradients(model, X, y, lik)
    return {"model": model, "X": X, "y": y, "F": F.numpy(), "g": G.mean(0).numpy(), "G": G.numpy(), "lik": lik}


@pytest.fixture(scope="module")
def result(problem):
    rules = ["gd", "adam", "ngd", "block-ngd", "diag", "empirical-ngd", "kfac"]
    return evaluate_fidelity(problem["model"], (problem["X"], problem["y"]), rules=rules, damping=DAMPINGS,
                             lr=LR, dtype=D)


def cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def ngd_by_hand(problem, lam):
    F = problem["F"]
    return -LR * np.linalg.solve(F + lam * np.eye(len(F)), problem["g"])


def layer_blocks(model):
    """Index ranges of each Linear layer (weight then bias) in named_parameters order."""
    out, start = [], 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            size = m.weight.numel() + m.bias.numel()
            out.append(np.arange(start, start + size))
            start += size
    return out


def test_exact_ngd_against_itself(result):
    at = result.sel({"rule": "ngd"})
    np.testing.assert_allclose(at["cosine"], 1.0, atol=1e-14)
    np.testing.assert_allclose(at["cosine_layer"], 1.0, atol=1e-14)
    assert np.all(at["rel_error"].values == 0) and np.all(at["fisher_rel_error"].values == 0)
    assert result.attrs["ngd_solver"] == "cholesky"
    assert np.all(result["ngd_iterations"].values == 0) and np.all(result["ngd_residual"].values < 1e-12)


@pytest.mark.parametrize("lam", DAMPINGS)
def test_gd_cosine_is_cosine_of_gradient_and_ngd_by_hand(problem, result, lam):
    v = ngd_by_hand(problem, lam)
    at = result.sel({"rule": "gd", "damping": lam})
    assert float(at["cosine"]) == pytest.approx(cos(-problem["g"], v), abs=1e-10)
    u = -LR * problem["g"]
    assert float(at["rel_error"]) == pytest.approx(np.linalg.norm(u - v) / np.linalg.norm(v), rel=1e-9)
    F = problem["F"]
    want = np.sqrt((u - v) @ F @ (u - v) / (v @ F @ v))
    assert float(at["fisher_rel_error"]) == pytest.approx(want, rel=1e-9)
    assert float(at["kl_predicted"]) == pytest.approx(0.5 * u @ F @ u, rel=1e-9)
    for k, ix in enumerate(layer_blocks(problem["model"])):
        assert float(at["cosine_layer"][k]) == pytest.approx(cos(-problem["g"][ix], v[ix]), abs=1e-10)


@pytest.mark.parametrize("lam", DAMPINGS)
def test_block_ngd_cosine_is_cosine_of_block_solve_by_hand(problem, result, lam):
    F, g = problem["F"], problem["g"]
    u = np.zeros_like(g)
    for ix in layer_blocks(problem["model"]):
        u[ix] = -LR * np.linalg.solve(F[np.ix_(ix, ix)] + lam * np.eye(len(ix)), g[ix])
    assert float(result.sel({"rule": "block-ngd", "damping": lam})["cosine"]) == pytest.approx(
        cos(u, ngd_by_hand(problem, lam)), abs=1e-10)


@pytest.mark.parametrize("lam", DAMPINGS)
def test_diag_adam_empirical_rules_by_hand(problem, result, lam):
    F, g, G = problem["F"], problem["g"], problem["G"]
    v = ngd_by_hand(problem, lam)
    E = G.T @ G / len(G)
    by_hand = {
        "diag": -LR * g / (np.diag(F) + lam),
        "adam": -LR * g / (np.abs(g) + 1e-8),
        "empirical-ngd": -LR * np.linalg.solve(E + lam * np.eye(len(E)), g),
    }
    for name, u in by_hand.items():
        at = result.sel({"rule": name, "damping": lam})
        assert float(at["cosine"]) == pytest.approx(cos(u, v), abs=1e-9), name
        assert float(at["update_norm"]) == pytest.approx(np.linalg.norm(u), rel=1e-8), name


def test_measured_kl_and_loss_change_by_hand(problem, result):
    lam = DAMPINGS[1]
    u = ngd_by_hand(problem, lam)
    after = copy.deepcopy(problem["model"])
    torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(after.parameters())
                                        + torch.from_numpy(u), after.parameters())
    z0, z1 = ref.outputs(problem["model"], problem["X"]).numpy(), ref.outputs(after, problem["X"]).numpy()
    p = np.exp(z0) / np.exp(z0).sum(1, keepdims=True)
    q = np.exp(z1) / np.exp(z1).sum(1, keepdims=True)
    kl = np.mean(np.sum(p * np.log(p / q), 1))
    y = problem["y"].numpy()
    loss = [np.mean(-np.log(s[np.arange(len(y)), y])) for s in (p, q)]
    at = result.sel({"rule": "ngd", "damping": lam})
    assert float(at["kl_measured"]) == pytest.approx(kl, rel=1e-8)
    assert float(at["loss_change"]) == pytest.approx(loss[1] - loss[0], rel=1e-8)
    assert float(result["loss"]) == pytest.approx(loss[0], rel=1e-12)


def test_predicted_kl_matches_measured_kl_for_small_steps(problem):
    lrs = [1e-1, 1e-2, 1e-3]
    gaps = []
    for lr in lrs:
        ds = evaluate_fidelity(problem["model"], (problem["X"], problem["y"]), rules=["ngd", "gd"], damping=1e-2,
                               lr=lr, dtype=D)
        ratio = (ds["kl_predicted"] / ds["kl_measured"]).values
        gaps.append(np.abs(ratio - 1).max())
    assert gaps[0] > gaps[1] > gaps[2]  # second-order prediction: the gap shrinks like lr
    assert gaps[2] < 1e-2
    assert gaps[1] / gaps[2] == pytest.approx(10, rel=0.3)


def test_cg_path_agrees_with_cholesky(problem, result):
    P = problem["F"].shape[0]
    budget = 3 * P * P * 8  # below the 4 dense P×P copies of a Cholesky solve, above a chunk of factor rows
    ds = evaluate_fidelity(problem["model"], (problem["X"], problem["y"]), rules=["gd", "ngd"], damping=DAMPINGS,
                           lr=LR, dtype=D, memory_budget=budget, cg_tol=1e-10)
    assert ds.attrs["ngd_solver"] == "multishift" and ds.attrs["cg_tol"] == 1e-10 and ds.attrs["ngd_converged"] == 1
    assert np.all(ds["ngd_iterations"].values > 0) and np.all(ds["ngd_residual"].values <= 1e-10)
    for lam in DAMPINGS:
        v = ngd_by_hand(problem, lam)
        gd = ds.sel({"rule": "gd", "damping": lam})
        assert float(gd["cosine"]) == pytest.approx(cos(-problem["g"], v), abs=1e-8)
    # metrics with the implicit Fisher equal those with the dense one
    cg_gd, dense_gd = ds.sel({"rule": "gd"}), result.sel({"rule": "gd"})
    np.testing.assert_allclose(cg_gd["fisher_rel_error"], dense_gd["fisher_rel_error"], rtol=1e-7)
    np.testing.assert_allclose(cg_gd["kl_predicted"], dense_gd["kl_predicted"], rtol=1e-10)


@pytest.fixture(scope="module")
def reconstructed(problem):
    rules = ["ngd", "block-ngd", "kfac", "diag", "sngd-dense", "sngd-block", "sngd-kfac", "sngd-diag",
             "sngd-kfac-lowrank"]
    return evaluate_fidelity(problem["model"], (problem["X"], problem["y"]), rules=rules, damping=DAMPINGS,
                             lr=LR, dtype=D)


def test_sngd_full_is_exact_ngd_to_round_off(reconstructed):
    at = reconstructed.sel({"rule": "sngd-dense"})
    np.testing.assert_allclose(at["cosine"], 1.0, atol=1e-12)
    assert np.all(at["rel_error"].values < 1e-9) and np.all(at["fisher_rel_error"].values < 1e-9)


@pytest.mark.parametrize("lam", DAMPINGS)
def test_sngd_block_cosine_is_cosine_of_block_solve_by_hand(problem, reconstructed, lam):
    F, g = problem["F"], problem["g"]
    u = np.zeros_like(g)
    for ix in layer_blocks(problem["model"]):
        u[ix] = -LR * np.linalg.solve(F[np.ix_(ix, ix)] + lam * np.eye(len(ix)), g[ix])
    at = reconstructed.sel({"rule": "sngd-block", "damping": lam})
    assert float(at["cosine"]) == pytest.approx(cos(u, ngd_by_hand(problem, lam)), abs=1e-10)


@pytest.mark.parametrize("structure", ["block", "kfac", "diag"])
def test_sngd_rule_equals_its_structure_rule(reconstructed, structure):
    """Invariant 2: GD on the rebuilt network, mapped back, is the G-preconditioned step."""
    rule = "block-ngd" if structure == "block" else structure
    for var in ("cosine", "rel_error", "kl_predicted", "kl_measured"):
        np.testing.assert_allclose(reconstructed.sel({"rule": f"sngd-{structure}"})[var],
                                   reconstructed.sel({"rule": rule})[var], rtol=1e-8, atol=1e-12)


def test_lowrank_rule_is_kfac_on_factors_narrower_than_twice_the_rank(reconstructed):
    """Every factor of the test MLP is ≤ 128 wide: the rank-64 roots are exact, so the step is sngd-kfac's."""
    for var in ("cosine", "rel_error"):
        np.testing.assert_allclose(reconstructed.sel({"rule": "sngd-kfac-lowrank"})[var],
                                   reconstructed.sel({"rule": "sngd-kfac"})[var], rtol=1e-10, atol=1e-12)


def test_sngd_rules_cover_every_reconstruction_structure():
    from fisherlab.reconstruction.build import STRUCTURES

    assert {f"sngd-{s}" for s in STRUCTURES} <= set(RULES)


def test_kfac_tracks_ngd_on_digits_mlp():
    """KFAC's cosine to exact NGD on a digits MLP (64-12-10, N = 96), measured over seeds 0-2 and N = 96/256:
    0.84-0.87 at λ = 1e-2 and 0.94-0.96 at λ = 1e-1 (0.67-0.74 at λ = 1e-3); GD gets 0.58-0.68 at λ = 1e-2.
    The threshold 0.8 passes KFAC and fails GD."""
    from fisherlab.data import load_digits

    data = load_digits(dtype=D)
    torch.manual_seed(0)
    model = MLP(64, [12], 10, "tanh").double()
    batch = (data.X_train[:96], data.y_train[:96])
    ds = assert_tracks_ngd("kfac", model, batch, min_cosine=0.8, damping=[1e-2, 1e-1])
    assert ds.sizes["rule"] == 1
    with pytest.raises(AssertionError, match="'gd' does not track exact NGD: cosine 0.6"):
        assert_tracks_ngd("gd", model, batch, min_cosine=0.8, damping=[1e-2, 1e-1])


def test_assert_tracks_ngd_failure_lists_layer_cosines(problem):
    with pytest.raises(AssertionError, match=r"(?s)gd.*does not track exact NGD.*per layer layers\.0: "):
        assert_tracks_ngd("gd", problem["model"], (problem["X"], problem["y"]), min_cosine=0.999, damping=1e-3)


def test_unknown_rule_lists_valid_ones(problem):
    with pytest.raises(InputError, match=r"unknown update rule 'ngd2'.*'block-ngd'.*'gd'"):
        evaluate_fidelity(problem["model"], (problem["X"], problem["y"]), rules=["gd", "ngd2"])


@pytest.mark.parametrize("kwargs, match", [({"damping": -1.0}, "damping"), ({"lr": 0.0}, "lr"),
                                           ({"rules": []}, "no update rules"), ({"rules": ["gd", "gd"]}, "twice|more")])
def test_bad_arguments(problem, kwargs, match):
    with pytest.raises(InputError, match=match):
        evaluate_fidelity(problem["model"], (problem["X"], problem["y"]), **kwargs)


def test_registered_rule_and_unavailable_rule(problem):
    def flipped(ctx: RuleContext, damping, lr):
        return lr * ctx.natural_gradient(damping)

    def too_big(ctx, damping, lr):
        raise MemoryBudgetError("needs 1 TiB")

    def wrong_shape(ctx, damping, lr):
        return ctx.gradient[:-1]

    def nan_update(ctx, damping, lr):
        return ctx.gradient * float("nan")

    for name, fn in [("flipped", flipped), ("too-big", too_big), ("wrong-shape", wrong_shape), ("nan", nan_update)]:
        register_rule(name, fn)
    try:
        data = (problem["X"], problem["y"])
        ds = evaluate_fidelity(problem["model"], data, rules=["flipped", "too-big"], damping=1e-2, dtype=D)
        assert float(ds.sel({"rule": "flipped", "damping": 1e-2})["cosine"]) == pytest.approx(-1.0, abs=1e-14)
        assert int(ds.sel({"rule": "too-big"})["available"]) == 0
        assert "needs 1 TiB" in str(ds.sel({"rule": "too-big"})["unavailable_reason"].values)
        assert np.isnan(ds.sel({"rule": "too-big"})["cosine"]).all()
        with pytest.raises(MemoryBudgetError):
            evaluate_fidelity(problem["model"], data, rules=["too-big"], skip_unavailable=False)
        with pytest.raises(InputError, match="wrong-shape.*shape"):
            evaluate_fidelity(problem["model"], data, rules=["wrong-shape"])
        with pytest.raises(NonFiniteError, match="nan"):
            evaluate_fidelity(problem["model"], data, rules=["nan"])
    finally:
        for name in ("flipped", "too-big", "wrong-shape", "nan"):
            RULES.pop(name, None)


def test_dataset_layout(result):
    assert result.attrs["fisherlab_kind"] == "fidelity"
    assert dict(result.sizes) == {"rule": 7, "damping": 2, "layer": 2}
    for name in ("cosine", "cosine_layer", "rel_error", "fisher_rel_error", "kl_predicted", "kl_measured",
                 "loss_change"):
        assert "long_name" in result[name].attrs and "units" in result[name].attrs
    assert result["cosine_layer"].dims == ("rule", "damping", "layer")


def test_shared_context_reads_block_and_eigenvalues_off_the_dense_fisher(problem):
    """Block (by layer) = the reference F's diagonal blocks; eigenvalues = numpy's of the reference F; once each."""
    ctx = RuleContext(problem["model"], (problem["X"], problem["y"]), "categorical", dtype=D)
    ctx.fisher()
    block = ctx.structure("block")
    assert ctx.structure("block", by="layer") is block  # one object for block-ngd, sngd-block and geometry
    F = problem["F"]
    for B, ix in zip(block.blocks.values(), layer_blocks(problem["model"]), strict=True):
        np.testing.assert_allclose(B.numpy(), F[np.ix_(ix, ix)], rtol=1e-10, atol=1e-14)
    ev = ctx.eigenvalues("true")
    assert ctx.eigenvalues("true") is ev
    np.testing.assert_allclose(ev.numpy(), np.linalg.eigvalsh(F), rtol=1e-9, atol=1e-13)


def test_spectra_in_a_shared_context_against_numpy(problem):
    from fisherlab.spectra import fisher_spectra

    data = (problem["X"], problem["y"])
    ctx = RuleContext(problem["model"], data, "categorical", dtype=D)
    ds = fisher_spectra(problem["model"], data, "categorical", kinds=["true", "empirical"], dtype=D, context=ctx)
    assert torch.equal(torch.from_numpy(ds.eigenvalue.sel(kind="true", structure="dense").values),
                       ctx.eigenvalues("true"))
    F, E = problem["F"], problem["G"].T @ problem["G"] / len(problem["G"])
    np.testing.assert_allclose(ds.eigenvalue.sel(kind="true", structure="dense"), np.linalg.eigvalsh(F),
                               rtol=1e-8, atol=1e-13)
    np.testing.assert_allclose(ds.eigenvalue.sel(kind="empirical", structure="dense"), np.linalg.eigvalsh(E),
                               rtol=1e-8, atol=1e-13)
    blocks = np.sort(np.concatenate([np.linalg.eigvalsh(F[np.ix_(ix, ix)]) for ix in layer_blocks(problem["model"])]))
    np.testing.assert_allclose(ds.eigenvalue.sel(kind="true", structure="block"), blocks, rtol=1e-8, atol=1e-13)
    with pytest.raises(InputError, match="mc_samples"):
        fisher_spectra(problem["model"], data, "categorical", kinds=["true"], dtype=D, context=ctx, mc_samples=2)


def test_empirical_fisher_solved_and_decomposed_in_sample_space(problem):
    """m = N = 24 < P = 69: the empirical Fisher's solves and eigenvalues come from its 24×24 Gram matrix, and
    agree with numpy on the dense reference E = GᵀG/N; the true Fisher (m = N·C = 96 > P) keeps its dense path."""
    data = (problem["X"], problem["y"])
    ctx = RuleContext(problem["model"], data, "categorical", dtype=D, dampings=tuple(DAMPINGS))
    assert ctx.sample_gram("true") is None
    gram = ctx.sample_gram("empirical")
    assert gram is not None and gram.K.shape == (24, 24) and ctx.sample_gram("empirical") is gram
    G = problem["G"]
    E = G.T @ G / len(G)
    for lam in DAMPINGS:
        want = np.linalg.solve(E + lam * np.eye(len(E)), problem["g"])
        got = ctx.exact_solve("empirical", lam).numpy()
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-10
        assert ctx.solves[("empirical", lam)].solver == "gram"
    assert "empirical" not in ctx._exact  # no dense P×P empirical Fisher was formed
    ev, want = ctx.eigenvalues("empirical").numpy(), np.linalg.eigvalsh(E)
    assert np.abs(ev - want).max() <= 1e-12 * want[-1]
    assert (ev[: len(E) - 24] == 0).all()  # the null space beyond rank m, exactly
    layers = ctx.layer_eigenvalues("true")
    assert ctx.layer_eigenvalues("true") is layers
    for e, ix in zip(layers.values(), layer_blocks(problem["model"]), strict=True):
        w = np.linalg.eigvalsh(problem["F"][np.ix_(ix, ix)])
        assert np.abs(e.numpy() - w).max() <= 1e-12 * w[-1]
    cholesky = RuleContext(problem["model"], data, "categorical", dtype=D, ngd_solver="cholesky")
    assert cholesky.sample_gram("empirical") is None


def test_empirical_layer_spectra_from_the_sample_gram(problem):
    """Layer 1 (P_1 = 45 > m = 24): its eigenvalues from its 24×24 sample Gram, with 21 exact zeros; layer 2
    (P_2 = 24 = m): its dense block's; both against numpy's eigvalsh of the reference E = GᵀG/N's blocks."""
    data = (problem["X"], problem["y"])
    ctx = RuleContext(problem["model"], data, "categorical", dtype=D, dampings=tuple(DAMPINGS))
    G = problem["G"]
    E = G.T @ G / len(G)
    gram = ctx.sample_gram("empirical")
    (ix1, ix2) = layer_blocks(problem["model"])
    K1 = gram.block_gram(torch.from_numpy(ix1))
    np.testing.assert_allclose(K1.numpy(), G[:, ix1] @ G[:, ix1].T / len(G), rtol=1e-10, atol=1e-14)
    assert gram.block_gram(torch.from_numpy(np.concatenate([ix1, ix2[:3]]))) is None  # not one part's
    layers = ctx.layer_eigenvalues("empirical")
    for e, ix in zip(layers.values(), (ix1, ix2), strict=True):
        w = np.linalg.eigvalsh(E[np.ix_(ix, ix)])
        assert e.shape == (len(ix),) and np.abs(e.numpy() - w).max() <= 1e-12 * w[-1]
    assert (layers[next(iter(layers))][: len(ix1) - 24] == 0).all()


def test_shared_context_refuses_other_parameters(problem):
    data = (problem["X"], problem["y"])
    ctx = RuleContext(problem["model"], data, "categorical", dtype=D)
    moved = copy.deepcopy(problem["model"])
    with torch.no_grad():
        next(moved.parameters()).add_(1e-3)
    with pytest.raises(InputError, match="parameters"):
        ctx.check_shares(moved, data, dtype=D)
    ctx.check_shares(copy.deepcopy(problem["model"]), data, dtype=D, likelihood="categorical")  # the same state


def _count_factorisations(monkeypatch, n: int) -> list[int]:
    """Patch torch.linalg.cholesky_ex to count the factorisations of matrices n wide (a list to read the count)."""
    calls, cholesky_ex = [], torch.linalg.cholesky_ex

    def counted(A, *args, **kwargs):
        if A.shape[-1] == n:
            calls.append(n)
        return cholesky_ex(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counted)
    return calls


@pytest.mark.parametrize("structure", ["dense", "block"])
def test_sngd_in_a_context_reads_its_structure_and_shares_the_cholesky_factor(problem, structure, monkeypatch):
    """sngd-dense/-block in a context: G from the context's structure (no reconstruction from the data), the root
    from the Cholesky factor exact NGD / block-ngd already made, and the step −η (G + λI)⁻¹∇L of the reference
    Fisher (per-sample autograd), as a fresh reconstruct gives it."""
    import fisherlab.reconstruction.build as build
    from fisherlab.reconstruction import reconstruct

    model, data, F, g = problem["model"], (problem["X"], problem["y"]), problem["F"], problem["g"]
    fresh = {lam: reconstruct(model, data, structure=structure, sqrt="cholesky", damping=lam,
                              dtype=D).gd_update(data, LR).numpy() for lam in DAMPINGS}
    G = F if structure == "dense" else np.zeros_like(F)
    if structure == "block":
        for ix in layer_blocks(model):
            G[np.ix_(ix, ix)] = F[np.ix_(ix, ix)]
    ctx = RuleContext(model, data, "categorical", dtype=D, dampings=tuple(DAMPINGS))
    shared_rule = RULES["ngd" if structure == "dense" else "block-ngd"]
    widest = F.shape[0] if structure == "dense" else max(len(ix) for ix in layer_blocks(model))
    calls = _count_factorisations(monkeypatch, widest)
    monkeypatch.setattr(build, "compute_structure", lambda *a, **k: pytest.fail("G computed again from the data"))
    for lam in DAMPINGS:
        shared_rule(ctx, lam, LR)  # factorises G + λI
        before = len(calls)
        u = RULES[f"sngd-{structure}"](ctx, lam, LR).numpy()
        assert len(calls) == before, "the root factorised G + λI again"
        want = -LR * np.linalg.solve(G + lam * np.eye(len(G)), g)
        np.testing.assert_allclose(u, want, rtol=1e-9, atol=1e-13)
        np.testing.assert_allclose(u, fresh[lam], rtol=1e-10, atol=1e-14)
    assert len(calls) == len(DAMPINGS)  # one factorisation of the widest matrix per λ, for both rules


def test_dense_factor_is_one_per_damping_and_exact_ngd_solves_with_it(problem, monkeypatch):
    """DenseFisher.damped_factor: L Lᵀ = F + λI of the reference F; kept per λ (dropped oldest first beyond the
    budget); exact NGD through it = numpy's solve."""
    ctx = RuleContext(problem["model"], (problem["X"], problem["y"]), "categorical", dtype=D)
    F = ctx.exact_fisher("true")
    P = F.spec.dim
    calls = _count_factorisations(monkeypatch, P)
    for lam in DAMPINGS:
        L = F.damped_factor(lam)
        assert F.damped_factor(lam) is L
        np.testing.assert_allclose((L @ L.T).numpy(), problem["F"] + lam * np.eye(P), rtol=1e-10, atol=1e-13)
        x = ctx.natural_gradient(lam).numpy()
        np.testing.assert_allclose(x, -ngd_by_hand(problem, lam) / LR, rtol=1e-9, atol=1e-12)
    assert len(calls) == len(DAMPINGS)
    F.memory_budget = 3 * L.numel() * L.element_size()  # F, one kept factor and the new one
    F.damped_factor(0.5)
    assert list(F._factors) == [DAMPINGS[-1], 0.5]
    F.memory_budget = 2 * L.numel() * L.element_size()  # F and the new one
    F.damped_factor(0.7)
    assert list(F._factors) == [0.7]


def test_sngd_metric_is_the_context_structure_or_none_and_a_wrong_one_is_refused(problem):
    """The rule reads G off the context only where reconstruct would compute that very structure; a structure of
    another grouping, or the implicit Fisher for sngd-dense, is refused by reconstruct (MetricMismatchError)."""
    from fisherlab.errors import MetricMismatchError
    from fisherlab.reconstruction import reconstruct

    model, data = problem["model"], (problem["X"], problem["y"])
    ctx = RuleContext(model, data, "categorical", dtype=D)
    assert RULES["sngd-block"].metric(ctx) is ctx.structure("block")
    assert RULES["sngd-kfac"].metric(ctx) is ctx.structure("kfac")
    assert RULES["sngd-dense"].metric(ctx) is ctx.exact_fisher("true")
    with pytest.raises(MetricMismatchError, match="block grouping"):
        reconstruct(model, data, structure="block", metric=ctx.structure("block", by="tensor"), dtype=D)
    small = RuleContext(model, data, "categorical", dtype=D, memory_budget=20_000)
    assert small.exact_fisher("true").structure == "implicit"
    assert RULES["sngd-dense"].metric(small) is None
    with pytest.raises(MetricMismatchError, match="structure"):
        reconstruct(model, data, structure="dense", metric=small.exact_fisher("true"), dtype=D)
