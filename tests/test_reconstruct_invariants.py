"""Invariants 1–4 of docs/method.md for reconstructed networks, against independent float64 references.

References: the true Fisher and gradients by brute-force autograd loops (tests/reference.py); G assembled densely
in the test from them (full, block, diag) or from the structure objects' factors with the damping written out
here (kfac: (S + sI) ⊗ (A + aI), a = π√λ, s = √λ/π; input: I ⊗ (A + λI) in row-major order; ekfac, unit:
to_dense() + λI); roots and solves by torch.linalg (eigh, Cholesky), never by fisherlab.linalg.
"""

from __future__ import annotations

import copy
import math
from functools import cache

import pytest
import reference as ref
import torch
from cases import CNN1D, CNN2D, MLP, Case
from torch import Tensor, nn

from fisherlab import fisher
from fisherlab.engine import FisherEngine
from fisherlab.models import build_model
from fisherlab.params import ParamSpec
from fisherlab.reconstruction import reconstruct

DT = torch.float64
LAM = 1e-2
LR = 0.3
STRUCTURES = ("dense", "block", "diag", "kfac", "input", "ekfac", "unit")
LAYERWISE = ("kfac", "input", "ekfac", "unit")
LSTM = Case("lstm", lambda: build_model("lstm", input_size=2, hidden_size=3, n_outputs=3, seed=3), (4, 2),
            "categorical", 3, n=6)
MODELS = {c.name: c for c in (MLP, CNN2D, CNN1D, LSTM)}


@cache
def problem(name: str) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """(model, X, y, X2, y2): a second batch of the same size for refreshes."""
    case = MODELS[name]
    model, X, y = case.build(DT)
    gen = torch.Generator().manual_seed(99)
    X2 = torch.randn(X.shape, generator=gen, dtype=DT)
    y2 = torch.randint(0, case.outputs, y.shape, generator=gen)
    return model, X, y, X2, y2


def options(name: str, structure: str) -> dict:
    return {"unsupported": "block"} if name == "lstm" and structure in LAYERWISE else {}


def build(name: str, structure: str, **kw) -> nn.Module:
    model, X, y, _, _ = problem(name)
    return reconstruct(model, (X, y), structure=structure, damping=LAM, **{**options(name, structure), **kw})


def rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def mean_gradient(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """∇L of the mean loss by plain autograd (per-sample reference gradients averaged)."""
    return ref.loss_gradients(model, X, y, ref.RefLikelihood("categorical")).mean(0)


def wbar_permutation(shapes: list[torch.Size]) -> Tensor:
    """p with flat[j] = W̄.reshape(-1)[p[j]] for a weight (m, ...) and optional bias (m,) (written independently)."""
    m = shapes[0][0]
    n_w = math.prod(shapes[0]) // m
    pos = torch.arange(m * (n_w + (len(shapes) == 2))).reshape(m, -1)
    parts = [pos[:, :n_w].reshape(-1)] + ([pos[:, -1]] if len(shapes) == 2 else [])
    return torch.cat(parts)


def pi_split(A: Tensor, S: Tensor, lam: float) -> tuple[float, float]:
    pi = math.sqrt((A.trace() / A.shape[0]) / (S.trace() / S.shape[0]))
    return pi * math.sqrt(lam), math.sqrt(lam) / pi


def reference_metric(model: nn.Module, X: Tensor, y: Tensor, structure: str, opts: dict) -> Tensor:
    """G (P, P) in flat order for ``structure`` at the model's current parameters."""
    spec = ParamSpec.from_model(model)
    P = spec.dim
    eye = torch.eye(P, dtype=DT)
    F = ref.true_fisher(model, X, ref.RefLikelihood("categorical"))
    if structure == "dense":
        return F + LAM * eye
    if structure == "diag":
        return torch.diag(F.diagonal()) + LAM * eye
    mask = torch.zeros(P, P, dtype=torch.bool)
    for ix in spec.blocks("layer").values():
        mask[ix.unsqueeze(1), ix.unsqueeze(0)] = True
    if structure == "block":
        return torch.where(mask, F, 0.0) + LAM * eye
    struct = fisher(model, (X, y), structure="kfac" if structure == "input" else structure, **opts)
    if structure in ("ekfac", "unit"):
        return struct.to_dense() + LAM * eye
    G = torch.where(mask, F, 0.0) + LAM * eye  # exact blocks of modules without a layer rule (LSTM)
    for path, f in struct.factors.items():
        ix = struct.index[path]
        if structure == "kfac":
            a, s = pi_split(f.A, f.S, LAM)
            block = torch.kron(f.S + s * torch.eye(len(f.S), dtype=DT), f.A + a * torch.eye(len(f.A), dtype=DT))
        else:
            block = torch.kron(torch.eye(len(f.S), dtype=DT), f.A + LAM * torch.eye(len(f.A), dtype=DT))
        p = wbar_permutation([spec.shapes[spec.names.index(n)] for n in f.param_names])
        G[ix.unsqueeze(1), ix.unsqueeze(0)] = block[p][:, p]
    return G


def sym_root(G: Tensor, power: float) -> Tensor:
    w, Q = torch.linalg.eigh(G)
    return (Q * w**power) @ Q.T


def sgd_steps(net: nn.Module, X: Tensor, y: Tensor, lr: float, steps: int) -> None:
    """Plain SGD on the reconstructed parameters θ' (cross-entropy on (X, y)); counted by the network."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    net.attach(opt)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        opt.step()


def coordinate_map(net: nn.Module) -> Tensor:
    """R (P, P) with θ' = R θ, read off the network column by column (its map of original updates)."""
    return net.from_original_update(torch.eye(net.spec.dim, dtype=DT))


def check_root(R: Tensor, G: Tensor, sqrt: str) -> None:
    """RᵀR = G for every root method; R = G^{1/2} (symmetric) for eigh."""
    assert rel(R.T @ R, G) < 1e-9
    if sqrt == "eigh":
        assert rel(R, sym_root(G, 0.5)) < 1e-9


CASES = [(m, s) for m in MODELS for s in STRUCTURES]
ROOTS = ("eigh", "cholesky")


@pytest.mark.parametrize(("name", "structure"), CASES)
def test_invariant_1_same_outputs_at_construction(name: str, structure: str) -> None:
    model, X, _, _, _ = problem(name)
    net = build(name, structure)
    with torch.no_grad():
        assert rel(net(X), model(X)) < 1e-10


@pytest.mark.parametrize("sqrt", ROOTS)
@pytest.mark.parametrize(("name", "structure"), CASES)
def test_invariant_2_gd_step_is_preconditioned_step(name: str, structure: str, sqrt: str) -> None:
    model, X, y, _, _ = problem(name)
    net = build(name, structure, sqrt=sqrt)
    G = reference_metric(model, X, y, structure, options(name, structure))
    g = mean_gradient(model, X, y)
    expected = -LR * torch.linalg.solve(G, g)
    assert rel(net.gd_update((X, y), LR), expected) < 1e-9
    # the coordinates: θ' = R θ with RᵀR = G, so the reconstructed gradient is R^{-T} ∇L
    R = coordinate_map(net)
    check_root(R, G, sqrt)
    _, g_prime = net.prime_gradient((X, y))
    assert rel(g_prime, torch.linalg.solve(R.T, g)) < 1e-9


@pytest.mark.parametrize("sqrt", ROOTS)
@pytest.mark.parametrize("name", list(MODELS))
def test_invariant_3_full_is_exact_ngd(name: str, sqrt: str) -> None:
    model, X, y, _, _ = problem(name)
    net = build(name, "dense", sqrt=sqrt)
    F = ref.true_fisher(model, X, ref.RefLikelihood("categorical"))
    L = torch.linalg.cholesky(F + LAM * torch.eye(len(F), dtype=DT))
    ngd = -LR * torch.cholesky_solve(mean_gradient(model, X, y).unsqueeze(1), L).squeeze(1)
    assert rel(net.gd_update((X, y), LR), ngd) < 1e-10


@pytest.mark.parametrize("sqrt", ROOTS)
@pytest.mark.parametrize(("name", "structure"), CASES)
def test_invariant_4_refresh_keeps_function_and_reexpresses(name: str, structure: str, sqrt: str) -> None:
    model, X, y, X2, y2 = problem(name)
    net = build(name, structure, sqrt=sqrt)
    sgd_steps(net, X, y, LR, 2)  # move θ away from where G was computed
    assert net.steps_since_refresh == 2
    moved = net.load_into(copy.deepcopy(model))
    for batch in ((X2, y2), (X, y)):
        with torch.no_grad():
            before = net(X)
        theta = net.original_vector()
        net.refresh(batch)
        assert net.steps_since_refresh == 0
        with torch.no_grad():
            assert rel(net(X), before) < 1e-10
        assert rel(net.original_vector(), theta) < 1e-10
        R = coordinate_map(net)
        check_root(R, reference_metric(moved, *batch, structure, options(name, structure)), sqrt)
        assert rel(net.reconstructed_vector(), R @ theta) < 1e-9
    assert net.refreshes == 2


@pytest.mark.parametrize("name", ["mlp", "cnn2d"])
def test_invariant_1_float32(name: str) -> None:
    model, X, y, X2, y2 = problem(name)
    model32 = copy.deepcopy(model).float()
    for structure, sqrt in (("kfac", "eigh"), ("dense", "eigh"), ("unit", "eigh"), ("kfac", "cholesky")):
        net = reconstruct(model32, (X.float(), y), structure=structure, damping=LAM, sqrt=sqrt)
        assert next(net.parameters()).dtype == torch.float32
        with torch.no_grad():
            assert rel(net(X.float()), model32(X.float())) < 1e-5
            net.refresh((X2.float(), y2))
            assert rel(net(X.float()), model32(X.float())) < 1e-5


@pytest.mark.parametrize("kind", ["empirical", "mc"])
def test_other_fisher_kinds(kind: str) -> None:
    model, X, y, _, _ = problem("mlp")
    net = reconstruct(model, (X, y), structure="dense", kind=kind, damping=LAM, mc_samples=3, seed=5)
    lik = ref.RefLikelihood("categorical")
    if kind == "empirical":
        F = ref.empirical_fisher(model, X, y, lik)
    else:
        labels = FisherEngine(model, (X, y), kind="mc", mc_samples=3, seed=5)._labels
        F = ref.mc_fisher(model, X, labels, lik)
    expected = -LR * torch.linalg.solve(F + LAM * torch.eye(len(F), dtype=DT), mean_gradient(model, X, y))
    assert rel(net.gd_update((X, y), LR), expected) < 1e-9


@pytest.mark.parametrize("method", ["denman_beavers", "newton_schulz"])
@pytest.mark.parametrize("structure", ["dense", "kfac", "unit"])
def test_square_root_methods_agree_with_eigh(method: str, structure: str) -> None:
    model, X, _, _, _ = problem("mlp")
    a = build("mlp", structure)
    b = build("mlp", structure, sqrt=method)
    assert rel(b.reconstructed_vector(), a.reconstructed_vector()) < 1e-8
    with torch.no_grad():
        assert rel(b(X), model(X)) < 1e-10


def test_moving_average_of_statistics() -> None:
    model, X, y, X2, y2 = problem("mlp")
    beta = 0.7
    net = reconstruct(model, (X, y), structure="diag", damping=LAM, ema_decay=beta)
    net.refresh((X2, y2))
    lik = ref.RefLikelihood("categorical")
    d_old = ref.true_fisher(model, X, lik).diagonal()
    d_new = ref.true_fisher(model, X2, lik).diagonal()  # θ did not move
    d = torch.cat([unit.sqrt.reshape(-1) ** 2 for _, unit in net.units()])  # units in spec order
    assert rel(d - LAM, beta * d_old + (1 - beta) * d_new) < 1e-10


def test_sngd_with_empirical_kfac_is_kfac_step_from_empirical_factors() -> None:
    model, X, y, _, _ = problem("cnn2d")
    net = reconstruct(model, (X, y), structure="kfac", kind="empirical", damping=LAM, split="sqrt")
    struct = fisher(model, (X, y), kind="empirical", structure="kfac")
    g = mean_gradient(model, X, y)
    spec = ParamSpec.from_model(model)
    expected = torch.zeros_like(g)
    r = math.sqrt(LAM)
    for path, f in struct.factors.items():
        ix = struct.index[path]
        p = wbar_permutation([spec.shapes[spec.names.index(n)] for n in f.param_names])
        gw = torch.empty_like(g[ix])
        gw[p] = g[ix]  # gradient in W̄ layout
        Gw = gw.reshape(f.S.shape[0], f.A.shape[0])
        step = torch.linalg.solve(f.S + r * torch.eye(len(f.S), dtype=DT), Gw) @ torch.linalg.inv(
            f.A + r * torch.eye(len(f.A), dtype=DT))
        expected[ix] = -LR * step.reshape(-1)[p]
    assert rel(net.gd_update((X, y), LR), expected) < 1e-9


@pytest.mark.parametrize("relative_damping", [0.0, 1e-2])
def test_released_sngd_unit_metric(relative_damping: float) -> None:
    """structure="unit", variant="sngd": G = the released code's unit-wise metric + λI (UnitwiseFisher.to_dense)."""
    model, X, y, _, _ = problem("mlp")
    opts = {"variant": "sngd", "relative_damping": relative_damping}
    net = reconstruct(model, (X, y), structure="unit", damping=LAM, **opts)
    struct = fisher(model, (X, y), structure="unit", **opts)
    G = struct.to_dense() + LAM * torch.eye(struct.spec.dim, dtype=DT)
    expected = -LR * torch.linalg.solve(G, mean_gradient(model, X, y))
    assert rel(net.gd_update((X, y), LR), expected) < 1e-9
