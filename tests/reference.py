"""Independent float64 brute-force references for the Fisher engine.

Nothing here uses ``torch.func`` or fisherlab's likelihood classes: per-sample Jacobians come from plain
``torch.autograd.grad`` loops over samples and outputs, the output-space Fishers Λ(z) and the losses are written
out again from their textbook formulas, and loss Hessians in output space come from double backward. The Fisher
variants (docs/method.md) are then assembled as explicit sums over samples:

- true:      (1/N) Σ_n J_nᵀ Λ(z_n) J_n
- empirical: (1/N) Σ_n g_n g_nᵀ,            g_n = ∇θ ℓ(f(x_n), y_n)
- mc:        (1/(N S)) Σ_n Σ_s g_ns g_nsᵀ,  g_ns = ∇θ ℓ(f(x_n), ŷ_ns) for given sampled labels ŷ
- ggn:       (1/N) Σ_n J_nᵀ H_n J_n,        H_n = ∇²_z ℓ(z_n, y_n)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NLL = Callable[[Tensor, Tensor], Tensor]


def _log1pexp(z: Tensor) -> Tensor:
    """log(1 + eᶻ) elementwise, stable for large |z|."""
    return z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))


@dataclass(frozen=True)
class RefLikelihood:
    """Textbook formulas of one likelihood for a single sample: z of shape (C,).

    Attributes:
        name: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or ``"softplus_gaussian"``.
        sigma: σ of the Gaussian likelihoods.
    """

    name: str
    sigma: float = 1.0

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        """−log p(y | z) without constants (a 0-dim tensor)."""
        if self.name == "categorical":
            m = z.max()
            return m + torch.log(torch.exp(z - m).sum()) - z[int(y)]
        if self.name == "gaussian":
            return 0.5 * ((z - y) ** 2).sum() / self.sigma**2
        if self.name == "bernoulli":
            return (_log1pexp(z) - y * z).sum()
        if self.name == "softplus_gaussian":
            return 0.5 * ((_log1pexp(z) - y) ** 2).sum() / self.sigma**2
        raise ValueError(self.name)

    def output_fisher(self, z: Tensor) -> Tensor:
        """Λ(z), shape (C, C)."""
        if self.name == "categorical":
            e = torch.exp(z - z.max())
            p = e / e.sum()
            return torch.diag(p) - torch.outer(p, p)
        if self.name == "gaussian":
            return torch.eye(len(z), dtype=z.dtype) / self.sigma**2
        sig = 1 / (1 + torch.exp(-z))
        if self.name == "bernoulli":
            return torch.diag(sig * (1 - sig))
        if self.name == "softplus_gaussian":
            return torch.diag(sig**2) / self.sigma**2
        raise ValueError(self.name)

    def hessian(self, z: Tensor, y: Tensor) -> Tensor:
        """∇²_z ℓ(z, y) by double backward, shape (C, C)."""
        z = z.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.nll(z, y), z, create_graph=True)
        return torch.stack([torch.autograd.grad(g[c], z, retain_graph=True)[0] for c in range(len(z))])


def selected(model: nn.Module, names: list[str] | None = None) -> list[Tensor]:
    """The model's parameter tensors for ``names`` (default: every trainable one), in model order."""
    chosen = [(n, p) for n, p in model.named_parameters() if (p.requires_grad if names is None else n in names)]
    return [p for _, p in chosen]


def _flat_grad(out: Tensor, params: list[Tensor]) -> Tensor:
    grads = torch.autograd.grad(out, params, retain_graph=True, allow_unused=True)
    flat = [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params, strict=True)]
    return torch.cat(flat)


def jacobians(model: nn.Module, X: Tensor, names: list[str] | None = None) -> Tensor:
    """Per-sample Jacobians ∂z_n/∂θ, shape (N, C, P), one backward pass per sample and output."""
    params = selected(model, names)
    rows = []
    for n in range(X.shape[0]):
        z = model(X[n: n + 1])[0]
        rows.append(torch.stack([_flat_grad(z[c], params) for c in range(z.shape[0])]))
    return torch.stack(rows)


def outputs(model: nn.Module, X: Tensor) -> Tensor:
    """z_n = f(x_n) evaluated one sample at a time, shape (N, C)."""
    with torch.no_grad():
        return torch.cat([model(X[n: n + 1]) for n in range(X.shape[0])])


