"""nn.MultiheadAttention has a Kronecker rule by default: KFAC/EKFAC/unit/diag on nn.TransformerEncoder, no fallback.

References (float64, independent of fisherlab's structure code): the true Fisher F by per-sample autograd loops
(tests/reference.py), the Kronecker factors (A, S) of every Linear/MHA layer from forward hooks and per-sample output
gradients (``test_reconstruct_transformer.kfac_factors``, Eschenhagen et al. 2023 expand/reduce). Then per layer:
kfac = S ⊗ A, ekfac = Q diag(Qᵀ F_l Q) Qᵀ with Q = Q_S ⊗ Q_A the factors' eigenvectors, unit = the exact
(width × width) blocks of F_l per row of W̄, diag = diag(F); the norms keep their exact blocks of F.
"""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch
from test_reconstruct_invariants import wbar_permutation
from test_reconstruct_transformer import kfac_factors, kronecker_modules, problem
from torch import Tensor, nn

from fisherlab import fisher
from fisherlab.errors import UnsupportedLayerError

DT = torch.float64
CAT = ref.RefLikelihood("categorical")
TOL = 1e-10


def layer_indices(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """Module path → (its flat indices in parameter order, p: flat[j] = W̄.reshape(-1)[p[j]])."""
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    offsets = dict(zip(names, [0, *torch.cumsum(torch.tensor(sizes), 0).tolist()], strict=False))
    out = {}
    for path in kronecker_modules(model):
        members = [n for n in names if n.rpartition(".")[0] == path]
        ix = torch.cat([torch.arange(offsets[n], offsets[n] + model.get_parameter(n).numel()) for n in members])
        out[path] = ix, wbar_permutation([model.get_parameter(n).shape for n in members])
    return out


def reference(structure: str, model: nn.Module, X: Tensor, y: Tensor, approx: str = "expand") -> Tensor:
    """The structure's undamped matrix (P, P) in parameter order, assembled from per-sample-loop references."""
    Fm = ref.true_fisher(model, X, CAT)
    if structure == "diag":
        return torch.diag(Fm.diagonal())
    owners = [n.rpartition(".")[0] for n, p in model.named_parameters() for _ in range(p.numel())]
    G = torch.where(torch.tensor([[a == b for b in owners] for a in owners]), Fm, 0.0)  # norms: exact blocks
    factors = kfac_factors(model, X, y, approx)
    for path, (ix, p) in layer_indices(model).items():
        A, S = factors[path]
        exact = torch.empty(len(p), len(p), dtype=DT)  # F_l in row-major W̄ order
        exact[p.unsqueeze(1), p.unsqueeze(0)] = Fm[ix.unsqueeze(1), ix.unsqueeze(0)]
        if structure == "kfac":
            block = torch.kron(S, A)
        elif structure == "unit":
            n = len(A)
            block = torch.where(torch.block_diag(*[torch.ones(n, n, dtype=DT)] * len(S)).bool(), exact, 0.0)
        else:
            Q = torch.kron(torch.linalg.eigh(S)[1].contiguous(), torch.linalg.eigh(A)[1].contiguous())
            block = Q @ torch.diag((Q.T @ exact @ Q).diagonal()) @ Q.T
        G[ix.unsqueeze(1), ix.unsqueeze(0)] = block[p][:, p]
    return G


@pytest.mark.parametrize(("structure", "approx"), [("kfac", "expand"), ("kfac", "reduce"), ("ekfac", "expand"),
                                                   ("unit", "expand"), ("diag", "expand")])
def test_transformer_encoder_structures_without_fallback(structure: str, approx: str) -> None:
    """Every layer of nn.TransformerEncoder (+ head) has a rule: no unsupported="block", the MHA factorised."""
    model, X, y, _, _ = problem("encoder")
    options = {"approx": approx} if structure == "kfac" else {}
    got = fisher(model, (X, y), structure=structure, dtype=DT, **options)
    if structure != "diag":
        assert {"layers.0.self_attn", "layers.0.self_attn.out_proj", "layers.1.linear1", "head"} <= set(got.factors)
        assert set(got.exact_blocks) == set(got.meta["norm_blocks"])  # only the norms keep exact blocks
    ref.assert_close(got.to_dense(), reference(structure, model, X, y, approx), TOL, structure)


def test_ekfac_is_closer_to_the_exact_layer_blocks_than_kfac_on_the_encoder() -> None:
    model, X, y, _, _ = problem("encoder")
    Fm = ref.true_fisher(model, X, CAT)
    kf, ek = (fisher(model, (X, y), structure=s, dtype=DT).to_dense() for s in ("kfac", "ekfac"))
    for path, (ix, _) in layer_indices(model).items():
        exact = Fm[ix][:, ix]
        err_k, err_e = ((M[ix][:, ix] - exact).norm() / exact.norm() for M in (kf, ek))
        assert err_e <= err_k + 1e-12, path


class PaddedAttention(nn.Module):
    """Embedding → self-attention with a key_padding_mask (bool: the keys of token 0 ignored, or additive) → head."""

    def __init__(self, additive: bool):
        super().__init__()
        self.additive = additive
        self.embed = nn.Embedding(5, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        pad = x == 0
        mask = torch.zeros(pad.shape, dtype=DT).masked_fill(pad, -math.inf) if self.additive else pad
        h = self.embed(x)
        return self.head(self.attn(h, h, h, key_padding_mask=mask, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("additive", [False, True])
def test_key_padding_mask_is_applied_as_torch_applies_it(additive: bool) -> None:
    """unit blocks = the exact sub-blocks of F (the recorded inputs and output gradients give the exact per-sample
    gradients, so the recomputed attention masks the keys as torch does); diag = diag(F)."""
    torch.manual_seed(2)
    model = PaddedAttention(additive).to(DT).eval()
    X = torch.tensor([[0, 1, 2, 3], [4, 0, 0, 1], [2, 3, 4, 1], [1, 0, 3, 2]])
    y = torch.tensor([0, 1, 2, 1])
    Fm = ref.true_fisher(model, X, CAT)
    unit = fisher(model, (X, y), structure="unit", dtype=DT).to_dense()
    assert "attn" in fisher(model, (X, y), structure="kfac", dtype=DT).factors
    ix, p = layer_indices(model)["attn"]
    rows = p // 7  # W̄ (18, 6 + 1): the row of each flat entry
    for r in range(18):
        block = ix[rows == r]
        ref.assert_close(unit[block][:, block], Fm[block][:, block], TOL, f"unit block of in_proj row {r}")
    ref.assert_close(fisher(model, (X, y), structure="diag", dtype=DT).to_dense(), torch.diag(Fm.diagonal()), TOL,
                     "diag")


class Decoder(nn.Module):
    """nn.TransformerDecoderLayer on (N, T, 6) against a fixed memory: its multihead_attn is cross-attention."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(6, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x, x.flip(1)).mean(1))


def test_decoder_cross_attention_is_named_or_an_exact_block() -> None:
    """A TransformerDecoderLayer's multihead_attn is cross-attention: refused by name, or under
    unsupported="block" an exact block of F (with its out_proj), while its self_attn is factorised."""
    model = Decoder().to(DT).eval()
    X, y = torch.randn(3, 4, 6, dtype=DT), torch.tensor([0, 1, 2])
    with pytest.raises(UnsupportedLayerError, match=r"'layer\.multihead_attn' \(MultiheadAttention\).*cross"):
        fisher(model, (X, y), structure="kfac", dtype=DT)
    kf = fisher(model, (X, y), structure="kfac", unsupported="block", dtype=DT)
    assert {"layer.multihead_attn", "layer.multihead_attn.out_proj"} <= set(kf.exact_blocks)
    assert "layer.self_attn" in kf.factors
    owners = [n.rpartition(".")[0] for n, p in model.named_parameters() for _ in range(p.numel())]
    Fm = ref.true_fisher(model, X, CAT)
    for path in ("layer.multihead_attn", "layer.multihead_attn.out_proj"):
        ix = torch.tensor([i for i, o in enumerate(owners) if o == path])
        ref.assert_close(kf.to_dense()[ix][:, ix], Fm[ix][:, ix], TOL, path)
