"""KFAC, EKFAC and unit-wise blocks for weight-sharing layers against independent float64 references.

Eschenhagen et al. (2023): Linear layers applied over T positions, ``approx="expand"`` and ``"reduce"``;
``nn.Embedding`` as a Linear layer on one-hot inputs (diagonal input factor under "expand"); LayerNorm/RMSNorm by
exact blocks; tied weights and configurations without a rule refused by name.

References (written here, not fisherlab's code paths): per sample, forward hooks record every layer's input and
output, the output Jacobian ∂z/∂y_{l} comes from one ``torch.autograd.grad`` per model output, and the factor
sums are plain loops over samples and positions (one-hot vectors formed explicitly); the exact Fisher comes from
per-sample autograd Jacobians (reference.py); Kronecker blocks are assembled entry by entry from the parameter
shapes (an Embedding's W̄ is its weight transposed). Tolerance of identities: 1e-10 relative, float64.
"""

from __future__ import annotations

import layer_reference as lref
import pytest
import reference as ref
import torch
from torch import Tensor, nn

from fisherlab import fisher
from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, SingularMatrixError, UnsupportedLayerError
from fisherlab.structures.ekfac import EKFACFisher
from fisherlab.structures.kfac import KFACFisher
from fisherlab.structures.unitwise import UnitwiseFisher

F64 = torch.float64
RTOL = 1e-10
CAT, GAUSS = ref.RefLikelihood("categorical"), ref.RefLikelihood("gaussian")
VOCAB, WIDTH, HIDDEN, MIX, CLASSES = 7, 4, 5, 3, 3
LAYERS = ("embed", "fc", "mix", "head")  # the layers with a rule in SeqClassifier


class SeqClassifier(nn.Module):
    """Token ids (N, T) → Embedding → LayerNorm → Linear (tanh) → RMSNorm → Linear → mean over T → Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, HIDDEN)
        self.rms = nn.RMSNorm(HIDDEN)
        self.mix = nn.Linear(HIDDEN, MIX)
        self.head = nn.Linear(MIX, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mix(self.rms(torch.tanh(self.fc(self.norm(self.embed(x))))))
        return self.head(h.mean(1))


def seq_problem(n: int = 6, length: int = 4, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """The classifier (float64) and ids in [0, VOCAB − 1) — the last id never occurs (a zero input-factor entry)."""
    torch.manual_seed(seed)
    model = SeqClassifier().to(F64)
    with torch.no_grad():  # affine norms away from (1, 0), so their blocks are generic
        for p in (model.norm.weight, model.norm.bias, model.rms.weight):
            p.add_(0.3 * torch.randn_like(p))
    X = torch.randint(0, VOCAB - 1, (n, length))
    return model, X, torch.randint(0, CLASSES, (n,))


# ------------------------------------------------------------------------------------------------- references
def input_rows(module: nn.Module, a: Tensor) -> Tensor:
    """ā_l (L, width) of one sample's layer input a: one-hot ids (Embedding) or [a_l; 1] (Linear with bias)."""
    if isinstance(module, nn.Embedding):
        return nn.functional.one_hot(a.reshape(-1), module.num_embeddings).to(F64)
    rows = a.reshape(-1, a.shape[-1])
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=F64)], 1) if module.bias is not None else rows


