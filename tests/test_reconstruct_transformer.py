"""Reconstructed transformers: invariants 1–4 on a nanoGPT-style model and an nn.TransformerEncoder (float64).

The models are defined here (the GPT exactly as ``fisherlab.models.GPT`` is laid out: Embedding ``embed`` and
``position``, pre-LN ``blocks[i]`` of ``ln1``, ``attn.qkv``/``attn.proj`` through
``F.scaled_dot_product_attention``, ``ln2``, ``mlp.fc``/``mlp.proj``, then ``norm`` and ``head``), so that the
tests do not depend on fisherlab.models. References are independent of fisherlab's structure code: the true
Fisher F and the gradients by per-sample autograd loops (tests/reference.py); G = F + λI (dense), its layer
blocks (block: one per owning module, grouped here by parameter name), its diagonal (diag); for kfac the Kronecker
factors are computed here from forward hooks (inputs ā, one-hot token rows for an Embedding, the input x of a
self-attention nn.MultiheadAttention whose packed in_proj gives q|k|v) and per-sample output gradients δ = Jᵀ m_r
(m_r the columns of a root of Λ(z)), with the norms (no Kronecker rule) as exact blocks of F; solves and roots by
torch.linalg.

Also ekfac, unit and input on the GPT (Embedding through the transposed layout there too), ekfac and unit on the
encoder (attention through fisherlab's default MultiheadAttention rule, no fallback), and a slow test at P = 2,079.

Forms (what each structure maps each tensor to; ``fisherlab.reconstruction.build`` documents the same table):
dense/block/diag: every tensor a parametrization (DenseRoot over all / per module, DiagonalRoot per tensor);
kfac: nn.Linear a LocalFisherLinear layer form, nn.Embedding a KroneckerRoot parametrization (W̄ = weightᵀ, a
diagonal input factor under "expand"), LayerNorm a DenseRoot (exact block), nn.MultiheadAttention's
``in_proj_weight``/``in_proj_bias`` and ``out_proj`` KroneckerRoot parametrizations (torch reads them
functionally, so no module swap is possible there).
"""

from __future__ import annotations

import copy
import math
from functools import cache
from unittest import mock

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from test_reconstruct_invariants import check_root, coordinate_map, pi_split, rel, wbar_permutation
from torch import Tensor, nn
from torch.nn.utils import parametrize

from fisherlab.errors import InputError, UnsupportedLayerError
from fisherlab.reconstruction import (
    DenseRoot,
    DiagonalRoot,
    KroneckerRoot,
    LocalFisherLinear,
    ReadOnlyTensorError,
    reconstruct,
)

DT = torch.float64
LAM = 1e-2
LR = 0.3
CAT = ref.RefLikelihood("categorical")


