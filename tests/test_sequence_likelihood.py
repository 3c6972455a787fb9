"""Sequence models (outputs (N, T, C)) against float64 brute-force references (docs/sequences.md).

The references loop over sequences, tokens and outputs with plain ``torch.autograd.grad`` (no ``torch.func``, no
fisherlab likelihood): per-token Jacobians J_nt (C×P), Λ(z_nt) and loss Hessians from ``reference.RefLikelihood``'s
textbook formulas, per-sequence gradients g_n = Σ_t m_nt ∇θ ℓ_nt, the loss from ``F.cross_entropy(ignore_index=…)``.
Definitions checked (m_nt = 0 for labels equal to −100, N_tok = Σ m_nt):

- true:      (1/N_tok) Σ_n Σ_t m_nt J_ntᵀ Λ(z_nt) J_nt
- ggn:       (1/N_tok) Σ_n Σ_t m_nt J_ntᵀ ∇²ℓ(z_nt, y_nt) J_nt
- empirical: (1/N_tok) Σ_n g_n g_nᵀ
- mc:        (1/(N_tok S)) Σ_n Σ_s g_ns g_nsᵀ, g_ns with the engine's labels drawn per token

Data-parallel (2 gloo ranks, unequal shards and unequal token counts): every quantity equals the single process's
to 1e-12.

Tolerances: 1e-10 relative (max norm over entries, relative to the largest reference entry) in float64; exact
identities (chunking, padding that no counted token sees) 1e-12; the MC Fisher at S = 2000 draws per token within
0.1 of the true Fisher in Frobenius norm (measured 0.04; the error falls as 1/√S, checked between S = 20 and 2000).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import reference as ref
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from fisherlab import fisher
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError
from fisherlab.likelihoods import Bernoulli, Categorical, Gaussian, TokenLikelihood

F64 = torch.float64
REF_RTOL = 1e-10
EXACT_RTOL = 1e-12
N, T, V, D, T_MAX = 4, 5, 7, 16, 8
IGNORE = -100
KINDS = ("true", "ggn", "empirical", "mc")


class TinyCausalLM(nn.Module):
    """Token and position embeddings, one causal attention layer (SDPA, is_causal), a linear head; P = 1447."""

    def __init__(self, vocab: int = V, width: int = D, max_len: int = T_MAX, outputs: int = V):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(max_len, width)
        self.qkv, self.proj, self.head = nn.Linear(width, 3 * width), nn.Linear(width, width), nn.Linear(width, outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        h = torch.tanh(h + self.proj(nnf.scaled_dot_product_attention(q, k, v, is_causal=True)))
        return self.head(h)


def make_model(seed: int = 0, outputs: int = V) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyCausalLM(outputs=outputs).to(F64)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # logits of order one: Λ far from its value at uniform p
    return model.eval()


def make_data(seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids X (N, T), labels y (N, T) with right-padding (−100 after each sequence's length), lengths (N,)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randint(0, V, (N, T), generator=gen)
    y = torch.randint(0, V, (N, T), generator=gen)
    lengths = torch.tensor([5, 3, 4, 1])
    y[torch.arange(T) >= lengths[:, None]] = IGNORE
    return X, y, lengths


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_model()


@pytest.fixture(scope="module")
def data() -> tuple[Tensor, Tensor, Tensor]:
    return make_data()


@pytest.fixture(scope="module")
def refs(model, data) -> dict[str, Tensor]:
    """The brute-force true Fisher and GGN of the padded data (computed once)."""
    X, y, _ = data
    return {kind: reference(kind, model, X, y, ref.RefLikelihood("categorical")) for kind in ("true", "ggn")}


# ------------------------------------------------------------------------------------------------ references
def token_jacobians(model: nn.Module, X: Tensor) -> tuple[Tensor, Tensor]:
    """J (N, T, C, P) by one backward pass per sequence, token and output; outputs Z (N, T, C)."""
    params = ref.selected(model)
    J, Z = [], []
    for n in range(X.shape[0]):
        z = model(X[n: n + 1])[0]
        J.append(torch.stack([torch.stack([flat_grad(z[t, c], params) for c in range(z.shape[1])])
                              for t in range(z.shape[0])]))
        Z.append(z.detach())
    return torch.stack(J), torch.stack(Z)


def flat_grad(out: Tensor, params: list[Tensor]) -> Tensor:
    grads = torch.autograd.grad(out, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params,
                                                                                            strict=True)])


def token_mask(y: Tensor, lik: ref.RefLikelihood) -> Tensor:
    """m (N, T): labels of −100 do not count (categorical); every token counts otherwise."""
    return y != IGNORE if lik.name == "categorical" else torch.ones(y.shape[:2], dtype=torch.bool)


def sequence_gradients(model: nn.Module, X: Tensor, Y: Tensor, mask: Tensor, lik: ref.RefLikelihood) -> Tensor:
    """g_n = Σ_t m_nt ∇θ ℓ(z_nt, Y_nt), shape (N, P)."""
    params = ref.selected(model)
    rows = []
    for n in range(X.shape[0]):
        z = model(X[n: n + 1])[0]
        loss = sum(lik.nll(z[t], Y[n, t]) for t in range(z.shape[0]) if mask[n, t])
        rows.append(flat_grad(loss, params))
    return torch.stack(rows)


def reference(kind: str, model: nn.Module, X: Tensor, y: Tensor, lik: ref.RefLikelihood,
              labels: Tensor | None = None) -> Tensor:
    """The brute-force Fisher of ``kind`` (module docstring); ``labels`` (N, S, T, ...) for ``mc``."""
    mask = token_mask(y, lik)
    count = int(mask.sum())
    if kind in ("true", "ggn"):
        J, Z = token_jacobians(model, X)
        total = 0
        for n in range(X.shape[0]):
            for t in range(X.shape[1]):
                if mask[n, t]:
                    inner = lik.output_fisher(Z[n, t]) if kind == "true" else lik.hessian(Z[n, t], y[n, t])
                    total = total + J[n, t].T @ inner @ J[n, t]
        return total / count
    if kind == "empirical":
        G = sequence_gradients(model, X, y, mask, lik)
        return G.T @ G / count
    assert labels is not None
    G = torch.cat([sequence_gradients(model, X, labels[:, s], mask, lik) for s in range(labels.shape[1])])
    return G.T @ G / (count * labels.shape[1])


def mc_labels(model: nn.Module, X: Tensor, y: Tensor, lik, **kw) -> Tensor:
    """The engine's own MC draws, (N, S, T, ...)."""
    return FisherEngine(model, (X, y), lik, kind="mc", **kw)._labels


