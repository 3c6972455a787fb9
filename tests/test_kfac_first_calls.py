"""The layer-row probe reads the engine's first evaluation (no forward pass of its own), and the flat indices of a
layer-wise structure are formed by the structure (after its pass), not before.

The engine records, on its first evaluation of the first samples, the calls of the modules that own the selected
parameters (``FisherEngine.first_calls``); the probe of the layer-row passes (which norms a pass carries, the chunk
size, the cloning of outputs an in-place operation alters, the refusal of a layer called twice) takes that record
once, before or after the first pass over the data (the engine keeps it until a probe takes it), and a later probe
of the engine makes its own pass. Either way the factors and exact blocks are the float64 brute-force references'
(per-sample loops, ``layer_reference``; the exact Fisher, ``reference``).
"""

from __future__ import annotations

import warnings

import layer_reference as lref
import pytest
import reference as ref
import torch
from torch import nn

from fisherlab import fisher
from fisherlab.engine import FisherEngine, ModuleCalls
from fisherlab.errors import UnsupportedLayerError
from fisherlab.layers import LayerCapture, iter_layer_rows, layer_layouts
from fisherlab.structures.kfac import KFACFisher
from fisherlab.structures.layerwise import LayerIndex

F64 = torch.float64
RTOL = 1e-10


def _norm_net(inplace: bool) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(inplace=inplace), nn.Linear(4, 2)).to(F64)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5), model[1].bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("pass_first", [False, True])
def test_first_probe_reads_the_first_evaluation_before_or_after_the_first_pass(inplace, pass_first):
    """A KFAC of an engine runs no probe pass (the model sees the construction's 2 samples, then the chunks), also
    after a complete first pass (the gradient's); a second probe of the engine (other layers) makes its own pass
    of 2 samples. The factors and the LayerNorm block are the references' of the same model without in-place
    operations, and the in-place ReLU (which alters the LayerNorm's output) is found by the record: the chunks
    are captured on clones at once (not again)."""
    X, y = torch.randn(6, 3, dtype=F64), torch.randn(6, 2, dtype=F64)
    plain, model = _norm_net(False), _norm_net(inplace)
    lik = ref.RefLikelihood("gaussian")
    exact = ref.empirical_fisher(plain, X, y, lik)
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        eng = FisherEngine(model, (X, y), "gaussian", kind="empirical")
        assert calls == [2]
        if pass_first:
            eng.loss_and_gradient()
        calls.clear()
        K = KFACFisher.from_engine(eng, chunk_size=3)
        assert calls == [3, 3], calls
        assert eng.first_calls is None  # read by the probe
        cloned = [v[1] for k, v in eng._probes.items() if k[0] == "iter_layer_rows" and k[2]]  # with the norm
        assert cloned and all(c is inplace for c in cloned)
        calls.clear()
        layouts = {p: f for p, f in layer_layouts(model, eng.spec)[0].items() if p == "3"}
        list(iter_layer_rows(eng, layouts, chunk_size=3))
        assert calls == [2, 3, 3], calls  # other layers: a probe pass of its own
    finally:
        handle.remove()
    ix = K.index["1"]
    ref.assert_close(K.exact_blocks["1"], exact[ix][:, ix], RTOL, f"LayerNorm block, inplace={inplace}")
    for layer in ("0", "3"):
        A, S = lref.kfac_factors(plain, layer, X, y, lik, "empirical")
        ref.assert_close(K.factors[layer].A, A, RTOL, f"A of layer {layer}, inplace={inplace}")
        ref.assert_close(K.factors[layer].S, S, RTOL, f"S of layer {layer}, inplace={inplace}")


class _TwiceEach(nn.Module):
    """a, b, b, a: b is the first layer whose second call comes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.a(torch.tanh(self.b(torch.tanh(self.b(self.a(x))))))


@pytest.mark.parametrize("pass_first", [False, True])
def test_layer_called_twice_refused_by_the_record_as_by_a_capture(pass_first):
    """Both layers are called twice; the refusal names the one called twice first ('b'), whether the probe reads
    the first evaluation or captures its own pass; a dense Fisher of the same engine is unaffected."""
    torch.manual_seed(0)
    model = _TwiceEach().to(F64)
    X, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    eng = FisherEngine(model, (X, y), "gaussian", kind="empirical")
    assert eng.first_calls is not None and eng.first_calls.repeated == ["b", "a"]
    if pass_first:
        eng.loss_and_gradient()
    with pytest.raises(UnsupportedLayerError, match=r"'b' \(Linear\) is called more than once"):
        KFACFisher.from_engine(eng)
    dense = fisher(model, (X, y), "gaussian", kind="empirical", structure="dense")
    ref.assert_close(dense.to_dense(), ref.empirical_fisher(model, X, y, ref.RefLikelihood("gaussian")), RTOL)


class _Gated(nn.Module):
    """A module with parameters that returns a tuple and is called with a keyword argument (no rule)."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d, dtype=F64) * 0.5)

    def forward(self, *, h):
        return h * torch.sigmoid(self.w), self.w