def loss_gradients(model: nn.Module, X: Tensor, Y: Tensor, lik: RefLikelihood,
                   names: list[str] | None = None) -> Tensor:
    """g_n = ∇θ ℓ(f(x_n), Y[n]) for every sample, shape (N, P)."""
    params = selected(model, names)
    return torch.stack([_flat_grad(lik.nll(model(X[n: n + 1])[0], Y[n]), params) for n in range(X.shape[0])])


def true_fisher(model: nn.Module, X: Tensor, lik: RefLikelihood, names: list[str] | None = None) -> Tensor:
    """(1/N) Σ_n J_nᵀ Λ(z_n) J_n, shape (P, P)."""
    J, Z = jacobians(model, X, names), outputs(model, X)
    return sum(J[n].T @ lik.output_fisher(Z[n]) @ J[n] for n in range(len(X))) / len(X)


def ggn(model: nn.Module, X: Tensor, y: Tensor, lik: RefLikelihood, names: list[str] | None = None) -> Tensor:
    """(1/N) Σ_n J_nᵀ ∇²_z ℓ(z_n, y_n) J_n, shape (P, P)."""
    J, Z = jacobians(model, X, names), outputs(model, X)
    return sum(J[n].T @ lik.hessian(Z[n], y[n]) @ J[n] for n in range(len(X))) / len(X)


def empirical_fisher(model: nn.Module, X: Tensor, y: Tensor, lik: RefLikelihood,
                     names: list[str] | None = None) -> Tensor:
    """(1/N) Σ_n g_n g_nᵀ with the observed labels, shape (P, P)."""
    G = loss_gradients(model, X, y, lik, names)
    return G.T @ G / len(X)


def mc_fisher(model: nn.Module, X: Tensor, labels: Tensor, lik: RefLikelihood,
              names: list[str] | None = None) -> Tensor:
    """(1/(N S)) Σ_n Σ_s g_ns g_nsᵀ for given sampled labels of shape (N, S) or (N, S, C); shape (P, P)."""
    S = labels.shape[1]
    F = sum(empirical_fisher(model, X, labels[:, s], lik, names) for s in range(S))
    return F / S


def fisher(kind: str, model: nn.Module, X: Tensor, y: Tensor, lik: RefLikelihood, *,
           labels: Tensor | None = None, names: list[str] | None = None) -> Tensor:
    """The reference Fisher of ``kind`` (``"true"``, ``"empirical"``, ``"mc"`` with ``labels``, ``"ggn"``)."""
    if kind == "true":
        return true_fisher(model, X, lik, names)
    if kind == "empirical":
        return empirical_fisher(model, X, y, lik, names)
    if kind == "ggn":
        return ggn(model, X, y, lik, names)
    if kind == "mc":
        assert labels is not None, "the MC reference needs the sampled labels"
        return mc_fisher(model, X, labels, lik, names)
    raise ValueError(kind)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual − expected| / max |expected| (both moved to float64 on the CPU)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    return float((a - e).abs().max() / e.abs().max())


def assert_close(actual: Tensor, expected: Tensor, rtol: float, what: str = "") -> None:
    """Assert max-norm relative agreement: max |actual − expected| ≤ rtol · max |expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def damped_kfac_dense(kfac, damping: float) -> Tensor:
    """The dense (P, P) matrix of a KFAC structure damped as the KFAC step damps it (split "pi").

    Per layer (S + sI) ⊗ (A + aI) with a = π√λ, s = √λ/π, π² = (tr A/dim A)/(tr S/dim S) (a diagonal A of an
    Embedding gets a added to its diagonal); exact norm blocks B + λI. Written from the formula, not from the
    library's damping code.
    """
    import dataclasses
    import math

    factors = {}
    for path, f in kfac.factors.items():
        tr_a = f.A.sum() / f.A.numel() if f.A.dim() == 1 else f.A.trace() / f.A.shape[0]
        pi = math.sqrt(float(tr_a) / float(f.S.trace() / f.S.shape[0]))
        a, s = pi * math.sqrt(damping), math.sqrt(damping) / pi
        A = f.A + a if f.A.dim() == 1 else f.A + a * torch.eye(f.A.shape[0], dtype=f.A.dtype)
        factors[path] = dataclasses.replace(f, A=A, S=f.S + s * torch.eye(f.S.shape[0], dtype=f.S.dtype))
    exact = {p: B + damping * torch.eye(B.shape[0], dtype=B.dtype) for p, B in kfac.exact_blocks.items()}
    return dataclasses.replace(kfac, factors=factors, exact_blocks=exact).to_dense()