def reference_factors(model: nn.Module, X: Tensor, y: Tensor, lik: ref.RefLikelihood, kind: str,
                      layers: tuple[str, ...]) -> dict[str, dict[str, Tensor]]:
    """Per layer the expand and reduce factors {"A_expand", "S_expand", "A_reduce", "S_reduce"} by loops."""
    acc: dict[str, dict[str, Tensor]] = {p: {} for p in layers}
    for n in range(X.shape[0]):
        store: dict[str, tuple[Tensor, Tensor]] = {}
        hooks = [model.get_submodule(p).register_forward_hook(lambda m, i, o, p=p, s=store: s.update({p: (i[0], o)}))
                 for p in layers]
        z = model(X[n: n + 1])[0]
        for h in hooks:
            h.remove()
        Q = lref.output_factors(kind, lik, z, y[n], None)  # Σ_r m_r m_rᵀ of this sample (C, C)
        for p in layers:
            a, out = store[p]
            rows = input_rows(model.get_submodule(p), a[0])  # (L, width)
            J = torch.stack([torch.autograd.grad(z[c], out, retain_graph=True)[0][0] for c in range(len(z))])
            J = J.reshape(len(z), rows.shape[0], -1)  # (C, L, out)
            mean_row, J_sum = rows.mean(0), J.sum(1)
            terms = {
                "A_expand": sum(torch.outer(r, r) for r in rows) / rows.shape[0],
                "S_expand": sum(J[:, t].T @ Q @ J[:, t] for t in range(rows.shape[0])),
                "A_reduce": torch.outer(mean_row, mean_row),
                "S_reduce": J_sum.T @ Q @ J_sum,
            }
            for k, v in terms.items():
                acc[p][k] = acc[p].get(k, 0) + v.detach() / X.shape[0]
    return acc