# ------------------------------------------------------------------------------------------------ Fishers
@pytest.mark.parametrize("kind", KINDS)
def test_dense_and_implicit_match_reference_with_padding(model, data, refs, kind):
    X, y, _ = data
    labels = mc_labels(model, X, y, "categorical", mc_samples=3, seed=5) if kind == "mc" else None
    if labels is not None:
        assert labels.shape == (N, 3, T)
    expected = refs[kind] if kind in refs else reference(kind, model, X, y, ref.RefLikelihood("categorical"), labels)
    F = fisher(model, (X, y), "categorical", kind=kind, structure="dense", mc_samples=3, seed=5)
    ref.assert_close(F.to_dense(), expected, REF_RTOL, f"dense {kind}")
    implicit = fisher(model, (X, y), "categorical", kind=kind, structure="implicit", mc_samples=3, seed=5)
    V = torch.randn(expected.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref.assert_close(implicit @ V, expected @ V, REF_RTOL, f"implicit {kind}")


def test_ggn_equals_true_fisher_and_rows_per_sequence(model, data):
    X, y, _ = data
    engines = {kind: FisherEngine(model, (X, y), "categorical", kind=kind, mc_samples=2) for kind in KINDS}
    assert {k: e.rows_per_sample for k, e in engines.items()} == {"true": T * (V - 1), "ggn": T * V,
                                                                   "empirical": 1, "mc": 2}
    assert engines["true"].num_tokens == 13 and engines["true"].output_shape == (T, V)
    true, ggn = (fisher(model, (X, y), "categorical", kind=k).to_dense() for k in ("true", "ggn"))
    ref.assert_close(ggn, true, REF_RTOL, "GGN = true Fisher")


@pytest.mark.parametrize("structure", ["diag", "block"])
def test_structures_that_divide_by_n_average_over_tokens(model, data, refs, structure):
    X, y, _ = data
    expected = refs["true"]
    if structure == "diag":
        F = fisher(model, (X, y), "categorical", kind="true", structure="diag")
        ref.assert_close(F.diag(), expected.diagonal(), REF_RTOL, "diag")
        return
    F = fisher(model, (X, y), "categorical", kind="true", structure="block", by="layer")
    mask = torch.zeros_like(expected)
    for ix in FisherEngine(model, (X, y), "categorical").spec.blocks("layer").values():
        mask[ix.unsqueeze(1), ix.unsqueeze(0)] = 1
    ref.assert_close(F.to_dense(), expected * mask, REF_RTOL, "block by layer")


def test_mc_converges_to_true_fisher(model, data):
    X, y, _ = data
    true = fisher(model, (X, y), "categorical", kind="true").to_dense()
    errs = {S: float(torch.linalg.norm(fisher(model, (X, y), "categorical", kind="mc", mc_samples=S,
                                              seed=1).to_dense() - true) / torch.linalg.norm(true))
            for S in (20, 2000)}
    assert errs[2000] < 0.1, errs
    assert errs[2000] < errs[20] / 4, errs  # 1/√S predicts a factor 10


@pytest.mark.parametrize("name", ["gaussian", "bernoulli"])
def test_float_targets_per_token(name):
    """Gaussian / Bernoulli targets (N, T, C): every token counts, N_tok = N·T."""
    model, C = make_model(2, outputs=3), 3
    gen = torch.Generator().manual_seed(3)
    X = torch.randint(0, V, (N, T), generator=gen)
    y = torch.randn(N, T, C, generator=gen, dtype=F64) if name == "gaussian" else \
        torch.randint(0, 2, (N, T, C), generator=gen).to(F64)
    lik, rlik = (Gaussian(0.7), ref.RefLikelihood("gaussian", 0.7)) if name == "gaussian" else \
        (Bernoulli(), ref.RefLikelihood("bernoulli"))
    for kind in ("true", "empirical"):
        F = fisher(model, (X, y), lik, kind=kind).to_dense()
        ref.assert_close(F, reference(kind, model, X, y, rlik), REF_RTOL, f"{name} {kind}")
    loss, _ = FisherEngine(model, (X, y), lik).loss_and_gradient()
    z = model(X).detach()
    expected = sum(rlik.nll(z[n, t], y[n, t]) for n in range(N) for t in range(T)) / (N * T)
    assert float(loss) == pytest.approx(float(expected), rel=1e-13)


# ------------------------------------------------------------------------------------------------ loss
def test_loss_and_gradient_are_the_token_mean(model, data):
    X, y, _ = data
    engine = FisherEngine(model, (X, y), "categorical")
    loss, g = engine.loss_and_gradient()
    params = ref.selected(model)
    expected = nnf.cross_entropy(model(X).reshape(-1, V), y.reshape(-1), ignore_index=IGNORE)  # mean over tokens
    g_ref = flat_grad(expected, params)
    assert float(loss) == pytest.approx(float(expected), rel=1e-13)
    ref.assert_close(g, g_ref, REF_RTOL, "gradient")
    G = sequence_gradients(model, X, y, y != IGNORE, ref.RefLikelihood("categorical"))
    ref.assert_close(G.sum(0) / engine.num_tokens, g_ref, REF_RTOL, "Σ_n g_n / N_tok")
    assert engine.outputs().shape == (N, T * V)


def test_token_kl_is_mean_over_counted_tokens(model, data):
    X, y, _ = data
    lik = FisherEngine(model, (X, y), "categorical").likelihood
    zp = model(X).detach()
    zq = zp + 0.3 * torch.randn(zp.shape, generator=torch.Generator().manual_seed(4), dtype=F64)

    def kl(a: Tensor, b: Tensor) -> float:
        p = torch.softmax(a, -1)
        return float((p * (torch.log_softmax(a, -1) - torch.log_softmax(b, -1))).sum())

    expected = sum(kl(zp[n, t], zq[n, t]) for n in range(N) for t in range(T) if y[n, t] != IGNORE) / 13
    got = lik.kl(zp.reshape(N, -1), zq.reshape(N, -1), lik.check_targets(zp.reshape(N, -1), y)).mean()
    assert float(got) == pytest.approx(expected, rel=1e-13)
    with pytest.raises(InputError, match="needs the targets"):
        lik.kl(zp.reshape(N, -1), zq.reshape(N, -1))


# ------------------------------------------------------------------------------------------------ padding
def test_right_padding_equals_truncated_sequences(model, data):
    """Causal model, right-padded: F, loss and gradient equal those of the truncated sequences (brute force)."""
    X, y, lengths = data
    rlik = ref.RefLikelihood("categorical")
    params = ref.selected(model)
    total, loss = 0, 0
    for n in range(N):
        x_n, y_n = X[n: n + 1, : lengths[n]], y[n, : lengths[n]]
        J, Z = token_jacobians(model, x_n)
        total = total + sum(J[0, t].T @ rlik.output_fisher(Z[0, t]) @ J[0, t] for t in range(int(lengths[n])))
        loss = loss + sum(rlik.nll(model(x_n)[0, t], y_n[t]) for t in range(int(lengths[n])))
    count = int(lengths.sum())
    ref.assert_close(fisher(model, (X, y), "categorical").to_dense(), total / count, REF_RTOL, "truncated")
    engine_loss, g = FisherEngine(model, (X, y), "categorical").loss_and_gradient()
    assert float(engine_loss) == pytest.approx(float(loss) / count, rel=1e-13)
    ref.assert_close(g, flat_grad(loss / count, params), REF_RTOL, "gradient")


@pytest.mark.parametrize("kind", KINDS)
def test_padded_inputs_change_nothing(model, data, kind):
    """Other token ids at the padded positions (which no counted token sees) leave every kind unchanged."""
    X, y, _ = data
    other = torch.where(y == IGNORE, (X + 3) % V, X)
    assert not torch.equal(other, X)
    a, b = (fisher(model, (x, y), "categorical", kind=kind, mc_samples=2, seed=3).to_dense() for x in (X, other))
    ref.assert_close(b, a, EXACT_RTOL, kind)


@pytest.mark.parametrize("kind", ["true", "mc"])
def test_chunks_and_batches_change_nothing(model, data, kind):
    X, y, _ = data
    whole = fisher(model, (X, y), "categorical", kind=kind, mc_samples=2, seed=3).to_dense()
    ones = fisher(model, (X, y), "categorical", kind=kind, mc_samples=2, seed=3, chunk_size=1).to_dense()
    batches = fisher(model, [(X[:1], y[:1]), (X[1:], y[1:])], "categorical", kind=kind, mc_samples=2,
                     seed=3, chunk_size=1).to_dense()
    ref.assert_close(ones, whole, EXACT_RTOL, "chunk_size=1")
    ref.assert_close(batches, whole, EXACT_RTOL, "list of batches")


def test_custom_ignore_index(model, data):
    X, y, _ = data
    shifted = torch.where(y == IGNORE, torch.full_like(y, V), y)  # pad label = vocabulary size
    a = fisher(model, (X, y), "categorical").to_dense()
    b = fisher(model, (X, shifted), Categorical(ignore_index=V)).to_dense()
    ref.assert_close(b, a, EXACT_RTOL, "ignore_index = C")


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("targets, match", [
    (lambda y: y[:, 0], r"T = 5, C = 7\) must be class labels of shape \(N, T\); got \(2,\)"),
    (lambda y: torch.cat([y, y[:, :1]], 1), r"got \(2, 6\) for 2 sequences"),
    (lambda y: y.double(), "integer class labels"),
    (lambda y: torch.full_like(y, IGNORE), "every token"),
    (lambda y: torch.where(y == 2, torch.full_like(y, V), y), r"\[0, 7\) or equal ignore_index = -100; got 7"),
    (lambda y: torch.where(y == 2, torch.full_like(y, -1), y), "got -1 at position"),
])
def test_bad_sequence_targets(model, data, targets, match):
    X, y, _ = data
    with pytest.raises(InputError, match=match):
        fisher(model, (X, targets(y)), "categorical")


def test_bad_targets_of_a_later_sequence_are_named_after_the_model_s_own_error(model, data):
    """Bad targets past the first samples (found by the token count at construction): the model's own error on a
    sample it cannot take comes first, else the targets' error."""
    X, y, _ = data
    bad_y = y.clone()
    bad_y[3, 0] = V
    with pytest.raises(InputError, match=r"\[0, 7\) or equal ignore_index = -100; got 7"):
        fisher(model, (X, bad_y), "categorical")
    bad_x = X.clone()
    bad_x[3, 1] = V  # no embedding row
    with pytest.raises(InputError, match=r"could not be evaluated on sample 3 .*index out of range"):
        fisher(model, (bad_x, bad_y), "categorical")


def test_bad_ignore_index_and_outputs(model, data):
    X, y, _ = data
    with pytest.raises(InputError, match="is a class label"):
        fisher(model, (X, y), Categorical(ignore_index=3))
    for bad in (1.5, True, "pad"):
        with pytest.raises(InputError, match="ignore_index must be an integer"):
            Categorical(ignore_index=bad)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="share one length T"):  # batches of different lengths
        fisher(model, [(X[:2], y[:2]), (X[2:, :4], y[2:, :4])], "categorical")
    with pytest.raises(InputError, match=r"\(N, C\), or \(N, T, C\)"):
        fisher(nn.Sequential(model, nn.Unflatten(2, (V, 1))), (X, y), "categorical")
    with pytest.raises(InputError, match=r"\(or \(N, T\) when C = 1\); got \(2, 5, 2\)"):
        fisher(model, (X, torch.zeros(N, T, 2, dtype=F64)), "gaussian")
    with pytest.raises(InputError, match="not another TokenLikelihood"):
        TokenLikelihood(TokenLikelihood(Categorical(), T, V), T, V)
    pooled = nn.Sequential(model, nn.Flatten())  # outputs (N, T·C): a classifier, whose labels must be classes
    with pytest.raises(InputError, match="left out only for sequence outputs"):
        fisher(pooled, (X, torch.tensor([0, 1, IGNORE, 2])), "categorical")


