"""Attention models: matrix-free products, CG NGD and fidelity against float64 brute-force references.

The references (tests/reference.py) build the dense Fisher from per-sample Jacobians by plain ``torch.autograd``
loops over samples and outputs, evaluating the model outside fisherlab (torch picks its own attention kernels
there); fisherlab's implicit F·v uses jvp + vjp under its differentiable-attention context.
"""

from __future__ import annotations

import math
import warnings

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from fisherlab import evaluate_fidelity, fisher, fisher_geometry
from fisherlab.data import make_sort_task
from fisherlab.engine import FisherEngine, differentiable_attention
from fisherlab.errors import FallbackWarning, UnsupportedLayerError
from fisherlab.models import build_model
from fisherlab.ngd import solve_ngd
from fisherlab.reconstruction import reconstruct
from fisherlab.reconstruction.local_layers import LocalFisherLinear

LAM = 0.1
CAT = ref.RefLikelihood("categorical")


def _tokens(n: int = 10, seed: int = 1):
    return make_sort_task(n, length=4, n_values=5, seed=seed, test_fraction=0.2)


def _gpt() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    data = _tokens()
    model = build_model("gpt", data, dtype=torch.float64, seed=3, n_layers=2, d_model=8, d_ff=12).eval()
    return model, data.X_train, data.y_train


class _MHA(nn.Module):
    """Embedding → causal nn.MultiheadAttention (need_weights=False: through SDPA) → mean over positions → Linear."""

    def __init__(self, vocab: int = 9, width: int = 8, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(torch.tanh(a).mean(1))


class _SDPA(nn.Module):
    """Float sequences → one causal F.scaled_dot_product_attention head (packed q, k, v) → last position → Linear."""

    def __init__(self, features: int = 3, width: int = 6, classes: int = 4):
        super().__init__()
        self.qkv = nn.Linear(features, 3 * width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.head(F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, -1])


class _Encoder(nn.Module):
    """nn.TransformerEncoder of two post-LN ReLU layers (the fused fast-path configuration) → flatten → Linear."""

    def __init__(self, width: int = 4, length: int = 3, classes: int = 3):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, 2, 6, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width * length, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).flatten(1))


def _classifier() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """fisherlab's EncoderClassifier (nn.TransformerEncoder over token + position embeddings, mean-pooled)."""
    data = _tokens()
    model = build_model("encoder", data, dtype=torch.float64, seed=2, d_model=8, d_ff=12).eval()
    return model, data.X_train, data.y_train


def _case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    if name == "gpt":
        return _gpt()
    if name == "classifier":
        return _classifier()
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    if name == "mha":
        X = _tokens().X_train
        return _MHA().double().eval(), X, torch.randint(0, 5, (X.shape[0],), generator=g)
    if name == "sdpa":
        return (_SDPA().double().eval(), torch.randn(7, 5, 3, generator=g, dtype=torch.float64),
                torch.randint(0, 4, (7,), generator=g))
    return (_Encoder().double().eval(), torch.randn(6, 3, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g))


CASES = ("gpt", "classifier", "mha", "sdpa", "encoder")


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model, X, y = _case(request.param)
    return request.param, model, X, y, ref.true_fisher(model, X, CAT)