def offsets(model: nn.Module) -> dict[str, int]:
    """Flat offset of every parameter (model order)."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name], start = start, start + p.numel()
    return out


def layer_coords(model: nn.Module, path: str) -> tuple[Tensor, Tensor, Tensor]:
    """(flat indices, W̄ rows, W̄ columns) of a layer's parameters, from the shapes alone."""
    module, off = model.get_submodule(path), offsets(model)
    if isinstance(module, nn.Embedding):  # weight[v, i] = W̄[i, v]
        t = torch.arange(module.weight.numel())
        return off[f"{path}.weight"] + t, t % module.embedding_dim, t // module.embedding_dim
    out_f, in_f = module.weight.shape
    t, b = torch.arange(out_f * in_f), torch.arange(out_f)
    flat = torch.cat([off[f"{path}.weight"] + t, off[f"{path}.bias"] + b])
    return flat, torch.cat([t // in_f, b]), torch.cat([t % in_f, torch.full_like(b, in_f)])


def sub(M: Tensor, ix: Tensor) -> Tensor:
    return M[ix][:, ix]


def kfac_block(model: nn.Module, path: str, A: Tensor, S: Tensor) -> tuple[Tensor, Tensor]:
    """(flat indices, S ⊗ A on them), A given as a matrix."""
    flat, rows, cols = layer_coords(model, path)
    return flat, lref.kron_block(A, S, rows, cols)


def dense_A(A: Tensor) -> Tensor:
    return torch.diag(A) if A.dim() == 1 else A


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", ["true", "empirical"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factors_equal_the_loop_reference(approx: str, kind: str) -> None:
    model, X, y = seq_problem()
    expected = reference_factors(model, X, y, CAT, kind, LAYERS)
    kf = fisher(model, (X, y), "categorical", kind=kind, structure="kfac", approx=approx, dtype=F64)
    assert kf.meta["kfac_convention"] == approx and kf.meta["norm_blocks"] == ["norm", "rms"]
    for p in LAYERS:
        f = kf.factors[p]
        ref.assert_close(dense_A(f.A), expected[p][f"A_{approx}"], RTOL, f"A of {p} ({approx}, {kind})")
        ref.assert_close(f.S, expected[p][f"S_{approx}"], RTOL, f"S of {p} ({approx}, {kind})")
        flat, block = kfac_block(model, p, expected[p][f"A_{approx}"], expected[p][f"S_{approx}"])
        ref.assert_close(sub(kf.to_dense(), flat), block, RTOL, f"dense block of {p} in flat order")
    # the Embedding's input factor under "expand" is diagonal, stored as the token counts / (N·T)
    if approx == "expand":
        counts = torch.bincount(X.reshape(-1), minlength=VOCAB).to(F64) / X.numel()
        assert kf.factors["embed"].A.shape == (VOCAB,)
        ref.assert_close(kf.factors["embed"].A, counts, RTOL, "embedding input factor = token frequencies")


def test_expand_and_reduce_coincide_for_single_positions_and_differ_otherwise() -> None:
    model, X, y = seq_problem(length=1)
    F = {a: fisher(model, (X, y), structure="kfac", approx=a, dtype=F64).to_dense() for a in ("expand", "reduce")}
    ref.assert_close(F["reduce"], F["expand"], RTOL, "expand = reduce for L = 1")
    model, X, y = seq_problem()
    F = {a: fisher(model, (X, y), structure="kfac", approx=a, dtype=F64).to_dense() for a in ("expand", "reduce")}
    assert ref.rel_err(F["reduce"], F["expand"]) > 1e-2


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_exact_for_one_sequence_of_length_one(approx: str) -> None:
    model, X, y = seq_problem(n=1, length=1)
    exact = ref.true_fisher(model, X, CAT)
    kf = fisher(model, (X, y), structure="kfac", approx=approx, dtype=F64)
    ek = fisher(model, (X, y), structure="ekfac", approx=approx, dtype=F64)
    for p in [*LAYERS, "norm", "rms"]:
        flat = layer_coords(model, p)[0] if p in LAYERS else torch.cat(
            [offsets(model)[n] + torch.arange(t.numel()) for n, t in model.get_submodule(p).named_parameters(p)])
        for F in (kf, ek):
            ref.assert_close(sub(F.to_dense(), flat), sub(exact, flat), RTOL, f"{F.structure} block of {p}")


class DeepLinear(nn.Module):
    """Linear layers over (N, T, d) positions, then either pooled (reduce setting) or kept per position."""

    def __init__(self, pooled: bool) -> None:
        super().__init__()
        self.pooled = pooled
        self.l1, self.l2, self.l3 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.l2(self.l1(x))
        return self.l3(h.mean(1)) if self.pooled else self.l3(h).flatten(1)  # (N, 2) or (N, T·2)


@pytest.mark.parametrize("setting", ["reduce", "expand"])
def test_exact_for_deep_linear_networks_in_their_setting(setting: str) -> None:
    """Gaussian likelihood: KFAC-reduce is exact when positions are pooled, KFAC-expand when each has its loss."""
    torch.manual_seed(1)
    model = DeepLinear(pooled=setting == "reduce").to(F64)
    X = torch.randn(5, 3, 3, dtype=F64)
    y = ref.outputs(model, X) + torch.randn(5, 2 if setting == "reduce" else 6, dtype=F64)
    exact = ref.true_fisher(model, X, GAUSS)
    other = "expand" if setting == "reduce" else "reduce"
    F = {a: fisher(model, (X, y), "gaussian", structure="kfac", approx=a, dtype=F64).to_dense()
         for a in (setting, other)}
    for p in ("l1", "l2", "l3"):
        flat = layer_coords(model, p)[0]
        ref.assert_close(sub(F[setting], flat), sub(exact, flat), RTOL, f"KFAC-{setting} block of {p}")
    assert lref.rel_fro(sub(F[other], layer_coords(model, "l1")[0]), sub(exact, layer_coords(model, "l1")[0])) > 1e-2


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_ekfac_is_never_farther_than_kfac_and_fits_the_exact_diagonal(approx: str) -> None:
    model, X, y = seq_problem()
    exact = ref.true_fisher(model, X, CAT)
    kf = fisher(model, (X, y), structure="kfac", approx=approx, dtype=F64)
    ek = fisher(model, (X, y), structure="ekfac", approx=approx, dtype=F64)
    K, E = kf.to_dense(), ek.to_dense()
    for p in LAYERS:
        flat, rows, cols = layer_coords(model, p)
        F_l = sub(exact, flat)
        assert lref.rel_fro(sub(E, flat), F_l) <= lref.rel_fro(sub(K, flat), F_l) + 1e-12, p
        # scalings = diag((Q_S ⊗ Q_A)ᵀ F_l (Q_S ⊗ Q_A)), the basis from explicit eigendecompositions of the factors
        f = ek.factors[p]
        Q_A = torch.linalg.eigh(dense_A(kf.factors[p].A)).eigenvectors if approx == "reduce" or p != "embed" \
            else torch.eye(VOCAB, dtype=F64)
        Q_S = torch.linalg.eigh(kf.factors[p].S).eigenvectors
        # column (i, j) of Q_S ⊗ Q_A in flat coordinates: entry (r, c) is Q_S[r, i] · Q_A[c, j]
        basis = torch.stack([Q_S[rows, i] * Q_A[cols, j] for i in range(Q_S.shape[0]) for j in range(Q_A.shape[0])],
                            1)
        expected = torch.diagonal(basis.T @ F_l @ basis).reshape(f.scaling.shape)
        ref.assert_close(f.scaling, expected, 1e-9, f"EKFAC scalings of {p} ({approx})")


def test_unitwise_blocks_and_diagonal_cover_the_embedding() -> None:
    model, X, y = seq_problem()
    exact = ref.true_fisher(model, X, CAT)
    unit = UnitwiseFisher.from_engine(FisherEngine(model, (X, y), dtype=F64))
    for p in LAYERS:
        flat, rows, _ = layer_coords(model, p)
        for i in range(int(rows.max()) + 1):  # unit i: W̄ row i (for the Embedding: coordinate i of every token)
            ix = flat[rows == i]
            got = unit.to_dense()[ix][:, ix]
            ref.assert_close(got, sub(exact, ix), RTOL, f"unit {i} of {p}")
    ref.assert_close(fisher(model, (X, y), structure="diag", dtype=F64).diag(), exact.diagonal(), RTOL,
                     "diag (layer-wise, one-hot rows for the Embedding)")


@pytest.mark.parametrize("split", ["pi", "sqrt", "exact"])
def test_diagonal_input_factor_operations_against_dense(split: str) -> None:
    model, X, y = seq_problem()
    kf = fisher(model, (X, y), structure="kfac", dtype=F64)
    f = kf.factors["embed"]
    flat, rows, cols = layer_coords(model, "embed")
    K = lref.kron_block(torch.diag(f.A), f.S, rows, cols)
    D = sub(kf.to_dense(), flat)
    ref.assert_close(D, K, RTOL, "dense block")
    V = torch.randn(kf.spec.dim, 2, dtype=F64)
    ref.assert_close(kf.matmat(V)[flat], K @ V[flat], RTOL, "matmat")
    ref.assert_close(kf.diag()[flat], K.diagonal(), RTOL, "diag")
    lam = 0.1
    if split == "exact":
        G = K + lam * torch.eye(len(flat), dtype=F64)
    else:
        pi = (f.A.mean() / (f.S.trace() / WIDTH)).sqrt() if split == "pi" else torch.tensor(1.0, dtype=F64)
        a, s = pi * lam ** 0.5, lam ** 0.5 / pi
        G = lref.kron_block(torch.diag(f.A) + a * torch.eye(VOCAB, dtype=F64),
                            f.S + s * torch.eye(WIDTH, dtype=F64), rows, cols)
    ref.assert_close(kf.solve(V, lam, split=split)[flat], torch.linalg.solve(G, V[flat]), 1e-9, f"solve ({split})")
    if split != "exact":
        A_is, S_is = kf.inv_sqrt_factors(lam, split=split)["embed"]
        ref.assert_close(A_is, (f.A + a).rsqrt(), RTOL, "diagonal input root")
        e, U = torch.linalg.eigh(f.S + s * torch.eye(WIDTH, dtype=F64))
        ref.assert_close(S_is, U @ torch.diag(e.rsqrt()) @ U.T, 1e-9, "output root")
    ev = torch.linalg.eigvalsh(kf.to_dense()[kf.index["embed"]][:, kf.index["embed"]])
    got = torch.sort(torch.outer(torch.linalg.eigvalsh(f.S), f.A).reshape(-1)).values
    ref.assert_close(got, ev, 1e-9, "spectrum of the block")
    assert float(kf.trace()) == pytest.approx(float(kf.to_dense().trace()), rel=1e-12)
    with pytest.raises(SingularMatrixError, match="embed"):  # the id VOCAB − 1 never occurs: a zero in A
        kf.solve(V, 0.0)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, WIDTH), nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x).mean(1))


