"""evaluate_fidelity on a sequence model (fisherlab's GPT, output="sequence", on sort-lm), float64.

References are computed here, independently of fisherlab: the per-token KL and cross-entropy by hand on the logits
before and after the step (counted tokens only), and the dense true Fisher of the token-mean loss from a per-token
autograd loop (C backward passes per counted token): F = (1/N_tok) Σ_nt J_ntᵀ (diag p_nt − p_nt p_ntᵀ) J_nt.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn

from fisherlab import data as fdata
from fisherlab import models
from fisherlab.data import IGNORE_INDEX
from fisherlab.fidelity import evaluate_fidelity

D = torch.float64
DAMPINGS = (1e-2, 1e-1)
LR = 1e-3


@pytest.fixture(scope="module")
def case():
    """A 1-block GPT (P = 2,105) on 4 sort-lm sequences (T = 6, C = 5, 3 counted tokens each), references."""
    split = fdata.make_sort_lm(n_samples=16, length=3, n_values=4, seed=1)
    X, y = split.X_train[:4].clone(), split.y_train[:4].clone()
    model = models.build_model("gpt", split, seed=2, dtype=D, d_model=12, n_layers=1, n_heads=2,
                               output="sequence")
    params = [p for p in model.parameters() if p.requires_grad]
    z = model(X)
    counted = (y != IGNORE_INDEX).nonzero().tolist()
    P = sum(p.numel() for p in params)
    F = torch.zeros(P, P, dtype=D)
    for n, t in counted:
        J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(z[n, t, c], params,
                                                                                retain_graph=True)])
                         for c in range(z.shape[-1])])  # (C, P)
        p = z[n, t].detach().softmax(-1)
        F += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    F /= len(counted)
    loss = Fn.cross_entropy(z.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)
    g = torch.cat([q.reshape(-1) for q in torch.autograd.grad(loss, params)])
    return {"model": model, "X": X, "y": y, "F": F, "g": g, "P": P}


def outputs_after(model, X, u):
    """The logits of a copy of ``model`` moved by the flat update u (parameter order)."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(moved.parameters()) + u,
                                            moved.parameters())
        return moved(X)


def token_kl_and_loss_change(model, X, y, u):
    """Mean over counted tokens of KL(p_before ‖ p_after), and the change of the token-mean cross-entropy."""
    with torch.no_grad():
        z0 = model(X)
    z1 = outputs_after(model, X, u)
    mask = y != IGNORE_INDEX
    lp0, lp1 = z0.log_softmax(-1)[mask], z1.log_softmax(-1)[mask]
    kl = (lp0.exp() * (lp0 - lp1)).sum(-1).mean()
    ce = [Fn.cross_entropy(z.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX) for z in (z0, z1)]
    return float(kl), float(ce[1] - ce[0])


def ngd_update(case, lam):
    return -LR * torch.linalg.solve(case["F"] + lam * torch.eye(case["P"], dtype=D), case["g"])


@pytest.fixture(scope="module")
def evaluated(case):
    return evaluate_fidelity(case["model"], (case["X"], case["y"]), "categorical", rules=["gd", "ngd"],
                             damping=DAMPINGS, lr=LR, dtype=D, ngd_solver="cholesky", progress=False)


def test_measured_kl_and_loss_change_are_token_means(case, evaluated):
    ds = evaluated
    assert ds.attrs["num_params"] == case["P"] == 2105
    for j, lam in enumerate(DAMPINGS):
        for rule, u in (("gd", -LR * case["g"]), ("ngd", ngd_update(case, lam))):
            kl, dloss = token_kl_and_loss_change(case["model"], case["X"], case["y"], u)
            got = ds.sel(rule=rule).isel(damping=j)
            np.testing.assert_allclose(float(got.kl_measured), kl, rtol=1e-8)
            np.testing.assert_allclose(float(got.loss_change), dloss, rtol=1e-8)
            # the quadratic model of the KL holds for this small step: ½uᵀFu within 1 % of the measured KL
            assert abs(float(got.kl_predicted) / kl - 1) < 1e-2