# ------------------------------------------------------------------------------------------------ models
class Attention(nn.Module):
    """Causal self-attention: packed ``qkv`` Linear, SDPA, ``proj`` Linear."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        N, T, d = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(N, T, d))


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NanoGPT(nn.Module):
    """Token ids (N, T) → logits (N, vocab) of the next token after the sequence (last position)."""

    def __init__(self, vocab: int = 7, length: int = 4, d: int = 6, heads: int = 2, hidden: int = 12,
                 layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Embedding(length, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.position(torch.arange(x.shape[1], device=x.device).expand(x.shape))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, -1]))


class SequenceGPT(NanoGPT):
    """The same GPT returning the logits at every position (N, T, vocab): language modelling."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.position(torch.arange(x.shape[1], device=x.device).expand(x.shape))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class EncoderWithHead(nn.TransformerEncoder):
    """nn.TransformerEncoder (2 post-LN ReLU layers, batch_first, dropout 0: torch's fast-path configuration),
    then the mean over positions and a Linear ``head``: (N, T, d) → (N, classes)."""

    def __init__(self, d: int = 6, heads: int = 2, hidden: int = 8, classes: int = 3):
        layer = nn.TransformerEncoderLayer(d, heads, hidden, dropout=0.0, batch_first=True)
        super().__init__(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(super().forward(x).mean(1))


@cache
def problem(name: str) -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """(model, X, y, X2, y2) in float64, eval mode; (X2, y2) a second batch for refreshes.

    ``"gpt"``: P = 835 (the invariant grid); ``"gpt-2k"``: P = 2,079 (the slow test); ``"gpt-seq"``: the P = 835
    GPT with logits at every position, labels (N, T), the first token and one more ignored (−100);
    ``"encoder"``: P = 625.
    """
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(7)
    if name.startswith("gpt"):
        model = {"gpt": NanoGPT, "gpt-seq": SequenceGPT}.get(name, lambda: NanoGPT(9, 5, 10, hidden=20))()
        V, T = model.embed.num_embeddings, model.position.num_embeddings
        shape = (6, T) if name == "gpt-seq" else (6,)
        draw = [(torch.randint(0, V, (6, T), generator=gen), torch.randint(0, V, shape, generator=gen))
                for _ in range(2)]
        if name == "gpt-seq":
            for _, y in draw:
                y[:, 0] = y[1, 2] = -100
    else:
        model = EncoderWithHead()
        draw = [(torch.randn(6, 4, 6, generator=gen, dtype=DT), torch.randint(0, 3, (6,), generator=gen))
                for _ in range(2)]
    model = model.to(DT).eval()
    with torch.no_grad():  # non-trivial norms: their affine parameters matter to the Fisher
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.3 * torch.randn(m.weight.shape, generator=gen, dtype=DT))
                m.bias.add_(0.3 * torch.randn(m.bias.shape, generator=gen, dtype=DT))
    (X, y), (X2, y2) = draw
    return model, X, y, X2, y2


#: Reconstruction cases: id → (structure, options). None needs ``unsupported="block"``: every module of the GPT
#: and the encoder (nn.MultiheadAttention and its out_proj included) has a Kronecker rule or is a norm.
CASES = {
    "dense": ("dense", {}),
    "block": ("block", {}),
    "diag": ("diag", {}),
    "kfac": ("kfac", {}),
    "kfac-reduce": ("kfac", {"approx": "reduce"}),
    "ekfac": ("ekfac", {}),
    "unit": ("unit", {}),
    "input": ("input", {}),
}
GRID = ([("gpt", c) for c in ("dense", "block", "diag", "kfac", "kfac-reduce", "ekfac", "unit", "input")]
        + [("gpt-seq", c) for c in ("dense", "block", "diag", "kfac")]
        + [("encoder", c) for c in ("dense", "block", "diag", "kfac", "kfac-reduce", "ekfac", "unit")])


def build(name: str, case: str, **kw) -> nn.Module:
    model, X, y, _, _ = problem(name)
    structure, opts = CASES[case]
    return reconstruct(model, (X, y), structure=structure, damping=LAM, **opts, **kw)


# ------------------------------------------------------------------------------------------------ references
def owner(name: str) -> str:
    return name.rpartition(".")[0]


def kronecker_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules KFAC factorises: Linear, Embedding, self-attention MHA (its packed in_proj) and MHA's out_proj (a
    NonDynamicallyQuantizableLinear)."""
    types = (nn.Linear, nn.Embedding, nn.MultiheadAttention, nn.modules.linear.NonDynamicallyQuantizableLinear)
    return {p: m for p, m in model.named_modules() if type(m) in types}


def self_attention(mha: nn.MultiheadAttention, x: Tensor, seen: dict, path: str) -> Tensor:
    """nn.MultiheadAttention(x, x, x) (batch_first, no mask, eval) written out; records (x, q|k|v) under ``path``."""
    N, T, E = x.shape
    h = mha.num_heads
    qkv = x @ mha.in_proj_weight.T + mha.in_proj_bias
    seen[path] = (x, qkv)
    q, k, v = (t.reshape(N, T, h, E // h).transpose(1, 2) for t in qkv.chunk(3, -1))
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(E // h), -1) @ v
    return mha.out_proj(attn.transpose(1, 2).reshape(N, T, E))


def capture(model: nn.Module, mods: dict[str, nn.Module], seen: dict) -> list:
    """Hooks recording (input, output) of every Kronecker module; an MHA's output is replaced by
    :func:`self_attention` (so that its packed projection q|k|v is a tensor of the graph)."""
    hooks = []
    for p, m in mods.items():
        if isinstance(m, nn.MultiheadAttention):
            def hook(m, args, kwargs, out, p=p):
                assert args[0] is args[1] is args[2] and kwargs.get("key_padding_mask") is None
                return self_attention(m, args[0], seen, p), None
            hooks.append(m.register_forward_hook(hook, with_kwargs=True))
        else:
            hooks.append(m.register_forward_hook(lambda m, i, o, p=p: seen.__setitem__(p, (i[0], o))))
    return hooks


def loss(out: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over samples, or over the counted tokens of (N, T, C) outputs (torch's ignore_index)."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten())


def output_fisher(z: Tensor, y: Tensor, scale: float) -> Tensor:
    """Λ_n for one sample's outputs z (C,) or (T, C): Λ(z), or scale · blockdiag_t m_t Λ(z_t) (m_t: label ≠ −100)."""
    if z.dim() == 1:
        return CAT.output_fisher(z)
    return torch.block_diag(*[scale * float(t != -100) * CAT.output_fisher(zt) for zt, t in zip(z, y, strict=True)])