class Positions(nn.Module):
    """A position table called on arange(T) (no batch dimension)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.position, self.head = nn.Embedding(VOCAB, WIDTH), nn.Embedding(5, WIDTH), nn.Linear(WIDTH, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((self.embed(x) + self.position(torch.arange(x.shape[1]))).mean(1))


@pytest.mark.filterwarnings("ignore:the model cannot be differentiated per sample")  # max_norm renorms in place
def test_refused_configurations_are_named() -> None:
    X, y = torch.randint(0, VOCAB, (4, 3)), torch.randint(0, 3, (4,))
    tied = Tied().to(F64)
    with pytest.raises(UnsupportedLayerError, match=r"'embed'.*'head'.*tied"):
        fisher(tied, (X, y), structure="kfac", params=["embed.weight"], dtype=F64)
    for structure in ("ekfac", "unit"):
        with pytest.raises(UnsupportedLayerError, match="tied"):
            fisher(tied, (X, y), structure=structure, params=["embed.weight"], dtype=F64)
    for option in ({"padding_idx": 0}, {"max_norm": 1.0}, {"scale_grad_by_freq": True}):
        model = nn.Sequential(nn.Embedding(VOCAB, WIDTH, **option), nn.Flatten(), nn.Linear(3 * WIDTH, 3)).to(F64)
        with pytest.raises(UnsupportedLayerError, match=next(iter(option))):
            fisher(model, (X, y), structure="kfac", dtype=F64)
    for chunk_size in (None, 3):  # T = 3 = chunk size must not pass as per-sample ids
        with pytest.raises(UnsupportedLayerError, match="'position'.*per-sample dimension"):
            fisher(Positions().to(F64), (X, y), structure="kfac", chunk_size=chunk_size, dtype=F64)
    prelu = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 2)).to(F64)
    Xf = torch.randn(4, 3, dtype=F64)
    with pytest.raises(UnsupportedLayerError, match="'1' \\(PReLU\\)"):
        fisher(prelu, (Xf, torch.randint(0, 2, (4,))), structure="kfac", dtype=F64)
    with pytest.raises(InputError, match="approx"):
        KFACFisher.from_engine(FisherEngine(prelu, (Xf, torch.randint(0, 2, (4,)))), approx="mean")
    with pytest.raises(InputError, match="approx"):
        EKFACFisher.from_engine(FisherEngine(prelu, (Xf, torch.randint(0, 2, (4,)))), approx="mean")


def test_linear_over_positions_and_conv_reduce_match_the_reference() -> None:
    """Conv1d under "reduce": patches averaged over output locations, output gradients summed."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5, 2)).to(F64)
    X, y = torch.randn(4, 2, 5, dtype=F64), torch.randint(0, 2, (4,))
    kf = fisher(model, (X, y), structure="kfac", approx="reduce", dtype=F64)
    A, S = 0, 0
    conv = model[0]
    for n in range(4):
        a, _, _ = lref.layer_input_output(model, "0", X[n])
        P = lref.patches(conv, a)  # (L, in_eff + 1)
        J, z = lref.output_jacobian(model, "0", X[n])  # (C, out, L)
        Q = lref.output_factors("true", CAT, z, y[n], None)
        A = A + torch.outer(P.mean(0), P.mean(0)) / 4
        S = S + J.sum(2).T @ Q @ J.sum(2) / 4
    ref.assert_close(kf.factors["0"].A, A, RTOL, "conv A (reduce)")
    ref.assert_close(kf.factors["0"].S, S, RTOL, "conv S (reduce)")