class _OpaqueNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)  # registered before the layers it follows
        self.gate = _Gated(4)
        self.first = nn.Linear(3, 4)
        with torch.no_grad():  # a parameter that is not contiguous in memory
            self.first.weight = nn.Parameter(torch.randn(3, 4, dtype=F64).t())

    def forward(self, x):
        h, _ = self.gate(h=torch.tanh(self.first(x)))
        return self.head(h)


def test_modules_called_on_other_than_tensors_and_unordered_noncontiguous_parameters():
    """The record notes a module called without a positional tensor, returning a tuple, and the probe still reads
    the record (that module gets an exact block from factor rows, unsupported='block'); parameters registered in
    another order than called, one of them not contiguous. KFAC's factors are the brute-force references', the
    gate's block the exact Fisher's, and the flat indices (formed after the pass) the parameters' offsets."""
    torch.manual_seed(0)
    model = _OpaqueNet().to(F64)
    assert not model.first.weight.is_contiguous()
    X, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    lik = ref.RefLikelihood("gaussian")
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        eng = FisherEngine(model, (X, y), "gaussian", kind="true")
        assert eng.first_calls is not None and eng.first_calls.opaque == {"gate"}
        K = KFACFisher.from_engine(eng, unsupported="block")
    finally:
        handle.remove()
    # the construction's 2 samples, the exact block's factor rows and the layer pass: no probe pass of 2 samples
    assert calls[0] == 2 and calls.count(2) == 1, calls
    assert isinstance(K.index, LayerIndex)
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    expected = {"head": torch.cat([offsets["head.weight"], offsets["head.bias"]]), "gate": offsets["gate.w"],
                "first": torch.cat([offsets["first.weight"], offsets["first.bias"]])}
    assert list(K.index) == ["head", "first", "gate"] and "gate" in K.index and "cell" not in K.index
    for path, ix in expected.items():
        assert torch.equal(K.index[path], ix), path
    exact = ref.true_fisher(model, X, lik)
    ix = expected["gate"]
    ref.assert_close(K.exact_blocks["gate"], exact[ix][:, ix], RTOL, "exact block of the gate")
    D = K.to_dense()
    for layer in ("head", "first"):
        names = [f"{layer}.weight", f"{layer}.bias"]
        A, S = lref.kfac_factors(model, layer, X, y, lik, "true")
        rows, cols, _ = lref.wbar_coords(model, layer, names)
        ix = expected[layer]
        ref.assert_close(D[ix][:, ix], lref.kron_block(A, S, rows, cols), RTOL, f"KFAC block of {layer}")


class _NumpyNet(nn.Module):
    """A forward pass that leaves torch (numpy): it cannot run with gradients, only without."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = self.lin(x)
        return torch.from_numpy(h.numpy().copy()) if not h.requires_grad else torch.from_numpy(h.numpy())


def test_first_evaluation_that_cannot_take_gradients_falls_back_to_a_plain_one():
    """The construction's recorded pass needs gradients; where it fails the first samples are evaluated as before
    (without), nothing is recorded, and the engine's outputs are the model's own."""
    torch.manual_seed(0)
    model = _NumpyNet().to(F64)
    X, y = torch.randn(4, 3, dtype=F64), torch.randn(4, 2, dtype=F64)
    eng = FisherEngine(model, (X, y), "gaussian", kind="empirical")
    assert eng.first_calls is None and eng.output_shape == (2,)
    with torch.no_grad():
        ref.assert_close(eng.forward(eng.params, X), model(X), 0.0, "outputs")


def _hooks(model: nn.Module) -> list[tuple[str, list, list, list]]:
    """Every module's forward, forward-pre and backward hooks, by path (what a context must leave as it was)."""
    return [(path, *(list(getattr(m, kind).items()) for kind in ("_forward_hooks", "_forward_hooks_with_kwargs",
                                                                 "_forward_pre_hooks", "_backward_hooks")))
            for path, m in model.named_modules()]