def true_fisher(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """(1/N) Σ_n J_nᵀ Λ_n J_n: tests/reference.py, or for a sequence model the token mean (scale c = N / N_tok)."""
    if y.dim() == 1:
        return ref.true_fisher(model, X, CAT)
    J = ref.jacobians(nn.Sequential(model, nn.Flatten(1)), X)  # (N, T·C, P)
    c = len(X) / int((y != -100).sum())
    Z = ref.outputs(model, X)
    return sum(J[n].T @ output_fisher(Z[n], y[n], c) @ J[n] for n in range(len(X))) / len(X)


def mean_gradient(model: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """∇L: per-sample loop gradients averaged (tests/reference.py), or for a sequence model autograd of the token
    mean (torch's cross-entropy with ignore_index)."""
    if y.dim() == 1:
        return ref.loss_gradients(model, X, y, CAT).mean(0)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(model(X), y), list(model.parameters()))])


def kfac_factors(model: nn.Module, X: Tensor, y: Tensor, approx: str) -> dict[str, tuple[Tensor, Tensor]]:
    """Per Kronecker module (A, S) from hooks and per-sample loops (Eschenhagen et al. 2023, expand/reduce).

    ā_{n,l}: the layer input at position l with a trailing 1 (bias), or the one-hot token row (Embedding);
    δ_{n,r,l} = ∂(m_rᵀ z_n)/∂y_{n,l}, m_r the columns of Λ_n^{1/2} (:func:`output_fisher`; z_n flattened for a
    sequence model), y the layer output (q|k|v for an MHA).
    expand: A = Σ ā āᵀ/(N L), S = Σ δ δᵀ/N; reduce: ā_n = mean_l ā_{n,l}, δ_{n,r} = Σ_l δ_{n,r,l},
    A = Σ ā_n ā_nᵀ/N, S = Σ δ_{n,r} δ_{n,r}ᵀ/N.
    """
    mods = kronecker_modules(model)
    scale = len(X) / int((y != -100).sum())
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = capture(model, mods, seen)
    A = {p: 0.0 for p in mods}
    S = {p: 0.0 for p in mods}
    try:
        for n in range(len(X)):
            z = model(X[n: n + 1])[0]
            w, Q = torch.linalg.eigh(output_fisher(z.detach(), y[n], scale))
            z = z.reshape(-1)
            root = Q * w.clamp_min(0).sqrt()
            outs = [seen[p][1] for p in mods]
            deltas = [torch.autograd.grad(z @ root[:, r], outs, retain_graph=True) for r in range(len(z))]
            for k, (p, m) in enumerate(mods.items()):
                a = seen[p][0].detach()
                if isinstance(m, nn.Embedding):
                    abar = F.one_hot(a.reshape(-1), m.num_embeddings).to(DT)
                else:
                    abar = a.reshape(-1, a.shape[-1])
                    if getattr(m, "bias", None) is not None or isinstance(m, nn.MultiheadAttention):
                        abar = torch.cat([abar, torch.ones(len(abar), 1, dtype=DT)], 1)
                rows = [d[k].reshape(-1, d[k].shape[-1]) for d in deltas]
                if approx == "expand":
                    A[p] = A[p] + abar.T @ abar / len(abar)
                    S[p] = S[p] + sum(r.T @ r for r in rows)
                else:
                    mean = abar.mean(0)
                    A[p] = A[p] + torch.outer(mean, mean)
                    S[p] = S[p] + sum(torch.outer(r.sum(0), r.sum(0)) for r in rows)
    finally:
        for h in hooks:
            h.remove()
    return {p: (A[p] / len(X), S[p] / len(X)) for p in mods}