def module_flat(model: nn.Module, path: str) -> Tensor:
    """Flat indices of a module's own parameters (model order)."""
    off = offsets(model)
    prefix = f"{path}." if path else ""
    return torch.cat([off[prefix + n] + torch.arange(t.numel())
                      for n, t in model.get_submodule(path).named_parameters(recurse=False)])


def test_the_gpt_needs_no_block_fallback() -> None:
    """fisherlab's GPT (Embedding, positions, LayerNorm, qkv/proj/MLP Linear over T, head): every structure builds
    with unsupported="error"; norms get their exact blocks; EKFAC ≤ KFAC per layer (both approximations)."""
    from fisherlab.data import make_sort_task
    from fisherlab.models import build_model

    data = make_sort_task(5, length=3, n_values=4, seed=1, test_fraction=0.2)
    model = build_model("gpt", data, dtype=F64, seed=3, n_layers=1, d_model=4, d_ff=6).eval()
    X, y = data.X_train, data.y_train
    exact = ref.true_fisher(model, X, CAT)
    norms = [p for p, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    for approx in ("expand", "reduce"):
        kf = fisher(model, (X, y), structure="kfac", approx=approx, dtype=F64)
        ek = fisher(model, (X, y), structure="ekfac", approx=approx, dtype=F64)
        K, E = kf.to_dense(), ek.to_dense()
        assert kf.meta["norm_blocks"] == kf.meta["exact_blocks"] == norms and "embed" in kf.factors
        for p in norms:
            ref.assert_close(sub(K, module_flat(model, p)), sub(exact, module_flat(model, p)), RTOL, f"block of {p}")
        for p in kf.factors:
            ix, F_l = module_flat(model, p), sub(exact, module_flat(model, p))
            assert lref.rel_fro(sub(E, ix), F_l) <= lref.rel_fro(sub(K, ix), F_l) + 1e-12, (approx, p)
    unit = fisher(model, (X, y), structure="unit", dtype=F64)
    assert unit.meta["norm_blocks"] == norms


class Attention(nn.Module):
    """Embedding → nn.MultiheadAttention (self-attention, optional causal mask) → mean over T → Linear."""

    def __init__(self, batch_first: bool, causal: bool, need_weights: bool) -> None:
        super().__init__()
        self.embed, self.attn = nn.Embedding(VOCAB, WIDTH), nn.MultiheadAttention(WIDTH, 2, batch_first=batch_first)
        self.head = nn.Linear(WIDTH, CLASSES)
        self.batch_first, self.causal, self.need_weights = batch_first, causal, need_weights
        self.weights: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) if self.batch_first else self.embed(x).transpose(0, 1)
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool).triu(1) if self.causal else None
        a, self.weights = self.attn(h, h, h, attn_mask=mask, need_weights=self.need_weights,
                                    is_causal=self.causal and not self.need_weights)
        return self.head((a if self.batch_first else a.transpose(0, 1)).mean(1))