def test_implicit_products_equal_the_dense_reference(case) -> None:
    name, model, X, y, F_ref = case
    V = torch.randn(F_ref.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    implicit = fisher(model, (X, y), "categorical", structure="implicit", dtype=torch.float64)
    ref.assert_close(implicit @ V, F_ref @ V, 1e-10, f"{name}: implicit F·V")
    ref.assert_close(implicit @ V[:, 0], F_ref @ V[:, 0], 1e-10, f"{name}: implicit F·v")


def test_cg_ngd_equals_dense_cholesky_ngd(case) -> None:
    name, model, X, y, F_ref = case
    g = ref.loss_gradients(model, X, y, CAT).mean(0)
    eye = torch.eye(F_ref.shape[0], dtype=torch.float64)
    expected = torch.cholesky_solve(g.unsqueeze(1), torch.linalg.cholesky(F_ref + LAM * eye)).squeeze(1)
    engine = FisherEngine(model, (X, y), dtype=torch.float64)
    got, info = solve_ngd(engine, g, LAM, solver="cg", cg_tol=1e-13)
    assert info.solver == "cg" and info.iterations > 0
    ref.assert_close(got, expected, 1e-9, f"{name}: CG NGD")


@pytest.mark.parametrize("kind", ["ggn", "empirical"])
def test_gpt_other_kinds(kind: str) -> None:
    model, X, y = _gpt()
    F_ref = ref.fisher(kind, model, X, y, CAT)
    V = torch.randn(F_ref.shape[0], 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    implicit = fisher(model, (X, y), "categorical", kind=kind, structure="implicit", dtype=torch.float64)
    ref.assert_close(implicit @ V, F_ref @ V, 1e-10, f"gpt {kind}: implicit F·V")


def _attention_settings() -> tuple[bool, ...]:
    return (torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
            torch.backends.cuda.cudnn_sdp_enabled())


class _Probe(nn.Module):
    """Records the attention settings in force during each forward pass."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.seen: list[tuple[bool, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(_attention_settings())
        return self.lin(x)


@pytest.mark.parametrize("fastpath", [True, False])
def test_callers_attention_settings_are_restored(fastpath: bool) -> None:
    before_all = torch.backends.mha.get_fastpath_enabled()
    model = _Probe().double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # the caller's: no math
            caller = _attention_settings()
            assert caller == (fastpath, True, True, False, False)
            implicit = fisher(model, (X, y), "categorical", structure="implicit")
            implicit @ torch.ones(implicit.shape[0], dtype=torch.float64)
            assert _attention_settings() == caller
            with pytest.raises(KeyError), differentiable_attention():  # restored after an error too
                raise KeyError("inside")
            assert _attention_settings() == caller
    finally:
        torch.backends.mha.set_fastpath_enabled(before_all)
    assert model.seen and set(model.seen) == {(False, False, False, True, False)}  # inside: math only


def test_gradient_equals_the_per_sample_reference(case) -> None:
    """loss_and_gradient (one plain reverse pass on the caller's attention kernels) against autograd per sample."""
    name, model, X, y, _ = case
    engine = FisherEngine(model, (X, y), dtype=torch.float64, chunk_size=3)  # several chunks, and one (default)
    default = FisherEngine(model, (X, y), dtype=torch.float64)
    assert default.gradient_chunk_size() == X.shape[0] and engine.gradient_chunk_size() == 3
    expected = ref.loss_gradients(model, X, y, CAT).mean(0)
    z = ref.outputs(model, X)
    expected_loss = sum(CAT.nll(z[n], y[n]) for n in range(X.shape[0])) / X.shape[0]
    for e in (engine, default):
        loss, g = e.loss_and_gradient()
        ref.assert_close(g, expected, 1e-10, f"{name}: gradient")
        assert abs(float(loss - expected_loss)) <= 1e-12 * abs(float(expected_loss)), name


def test_gradient_runs_on_the_callers_sdpa_kernels() -> None:
    """The gradient's forward keeps the caller's SDPA backends (MHA fast path off); products stay on math SDPA."""
    before_all = torch.backends.mha.get_fastpath_enabled()
    model = _Probe().double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            caller = _attention_settings()
            engine = FisherEngine(model, (X, y), dtype=torch.float64)
            model.seen.clear()
            engine.loss_and_gradient()
            assert set(model.seen) == {(False, *caller[1:])}
            model.seen.clear()
            engine.matmat(torch.ones(engine.spec.dim, dtype=torch.float64))
            assert set(model.seen) == {(False, False, False, True, False)}
            assert _attention_settings() == caller
    finally:
        torch.backends.mha.set_fastpath_enabled(before_all)


def test_encoder_dense_path_agrees_and_fast_path_is_what_failed() -> None:
    """The fused encoder kernel has no forward-mode rule (what used to fail); fisherlab's path gives the reference."""
    model, X, y = _case("encoder")
    params = dict(model.named_parameters())
    tangent = {n: torch.ones_like(p) for n, p in params.items()}
    fn = lambda p: torch.func.functional_call(model, p, (X,))  # noqa: E731
    with torch.no_grad(), pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(fn, (params,), (tangent,))
    J = ref.jacobians(model, X)
    engine = FisherEngine(model, (X, y), dtype=torch.float64)
    _, jv = torch.func.jvp(lambda p: engine.forward(p, X), (engine.params,), (tangent,))
    ref.assert_close(jv, J @ torch.cat([t.reshape(-1) for t in tangent.values()]), 1e-12, "encoder J v")


# ------------------------------------------------------------------------------- no forward-mode rule at all
class _Softplus(torch.autograd.Function):
    """softplus with a backward (differentiable in its incoming gradient) and no jvp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class _OnceSoftplus(_Softplus):
    """The same with a backward torch cannot differentiate (a second VJP through it would be silently wrong)."""

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class _Custom(nn.Module):
    def __init__(self, fn: type[torch.autograd.Function]):
        super().__init__()
        self.a, self.b, self.fn = nn.Linear(4, 6), nn.Linear(6, 3), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.fn.apply(self.a(x)))


def _custom_case(fn):
    torch.manual_seed(2)
    model = _Custom(fn).double()
    g = torch.Generator().manual_seed(2)
    return model, torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)


def test_no_forward_rule_uses_two_vjps() -> None:
    model, X, y = _custom_case(_Softplus)
    F_ref = ref.true_fisher(model, X, CAT)
    V = torch.randn(F_ref.shape[0], 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    implicit = fisher(model, (X, y), "categorical", structure="implicit")
    with pytest.warns(FallbackWarning, match="two reverse passes"):
        got = implicit @ V
    ref.assert_close(got, F_ref @ V, 1e-10, "double-VJP F·V")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per engine
        ref.assert_close(implicit @ V[:, 1], F_ref @ V[:, 1], 1e-10, "double-VJP F·v")


def test_neither_rule_is_a_named_error_and_recorded_unavailable() -> None:
    model, X, y = _custom_case(_OnceSoftplus)
    implicit = fisher(model, (X, y), "categorical", structure="implicit")
    with pytest.raises(UnsupportedLayerError, match="adjoint check"):
        implicit @ torch.ones(implicit.shape[0], dtype=torch.float64)
    ds = evaluate_fidelity(model, (X, y), rules=("gd", "ngd", "lowrank"), damping=LAM, dtype=torch.float64,
                           progress=False)
    assert ds.available.sel(rule="lowrank") == 0 and ds.available.sel(rule="gd") == 1
    assert "UnsupportedLayerError: the matrix-free product F·v is unavailable, because" in str(
        ds.unavailable_reason.sel(rule="lowrank").values)


# ---------------------------------------------------------------------------------------- fidelity on the GPT
def test_evaluate_fidelity_on_the_gpt_by_the_implicit_path() -> None:
    model, X, y = _gpt()
    P = sum(p.numel() for p in model.parameters())
    F_ref = ref.true_fisher(model, X, CAT)
    g = ref.loss_gradients(model, X, y, CAT).mean(0)
    x = torch.linalg.solve(F_ref + LAM * torch.eye(P, dtype=torch.float64), g)
    budget = 8 * P * P // 2  # the dense P×P Fisher does not fit: exact NGD matrix-free (CG on F·v)
    ds = evaluate_fidelity(model, (X, y), rules=("gd", "ngd", "diag"), damping=LAM, dtype=torch.float64,
                           memory_budget=budget, cg_tol=1e-12, ngd_solver="cg", progress=False)
    assert ds.attrs["ngd_solver"] == "cg" and bool(ds.available.all())
    # auto takes the sample-space solve from layer rows there (m = N·C < P); same exact NGD
    auto = evaluate_fidelity(model, (X, y), rules=("gd",), damping=LAM, dtype=torch.float64, memory_budget=budget,
                             cg_tol=1e-12, progress=False)
    assert auto.attrs["ngd_solver"] == "gram"
    cos_gd = float(g @ x / (g.norm() * x.norm()))
    diag = g / (torch.diagonal(F_ref) + LAM)
    cos_diag = float(diag @ x / (diag.norm() * x.norm()))
    assert math.isclose(float(ds.cosine.sel(rule="gd", damping=LAM)), cos_gd, rel_tol=1e-9)
    assert math.isclose(float(ds.cosine.sel(rule="diag", damping=LAM)), cos_diag, rel_tol=1e-9)
    assert math.isclose(float(ds.cosine.sel(rule="ngd", damping=LAM)), 1.0, rel_tol=1e-12)
    assert math.isclose(float(auto.cosine.sel(rule="gd", damping=LAM)), cos_gd, rel_tol=1e-9)


# ------------------------------------------------------------------------------------ reconstruction of the GPT
def test_reconstructed_gpt_keeps_the_layer_interface_and_outputs() -> None:
    model, X, y = _gpt()
    net = reconstruct(model, (X, y), structure="kfac", damping=LAM)
    local = [n for n, m in net.net.named_modules() if isinstance(m, LocalFisherLinear)]
    assert local == [f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc",
                                                                           "mlp.proj")] + ["head"]
    assert "LocalFisherLinear" in str(net)
    inner, original = net.net.blocks[0].attn.qkv, model.blocks[0].attn.qkv
    assert isinstance(inner, LocalFisherLinear)
    assert (inner.in_features, inner.out_features) == (original.in_features, original.out_features)
    ref.assert_close(inner.weight, original.weight, 1e-13, "effective attn.qkv.weight")
    ref.assert_close(inner.bias, original.bias, 1e-13, "effective attn.qkv.bias")
    with pytest.raises(AttributeError, match="read-only"):
        inner.weight = original.weight.detach().clone()
    ref.assert_close(net(X), model(X), 1e-12, "reconstructed outputs")


def test_reconstructed_encoder_runs_torchs_fast_path_on_the_local_layers() -> None:
    model, X, y = _case("encoder")
    net = reconstruct(model, (X, y), structure="kfac", damping=LAM)
    inner, original = net.net.encoder.layers[0].linear1, model.encoder.layers[0].linear1
    assert isinstance(inner, LocalFisherLinear) and "LocalFisherLinear" in str(net)
    ref.assert_close(inner.weight, original.weight, 1e-13, "effective linear1.weight")
    ref.assert_close(inner.bias, original.bias, 1e-13, "effective linear1.bias")
    with torch.no_grad():  # eval + no grad: torch's encoder fast path reads linear1.weight / .bias
        ref.assert_close(net(X), model(X), 1e-12, "reconstructed outputs (no grad)")
    ref.assert_close(net(X), model(X), 1e-12, "reconstructed outputs")


@pytest.mark.parametrize("structure", ["dense", "diag", "kfac"])
def test_reconstructed_gpt_gd_step_is_the_structures_ngd_step(structure: str) -> None:
    model, X, y = _gpt()
    lr = 0.3
    g = ref.loss_gradients(model, X, y, CAT).mean(0)
    net = reconstruct(model, (X, y), structure=structure, damping=LAM)  # no fallback: every module has a rule
    if structure == "kfac":  # the structure's own solve (its factors are checked against references in test_kfac)
        expected = -lr * fisher(model, (X, y), structure="kfac", dtype=torch.float64).solve(
            g, damping=LAM)
    else:
        F_ref = ref.true_fisher(model, X, CAT)
        G = F_ref if structure == "dense" else torch.diag(torch.diagonal(F_ref))
        expected = -lr * torch.linalg.solve(G + LAM * torch.eye(len(G), dtype=torch.float64), g)
    ref.assert_close(net.gd_update((X, y), lr), expected, 1e-10, f"{structure}: GD on θ' vs NGD step")


def test_lanczos_geometry_on_the_gpt_matches_the_dense_spectrum() -> None:
    model, X, y = _gpt()
    F_ref = ref.true_fisher(model, X, CAT)
    P = F_ref.shape[0]
    expected = torch.linalg.eigvalsh(F_ref + LAM * torch.eye(P, dtype=torch.float64))[-5:]
    ds = fisher_geometry(model, (X, y), structures=("diag",), damping=LAM, memory_budget=8 * P * P // 2,
                         num_eigs=10, progress=False)  # the dense Fisher does not fit: Lanczos on F·v
    got = torch.as_tensor(ds.eigenvalue.sel(structure="original", damping=LAM).values)
    ref.assert_close(got[~got.isnan()][-5:], expected, 1e-8, "top eigenvalues of F + λI by Lanczos")