def layer_mask(names: list[str], shapes: list[torch.Size]) -> Tensor:
    """(P, P) mask of the blocks of parameters sharing their owning module."""
    owners = [owner(n) for n, s in zip(names, shapes, strict=True) for _ in range(math.prod(s))]
    return torch.tensor([[a == b for b in owners] for a in owners])


def reference_metric(model: nn.Module, X: Tensor, y: Tensor, case: str) -> Tensor:
    """G (P, P) in parameter order for ``case`` at the model's current parameters."""
    structure, opts = CASES[case]
    names, params = zip(*model.named_parameters(), strict=True)
    shapes = [p.shape for p in params]
    P = sum(p.numel() for p in params)
    eye = torch.eye(P, dtype=DT)
    Fm = true_fisher(model, X, y)
    if structure == "dense":
        return Fm + LAM * eye
    if structure == "diag":
        return torch.diag(Fm.diagonal()) + LAM * eye
    G = torch.where(layer_mask(list(names), shapes), Fm, 0.0) + LAM * eye  # block, and kfac's exact blocks
    if structure == "block":
        return G
    offsets = dict(zip(names, torch.cumsum(torch.tensor([0] + [math.prod(s) for s in shapes]), 0).tolist(),
                       strict=False))
    mods = kronecker_modules(model)
    for path, (A, S) in kfac_factors(model, X, y, opts.get("approx", "expand")).items():
        members = [n for n in names if owner(n) == path]
        ix = torch.cat([torch.arange(offsets[n], offsets[n] + model.get_parameter(n).numel()) for n in members])
        if isinstance(mods[path], nn.Embedding):  # W̄ = weightᵀ (d, V): weight[v, i] sits at W̄[i, v]
            V, d = mods[path].weight.shape
            p = torch.arange(d * V).reshape(d, V).T.reshape(-1)
        else:
            p = wbar_permutation([model.get_parameter(n).shape for n in members])
        exact = torch.empty(len(p), len(p), dtype=DT)  # F_l in row-major W̄ order
        exact[p.unsqueeze(1), p.unsqueeze(0)] = Fm[ix.unsqueeze(1), ix.unsqueeze(0)]
        block = layer_block(structure, A, S, exact, isinstance(mods[path], nn.Embedding))
        G[ix.unsqueeze(1), ix.unsqueeze(0)] = block[p][:, p]
    return G


def layer_block(structure: str, A: Tensor, S: Tensor, exact: Tensor, embedding: bool) -> Tensor:
    """G_l + damping in row-major W̄ order: kfac (S + sI) ⊗ (A + aI) (π split); input I ⊗ (A + λI); unit: the
    exact (width × width) blocks of F_l per row of W̄, + λI; ekfac: (Q_S ⊗ Q_A) diag(s + λ) (Q_S ⊗ Q_A)ᵀ, Q the
    factors' eigenvectors (Q_A = I for an Embedding, whose A is diagonal), s = diag((Q_S ⊗ Q_A)ᵀ F_l (Q_S ⊗ Q_A)).
    """
    m, n = len(S), len(A)
    if structure == "kfac":
        a, s = pi_split(A, S, LAM)
        return torch.kron(S + s * torch.eye(m, dtype=DT), A + a * torch.eye(n, dtype=DT))
    if structure == "input":
        return torch.kron(torch.eye(m, dtype=DT), A + LAM * torch.eye(n, dtype=DT))
    if structure == "unit":
        mask = torch.block_diag(*[torch.ones(n, n, dtype=DT)] * m).bool()
        return torch.where(mask, exact, 0.0) + LAM * torch.eye(m * n, dtype=DT)
    Q_A = torch.eye(n, dtype=DT) if embedding else torch.linalg.eigh(A)[1]
    Q = torch.kron(torch.linalg.eigh(S)[1].contiguous(), Q_A.contiguous())  # (kron fails on eigh's strides)
    return Q @ torch.diag((Q.T @ exact @ Q).diagonal() + LAM) @ Q.T


