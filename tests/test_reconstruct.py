"""The reconstructed network's API: forms, parameters, buffers, coordinate maps, the original model, bad input.

The invariants of docs/method.md are in test_reconstruct_invariants.py; this file checks the machinery around them
(every value against an independent computation: explicit Kronecker products, eigh roots, plain nn layers).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import reference as ref
import torch
from cases import CNN2D, MLP, GatedNet, resnet_bn
from test_reconstruct_invariants import sgd_steps
from torch import Tensor, nn

from fisherlab import fisher
from fisherlab.errors import InputError, SingularMatrixError, UnsupportedLayerError
from fisherlab.layers import expand_input, to_combined
from fisherlab.models import build_model
from fisherlab.params import ParamSpec
from fisherlab.reconstruction import (
    CombinedLayout,
    DenseRoot,
    DiagonalRoot,
    InputWhitening,
    KroneckerRoot,
    LocalFisherConv,
    LocalFisherLinear,
    MetricMismatchError,
    OutputFisher,
    parametrize_group,
    reconstruct,
)

DT = torch.float64
LAM = 1e-2


def rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def spd(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g, dtype=DT)
    return M @ M.T / n + 0.1 * torch.eye(n, dtype=DT)


def sym_root(G: Tensor, power: float) -> Tensor:
    w, Q = torch.linalg.eigh(G)
    return (Q * w**power) @ Q.T


@pytest.fixture
def mlp() -> tuple[nn.Module, Tensor, Tensor]:
    return MLP.build(DT)


# ------------------------------------------------------------------------------------------- the forms
def test_layer_form_is_visible_and_parameters_are_reconstructed(mlp) -> None:
    model, X, y = mlp
    net = reconstruct(model, (X, y), structure="kfac", damping=LAM)
    text = repr(net)
    assert text.count("LocalFisherLinear") == 3 and text.count("InputWhitening") == 3
    assert text.count("OutputFisher") == 3
    params = dict(net.named_parameters())
    assert list(params) == ["net.0.weight_prime", "net.2.weight_prime", "net.4.weight_prime"]  # W̄' = [W', b']
    assert params["net.0.weight_prime"].shape == (6, 5 + 1)
    assert sum(p.numel() for p in net.parameters()) == ParamSpec.from_model(model).dim
    inp = reconstruct(model, (X, y), structure="input", damping=LAM)
    assert "OutputFisher" not in repr(inp) and repr(inp).count("InputWhitening") == 3


def test_parametrization_form_parameters(mlp) -> None:
    model, X, y = mlp
    for structure in ("dense", "block", "diag", "ekfac", "unit"):
        net = reconstruct(model, (X, y), structure=structure, damping=LAM)
        names = [n for n, _ in net.named_parameters()]
        assert names == [f"net.{n.rpartition('.')[0]}.parametrizations.{n.rpartition('.')[2]}.original"
                         for n, _ in model.named_parameters()], structure
        assert [p.shape for p in net.parameters()] == [p.shape for p in model.parameters()]


def test_optimizer_sees_theta_prime_and_no_gradient_reaches_the_roots(mlp) -> None:
    model, X, y = mlp
    for structure in ("kfac", "dense", "unit"):
        net = reconstruct(model, (X, y), structure=structure, damping=LAM)
        buffers = list(net.buffers())
        assert buffers and not any(b.requires_grad for b in buffers)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
            p.numel() for p in model.parameters())
        loss = nn.functional.cross_entropy(net(X), y)
        with pytest.raises(RuntimeError, match="does not require grad"):
            torch.autograd.grad(loss, buffers[:1], retain_graph=True)
        loss.backward()
        assert all(p.grad is not None for p in net.parameters())
        assert all(b.grad is None for b in buffers)
        # the θ' gradient is G^{-1/2} ∇L whatever the roots' provenance: the graph holds them as constants
        before = [b.clone() for b in buffers]
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, net.buffers(), strict=True))


def test_layer_form_fold_modes_agree() -> None:
    lin = nn.Linear(7, 4).double()
    A, S = spd(8, 1), spd(4, 2)
    x = torch.randn(9, 7, dtype=DT)
    outs = []
    for fold in ("never", "always", "auto"):
        layer = LocalFisherLinear.from_layer(lin, fold=fold)
        layer.update({"A": A, "S": S}, 0.0, "eigh")
        layer.load_theta(torch.cat([lin.weight.detach().reshape(-1), lin.bias.detach()]))
        outs.append(layer(x).detach())
        # W̄' = S^{1/2} W̄ A^{1/2}, and the explicit form is S^{-1/2} W̄' (A^{-1/2} ā)
        Wbar = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
        assert rel(layer.weight_prime.detach(), sym_root(S, 0.5) @ Wbar @ sym_root(A, 0.5)) < 1e-12
    abar = torch.cat([x, torch.ones(9, 1, dtype=DT)], 1)
    explicit = abar @ sym_root(A, -0.5) @ layer.weight_prime.detach().T @ sym_root(S, -0.5)
    for y in outs:
        assert rel(y, lin(x).detach()) < 1e-12
        assert rel(y, explicit) < 1e-12


@pytest.mark.parametrize("conv", [nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Conv1d(2, 3, 3, padding_mode="reflect",
                                                                                     padding=1, bias=False)])
def test_conv_layer_form_with_given_factors(conv: nn.Module) -> None:
    conv = conv.double()
    x = torch.randn(4, 2, *([6, 6] if isinstance(conv, nn.Conv2d) else [7]), dtype=DT)
    rows = expand_input(conv, x)  # (n, L, width)
    A = rows.reshape(-1, rows.shape[-1]).T @ rows.reshape(-1, rows.shape[-1]) / rows.shape[1] / 4
    S = spd(3, 3)
    for fold in ("never", "always"):
        layer = LocalFisherConv.from_layer(conv, fold=fold)
        theta = torch.cat([p.detach().reshape(-1) for p in conv.parameters()])
        layer.update({"A": A, "S": S}, LAM, "eigh")
        layer.load_theta(theta)
        assert rel(layer(x), conv(x).detach()) < 1e-12
        assert "InputWhitening" in repr(layer) and "OutputFisher" in repr(layer)


def test_combined_layout_matches_layer_rules() -> None:
    conv = nn.Conv2d(2, 3, 3).double()
    layout = CombinedLayout([conv.weight.shape, conv.bias.shape])
    M = layout.to_matrix([conv.weight, conv.bias])
    assert torch.equal(M, to_combined(conv, conv.weight, conv.bias))
    w, b = layout.from_matrix(M)
    assert torch.equal(w, conv.weight) and torch.equal(b, conv.bias)
    v = torch.cat([conv.weight.reshape(-1), conv.bias])
    assert torch.equal(layout.matrix_to_flat(layout.flat_to_matrix(v)), v)


def test_factor_modules_apply_their_roots() -> None:
    A, S = spd(5, 4), spd(3, 5)
    iw = InputWhitening(5, homogeneous=True).double()
    iw.set_roots(sym_root(A, 0.5), sym_root(A, -0.5))
    a = torch.randn(2, 4, dtype=DT)
    assert rel(iw(a), torch.cat([a, torch.ones(2, 1, dtype=DT)], 1) @ sym_root(A, -0.5)) < 1e-12
    of = OutputFisher(3, dim=1).double()
    of.set_roots(sym_root(S, 0.5), sym_root(S, -0.5))
    h = torch.randn(2, 3, 4, 4, dtype=DT)
    assert rel(of(h), torch.einsum("ij,njhw->nihw", sym_root(S, -0.5), h)) < 1e-12
    with pytest.raises(InputError, match="shape"):
        of.set_roots(torch.eye(4), torch.eye(4))


def test_cholesky_roots_are_triangular_factors(mlp) -> None:
    """sqrt="cholesky": InputWhitening holds L_A⁻¹ (lower), OutputFisher L_S^{-T} (upper), L Lᵀ = damped factor."""
    model, X, y = mlp
    net = reconstruct(model, (X, y), structure="kfac", damping=0.1, sqrt="cholesky", split="sqrt")
    struct = fisher(model, (X, y), structure="kfac")
    for path, f in struct.factors.items():
        layer = net.net.get_submodule(path)
        iw, of = layer.input_whitening, layer.output_fisher
        for M, damped, upper in ((iw.inv_sqrt, f.A, False), (of.inv_sqrt, f.S, True)):
            eye = torch.eye(len(damped), dtype=DT)
            assert torch.equal(M, M.triu() if upper else M.tril())
            L = torch.linalg.inv(M.T if upper else M)  # the Cholesky factor of the damped factor
            assert rel(L @ L.T, damped + 0.1**0.5 * eye) < 1e-12
            assert rel(M @ (iw.sqrt if M is iw.inv_sqrt else of.sqrt), eye) < 1e-12
    with torch.no_grad():
        assert rel(net(X), model(X)) < 1e-12


# ------------------------------------------------------------------------------- parametrization roots
def test_parametrize_any_tensor_with_dense_diagonal_and_kronecker_roots() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 4, dtype=DT)
    for kind in ("dense", "diag", "kron"):
        model = GatedNet(4, 5, 2).double()
        before = model(x).detach()
        W = model.weight.detach().clone()  # a bare (5, 4) parameter of a user module
        if kind == "dense":
            G, root, stats = spd(20, 6), DenseRoot([W.shape], DT), None
            stats = {"G": G}
        elif kind == "diag":
            d = torch.rand(20, dtype=DT) + 0.1
            G, root, stats = torch.diag(d), DiagonalRoot([W.shape], DT), {"diagonal": d}
        else:
            A, S = spd(4, 7), spd(5, 8)
            G, root, stats = torch.kron(S, A), KroneckerRoot([W.shape], DT, split="sqrt"), {"A": A, "S": S}
        root.update(stats, 0.0, "eigh")
        parametrize_group(model, ["weight"], root)
        assert rel(model(x), before) < 1e-12
        original = model.parametrizations.weight.original
        assert rel(original.detach().reshape(-1), sym_root(G, 0.5) @ W.reshape(-1)) < 1e-12
        # W = unvec(G^{-1/2} vec W') for any W'
        new = torch.randn(5, 4, dtype=DT)
        with torch.no_grad():
            original.copy_(new)
        assert rel(model.weight, (sym_root(G, -0.5) @ new.reshape(-1)).reshape(5, 4)) < 1e-12
        with pytest.raises(InputError, match="already parametrized"):
            parametrize_group(model, ["weight"], DenseRoot([W.shape], DT))


def test_norm_parameters_and_batchnorm_in_eval_mode() -> None:
    model = resnet_bn(3).double().eval()
    X = torch.randn(5, 1, 6, 6, dtype=DT)
    y = torch.randint(0, 3, (5,))
    for structure in ("diag", "block"):
        net = reconstruct(model, (X, y), structure=structure, damping=LAM)
        with torch.no_grad():
            assert rel(net(X), model(X)) < 1e-10


# ----------------------------------------------------------------------------------- coordinate maps
def test_coordinates_and_update_maps(mlp) -> None:
    model, X, y = mlp
    spec = ParamSpec.from_model(model)
    net = reconstruct(model, (X, y), structure="dense", damping=LAM)
    theta = spec.vector(model)
    G = ref.true_fisher(model, X, ref.RefLikelihood("categorical")) + LAM * torch.eye(spec.dim, dtype=DT)
    assert rel(net.original_vector(), theta) < 1e-12
    assert rel(net.reconstructed_vector(), sym_root(G, 0.5) @ theta) < 1e-10
    named = net.original_parameters()
    assert list(named) == list(spec.names)
    assert all(rel(named[n], p.detach()) < 1e-12 for n, p in model.named_parameters())
    V = torch.randn(spec.dim, 3, dtype=DT)
    assert rel(net.to_original_update(V), sym_root(G, -0.5) @ V) < 1e-10
    assert rel(net.from_original_update(V), sym_root(G, 0.5) @ V) < 1e-10
    for structure in ("kfac", "unit", "diag"):
        other = reconstruct(model, (X, y), structure=structure, damping=LAM)
        assert rel(other.from_original_update(other.to_original_update(V[:, 0])), V[:, 0]) < 1e-10
    with pytest.raises(InputError, match="P ="):
        net.to_original_update(torch.zeros(3))


def test_load_into_and_load_original(mlp) -> None:
    model, X, y = mlp
    net = reconstruct(model, (X, y), structure="kfac", damping=LAM)
    sgd_steps(net, X, y, 0.5, 3)
    target = net.load_into(copy.deepcopy(model))
    with torch.no_grad():
        assert rel(target(X), net(X)) < 1e-12
    theta0 = ParamSpec.from_model(model).vector(model)
    net.load_original(theta0)
    with torch.no_grad():
        assert rel(net(X), model(X)) < 1e-12
    with pytest.raises(InputError, match="parameters"):
        net.load_into(nn.Linear(5, 3).double())


def test_original_model_untouched_unless_inplace(mlp) -> None:
    model, X, y = mlp
    model = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())
    net = reconstruct(model, (X, y), structure="kfac", damping=LAM)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    nn.functional.cross_entropy(net(X), y).backward()
    opt.step()
    net.refresh()
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.Tanh) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        expected = model(X)
    inplace = reconstruct(model, (X, y), structure="block", damping=LAM, inplace=True)
    assert inplace.net is model
    assert "parametrizations" in dict(model.named_modules())["0"].__dict__["_modules"]
    with torch.no_grad():
        assert rel(inplace(X), expected) < 1e-10


def test_copies_and_state_dict(mlp) -> None:
    model, X, y = mlp
    a = reconstruct(model, (X, y), structure="kfac", damping=LAM)
    b = copy.deepcopy(a)
    with torch.no_grad():
        next(b.parameters()).add_(1.0)
        assert not torch.equal(a(X), b(X))
    c = reconstruct(model, (X, y), structure="kfac", damping=1.0)
    c.load_state_dict(b.state_dict())
    with torch.no_grad():
        assert rel(c(X), b(X)) < 1e-12
    full = reconstruct(model, (X, y), structure="dense", damping=LAM)
    full_copy = copy.deepcopy(full)
    with torch.no_grad():
        full_copy.net[0].parametrizations.bias.original.add_(1.0)  # the copy's peers are the copy's tensors
        assert rel(full(X), model(X)) < 1e-10 and not torch.allclose(full_copy(X), model(X))


def test_dense_cholesky_root_applies_its_inverse_by_triangular_solves(mlp) -> None:
    """sqrt="cholesky" (dense): R = Lᵀ of the reference F + λI, no R⁻¹ formed; θ = R⁻¹θ' by numpy's solve; the GD
    step is −η (F + λI)⁻¹ ∇L; state dicts load between the eigh and Cholesky forms with the same function."""
    model, X, y = mlp
    chol = reconstruct(model, (X, y), structure="dense", damping=LAM, sqrt="cholesky")
    eigh = reconstruct(model, (X, y), structure="dense", damping=LAM)
    (root,) = [m for m in chol.modules() if isinstance(m, DenseRoot)]
    F = ref.true_fisher(model, X, ref.RefLikelihood("categorical")) + LAM * torch.eye(root.dim, dtype=DT)
    assert root.inv_sqrt.shape == (0,)
    assert rel(root.sqrt, torch.linalg.cholesky(F).T) < 1e-10
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = torch.from_numpy(np.linalg.solve(root.sqrt.numpy(), root.prime_vector().numpy()))
    assert rel(root.theta_vector(), want) < 1e-12 and rel(want, theta) < 1e-10
    with torch.no_grad():
        assert rel(chol(X), model(X)) < 1e-10
    g = ref.loss_gradients(model, X, y, ref.RefLikelihood("categorical")).mean(0)
    assert rel(chol.gd_update((X, y), 0.1), -0.1 * torch.linalg.solve(F, g)) < 1e-9
    for into, source in ((copy.deepcopy(eigh), chol), (copy.deepcopy(chol), eigh)):
        into.load_state_dict(source.state_dict())
        (loaded,) = [m for m in into.modules() if isinstance(m, DenseRoot)]
        assert loaded.inv_sqrt.shape == [m for m in source.modules() if isinstance(m, DenseRoot)][0].inv_sqrt.shape
        with torch.no_grad():
            assert rel(into(X), model(X)) < 1e-10


def test_reconstructed_network_is_a_model_for_the_fisher_engine(mlp) -> None:
    from fisherlab import fisher

    model, X, y = mlp
    net = reconstruct(model, (X, y), structure="dense", damping=LAM)
    F_prime = fisher(net, (X, y), structure="dense").to_dense()  # the Fisher the reconstructed network sees
    F = ref.true_fisher(model, X, ref.RefLikelihood("categorical"))
    R = sym_root(F + LAM * torch.eye(len(F), dtype=DT), -0.5)
    assert rel(F_prime, R @ F @ R) < 1e-9


# --------------------------------------------------------------------------------------------- bad input
def test_training_mode_with_dropout_or_batchnorm_is_refused() -> None:
    X, y = torch.randn(4, 5, dtype=DT), torch.randint(0, 3, (4,))
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 3)).double()
    with pytest.raises(InputError, match="'1'.*Dropout.*eval"):
        reconstruct(model, (X, y))
    bn = resnet_bn(3).double()
    with pytest.raises(InputError, match="BatchNorm2d.*training mode"):
        reconstruct(bn, (torch.randn(4, 1, 6, 6, dtype=DT), y))


def test_shared_parameters_are_refused() -> None:
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Linear(4, 2)).double()
    with pytest.raises(InputError, match="same tensor.*Untie"):
        reconstruct(model, (torch.randn(3, 4, dtype=DT), torch.randint(0, 2, (3,))), structure="block")


def test_structure_without_a_rule_names_the_module() -> None:
    model = build_model("lstm", input_size=2, hidden_size=3, n_outputs=3, dtype=DT).eval()
    X, y = torch.randn(4, 5, 2, dtype=DT), torch.randint(0, 3, (4,))
    for structure in ("kfac", "ekfac", "unit", "input"):
        with pytest.raises(UnsupportedLayerError, match="'lstm'.*LSTM.*'block'"):
            reconstruct(model, (X, y), structure=structure)
    net = reconstruct(model, (X, y), structure="kfac", unsupported="block")
    assert [p.form for p in net.plans] == ["layer", "parametrization"]


def test_singular_metric_without_damping() -> None:
    model, X, y = CNN2D.build(DT)
    with pytest.raises(SingularMatrixError, match="damping"):
        reconstruct(model, (X[:1], y[:1]), structure="dense", damping=0.0)
    mlp, X, y = MLP.build(DT)
    X = X.clone()
    X[:, 0] = 0.0  # the weights of input 0 get no gradient: diag(F) has zeros
    for structure, sqrt in (("diag", "eigh"), ("kfac", "eigh"), ("block", "eigh"), ("kfac", "cholesky"),
                            ("block", "cholesky")):
        with pytest.raises(SingularMatrixError, match="damping > 0"):
            reconstruct(mlp, (X, y), structure=structure, damping=0.0, sqrt=sqrt)


@pytest.mark.parametrize("structure", ["dense", "block"])
def test_given_metric_is_used_and_not_computed_again(mlp, monkeypatch, structure: str) -> None:
    """metric=: no pass over the data for G; the GD step is −η (G + λI)⁻¹ ∇L with G from the per-sample reference."""
    import fisherlab.reconstruction.build as build

    model, X, y = mlp
    metric = fisher(model, (X, y), structure=structure)
    F = ref.true_fisher(model, X, ref.RefLikelihood("categorical"))
    if structure == "block":
        mask = torch.zeros_like(F)
        for ix in ParamSpec.from_model(model).blocks("layer").values():
            mask[ix.unsqueeze(1), ix.unsqueeze(0)] = 1
        F = F * mask
    grad = ref.loss_gradients(model, X, y, ref.RefLikelihood("categorical")).mean(0)
    monkeypatch.setattr(build, "compute_structure", lambda *a, **k: pytest.fail("G computed again"))
    lam, lr = 0.05, 0.3
    net = reconstruct(model, (X, y), structure=structure, damping=lam, sqrt="cholesky", metric=metric)
    expected = -lr * torch.linalg.solve(F + lam * torch.eye(len(F), dtype=DT), grad)
    ref.assert_close(net.gd_update((X, y), lr), expected, 1e-10, f"{structure} step with a given metric")
    with torch.no_grad():
        assert rel(net(X), model(X)) < 1e-12


def test_mismatched_metric_is_refused(mlp) -> None:
    model, X, y = mlp
    other, X2, y2 = CNN2D.build(DT)
    cases = [
        (fisher(model, (X, y), structure="kfac"), {"structure": "dense"}, "structure 'kfac'"),
        (fisher(model, (X, y), structure="dense", kind="empirical"), {"structure": "dense"}, "kind 'empirical'"),
        (fisher(other, (X2, y2), structure="dense"), {"structure": "dense"}, "other parameters"),
        (fisher(model, (X, y), structure="dense"), {"structure": "dense", "dtype": torch.float32}, "dtype"),
        (fisher(model, (X, y), structure="block", by="tensor"), {"structure": "block"}, "block grouping"),
        ("not a structure", {"structure": "dense"}, "FisherMatrix"),
    ]
    for metric, kwargs, match in cases:
        with pytest.raises(MetricMismatchError, match=match):
            reconstruct(model, (X, y), metric=metric, **kwargs)
    assert issubclass(MetricMismatchError, InputError)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"structure": "lowrank"}, "reconstruction structure"), ({"sqrt": "qr"}, "sqrt method"),
    ({"split": "exact"}, "damping split"), ({"fold": "sometimes"}, "fold mode"), ({"damping": -1.0}, "damping"),
    ({"ema_decay": 1.0}, "ema_decay"), ({"kind": "hessian"}, "Fisher kind"),
])
def test_bad_options(mlp, kwargs: dict, match: str) -> None:
    model, X, y = mlp
    with pytest.raises(InputError, match=match):
        reconstruct(model, (X, y), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("sqrt", ["eigh", "cholesky", "lowrank"])
def test_cuda_matches_cpu(sqrt: str) -> None:
    model, X, y = CNN2D.build(DT)
    for structure in ("kfac", "dense", "unit"):
        kw = {"sqrt": sqrt, "root_rank": 2}
        net = reconstruct(model, (X, y), structure=structure, damping=LAM, device="cuda", **kw)
        assert all(b.is_cuda for b in net.buffers()) and all(p.is_cuda for p in net.parameters())
        with torch.no_grad():
            assert rel(net(X.cuda()).cpu(), model(X)) < 1e-10
        cpu = reconstruct(model, (X, y), structure=structure, damping=LAM, **kw)
        assert rel(net.gd_update((X, y), 0.1).cpu(), cpu.gd_update((X, y), 0.1)) < 1e-8
        net.refresh((X.cuda(), y.cuda()))
        with torch.no_grad():
            assert rel(net(X.cuda()).cpu(), model(X)) < 1e-10


def test_layer_with_a_kronecker_rule_but_no_layer_form_falls_back_to_a_parametrization() -> None:
    from fisherlab import fisher
    from fisherlab.layers import LAYER_RULES, LinearRule, register_layer_rule

    class MyLinear(nn.Linear):
        pass

    register_layer_rule(MyLinear, LinearRule())
    try:
        torch.manual_seed(0)
        model = nn.Sequential(MyLinear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
        X, y = torch.randn(7, 5, dtype=DT), torch.randint(0, 3, (7,))
        net = reconstruct(model, (X, y), structure="kfac", damping=LAM, split="sqrt")
        assert [p.form for p in net.plans] == ["parametrization", "layer"]
        assert isinstance(net.net[0].parametrizations.weight[0].root, KroneckerRoot)
        with torch.no_grad():
            assert rel(net(X), model(X)) < 1e-12
        struct = fisher(model, (X, y), structure="kfac")
        g = ref.loss_gradients(model, X, y, ref.RefLikelihood("categorical")).mean(0)
        expected = -0.1 * struct.solve(g, LAM, split="sqrt")
        assert rel(net.gd_update((X, y), 0.1), expected) < 1e-10
    finally:
        del LAYER_RULES[MyLinear]
