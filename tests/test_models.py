"""Tests of fisherlab.models: shapes, seeding, vmap compatibility, registry errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from fisherlab import data as D
from fisherlab import models as M
from fisherlab.errors import InputError


@pytest.fixture(scope="module")
def datasets():
    out = {f"digits-{layout}": D.load_digits(layout=layout) for layout in ("flat", "image")}
    for layout in ("flat", "channels", "sequence"):
        out[f"mnist1d-{layout}"] = D.load_mnist1d(n_samples=100, layout=layout)
    return out


CASES = [
    ("mlp", "digits-flat"),
    ("mlp", "digits-image"),
    ("cnn", "digits-image"),
    ("resnet", "digits-image"),
    ("mlp", "mnist1d-flat"),
    ("cnn", "mnist1d-channels"),
    ("resnet", "mnist1d-channels"),
    ("lstm", "mnist1d-sequence"),
]


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "key"), CASES)
def test_output_shapes(datasets, name, key):
    d = datasets[key]
    model = M.build_model(name, d)
    out = model(d.X_test[:6])
    assert out.shape == (6, d.n_outputs) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert _n_params(model) < 10_000


def test_small_sizes_on_digits(datasets):
    assert _n_params(M.build_model("cnn", datasets["digits-image"])) == 1898
    assert _n_params(M.build_model("resnet", datasets["digits-image"])) == 2546


def test_reference_mlp():
    model = M.reference_mlp()
    assert isinstance(model, M.MLP)
    assert _n_params(model) == 3466 == M.REFERENCE_MLP_PARAMS
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(64, 32), (32, 32), (32, 10)]
    assert [n for n, _ in model.named_parameters()][:2] == ["layers.0.weight", "layers.0.bias"]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    # identical to the registry build on flat digits
    d = D.load_digits()
    built = M.build_model("mlp", d, activation="tanh")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), built.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.parametrize(("name", "key"), CASES)
def test_seeded_construction(datasets, name, key):
    d = datasets[key]
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    a = M.build_model(name, d, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    b = M.build_model(name, d, seed=5)
    c = M.build_model(name, d, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert list(sa) == list(sb) == list(sc)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    # float64 model is the exact upcast of the float32 one
    a64 = M.build_model(name, d, seed=5, dtype=torch.float64)
    for k, v in a64.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float64
            assert torch.equal(v, sa[k].double())



@pytest.mark.parametrize(("name", "key"), CASES)
def test_seeded_construction_ignores_the_default_dtype(datasets, name, key):
    d = datasets[key]
    reference = M.build_model(name, d, seed=3).state_dict()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        a = M.build_model(name, d, seed=3).state_dict()
        a64 = M.build_model(name, d, seed=3, dtype=torch.float64).state_dict()
        assert torch.get_default_dtype() == torch.float64  # the caller's default is restored
    finally:
        torch.set_default_dtype(previous)
    for k, v in reference.items():
        assert a[k].dtype == v.dtype and torch.equal(a[k], v)
        if v.is_floating_point():
            assert torch.equal(a64[k], v.double())


def test_seeded_weights_are_the_float32_draws_of_the_seed():
    # independent reference: nn.Linear's default init of a (32, 64) weight is U(-1/8, 1/8) (kaiming_uniform_ with
    # a = sqrt(5) and fan_in 64), drawn in float32 from a generator seeded by the seed
    expected = torch.empty(32, 64).uniform_(-1 / 8, 1 / 8, generator=torch.Generator().manual_seed(7))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = M.build_model("mlp", seed=7, in_features=64, out_features=10, dtype=torch.float64)
    finally:
        torch.set_default_dtype(previous)
    torch.testing.assert_close(model.layers[0].weight, expected.double(), rtol=0, atol=0)
    with pytest.raises(InputError, match="seed"):
        M.build_model("mlp", seed=1.5, in_features=3, out_features=2)

def _per_sample(model, params_and_buffers):
    def f(x):
        return functional_call(model, params_and_buffers, (x.unsqueeze(0),)).squeeze(0)

    return vmap(f)


def _warm_batchnorm(model, X):
    """Give BatchNorm non-trivial running statistics, then switch to eval mode."""
    model.train()
    with torch.no_grad():
        for i in range(3):
            model(X[i * 16 : (i + 1) * 16] * (1 + i))
    return model.eval()


@pytest.mark.parametrize(("name", "key"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vmap_functional_call_matches_batched_forward(datasets, name, key, dtype):
    d = datasets[key].to(dtype=dtype)
    model = _warm_batchnorm(M.build_model(name, d, seed=1, dtype=dtype), d.X_train)
    if name == "resnet":
        bn = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
        assert bn.running_mean.abs().sum() > 0
    X = d.X_test[:9]
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        batched = model(X)
        per_sample = _per_sample(model, (params, buffers))(X)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(per_sample, batched, rtol=tol, atol=tol)


@pytest.mark.parametrize(("name", "key"), CASES)
def test_per_sample_jacobian_under_vmap(datasets, name, key):
    d = datasets[key].to(dtype=torch.float64)
    model = M.build_model(name, d, dtype=torch.float64).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    X = d.X_test[:3]

    def f(p, x):
        return functional_call(model, (p, buffers), (x.unsqueeze(0),)).squeeze(0)

    J = vmap(jacrev(f), in_dims=(None, 0))(params, X)
    # compare one sample against plain autograd on the batched module
    out = model(X[1:2])[0, 0]
    grads = torch.autograd.grad(out, list(model.parameters()))
    for (k, jk), g in zip(J.items(), grads, strict=True):
        assert jk.shape == (3, d.n_outputs, *params[k].shape)
        torch.testing.assert_close(jk[1, 0], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_lstm_explicit_recurrence_matches_fused(num_layers):
    model = M.LSTMClassifier(3, 7, 4, num_layers=num_layers).double()
    X = torch.randn(5, 11, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(X), model.forward_fused(X), rtol=1e-12, atol=1e-12)


def test_kwargs_and_no_data():
    d = D.load_digits()
    model = M.build_model("mlp", d, widths=[16], activation="relu")
    assert _n_params(model) == 64 * 16 + 16 + 16 * 10 + 10
    mlp = M.build_model("mlp", in_features=5, out_features=2)
    assert mlp(torch.zeros(3, 5)).shape == (3, 2) and mlp.widths == (32, 32)
    cnn = M.build_model("cnn", input_shape=(3, 32, 32), n_outputs=10, channels=(4,))
    assert cnn(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    res = M.build_model("resnet", input_shape=(2, 12), n_outputs=3, n_blocks=0, activation="gelu")
    assert res(torch.zeros(2, 2, 12)).shape == (2, 3)
    lstm = M.build_model("lstm", input_size=2, n_outputs=1, hidden_size=4)
    assert lstm(torch.zeros(2, 6, 2)).shape == (2, 1)
    sig = M.MLP(4, [], 1, activation="sigmoid")
    assert len([m for m in sig.modules() if isinstance(m, nn.Linear)]) == 1


def test_errors(datasets):
    with pytest.raises(InputError) as info:
        M.build_model("transformer")
    for name in M.MODELS:
        assert name in str(info.value)
    assert M.MODELS == ("mlp", "cnn", "lstm", "resnet", "gpt", "encoder")
    with pytest.raises(InputError, match='layout="image"'):
        M.build_model("cnn", datasets["digits-flat"])
    with pytest.raises(InputError, match='layout="image"'):
        M.build_model("resnet", datasets["digits-flat"])
    with pytest.raises(InputError, match='layout="sequence"'):
        M.build_model("lstm", datasets["mnist1d-flat"])
    with pytest.raises(InputError, match='layout="sequence"'):
        M.build_model("lstm", datasets["mnist1d-channels"])
    with pytest.raises(InputError, match='layout="channels"'):
        M.build_model("cnn", datasets["mnist1d-sequence"])
    with pytest.raises(InputError, match="mnist1d"):
        M.build_model("lstm", datasets["digits-image"])
    with pytest.raises(InputError, match="unknown argument"):
        M.build_model("mlp", datasets["digits-flat"], depth=3)
    with pytest.raises(InputError, match="missing argument"):
        M.build_model("cnn")
    with pytest.raises(InputError, match="valid activations"):
        M.build_model("mlp", datasets["digits-flat"], activation="swish")
    with pytest.raises(InputError, match="dtype"):
        M.build_model("mlp", datasets["digits-flat"], dtype=torch.int64)
    with pytest.raises(InputError, match="input_shape"):
        M.CNN((64,), 10)
    with pytest.raises(InputError, match="kernel_size must be odd"):
        M.CNN((1, 8, 8), 10, kernel_size=4)
    assert M.CNN((1, 3, 3), 2, kernel_size=5)(torch.zeros(1, 1, 3, 3)).shape == (1, 2)