@cache
def reference(name: str, case: str) -> tuple[Tensor, Tensor]:
    """(G, mean gradient ∇L) at the model's initial parameters."""
    model, X, y, _, _ = problem(name)
    return reference_metric(model, X, y, case), mean_gradient(model, X, y)


# ------------------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize(("name", "case"), GRID)
def test_invariant_1_same_function(name: str, case: str) -> None:
    model, X, _, _, _ = problem(name)
    net = build(name, case)
    assert rel(net(X), model(X)) < 1e-10
    with torch.no_grad():  # the encoder then takes torch's fast path on the effective tensors
        assert rel(net(X), model(X)) < 1e-10


@pytest.mark.parametrize(("name", "case"), GRID)
def test_invariant_2_gd_step_is_the_preconditioned_step(name: str, case: str) -> None:
    model, X, y, _, _ = problem(name)
    net = build(name, case)
    G, g = reference(name, case)
    assert rel(net.gd_update((X, y), LR), -LR * torch.linalg.solve(G, g)) < 1e-10
    R = coordinate_map(net)
    check_root(R, G, "eigh")
    _, g_prime = net.prime_gradient((X, y))
    assert rel(g_prime, torch.linalg.solve(R.T, g)) < 1e-10


@pytest.mark.parametrize("name", ["gpt", "encoder"])
def test_invariant_3_dense_is_exact_ngd(name: str) -> None:
    model, X, y, _, _ = problem(name)
    net = build(name, "dense", sqrt="cholesky")
    Fm = ref.true_fisher(model, X, CAT)
    L = torch.linalg.cholesky(Fm + LAM * torch.eye(len(Fm), dtype=DT))
    g = ref.loss_gradients(model, X, y, CAT).mean(0)
    assert rel(net.gd_update((X, y), LR), -LR * torch.cholesky_solve(g.unsqueeze(1), L).squeeze(1)) < 1e-10


@pytest.mark.parametrize(("name", "case"), GRID)
def test_invariant_4_refresh_keeps_the_function_and_reexpresses(name: str, case: str) -> None:
    model, X, y, X2, y2 = problem(name)
    net = build(name, case)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    net.attach(opt)
    for _ in range(2):  # move θ away from where G was computed
        opt.zero_grad()
        loss(net(X), y).backward()
        opt.step()
    moved = net.load_into(copy.deepcopy(model))
    with torch.no_grad():
        before = net(X)
    theta = net.original_vector()
    net.refresh((X2, y2))
    assert net.steps_since_refresh == 0 and net.refreshes == 1
    with torch.no_grad():
        assert rel(net(X), before) < 1e-10
    assert rel(net.original_vector(), theta) < 1e-10
    R = coordinate_map(net)
    check_root(R, reference_metric(moved, X2, y2, case), "eigh")
    assert rel(net.reconstructed_vector(), R @ theta) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("case", ["dense", "block", "diag", "kfac"])
def test_invariants_1_and_2_on_a_gpt_of_2k_parameters(case: str) -> None:
    """The same function and GD on θ' = −η G⁻¹ ∇L (reference G, 1e-10) on the GPT with P = 2,079."""
    model, X, y, _, _ = problem("gpt-2k")
    structure, opts = CASES[case]
    net = reconstruct(model, (X, y), structure=structure, damping=LAM, **opts)
    assert rel(net(X), model(X)) < 1e-10
    G = reference_metric(model, X, y, case)
    g = mean_gradient(model, X, y)
    assert rel(net.gd_update((X, y), LR), -LR * torch.linalg.solve(G, g)) < 1e-10


