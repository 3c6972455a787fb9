"""The parameter-ordering convention (ParamSpec) and Fishers over parameter subsets.

The ordering must be that of ``torch.nn.utils.parameters_to_vector`` (exact equality); a Fisher over a subset of
parameter names must be the corresponding sub-block of the full Fisher (1e-12 relative), and frozen parameters
(``requires_grad=False``) are left out by default and treated as constants.
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from cases import CASES_BY_NAME, GatedNet
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from fisherlab import fisher
from fisherlab.checks import check_model
from fisherlab.errors import InputError, NonFiniteError
from fisherlab.params import ParamSpec, all_finite, layer_of


@pytest.mark.parametrize("name", ["mlp", "cnn2d", "lstm", "resnet_bn", "custom"])
def test_flatten_agrees_with_parameters_to_vector(problems, name):
    model = problems(name).model
    spec = ParamSpec.from_model(model)
    assert spec.names == tuple(n for n, _ in model.named_parameters())
    assert spec.shapes == tuple(t.shape for t in model.parameters())
    assert spec.dim == sum(t.numel() for t in model.parameters())
    assert torch.equal(spec.vector(model), parameters_to_vector(model.parameters()))
    # unflatten ↔ vector_to_parameters: the same slice lands in the same tensor
    v = torch.arange(spec.dim, dtype=torch.float64)
    named = spec.unflatten(v)
    clone = [torch.empty_like(t) for t in model.parameters()]
    vector_to_parameters(v, clone)
    for (n, t), c in zip(named.items(), clone, strict=True):
        assert torch.equal(t, c), n
        assert torch.equal(v[spec.slice(n)], c.reshape(-1))
    assert torch.equal(spec.flatten(named), v)
    assert torch.equal(spec.flatten(list(named.values())), v)


def test_offsets_slices_and_batched_round_trip():
    spec = ParamSpec.from_model(GatedNet(4, 5, 2))
    assert spec.names == ("weight", "log_scale", "proj.weight", "proj.bias")
    assert spec.numels == (20, 5, 10, 2) and spec.offsets == (0, 20, 25, 35, 37) and spec.dim == 37
    assert spec.slice("proj.weight") == slice(25, 35)
    V = torch.randn(3, 2, 37)
    named = spec.unflatten(V)
    assert named["weight"].shape == (3, 2, 5, 4) and named["proj.bias"].shape == (3, 2, 2)
    assert torch.equal(named["weight"][1, 0], V[1, 0, :20].reshape(5, 4))  # row-major per tensor
    assert torch.equal(spec.flatten(named), V)


def test_layers_and_blocks():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Sequential(nn.Conv1d(1, 2, 2), nn.Flatten()),
                          nn.Linear(6, 2, bias=False))
    spec = ParamSpec.from_model(model)
    assert spec.layers() == {"0": ("0.weight", "0.bias"), "2.0": ("2.0.weight", "2.0.bias"), "3": ("3.weight",)}
    tensor_blocks, layer_blocks = spec.blocks("tensor"), spec.blocks("layer")
    assert list(tensor_blocks) == list(spec.names)
    assert tensor_blocks["0.bias"].tolist() == [12, 13, 14, 15]
    assert layer_blocks["0"].tolist() == list(range(16)) and layer_blocks["3"].tolist() == list(range(22, 34))
    for blocks in (tensor_blocks, layer_blocks):
        assert torch.equal(torch.cat(list(blocks.values())), torch.arange(spec.dim))
    assert spec.indices(["3.weight", "0.bias"]).tolist() == [*range(22, 34), 12, 13, 14, 15]  # the order given
    assert layer_of("2.0.weight") == "2.0" and layer_of("weight") == ""
    assert ParamSpec.from_model(GatedNet(4, 5, 2)).layers() == {"": ("weight", "log_scale"),
                                                                "proj": ("proj.weight", "proj.bias")}
    with pytest.raises(InputError, match="unknown block grouping 'module'.*'tensor', 'layer'"):
        spec.blocks("module")


def test_subset_keeps_model_order_and_frozen_parameters_are_left_out():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert ParamSpec.from_model(model, ["2.bias", "0.weight"]).names == ("0.weight", "2.bias")
    model[0].bias.requires_grad_(False)
    assert ParamSpec.from_model(model).names == ("0.weight", "2.weight", "2.bias")


@pytest.mark.parametrize("kind", ["true", "mc", "empirical", "ggn"])
@pytest.mark.parametrize("name", ["mlp", "custom"])
def test_parameter_subset_is_sub_block(problems, name, kind):
    p = problems(name)
    names = [n for n, _ in p.model.named_parameters()]
    subset = [names[-1], names[1]]  # out of order on purpose
    full = p.fisher(kind, engine_kw={"seed": 1, "mc_samples": 2}).to_dense()
    engine = p.engine(kind, params=subset, seed=1, mc_samples=2)
    sub = fisher(p.model, p.data, p.likelihood, kind=kind, params=subset, seed=1, mc_samples=2).to_dense()
    spec = ParamSpec.from_model(p.model)
    ix = torch.cat([torch.arange(spec.slice(n).start, spec.slice(n).stop) for n in engine.spec.names])
    assert engine.spec.names == (names[1], names[-1])
    ref.assert_close(sub, full[ix][:, ix], 1e-12, f"{name} {kind} subset")
    if kind != "mc":
        ref.assert_close(sub, p.reference(kind, names=subset), 1e-10, "subset vs reference")


def test_frozen_parameters_are_constants():
    case = CASES_BY_NAME["mlp"]
    model, X, y = case.build()
    full = fisher(model, (X, y), "categorical").to_dense()
    model[2].weight.requires_grad_(False)
    F = fisher(model, (X, y), "categorical")
    spec = ParamSpec.from_model(model)
    assert "2.weight" not in F.spec.names and F.spec.dim == spec.dim == 99 - 36
    keep = torch.cat([torch.arange(0, 36), torch.arange(72, 99)])  # all but 2.weight (6×6, offsets 36..72)
    ref.assert_close(F.to_dense(), full[keep][:, keep], 1e-12, "frozen")


def test_all_finite_vouches_only_for_finite_entries():
    """all_finite against the entry-wise check: True only if every entry is finite (nan_only: no NaN)."""
    gen = torch.Generator().manual_seed(0)
    big = torch.finfo(torch.float32).max
    specials = [float("nan"), float("inf"), -float("inf")]
    for trial in range(60):
        tensors = [torch.randn(int(torch.randint(1, 40, (1,), generator=gen)), generator=gen,
                               dtype=[torch.float32, torch.float64, torch.float16][trial % 3]) for _ in range(3)]
        if trial % 4 == 1:
            t = tensors[trial % 3]
            t[int(torch.randint(t.numel(), (1,), generator=gen))] = specials[trial % 3]
        if trial % 4 == 2:  # finite entries whose float32 sum overflows: the sums cannot vouch, the entries are fine
            tensors[0] = torch.full((4,), big)
        entry_wise = all(bool(torch.isfinite(t).all()) for t in tensors)
        no_nan = all(not bool(t.isnan().any()) for t in tensors)
        if trial % 4 == 2:
            assert entry_wise and not all_finite(tensors)
        else:
            assert all_finite(tensors) == entry_wise
            assert all_finite([], nan_only=tensors) == no_nan
    assert all_finite([], nan_only=[torch.tensor([-float("inf"), 1.0])])  # an additive mask's -inf is no NaN
    for dtype in (torch.float32, torch.float64):  # both infinities in one mask: their norm is inf, not NaN
        assert all_finite([], nan_only=[torch.tensor([-float("inf"), float("inf"), 1.0], dtype=dtype)])
    assert all_finite([torch.full((2,), 60000.0, dtype=torch.float16)])  # half precision summed in float32
    assert all_finite([torch.arange(3)], nan_only=[torch.arange(3)])  # integer tensors are not read
    assert all_finite([torch.tensor([1 + 2j])]) and not all_finite([torch.tensor([complex(1, float("nan"))])])


def test_check_model_passes_finite_extremes_and_masks():
    """Finite parameters whose sum overflows, and a buffer holding ±inf (no NaN), pass check_model; NaN still fails."""
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(torch.finfo(torch.float32).max)
    model.register_buffer("mask", torch.tensor([-float("inf"), float("inf"), 0.0]))
    check_model(model)
    model.mask[2] = float("nan")
    with pytest.raises(NonFiniteError, match="buffer 'mask' contains NaN values"):
        check_model(model)
    model.mask[2] = 0.0
    with torch.no_grad():
        model[1].bias[0] = -float("inf")
    with pytest.raises(NonFiniteError, match="parameter '1.bias' contains NaN or infinite values"):
        check_model(model)