def test_ngd_against_the_per_token_autograd_fisher(case, evaluated):
    ds = evaluated
    with torch.no_grad():
        z = case["model"](case["X"])
    loss = Fn.cross_entropy(z.flatten(0, 1), case["y"].flatten(), ignore_index=IGNORE_INDEX)
    np.testing.assert_allclose(float(ds.loss), float(loss), rtol=1e-12)
    np.testing.assert_allclose(float(ds.grad_norm), float(case["g"].norm()), rtol=1e-10)
    for j, lam in enumerate(DAMPINGS):
        v = ngd_update(case, lam)
        ngd, gd = ds.sel(rule="ngd").isel(damping=j), ds.sel(rule="gd").isel(damping=j)
        np.testing.assert_allclose(float(ngd.kl_predicted), float(0.5 * v @ case["F"] @ v), rtol=1e-10)
        np.testing.assert_allclose(float(ngd.update_norm), float(v.norm()), rtol=1e-10)
        assert abs(float(ngd.cosine) - 1) < 1e-10
        u = -LR * case["g"]
        np.testing.assert_allclose(float(gd.cosine), float(u @ v / (u.norm() * v.norm())), rtol=1e-10)
        np.testing.assert_allclose(float(gd.kl_predicted), float(0.5 * u @ case["F"] @ u), rtol=1e-10)
    assert ds.available.values.tolist() == [1, 1]


#: The rule of each structure that its reconstructed network's rule ``sngd-<structure>`` equals (invariant 2).
STRUCTURE_RULES = {"dense": "ngd", "block": "block-ngd", "diag": "diag", "kfac": "kfac"}


def test_sngd_rules_take_their_structures_step_on_sequence_outputs(case):
    """Invariant 2 on the token-mean loss: sngd-<s> (GD on the reconstructed network, mapped back) is the step of
    the rule of structure s; sngd-dense is exact NGD, itself checked against the per-token autograd F above."""
    from fisherlab.fidelity.rules import RuleContext, get_rule

    lam = DAMPINGS[0]  # one damping: sngd-dense's root of the (P, P) F takes most of the test's time
    ctx = RuleContext(case["model"], (case["X"], case["y"]), "categorical", dtype=D, ngd_solver="cholesky")
    for s, reference in STRUCTURE_RULES.items():
        u, v = get_rule(f"sngd-{s}")(ctx, lam, LR), get_rule(reference)(ctx, lam, LR)
        assert float((u - v).norm() / v.norm()) < 1e-9, s  # measured: 7e-14 (dense), <= 4e-15 (the others)
    v = get_rule("ngd")(ctx, lam, LR)
    assert float((v - ngd_update(case, lam)).norm() / v.norm()) < 1e-9


def test_inputs_after_the_counted_tokens_change_nothing(case):
    """Right padding: the last two positions of sequence 0 ignored; other token ids there change no number.

    (Rules whose matrix is exact in the data's per-token terms. KFAC's input factors A also average the activations
    at ignored positions, so kfac/ekfac do change: they are not in this list.)
    """
    X, y = case["X"].clone(), case["y"].clone()
    y[0, -2:] = IGNORE_INDEX
    other = X.clone()
    other[0, -2:] = (X[0, -2:] + 1) % 4
    rules = ["gd", "ngd", "block-ngd", "diag"]
    kwargs = dict(rules=rules, damping=0.1, lr=LR, dtype=D, ngd_solver="cholesky", progress=False)
    a = evaluate_fidelity(case["model"], (X, y), "categorical", **kwargs)
    b = evaluate_fidelity(case["model"], (other, y), "categorical", **kwargs)
    assert a.available.values.tolist() == [1] * len(rules)
    for name in ("cosine", "kl_measured", "kl_predicted", "loss_change", "update_norm", "fisher_rel_error"):
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-12, atol=1e-300)
    # not vacuous: where those positions count, the same ids change the loss
    with torch.no_grad():
        ce = [float(Fn.cross_entropy(case["model"](x).flatten(0, 1), case["y"].flatten(),
                                     ignore_index=IGNORE_INDEX)) for x in (X, other)]
    assert abs(ce[1] - ce[0]) > 1e-6
