"""KFAC/EKFAC leave right padding out of the input factor (fisherlab issue 11): a causal GPT whose samples 0 and 1
end in padded tokens (target ignore_index), sample 2 with one ignored token in the middle (not padding).

The reference is an in-test loop over the counted tokens: per-token Jacobians of the logits with respect to each
layer's output (autograd, class by class), the softmax Fisher diag(p) − ppᵀ, and the layer inputs from forward
hooks. The positions kept in A come from the data, not from the gradients: in every layer, the positions up to each
sample's last counted token (a causal model: later positions reach no counted logit; earlier ones, the ignored
middle token included, reach the later counted logits through the attention).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fisherlab import fisher
from fisherlab.data import make_sort_lm
from fisherlab.models import build_model
from fisherlab.vocabulary import IGNORE_INDEX

F64 = torch.float64
PAD = 2  # right-padded tokens of samples 0 and 1


def padded_case() -> tuple[nn.Module, Tensor, Tensor]:
    """A 1-block causal GPT on 4 sort-lm sequences; samples 0 and 1 right-padded by PAD, sample 2's token 1 ignored."""
    split = make_sort_lm(n_samples=16, length=3, n_values=4, seed=1)
    X, y = split.X_train[:4].clone(), split.y_train[:4].clone()
    y[:2, -PAD:] = IGNORE_INDEX
    y[2, 1] = IGNORE_INDEX
    model = build_model("gpt", split, seed=2, dtype=F64, d_model=6, n_layers=1, n_heads=2, d_ff=8,
                        output="sequence").eval()
    return model, X, y


def reference_factors(model: nn.Module, X: Tensor, y: Tensor, paths: list[str], approx: str
                      ) -> dict[str, tuple[Tensor, Tensor]]:
    """(A, S) per layer from the formula, A over the positions up to each sample's last counted token."""
    records: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda m, i, o, p=p: records.__setitem__(p, (i[0], o))) for p in paths]
    z = model(X)
    for h in hooks:
        h.remove()
    counted = y != IGNORE_INDEX
    N_tok, N, T = int(counted.sum()), X.shape[0], X.shape[1]
    last = torch.stack([row.nonzero().max() for row in counted])
    live = torch.arange(T).unsqueeze(0) <= last.unsqueeze(1)  # (N, T)
    outs = [records[p][1] for p in paths]
    S = {p: torch.zeros(o.shape[-1], o.shape[-1], dtype=F64) for p, o in zip(paths, outs, strict=True)}
    for n, t in counted.nonzero().tolist():
        prob = z[n, t].detach().softmax(-1)
        B = torch.diag(prob) - torch.outer(prob, prob)
        J = [torch.stack(g) for g in zip(*[torch.autograd.grad(z[n, t, c], outs, retain_graph=True)
                                             for c in range(z.shape[-1])], strict=True)]  # per layer (C, N, T, out)
        for p, Jp in zip(paths, J, strict=True):
            Jn = Jp[:, n]  # (C, T, out)
            if approx == "expand":
                S[p] += torch.einsum("clo,cd,dlp->op", Jn, B, Jn) / N_tok
            else:
                Js = Jn.sum(1)
                S[p] += Js.T @ B @ Js / N_tok
    result = {}
    for p in paths:
        module, a = model.get_submodule(p), records[p][0]
        if isinstance(module, nn.Embedding):
            rows = nn.functional.one_hot(a.reshape(N, -1), module.num_embeddings).to(F64)
        else:
            rows = a.reshape(N, -1, a.shape[-1])
            if module.bias is not None:
                rows = torch.cat([rows, torch.ones(*rows.shape[:-1], 1, dtype=F64)], -1)
        if approx == "expand":
            kept = torch.cat([rows[n, live[n]] for n in range(N)])
            A = kept.T @ kept / kept.shape[0]
        else:
            pooled = torch.stack([rows[n, live[n]].mean(0) for n in range(N)])
            A = pooled.T @ pooled / N
        result[p] = (A, S[p])
    return result


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_of_a_padded_batch_equals_the_formula_over_unpadded_positions(approx: str) -> None:
    model, X, y = padded_case()
    kf = fisher(model, (X, y), structure="kfac", approx=approx, dtype=F64)
    assert {"embed", "position", "head"} <= set(kf.factors)
    ref = reference_factors(model, X, y, list(kf.factors), approx)
    for p, f in kf.factors.items():
        A_ref, S_ref = ref[p]
        A = torch.diag(f.A) if f.A.dim() == 1 else f.A
        assert torch.linalg.norm(A - A_ref) <= 1e-12 * torch.linalg.norm(A_ref), (approx, p, "A")
        assert torch.linalg.norm(f.S - S_ref) <= 1e-10 * torch.linalg.norm(S_ref), (approx, p, "S")


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_token_ids_at_padded_positions_change_nothing(structure: str, approx: str) -> None:
    model, X, y = padded_case()
    other = X.clone()
    other[:2, -PAD:] = (other[:2, -PAD:] + 1) % model.get_submodule("embed").num_embeddings
    assert not torch.equal(other, X)
    K = fisher(model, (X, y), structure=structure, approx=approx, dtype=F64).to_dense()
    K_other = fisher(model, (other, y), structure=structure, approx=approx, dtype=F64).to_dense()
    assert torch.linalg.norm(K_other - K) <= 1e-12 * torch.linalg.norm(K), (structure, approx)
