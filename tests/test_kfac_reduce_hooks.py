"""KFAC-reduce sums each layer's output gradients over the positions as they arrive in the reverse pass (issue 11).

``layer_rows(pool=True)`` with one cotangent row (R = 1: empirical, one MC sample) keeps Σ_l δ_{n,l} per layer
(:attr:`~fisherlab.layers.LayerRows.grad_sum`) instead of the (n, L, out) rows, from tensor hooks on the layer
outputs; the reverse pass is asked only for the lowest captured outputs (:func:`~fisherlab.layers._lowest_outputs`).

References: the float64 per-sample loop of tests/test_kfac_weight_sharing.py (hooks record each layer's input and
output, one ``torch.autograd.grad`` per model output, A_reduce and S_reduce formed by hand as Eschenhagen et al.
(2023) define them), on a model whose layers sit on parallel branches (two embeddings, a side Linear joining
later, a LayerNorm, a MultiheadAttention); the input factor of a padded batch against the data-derived formula of
tests/test_kfac_padding.py; the graph walk against hand-built graphs. The pooled pass also equals the full rows
summed afterwards, bit for bit (the same operations on the same gradients).
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
from test_kfac_padding import padded_case
from test_kfac_padding import reference_factors as padded_reference
from test_kfac_weight_sharing import module_flat, reference_factors, sub
from torch import Tensor, nn

import fisherlab.layers as layers_module
from fisherlab import fisher
from fisherlab.engine import FisherEngine
from fisherlab.layers import _lowest_outputs, layer_layouts, layer_rows, norm_gradients, reduce_inputs
from fisherlab.structures.kfac import KFACFisher

F64 = torch.float64
CAT = ref.RefLikelihood("categorical")
VOCAB, T, WIDTH, CLASSES = 6, 5, 4, 3
LAYERS = ("embed", "position", "fc", "side", "attn", "attn.out_proj", "head")


class Branchy(nn.Module):
    """Ids (N, T) → token + position embeddings → LayerNorm → fc (tanh) + side → [self-attention] → mean → head.

    ``embed`` and ``position`` lie on parallel branches (neither below the other), ``side`` joins ``fc`` from the
    embeddings, so the lowest captured outputs are the two embeddings and the LayerNorm's.
    """

    def __init__(self, attention: bool = True) -> None:
        super().__init__()
        self.attention = attention
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Embedding(T, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.side = nn.Linear(WIDTH, WIDTH, bias=False)
        self.attn = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        e = self.embed(x) + self.position(torch.arange(x.shape[1], device=x.device).expand_as(x))
        h = torch.tanh(self.fc(self.norm(e))) + self.side(e)
        return self.head((self.attn(h, h, h, need_weights=False)[0] if self.attention else h).mean(1))


def branchy_problem(n: int = 6, attention: bool = True) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(3)
    model = Branchy(attention).to(F64).eval()
    return model, torch.randint(0, VOCAB, (n, T)), torch.randint(0, CLASSES, (n,))


def rows_both_ways(model: nn.Module, X: Tensor, y: Tensor, kind: str) -> tuple[dict, dict]:
    """One chunk's rows with and without ``pool`` (every layer masked: its δ rows mark the live positions)."""
    engine = FisherEngine(model, (X, y), "categorical", kind=kind, dtype=F64, progress=False)
    layouts, _ = layer_layouts(model, engine.spec)
    x, y, labels = next(iter(engine.chunks(None, chunk_size=X.shape[0])))  # (the MC labels drawn)
    norms = {"norm": ("norm.weight", "norm.bias")} if hasattr(model, "norm") else {}
    return tuple(layer_rows(engine, layouts, x, y, labels, pool=pool, masked=list(layouts), norms=norms)
                 for pool in (True, False))


def test_pooled_reduce_factors_equal_the_per_sample_loop() -> None:
    """(The loop reference covers Embedding and Linear layers: the model without its attention.)"""
    model, X, y = branchy_problem(attention=False)
    layers = [p for p in LAYERS if not p.startswith("attn")]
    pooled, _ = rows_both_ways(model, X, y, "empirical")
    assert set(pooled) == set(layers)
    for p in layers:  # the pooled pass ran: no (n, L, out) rows kept, the dense inputs averaged (L = T; head: 1)
        r, out = pooled[p], model.get_submodule(p).weight.shape[1 if p in ("embed", "position") else 0]
        assert r.grads is None and r.grad_sum.shape == (1, X.shape[0], out), p
        assert r.outputs.shape == (X.shape[0], 1 if p == "head" else T, 0), p
        assert r.unfolded.shape[1] == (T if p in ("embed", "position") else 1), p  # (ids kept as they are)
    expected = reference_factors(model, X, y, CAT, "empirical", tuple(layers))
    kf = fisher(model, (X, y), "categorical", kind="empirical", structure="kfac", approx="reduce", dtype=F64,
                progress=False)
    for p in layers:
        ref.assert_close(kf.factors[p].A, expected[p]["A_reduce"], 1e-10, f"A of {p}")
        ref.assert_close(kf.factors[p].S, expected[p]["S_reduce"], 1e-10, f"S of {p}")