@pytest.mark.parametrize(("batch_first", "causal", "need_weights"),
                         [(True, True, False), (False, True, True), (True, False, True)])
def test_multihead_attention_rule_against_the_exact_fisher(batch_first: bool, causal: bool,
                                                           need_weights: bool) -> None:
    """in_proj (q, k, v rows of one Linear over T) and out_proj: unit blocks = exact sub-blocks (so the recorded
    inputs and output gradients give the exact per-sample gradients), EKFAC ≤ KFAC, the recomputed attention
    equals torch's (outputs and weights)."""
    from fisherlab.layers import LayerCapture

    torch.manual_seed(3)
    model = Attention(batch_first, causal, need_weights).to(F64).eval()
    X, y = torch.randint(0, VOCAB, (5, 4)), torch.randint(0, CLASSES, (5,))
    with torch.no_grad():
        z, weights = model(X), model.weights
        with LayerCapture(model, ["attn", "attn.out_proj"]):
            ref.assert_close(model(X), z, 1e-12, "outputs under the capture")
        if need_weights:
            ref.assert_close(model.weights, weights, 1e-12, "attention weights under the capture")
    exact = ref.true_fisher(model, X, CAT)
    off = offsets(model)
    in_proj = torch.cat([off["attn.in_proj_weight"] + torch.arange(3 * WIDTH * WIDTH),
                         off["attn.in_proj_bias"] + torch.arange(3 * WIDTH)])
    rows = torch.cat([torch.arange(3 * WIDTH * WIDTH) // WIDTH, torch.arange(3 * WIDTH)])  # W̄ row of each entry
    unit = fisher(model, (X, y), structure="unit", dtype=F64)
    for i in range(3 * WIDTH):
        ix = in_proj[rows == i]
        ref.assert_close(sub(unit.to_dense(), ix), sub(exact, ix), RTOL, f"unit {i} of in_proj")
    kf = fisher(model, (X, y), structure="kfac", dtype=F64)
    ek = fisher(model, (X, y), structure="ekfac", dtype=F64)
    assert set(kf.factors) == {"embed", "attn", "attn.out_proj", "head"} and not kf.exact_blocks
    for ix in (in_proj, module_flat(model, "attn.out_proj")):
        F_l = sub(exact, ix)
        assert lref.rel_fro(sub(ek.to_dense(), ix), F_l) <= lref.rel_fro(sub(kf.to_dense(), ix), F_l) + 1e-12
    ref.assert_close(ek.trace(), exact.trace(), RTOL, "EKFAC trace = exact trace")


def test_multihead_attention_exact_for_one_position_and_refusals() -> None:
    torch.manual_seed(4)
    model = Attention(True, False, False).to(F64).eval()
    X, y = torch.randint(0, VOCAB, (1, 1)), torch.randint(0, CLASSES, (1,))
    exact, kf = ref.true_fisher(model, X, CAT), fisher(model, (X, y), structure="kfac", approx="reduce", dtype=F64)
    for p in ("attn", "attn.out_proj"):
        b = module_flat(model, p)
        ref.assert_close(sub(kf.to_dense(), b), sub(exact, b), RTOL, f"KFAC block of {p}, one sequence of length 1")

    class Cross(nn.Module):
        def __init__(self, **kw: object) -> None:
            super().__init__()
            self.attn, self.head = nn.MultiheadAttention(WIDTH, 2, batch_first=True, **kw), nn.Linear(WIDTH, 2)

        def forward(self, x: Tensor) -> Tensor:
            memory = x.flip(1)[..., : self.attn.kdim]
            return self.head(self.attn(x, memory, memory, need_weights=False)[0].mean(1))

    Xf, yf = torch.randn(3, 4, WIDTH, dtype=F64), torch.randint(0, 2, (3,))
    for model, match in ((Cross(), "cross-attention"), (Cross(add_bias_kv=True), "add_bias_kv"),
                         (Cross(kdim=3, vdim=3), "kdim")):
        with pytest.raises(UnsupportedLayerError, match=match):
            fisher(model.to(F64), (Xf, yf), structure="kfac", dtype=F64)


class NormZoo(nn.Module):
    """Token ids (N, T) → Embedding → LayerNorm → Linear (tanh) → LayerNorm over (2, 3) → RMSNorm (eps None) →
    LayerNorm without bias → one LayerNorm called twice → one whose parameters are read without a call → mean over
    T → Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 6)
        self.ln = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 6)
        self.ln2d = nn.LayerNorm((2, 3))
        self.rms = nn.RMSNorm(6)
        self.nobias = nn.LayerNorm(6, bias=False)
        self.twice = nn.LayerNorm(6)
        self.functional = nn.LayerNorm(6)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(self.ln(self.embed(x))))
        h = self.ln2d(h.reshape(*h.shape[:-1], 2, 3)).reshape(h.shape)
        h = self.twice(torch.tanh(self.twice(self.nobias(self.rms(h)))))
        f = self.functional
        h = nn.functional.layer_norm(h, f.normalized_shape, f.weight, f.bias, f.eps)
        return self.head(h.mean(1))


NORM_PATHS = ("ln", "ln2d", "rms", "nobias", "twice", "functional")


def norm_zoo(seed: int = 5) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = NormZoo().to(F64).eval()
    with torch.no_grad():  # affine parameters away from (1, 0)
        for m in (model.get_submodule(p) for p in NORM_PATHS):
            for q in m.parameters():
                q.add_(0.4 * torch.randn_like(q))
    return model, torch.randint(0, VOCAB, (5, 4)), torch.randint(0, CLASSES, (5,))


@pytest.mark.parametrize("kind", ["true", "empirical", "ggn", "mc"])
def test_norm_blocks_from_the_layer_pass_equal_the_exact_blocks(kind: str) -> None:
    """LayerNorm (1-d and 2-d normalized_shape, without bias), RMSNorm: the blocks accumulated in KFAC's pass of
    layer rows (per-sample Σ_l δ_l ⊙ x̂_l, Σ_l δ_l) equal the sub-blocks of the per-sample autograd Fisher of each
    kind, over several chunks; a norm called twice, or read without a call, takes the factor rows instead (same
    result); EKFAC and the unit-wise structure carry the same blocks."""
    from fisherlab.layers import captured_norms, layer_layouts

    model, X, y = norm_zoo()
    engine = FisherEngine(model, (X, y), "categorical", kind=kind, mc_samples=2, seed=1, dtype=F64)
    groups = {p: [n for n in engine.spec.names if n.startswith(f"{p}.")] for p in NORM_PATHS}
    captured = captured_norms(engine, groups, layer_layouts(model, engine.spec)[0])
    assert set(captured) == set(NORM_PATHS) - {"twice", "functional"}
    exact = ref.fisher(kind, model, X, y, CAT, labels=engine._labels)
    structures = [KFACFisher.from_engine(engine, approx=a, chunk_size=2) for a in ("expand", "reduce")]
    structures += [EKFACFisher.from_engine(engine, chunk_size=3), UnitwiseFisher.from_engine(engine, chunk_size=2)]
    for F in structures:
        assert F.meta["norm_blocks"] == list(NORM_PATHS) == list(F.exact_blocks)
        for p in NORM_PATHS:
            ix = module_flat(model, p)
            ref.assert_close(F.exact_blocks[p], sub(exact, ix), RTOL, f"{F.structure} {kind} block of {p}")


def test_norm_blocks_of_a_selection_of_norm_parameters() -> None:
    """params=[...] naming a norm's weight only (or bias only): the block is that parameter's exact sub-block."""
    model, X, y = norm_zoo(seed=6)
    names = ["ln.weight", "ln2d.bias", "rms.weight", "fc.weight", "head.weight", "head.bias"]
    kf = fisher(model, (X, y), structure="kfac", params=names, dtype=F64)
    exact = ref.true_fisher(model, X, CAT, names)
    off, start = {}, 0
    for n in names_in_order(model, names):
        off[n], start = start, start + model.get_parameter(n).numel()
    for p, n in (("ln", "ln.weight"), ("ln2d", "ln2d.bias"), ("rms", "rms.weight")):
        ix = off[n] + torch.arange(model.get_parameter(n).numel())
        ref.assert_close(kf.exact_blocks[p], sub(exact, ix), RTOL, f"block of {n} alone")


def names_in_order(model: nn.Module, names: list[str]) -> list[str]:
    return [n for n, _ in model.named_parameters() if n in names]
