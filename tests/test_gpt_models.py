"""The transformers of fisherlab.models (GPT, EncoderClassifier) against independent float64 references.

The GPT reference below recomputes the forward pass from the parameter tensors with explicit formulas (row
indexing for embeddings, LayerNorm by its definition, attention one head at a time with an explicit causal mask and
softmax, GELU through erf): it checks the documented packing of ``attn.qkv`` (q, k, v blocks, heads by rows) and
the causal structure without calling SDPA. Causality is also checked by direct evaluation on edited inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, vmap

from fisherlab import fisher
from fisherlab import models as M
from fisherlab.data import make_sort_lm, make_sort_task, make_synthetic
from fisherlab.engine import differentiable_attention
from fisherlab.errors import InputError, UnsupportedLayerError

F64 = torch.float64


def _gpt(output: str = "sequence", **kwargs) -> M.GPT:
    options = {"vocab": 7, "seq_len": 6, "d_model": 8, "n_layers": 2, "n_heads": 2, "output": output, **kwargs}
    model = M.build_model("gpt", seed=4, dtype=F64, **options)
    with torch.no_grad():  # move the LayerNorm affine parameters off their (1, 0) initialisation
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=F64))
    return model.eval()


def _ids(n: int, T: int, vocab: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def _layer_norm(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + 1e-5) * w + b


def _reference_logits(model: M.GPT, x: torch.Tensor) -> torch.Tensor:
    """(B, T, n_outputs) next-token logits of ``model`` from its parameters, by the formulas of the docstring."""
    p = dict(model.named_parameters(remove_duplicate=False))
    B, T = x.shape
    d = model.embed.embedding_dim
    H = model.blocks[0].attn.n_heads
    dh = d // H
    h = p["embed.weight"][x] + p["position.weight"][:T]
    for i in range(len(model.blocks)):
        q_ = f"blocks.{i}."
        u = _layer_norm(h, p[q_ + "ln1.weight"], p[q_ + "ln1.bias"])
        qkv = u @ p[q_ + "attn.qkv.weight"].T + p[q_ + "attn.qkv.bias"]
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
        heads = []
        for j in range(H):
            cols = slice(j * dh, (j + 1) * dh)
            scores = q[..., cols] @ k[..., cols].transpose(1, 2) / math.sqrt(dh)  # (B, T, T): query s, key r
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
            weights = torch.exp(scores - scores.amax(-1, keepdim=True))
            heads.append((weights / weights.sum(-1, keepdim=True)) @ v[..., cols])
        h = h + torch.cat(heads, -1) @ p[q_ + "attn.proj.weight"].T + p[q_ + "attn.proj.bias"]
        u = _layer_norm(h, p[q_ + "ln2.weight"], p[q_ + "ln2.bias"])
        z = u @ p[q_ + "mlp.fc.weight"].T + p[q_ + "mlp.fc.bias"]
        z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
        h = h + z @ p[q_ + "mlp.proj.weight"].T + p[q_ + "mlp.proj.bias"]
    return _layer_norm(h, p["norm.weight"], p["norm.bias"]) @ p["head.weight"].T + p["head.bias"]


@pytest.mark.parametrize("kwargs", [{}, {"n_heads": 4, "d_ff": 5, "n_outputs": 3}, {"tie_embeddings": True}])
def test_gpt_equals_the_explicit_reference_in_both_output_modes(kwargs) -> None:
    model = _gpt(**kwargs)
    x = _ids(5, 6)
    expected = _reference_logits(model, x)
    with torch.no_grad():
        got = model(x)
        assert got.shape == (5, 6, model.n_outputs)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        model.output = M.GPTOutput.LAST
        last = model(x)
        assert last.shape == (5, model.n_outputs)
        torch.testing.assert_close(last, expected[:, -1], rtol=0, atol=1e-12)
        torch.testing.assert_close(model(x[:, :4]), _reference_logits(model, x[:, :4])[:, -1], rtol=0, atol=1e-12)


def test_gpt_is_causal_by_direct_evaluation() -> None:
    model = _gpt()
    x = _ids(4, 6, seed=1)
    with torch.no_grad():
        base = model(x)
        for t in range(6):
            edited = x.clone()
            edited[:, t] = (edited[:, t] + 1 + t % 5) % 7  # a different token at position t
            out = model(edited)
            assert torch.equal(out[:, :t], base[:, :t]), f"a logit before position {t} depends on token {t}"
            assert (out[:, t:] - base[:, t:]).abs().amax(-1).min() > 1e-6  # and every later position does
            model.output = M.GPTOutput.LAST  # the prefix alone gives the same logits at its last position
            torch.testing.assert_close(model(x[:, : t + 1]), base[:, t], rtol=0, atol=1e-12)
            model.output = M.GPTOutput.SEQUENCE


def test_gpt_per_sample_vmap_equals_the_batch() -> None:
    model = _gpt("last")
    x = _ids(5, 6, seed=2)
    params = dict(model.named_parameters())
    with differentiable_attention():  # the math SDPA kernel fisherlab's engines use (it has a batching rule)
        per_sample = vmap(lambda xi: functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0))(x)
    with torch.no_grad():
        torch.testing.assert_close(per_sample, model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs", [
    {"vocab": 7, "seq_len": 6},
    {"vocab": 11, "seq_len": 3, "d_model": 12, "n_layers": 3, "n_heads": 3, "d_ff": 7, "n_outputs": 4},
    {"vocab": 9, "seq_len": 5, "d_model": 8, "n_layers": 2, "tie_embeddings": True},
])
def test_parameter_count_formula(kwargs) -> None:
    model = M.GPT(**kwargs)
    count = sum(p.numel() for p in model.parameters())
    shape = {k: v for k, v in kwargs.items() if k != "n_heads"}
    assert count == M.gpt_param_count(**shape)
    L = kwargs.get("n_layers", 1)
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    assert per_block == (count - M.gpt_param_count(**{**shape, "n_layers": 0})) // L


def test_sizes_land_on_their_targets_on_the_meta_device() -> None:
    data = make_sort_lm(8)
    cases = [("10k", 1e4, data.meta["vocab"], data.input_shape[0], 10_361),
             ("1M", 1e6, 65, 64, 1_016_513), ("10M", 1e7, 65, 64, 10_722_113)]  # the counts GPT_SIZES documents
    for size, target, V, S, documented in cases:
        with torch.device("meta"):
            model = M.GPT(V, S, **M.GPT_SIZES[size])
        count = sum(p.numel() for p in model.parameters())
        assert next(model.parameters()).device.type == "meta"
        assert count == documented == M.gpt_param_count(V, S, M.GPT_SIZES[size]["d_model"],
                                                        M.GPT_SIZES[size]["n_layers"])
        assert abs(count / target - 1) < 0.2, (size, count)


def test_tied_embeddings_share_one_tensor() -> None:
    model = _gpt(tie_embeddings=True)  # built by build_model: cast to float64 after construction, still tied
    assert model.head.weight is model.embed.weight
    names = [n for n, _ in model.named_parameters()]
    assert "head.weight" not in names and "head.bias" in names
    with torch.no_grad():
        model.embed.weight[0, 0] += 1.0
    assert model.head.weight[0, 0] == model.embed.weight[0, 0]
    model(_ids(2, 3)).sum().backward()  # one gradient: the sum of the embedding's and the head's uses
    untied = _gpt()
    untied.load_state_dict({**model.state_dict(), "head.weight": model.embed.weight.detach().clone()})
    untied(_ids(2, 3)).sum().backward()
    torch.testing.assert_close(model.embed.weight.grad, untied.embed.weight.grad + untied.head.weight.grad,
                               rtol=0, atol=1e-12)


def test_build_model_picks_the_output_from_the_targets() -> None:
    lm, sort = make_sort_lm(12, length=3, n_values=4), make_sort_task(12, length=3, n_values=4)
    gpt_lm = M.build_model("gpt", lm)
    assert gpt_lm.output is M.GPTOutput.SEQUENCE and gpt_lm(lm.X_train).shape == (lm.n_train, 6, 5)
    gpt_cls = M.build_model("gpt", sort)
    assert gpt_cls.output is M.GPTOutput.LAST and gpt_cls(sort.X_train).shape == (sort.n_train, 4)
    enc = M.build_model("encoder", sort, n_layers=2)
    assert enc(sort.X_train).shape == (sort.n_train, 4)
    with pytest.raises(InputError, match="target per position"):
        M.build_model("encoder", lm)
    for name in ("gpt", "encoder"):
        with pytest.raises(InputError, match="needs token data"):
            M.build_model(name, make_synthetic("multiclass", n_samples=8))


def test_encoder_classifier_fast_path_and_independent_layers() -> None:
    model = M.build_model("encoder", vocab=7, seq_len=6, n_outputs=3, n_layers=2, seed=1, dtype=F64)
    w = [layer.linear1.weight for layer in model.encoder.layers]
    assert not torch.equal(w[0], w[1])  # initialised one by one, not deep copies of one layer
    x = _ids(4, 6, seed=3)
    slow = model(x)  # training mode, gradients on: the explicit path
    model.eval()
    with torch.no_grad():
        fast = model(x)  # eval without gradients: torch's fused encoder kernel
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=1e-10)
    encoded = model.encoder(model.embed(x) + model.position.weight[:6])
    torch.testing.assert_close(slow, model.head(encoded.mean(1)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [M.GPT, M.EncoderClassifier])
def test_bad_token_inputs_are_named_errors(cls) -> None:
    model = cls(7, 6, 3) if cls is M.EncoderClassifier else cls(7, 6)
    bad = {
        "float ids": (torch.zeros(2, 3), "int64 token ids"),
        "int32 ids": (torch.zeros(2, 3, dtype=torch.int32), "int64 token ids"),
        "one sequence without batch": (torch.zeros(3, dtype=torch.int64), r"shape \(B, T\)"),
        "too long": (torch.zeros(2, 7, dtype=torch.int64), "T ≤ seq_len = 6"),
        "empty": (torch.zeros(2, 0, dtype=torch.int64), "1 ≤ T"),
        "id = vocab": (torch.tensor([[0, 7]]), r"ids in \[0, vocab = 7\); got ids from 0 to 7"),
        "negative id": (torch.tensor([[-1, 2]]), "from -1 to 2"),
    }
    for what, (x, message) in bad.items():
        with pytest.raises(InputError, match=message):
            model(x)
            pytest.fail(what)


def test_bad_ids_are_refused_through_fisher_and_bad_options_at_construction() -> None:
    model = _gpt("last")
    with pytest.raises(InputError, match="vocab = 7"):
        fisher(model, (torch.tensor([[1, 2, 9]]), torch.tensor([0])), "categorical", structure="implicit")
    with pytest.raises(InputError, match="must divide d_model"):
        M.GPT(7, 6, d_model=10, n_heads=4)
    with pytest.raises(InputError, match="valid: \\['last', 'sequence'\\]"):
        M.GPT(7, 6, output="all")
    with pytest.raises(InputError, match="n_outputs == vocab"):
        M.GPT(7, 6, n_outputs=3, tie_embeddings=True)
    with pytest.raises(InputError, match="bool"):
        M.GPT(7, 6, tie_embeddings=1)
    with pytest.raises(InputError, match="EncoderClassifier n_layers"):
        M.EncoderClassifier(7, 6, 3, n_layers=0)


def _token_mean_fisher(model: M.GPT, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """F = (1/N_tok) Σ_n Σ_{t: y_nt ≠ −100} J_ntᵀ (diag p_nt − p_nt p_ntᵀ) J_nt, one autograd call per logit."""
    params = list(model.parameters())  # a tied tensor once: its gradient sums both uses
    P = sum(p.numel() for p in params)
    F_ref = torch.zeros(P, P, dtype=F64)
    for n in range(X.shape[0]):
        z = model(X[n : n + 1])[0]
        for t in (y[n] != -100).nonzero()[:, 0].tolist():
            J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(z[t, c], params, retain_graph=True)])
                             for c in range(z.shape[1])])
            p = torch.softmax(z[t], 0).detach()
            F_ref += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return F_ref / int((y != -100).sum())


@pytest.mark.parametrize("tied", [False, True])
def test_sequence_gpt_on_sort_lm_has_the_token_mean_fisher(tied: bool) -> None:
    """End to end with fisherlab's engine: (N, T, C) outputs, −100 on the prompt (the engine's sequence likelihood)."""
    data = make_sort_lm(6, length=3, n_values=4, seed=0)
    model = M.build_model("gpt", data, dtype=F64, d_model=8, d_ff=8, tie_embeddings=tied).eval()
    X, y = data.X_train, data.y_train
    F_ref = _token_mean_fisher(model, X, y)
    names = [n for n, _ in model.named_parameters()]  # a tied tensor once, as embed.weight
    dense = fisher(model, (X, y), "categorical", structure="dense", dtype=F64, params=names).to_dense()
    torch.testing.assert_close(dense, F_ref, rtol=0, atol=1e-12 * float(F_ref.abs().max()))
    if tied:  # a layer-wise structure cannot split one tensor between two layers: refused by name
        with pytest.raises(UnsupportedLayerError, match="tied weights"):
            fisher(model, (X, y), "categorical", structure="kfac", dtype=F64, params=names)
        return
    v = torch.randn(F_ref.shape[0], generator=torch.Generator().manual_seed(0), dtype=F64)
    implicit = fisher(model, (X, y), "categorical", structure="implicit", dtype=F64)
    torch.testing.assert_close(implicit @ v, F_ref @ v, rtol=0, atol=1e-10 * float((F_ref @ v).abs().max()))