def test_hooks_sum_on_one_thread_of_two(monkeypatch) -> None:
    """On two intra-op threads each hook's position sums run on one thread (``serial``: no parallel region) and the
    pass ends on two again; the factors are still the float64 per-sample loop's and the LayerNorm's exact block the
    per-sample autograd empirical Fisher's (the model without its attention, which the loop does not cover)."""
    seen: list[int] = []
    for name in ("_pool_grads", "_pooled_norm_rows"):
        inner = getattr(layers_module, name)
        monkeypatch.setattr(layers_module, name, lambda *a, inner=inner: (seen.append(torch.get_num_threads()),
                                                                          inner(*a))[1])
    model, X, y = branchy_problem(attention=False)
    layers = [p for p in LAYERS if not p.startswith("attn")]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kf = fisher(model, (X, y), "categorical", kind="empirical", structure="kfac", approx="reduce", dtype=F64,
                    progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1] * (len(layers) + 1), seen  # every layer's hook and the norm's, each on one thread
    expected = reference_factors(model, X, y, CAT, "empirical", tuple(layers))
    for p in layers:
        ref.assert_close(kf.factors[p].A, expected[p]["A_reduce"], 1e-10, f"A of {p}")
        ref.assert_close(kf.factors[p].S, expected[p]["S_reduce"], 1e-10, f"S of {p}")
    exact = ref.fisher("empirical", model, X, y, CAT)
    ref.assert_close(kf.exact_blocks["norm"], sub(exact, module_flat(model, "norm")), 1e-10, "LayerNorm block")


def test_pooled_pass_equals_the_full_rows_summed_bit_for_bit() -> None:
    """Σ_l δ from the hooks = the full rows' sum, the norms' rows and the live positions unchanged (float64 and 32)."""
    for model, X, y in (branchy_problem(), (lambda m, X, y: (m.float(), X, y))(*branchy_problem())):
        for kind in ("empirical", "mc"):
            pooled, full = rows_both_ways(model, X, y, kind)
            assert set(pooled) == set(full) == set(LAYERS)
            for p in LAYERS:
                assert pooled[p].grads is None and torch.equal(pooled[p].grad_sums(), full[p].grads.sum(2)), (kind, p)
                assert pooled[p].outputs.shape == (*full[p].outputs.shape[:2], 0)
                assert torch.equal(reduce_inputs(pooled[p].unfolded, F64), reduce_inputs(full[p].unfolded, F64))
            names = ["weight", "bias"]
            assert pooled.norms["norm"].grads is None and list(pooled.norms) == list(full.norms) == ["norm"]
            assert torch.equal(norm_gradients(pooled.norms["norm"], names), norm_gradients(full.norms["norm"], names))
            assert pooled.live == full.live == {T: None}  # no δ row is zero: every position live


def test_padded_batch_pooled_equals_full_rows_and_the_data_derived_input_factor() -> None:
    """Right padding (tests/test_kfac_padding.py): the live positions come from the hooks' δ sums' rows."""
    model, X, y = padded_case()
    engine = FisherEngine(model, (X, y), "categorical", kind="empirical", dtype=F64, progress=False)
    pooled = KFACFisher.from_engine(engine, approx="reduce")
    full, _ = KFACFisher.factor_pass(engine, "reduce", "error", None, keep_bytes=2**30)  # EKFAC's: rows kept
    expected = padded_reference(model, X, y, list(pooled.factors), "reduce")
    for p, f in pooled.factors.items():
        assert torch.equal(f.A, full.factors[p].A) and torch.equal(f.S, full.factors[p].S), p
        A_ref = expected[p][0]
        assert torch.linalg.norm(f.A - A_ref) <= 1e-12 * torch.linalg.norm(A_ref), p
    rows, full_rows = rows_both_ways(model, X, y, "empirical")
    assert rows.live.keys() == full_rows.live.keys() and rows.live[X.shape[1]] is not None
    assert all(torch.equal(rows.live[L], full_rows.live[L]) for L in rows.live)