# ------------------------------------------------------------------------------------------------ interface
def test_gpt_kfac_forms_and_print() -> None:
    """kfac without fallback: Linear → LocalFisherLinear, Embedding → KroneckerRoot (transposed, diagonal A),
    LayerNorm → DenseRoot; print(net) shows them."""
    net = build("gpt", "kfac")
    inner = net.net
    layers = [n for n, m in inner.named_modules() if isinstance(m, LocalFisherLinear)]
    assert layers == [f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
                      ] + ["head"]
    for path in ("embed", "position"):
        root = inner.get_submodule(path).parametrizations.weight[0].root
        assert isinstance(root, KroneckerRoot) and root.input_whitening.diagonal
        assert root.input_whitening.inv_sqrt.dim() == 1  # no vocab × vocab matrix
    for path in ("blocks.0.ln1", "blocks.1.ln2", "norm"):
        module = inner.get_submodule(path)
        assert parametrize.is_parametrized(module, "weight") and parametrize.is_parametrized(module, "bias")
        assert isinstance(module.parametrizations.weight[0].root, DenseRoot)
    text = str(net)
    for word in ("LocalFisherLinear", "InputWhitening", "OutputFisher", "KroneckerRoot", "DenseRoot", "diagonal"):
        assert word in text


@pytest.mark.parametrize("case", ["dense", "block", "diag", "kfac"])
def test_encoder_forms_cover_attention_norms_and_linears(case: str) -> None:
    """in_proj_weight/in_proj_bias/out_proj and LayerNorms are parametrized under every structure (torch reads
    them functionally), linear1/linear2/head are layer forms under kfac; the roots are the documented ones."""
    net = build("encoder", case)
    layer = net.net.layers[0]
    root = {"dense": DenseRoot, "block": DenseRoot, "diag": DiagonalRoot, "kfac": KroneckerRoot}[case]
    norm = DenseRoot if case == "kfac" else root
    for module, attr, expected in ((layer.self_attn, "in_proj_weight", root), (layer.self_attn, "in_proj_bias", root),
                                   (layer.self_attn.out_proj, "weight", root), (layer.norm1, "bias", norm)):
        assert parametrize.is_parametrized(module, attr)
        assert isinstance(module.parametrizations[attr][0].group, expected)
    kfac = case == "kfac"
    assert isinstance(layer.linear1, LocalFisherLinear) == kfac and isinstance(net.net.head, LocalFisherLinear) == kfac
    assert ("LocalFisherLinear" in str(net)) == kfac
    assert "FisherParametrization" in str(net)


@pytest.mark.parametrize(("name", "case"), GRID)
def test_effective_tensors_are_the_original_coordinates_after_a_step(name: str, case: str) -> None:
    """``linear1.weight`` / ``attn.qkv.weight`` (and every tensor) read θ after one GD step on θ': θ₀ − η G⁻¹ ∇L."""
    model, X, y, _, _ = problem(name)
    net = build(name, case)
    G, g = reference(name, case)
    net.zero_grad()
    loss(net(X), y).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= LR * p.grad
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - LR * torch.linalg.solve(G, g)
    expected = dict(zip([n for n, _ in model.named_parameters()],
                        torch.split(theta, [p.numel() for p in model.parameters()]), strict=True))
    key = "layers.0.linear1.weight" if name == "encoder" else "blocks.0.attn.qkv.weight"
    read = {key: (net.net.layers[0].linear1.weight if name == "encoder" else net.net.blocks[0].attn.qkv.weight)}
    read |= {n: getattr(net.net.get_submodule(owner(n)), n.rpartition(".")[2]) for n in expected}
    for n, value in read.items():
        assert value.shape == model.get_parameter(n).shape
        assert rel(value.reshape(-1), expected[n]) < 1e-10, n


@pytest.mark.parametrize("case", ["dense", "diag", "kfac"])
def test_encoder_fast_path_under_no_grad(case: str) -> None:
    """Eval + no grad: torch's fused encoder kernel runs (once per layer) on the effective tensors."""
    model, X, _, _, _ = problem("encoder")
    net = build("encoder", case)
    fused = torch._transformer_encoder_layer_fwd
    with mock.patch.object(torch, "_transformer_encoder_layer_fwd", wraps=fused) as spy, torch.no_grad():
        out = net(X)
    assert spy.call_count == 2
    with torch.no_grad():
        assert rel(out, model(X)) < 1e-10


