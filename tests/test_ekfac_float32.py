"""float32 EKFAC against an independent float64 EKFAC of the same model, data and MC labels (issue 15).

The reference: per-sample float64 gradients by an autograd loop (the true Fisher's rows J_nᵀ L_n e_r with
L_n L_nᵀ = Λ(z_n) = diag(p) − ppᵀ, the MC Fisher's the gradients at fisherlab's sampled labels), the KFAC factors
from the layers' inputs and the rows' bias gradients, their explicit float64 eigendecompositions, and the scalings
s = (1/N) Σ_{n,r} (Q_Sᵀ G_{n,r} Q_A)² of the full per-sample gradients G = [dW | db]. The model has more hidden units
than samples, as bench_peers' MLP (1,024 wide, 512 samples): each hidden factor is rank-deficient, a null space of
over 200 numerically zero eigenvalues, ε·‖M‖ apart in float32. A float32 ``eigh`` of these 320² / 321² factors has
a backward error of 1.1–1.9e-6·‖M‖ (‖QᵀQ − I‖_F 1.6–1.8e-5), 5–10 times the factors' own float32 rounding
(1.6–2.3e-7), and put EKFAC 3.4e-5 (true) / 1.1e-5 (MC) from the reference (the default, ``eigh_dtype=None``);
decomposed in float64 (``eigh_dtype=torch.float64``) it is 4.9e-7 / 4.8e-7 away, the factors' rounding.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError
from fisherlab.structures.ekfac import EKFACFisher

F64 = torch.float64
N, WIDTH, CLASSES = 96, 320, 3
#: float32 EKFAC ↔ float64 reference, relative Frobenius norm of K V, per ``eigh_dtype`` (measured: 4.9e-7 with the
#: factors decomposed in float64, 1.1e-5–3.4e-5 with a float32 eigh).
TOL32 = {F64: 3e-6, None: 1e-4}


def model_and_data() -> tuple[nn.Sequential, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(40, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                          nn.Linear(WIDTH, CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    X = torch.randn(N, 40, generator=g)
    y = torch.randint(CLASSES, (N,), generator=g)
    return model, X, y


def gradient_rows(model: nn.Sequential, X: Tensor, kind: str, labels: Tensor | None,
                  params: list[Tensor]) -> Iterator[tuple[Tensor, ...]]:
    """Per-sample rows g_{n,r} of the Fisher (1/N) Σ_{n,r} g gᵀ, as gradients of ``params``, one autograd call each:
    true (r over the C columns of L_n, L_n L_nᵀ = diag(p) − ppᵀ) or MC at ``labels`` (one row)."""
    for n in range(len(X)):
        z = model(X[n: n + 1])[0]
        if kind == "mc":
            yield torch.autograd.grad(-z.log_softmax(0)[labels[n]], params)
            continue
        p = z.detach().softmax(0)
        L = torch.diag(p.sqrt()) - p[:, None] * p.sqrt()[None, :]  # L Lᵀ = diag(p) − ppᵀ (Σ p = 1)
        for r in range(len(p)):
            yield torch.autograd.grad(z @ L[:, r], params, retain_graph=True)


def reference_ekfac_matmat(model: nn.Sequential, X: Tensor, kind: str, labels: Tensor | None, V: Tensor) -> Tensor:
    """EKFAC V (P, k) in float64, per Linear layer in W̄ = [W | b] order: the factors A = (1/N) Σ ā āᵀ and
    S = (1/N) Σ δ δᵀ (δ: a row's bias gradient), their eigh, and s from the full per-sample gradients [dW | db]."""
    linear = [m for m in model if isinstance(m, nn.Linear)]
    inputs, h = [], X
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                inputs.append(torch.cat([h, torch.ones(len(h), 1, dtype=F64)], 1))  # ā (N, in + 1)
            h = m(h)
    S = [torch.zeros(m.out_features, m.out_features, dtype=F64) for m in linear]
    for rows in gradient_rows(model, X, kind, labels, [m.bias for m in linear]):
        for Sl, delta in zip(S, rows, strict=True):
            Sl += torch.outer(delta, delta) / N
    Q = [(torch.linalg.eigh(a.T @ a / N).eigenvectors, torch.linalg.eigh(Sl).eigenvectors)
         for a, Sl in zip(inputs, S, strict=True)]
    s = [torch.zeros(m.out_features, m.in_features + 1, dtype=F64) for m in linear]
    params = [t for m in linear for t in (m.weight, m.bias)]
    for rows in gradient_rows(model, X, kind, labels, params):
        for sl, (Q_A, Q_S), dW, db in zip(s, Q, rows[::2], rows[1::2], strict=True):
            sl += (Q_S.T @ torch.cat([dW, db[:, None]], 1) @ Q_A).square() / N
    out, start = [], 0
    for m, sl, (Q_A, Q_S) in zip(linear, s, Q, strict=True):
        o, i = m.weight.shape
        Vl = torch.cat([V[start: start + o * i].reshape(o, i, -1), V[start + o * i: start + o * i + o, None]], 1)
        Kl = torch.einsum("os,sjk,ij->oik", Q_S, sl[:, :, None] * torch.einsum("os,oik,ij->sjk", Q_S, Vl, Q_A), Q_A)
        out += [Kl[:, :-1].reshape(o * i, -1), Kl[:, -1]]
        start += o * i + o
    return torch.cat(out)


def rel_fro(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.norm(a.double() - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("eigh_dtype", [F64, None])
@pytest.mark.parametrize("kind", ["true", "mc"])
def test_float32_ekfac_within_tolerance_of_a_float64_reference(kind, eigh_dtype):
    model, X, y = model_and_data()
    engine = FisherEngine(model, (X, y), "categorical", kind=kind, dtype=torch.float32, seed=3, progress=False)
    E32 = EKFACFisher.from_engine(engine, eigh_dtype=eigh_dtype)
    assert E32.meta["eigh_dtype"] == ("float64" if eigh_dtype is F64 else "float32")
    labels = engine._labels[:, 0] if kind == "mc" else None
    model64 = model.double()  # (in place: E32 is built)
    V = torch.randn(E32.spec.dim, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    expected = reference_ekfac_matmat(model64, X.double(), kind, labels, V)
    # the reference's conventions are fisherlab's: its float64 EKFAC agrees (the MC Fisher at labels ŷ is the
    # empirical Fisher with targets ŷ)
    E64 = EKFACFisher.from_engine(FisherEngine(model64, (X.double(), y if labels is None else labels),
                                               "categorical", kind="true" if kind == "true" else "empirical",
                                               dtype=F64, progress=False))
    assert rel_fro(E64 @ V, expected) < 1e-10
    # the factors are rank-deficient: null spaces of near-equal eigenvalues (ε-apart in float32)
    hidden = [f for f in E32.factors.values() if f.A.shape[0] > N]
    assert len(hidden) == 2
    for f in hidden:
        w = torch.linalg.eigvalsh(f.A.double())
        assert int((w < 1e-6 * w[-1]).sum()) >= WIDTH + 1 - N
    err = rel_fro(E32 @ V.float(), expected)
    print(f"{kind}, eigh_dtype={eigh_dtype}: float32 EKFAC to the float64 reference {err:.2e} "
          f"(tolerance {TOL32[eigh_dtype]:.0e})")
    assert err < TOL32[eigh_dtype]


@pytest.mark.parametrize("bad", [torch.int64, "float64", 64])
def test_eigh_dtype_must_be_a_floating_dtype(bad):
    model, X, y = model_and_data()
    engine = FisherEngine(model, (X[:8], y[:8]), "categorical", kind="true", dtype=torch.float32, progress=False)
    with pytest.raises(InputError, match="eigh_dtype"):
        EKFACFisher.from_engine(engine, eigh_dtype=bad)


def test_eigh_dtype_below_the_fishers_decomposes_in_the_fishers():
    """eigh_dtype asks for at least that precision: float16 on a float32 Fisher decomposes in float32 (recorded so),
    the same bits as the default."""
    model, X, y = model_and_data()
    engine = FisherEngine(model, (X[:8], y[:8]), "categorical", kind="true", dtype=torch.float32, progress=False)
    low, default = (EKFACFisher.from_engine(engine, eigh_dtype=d) for d in (torch.float16, None))
    assert low.meta["eigh_dtype"] == default.meta["eigh_dtype"] == "float32"
    V = torch.randn(low.spec.dim, 2, generator=torch.Generator().manual_seed(2))
    assert torch.equal(low @ V, default @ V)