def test_a_layer_the_output_ignores_gets_zero_sums() -> None:
    class Dead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.dead, self.head = nn.Linear(3, 4), nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            self.dead(x)  # called, its output unused
            return self.head(torch.tanh(self.fc(x)).mean(1))

    torch.manual_seed(0)
    model, X, y = Dead().to(F64), torch.randn(4, 5, 3, dtype=F64), torch.randint(0, 2, (4,))
    engine = FisherEngine(model, (X, y), "categorical", kind="empirical", dtype=F64, progress=False)
    layouts, _ = layer_layouts(model, engine.spec)
    rows = layer_rows(engine, layouts, X, y, None, pool=True, masked=["fc", "dead"])
    assert torch.equal(rows["dead"].grad_sum, torch.zeros(1, 4, 2, dtype=F64))
    assert rows.live == {5: None}  # the live positions of fc (all) are not taken away by dead's zeros
    K = fisher(model, (X, y), "categorical", kind="empirical", structure="kfac", approx="reduce", dtype=F64,
               progress=False)
    assert torch.equal(K.factors["dead"].S, torch.zeros(2, 2, dtype=F64))


def test_lowest_outputs_of_hand_built_graphs() -> None:
    w, v = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    a = w * x  # below b
    b = a.sin()
    c = v * x  # a parallel branch
    d = (b * c).exp()  # above both
    z = (d + b).sum()
    assert _lowest_outputs(z, [a, b, c, d]) == {0, 2}
    assert _lowest_outputs(z, [d, b]) == {1}
    assert _lowest_outputs(z, [d, c, a]) == {1, 2}
    unused = w * 2  # off every path from z: lowest, asked for (its gradient is zero)
    assert _lowest_outputs(z, [unused, d, b]) == {0, 2}
    assert _lowest_outputs(z, [w, b]) == {0, 1}  # a leaf has no node: lowest


def test_an_in_place_activation_after_a_layer_changes_nothing() -> None:
    """ReLU(inplace=True) on a layer's output: the pass is captured on clones; pooled = full rows, bit for bit."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 4), nn.Flatten(), nn.Linear(24, 2))
    model = model.to(F64)
    X, y = torch.randn(4, 6, 3, dtype=F64), torch.randint(0, 2, (4,))
    pooled, full = rows_both_ways(model, X, y, "empirical")
    assert pooled.cloned_outputs and full.cloned_outputs
    for p in ("0", "2", "4"):
        assert pooled[p].grads is None and torch.equal(pooled[p].grad_sums(), full[p].grads.sum(2)), p
        assert torch.equal(reduce_inputs(pooled[p].unfolded, F64), reduce_inputs(full[p].unfolded, F64)), p


def test_a_norm_first_and_an_unused_norm() -> None:
    """A LayerNorm on the raw input (its output the lowest one asked for) and one whose output is not used."""

    class NormFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.spare = nn.LayerNorm(3), nn.LayerNorm(3)
            self.fc, self.head = nn.Linear(3, 4), nn.Linear(24, 2)

        def forward(self, x: Tensor) -> Tensor:
            self.spare(x)  # called, its output unused
            return self.head(torch.tanh(self.fc(self.norm(x))).flatten(1))

    torch.manual_seed(2)
    model, X, y = NormFirst().to(F64), torch.randn(4, 6, 3, dtype=F64), torch.randint(0, 2, (4,))
    engine = FisherEngine(model, (X, y), "categorical", kind="empirical", dtype=F64, progress=False)
    layouts, _ = layer_layouts(model, engine.spec)
    norms = {p: (f"{p}.weight", f"{p}.bias") for p in ("norm", "spare")}
    pooled, full = (layer_rows(engine, layouts, X, y, None, pool=pool, masked=list(layouts), norms=norms)
                    for pool in (True, False))
    names = ["weight", "bias"]
    assert list(pooled.norms) == list(full.norms) == ["norm", "spare"]
    for p in norms:
        assert torch.equal(norm_gradients(pooled.norms[p], names), norm_gradients(full.norms[p], names)), p
    assert not norm_gradients(pooled.norms["spare"], names).any()
    for p in layouts:
        assert torch.equal(pooled[p].grad_sums(), full[p].grads.sum(2)), p


@pytest.mark.gpu
def test_pooled_pass_on_cuda_equals_the_full_rows() -> None:
    """On CUDA the hooks run on the autograd engine's device thread: the same sums and live positions."""
    model, X, y = branchy_problem()
    model, X, y = model.cuda(), X.cuda(), y.cuda()
    pooled, full = rows_both_ways(model, X, y, "empirical")
    for p in LAYERS:
        assert pooled[p].grads is None and pooled[p].grad_sum.is_cuda, p
        torch.testing.assert_close(pooled[p].grad_sums(), full[p].grads.sum(2), rtol=1e-12, atol=0)
    assert pooled.live == full.live == {T: None}