def _partly_scripted() -> nn.Sequential:
    """A Linear, then a ``torch.jit.script`` Linear: a forward hook can be registered on the first only."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's (torch >= 2.7)
        return nn.Sequential(nn.Linear(3, 4), torch.jit.script(nn.Linear(4, 2))).to(F64)


def test_a_model_that_refuses_a_hook_is_left_as_it_was():
    """The first evaluation's record cannot hook the scripted module: the hook already on the first Linear is
    removed (before: one more permanent hook per construction), nothing is recorded, and the engine works on the
    plain evaluation (its dense empirical Fisher is the per-sample reference's); KFAC refuses the scripted module
    by a named error (it has no layer rule), leaving the hooks as they were too."""
    model = _partly_scripted()
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
        model[1].register_forward_hook(lambda *a: None)  # the premise: torch refuses the hook
    before = _hooks(model)
    X, y = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    for _ in range(2):
        eng = FisherEngine(model, (X, y), "gaussian", kind="empirical")
        assert _hooks(model) == before and eng.first_calls is None
    dense = fisher(model, (X, y), "gaussian", kind="empirical", structure="dense")
    ref.assert_close(dense.to_dense(), ref.empirical_fisher(model, X, y, ref.RefLikelihood("gaussian")), RTOL)
    with pytest.raises(UnsupportedLayerError, match=r"module '1' \(RecursiveScriptModule\) has no Kronecker"):
        KFACFisher.from_engine(eng)
    assert _hooks(model) == before


def test_a_capture_that_cannot_hook_a_module_leaves_the_model_as_it_was():
    """A layer capture whose hooks are registered in turn — the attention's recomputing one (with kwargs), a
    Linear's — up to a scripted module that refuses one: torch's own error, and no hook left on any module."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2, batch_first=True), "lin": nn.Linear(4, 4),
                           "script": _partly_scripted()[1]})
    before = _hooks(model)
    capture = LayerCapture(model, ["attn", "lin", "script"])
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):
        with capture:
            pass
    assert capture.recomputed == {"attn"} and _hooks(model) == before


@pytest.mark.parametrize(("likelihood", "kind"), [("bernoulli", "true"), ("gaussian", "true"), ("gaussian", "ggn")])
def test_one_output_kfac_runs_no_probe_pass(likelihood, kind):
    """One output, so R = 1 for kind 'true' (a one-column factor) and 'ggn' (C = 1), though the kind alone does
    not say so: the layer-row passes use the kernels the construction measured, so KFAC's probe makes no forward
    pass (the model sees the construction's 2 samples, then the chunk; before, a 2-sample pass in between). The
    factors are the float64 per-sample references'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(F64)
    X = torch.randn(6, 3, dtype=F64)
    y = torch.randint(0, 2, (6, 1)).to(F64) if likelihood == "bernoulli" else torch.randn(6, 1, dtype=F64)
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        eng = FisherEngine(model, (X, y), likelihood, kind=kind)
        assert eng.rows_per_sample == 1 and not eng.reverse_only_rows
        K = KFACFisher.from_engine(eng)
    finally:
        handle.remove()
    assert calls == [2, 6], calls
    lik = ref.RefLikelihood(likelihood)
    z = torch.randn(1, dtype=F64)
    assert kind == "true" or torch.equal(lik.hessian(z, y[0]), lik.output_fisher(z))  # the Gaussian's ∇²ℓ = Λ
    for layer in ("0", "2"):  # so its GGN factors are the true Fisher's
        A, S = lref.kfac_factors(model, layer, X, y, lik, "true")
        ref.assert_close(K.factors[layer].A, A, RTOL, f"A of layer {layer}")
        ref.assert_close(K.factors[layer].S, S, RTOL, f"S of layer {layer}")


def test_module_calls_hook_a_module_shared_under_two_paths_under_each():
    """One module at two paths (``b`` is ``a``) is hooked under both, as ``get_submodule`` of each path finds it:
    each path records the module's two calls (counted by a hook of the test's own), the root path ``""`` its one."""
    torch.manual_seed(0)
    shared = nn.Linear(3, 3).to(F64)
    model = nn.Sequential()
    model.add_module("a", shared)
    model.add_module("b", shared)
    seen: list[int] = []
    own = shared.register_forward_hook(lambda m, i, o: seen.append(1))
    x = torch.randn(2, 3, dtype=F64)
    with ModuleCalls(model, ["a", "b", ""]) as calls:
        z = model(x)
    own.remove()
    assert len(seen) == 2 and not model._forward_hooks and not shared._forward_hooks
    assert calls.calls == {"a": 2, "b": 2, "": 1} and calls.repeated == ["a", "b"]
    torch.testing.assert_close(calls.records[""][1], z, rtol=0, atol=0)
    torch.testing.assert_close(calls.records["a"][0], x, rtol=0, atol=0)
    with pytest.raises(AttributeError, match="has no attribute `c`"), ModuleCalls(model, ["a", "c"]):
        pass
    assert not shared._forward_hooks