# ------------------------------------------------------------------------------------------------ data-parallel
def dp_problem() -> tuple[nn.Module, Tensor, Tensor]:
    """5 sequences (shards of 3 and 2 on two ranks), the padding mostly on the second rank."""
    X, y, _ = make_data(seed=6)
    X, y = torch.cat([X, X[:1]]), torch.cat([y, y[:1]])
    y[3:, 2:] = IGNORE
    return make_model(3), X, y


def dp_compute(X: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Loss, gradient, N_tok, dense true / mc / empirical Fishers and F·V (this rank's shard under a group)."""
    model = dp_problem()[0]
    engine = FisherEngine(model, (X, y), "categorical", chunk_size=2)
    V = torch.randn(engine.spec.dim, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    loss, grad = engine.loss_and_gradient()
    out = {"num_tokens": torch.tensor(float(engine.num_tokens)), "loss": loss, "gradient": grad,
           "FV": engine.matmat(V)}
    for kind in ("true", "mc", "empirical"):
        out[kind] = fisher(model, (X, y), "categorical", kind=kind, mc_samples=2, seed=4, chunk_size=2).to_dense()
    return out


def dp_worker(rank: int, world: int, port: int, path: str) -> None:
    import datetime

    import torch.distributed as dist

    from fisherlab.distributed import shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        _, X, y = dp_problem()
        ix = shard(len(X), rank, world)
        out = dp_compute(X[ix.start: ix.stop], y[ix.start: ix.stop])
        if rank == 0:
            torch.save(out, path)
    finally:
        dist.destroy_process_group()


#: Rank ``sys.argv[1]`` of ``sys.argv[2]`` (port ``sys.argv[3]``) saving to ``sys.argv[4]``.
DP_RANK = "import sys; from test_sequence_likelihood import dp_worker; dp_worker(*map(int, sys.argv[1:4]), sys.argv[4])"


@pytest.mark.slow
def test_data_parallel_token_counts(spawner, tmp_path: Path):
    """Two gloo ranks, children of the ``spawner`` fixture (tests/conftest.py)."""
    from test_distributed import free_port

    path, port, world = tmp_path / "dp.pt", free_port(), 2
    procs = [spawner.spawn(DP_RANK, str(r), str(world), str(port), str(path), env={"MASTER_ADDR": "127.0.0.1"})
             for r in range(world)]
    try:
        logs = ["".join(p.communicate(timeout=180)) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [log[-3000:] for log in logs]
    got, (_, X, y) = torch.load(path), dp_problem()
    single = dp_compute(X, y)
    assert float(got["num_tokens"]) == int((y != IGNORE).sum()) == 15
    errors = {key: ref.rel_err(got[key], value) for key, value in single.items()}
    print("2 ranks vs one process, max relative differences:", {k: f"{e:.1e}" for k, e in errors.items()})
    assert all(e <= EXACT_RTOL for e in errors.values()), errors