@pytest.mark.parametrize("case", ["dense", "diag", "kfac"])
def test_effective_tensors_are_read_only(case: str) -> None:
    net = build("gpt", case)
    for module in (net.net.blocks[0].attn.qkv, net.net.blocks[0].ln1, net.net.embed):
        with pytest.raises(ReadOnlyTensorError, match="read-only"):
            module.weight = torch.zeros_like(module.weight.detach())
    if case == "kfac":
        qkv = net.net.blocks[0].attn.qkv
        for attr, v in (("weight", nn.Parameter(torch.zeros(18, 6, dtype=DT))), ("bias", None)):
            with pytest.raises(ReadOnlyTensorError, match="weight_prime"):
                setattr(qkv, attr, v)
    model, X, _, _, _ = problem("gpt")
    assert rel(net(X), model(X)) < 1e-10  # nothing was changed


@pytest.mark.parametrize("case", ["dense", "kfac"])
def test_attention_tensors_are_read_only(case: str) -> None:
    """MHA's in_proj_weight / in_proj_bias / out_proj.weight (parametrizations under every structure) and a layer
    form's linear1.bias refuse assignment by name; the function is unchanged."""
    model, X, _, _, _ = problem("encoder")
    net = build("encoder", case)
    layer = net.net.layers[0]
    for module, attr in ((layer.self_attn, "in_proj_weight"), (layer.self_attn, "in_proj_bias"),
                         (layer.self_attn.out_proj, "weight"), (layer.linear1, "bias")):
        with pytest.raises(ReadOnlyTensorError, match="read-only"):
            setattr(module, attr, torch.zeros_like(getattr(module, attr).detach()))
    assert rel(net(X), model(X)) < 1e-10


# ------------------------------------------------------------------------------------------------ bad input
def test_tied_embeddings_are_refused_by_name() -> None:
    model, X, y, _, _ = problem("gpt")
    tied = copy.deepcopy(model)
    tied.head = nn.Linear(6, 7, bias=False, dtype=DT)
    tied.head.weight = tied.embed.weight
    for structure in ("dense", "kfac"):
        with pytest.raises(InputError, match=r"'embed\.weight' and 'head\.weight'"):
            reconstruct(tied, (X, y), structure=structure, damping=LAM)


class CrossAttention(nn.Module):
    """Queries (N, T, 6) attend to a memory (N, T, 4) (kdim = vdim = 4: no packed in_proj), then a head."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, kdim=4, vdim=4, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(x[..., :6], x[..., 6:], x[..., 6:], need_weights=False)[0].mean(1))


def test_attention_without_a_kronecker_rule_is_refused_by_name() -> None:
    """kfac refuses an MHA its rule does not cover (kdim ≠ embed_dim), naming it and the reason;
    unsupported="block" gives it an exact block of F."""
    model = CrossAttention().to(DT).eval()
    X, y = torch.randn(5, 3, 10, dtype=DT), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(UnsupportedLayerError, match=r"'attn' \(MultiheadAttention\) has kdim"):
        reconstruct(model, (X, y), structure="kfac", damping=LAM)
    net = reconstruct(model, (X, y), structure="kfac", damping=LAM, unsupported="block")
    assert isinstance(net.net.attn.parametrizations.q_proj_weight[0].root, DenseRoot)
    assert isinstance(net.net.head, LocalFisherLinear)
    flat_owners = [owner(n) for n, p in model.named_parameters() for _ in range(p.numel())]
    ix = torch.tensor([i for i, o in enumerate(flat_owners) if o == "attn"])  # q/k/v_proj_weight, in_proj_bias
    Gm = ref.true_fisher(model, X, CAT)[ix][:, ix] + LAM * torch.eye(len(ix), dtype=DT)  # G is block diagonal
    g = ref.loss_gradients(model, X, y, CAT).mean(0)
    assert rel(net.gd_update((X, y), LR)[ix], -LR * torch.linalg.solve(Gm, g[ix])) < 1e-10


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(InputError, match="transposed"):
        KroneckerRoot([torch.Size((4, 3)), torch.Size((4,))], DT, transposed=True)
    root = KroneckerRoot([torch.Size((5, 3))], DT, transposed=True, diagonal_input=True)
    with pytest.raises(InputError, match="input factor of shape"):
        root.update({"A": torch.eye(5, dtype=DT), "S": torch.eye(3, dtype=DT)}, LAM, "eigh")
