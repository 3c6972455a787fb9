"""Brute-force per-layer references for the Kronecker-factored structures (KFAC, EKFAC, unit-wise).

Written without fisherlab.layers: input patches by explicit loops over output locations, output Jacobians by one
autograd backward per output, the flat-index → W̄ (row, column) map from the parameter shapes, and Kronecker
blocks entry by entry. Everything is float64.
"""

from __future__ import annotations

import reference as ref
import torch
import torch.nn.functional as nnf
from torch import Tensor, nn


def wbar_coords(model: nn.Module, layer: str, names: list[str]) -> tuple[Tensor, Tensor, int]:
    """(rows, cols, width) of W̄ = [W_flat, b] for every flat position of the layer's selected parameters."""
    module = model.get_submodule(layer)
    in_eff = module.weight[0].numel()
    rows, cols = [], []
    for name in names:
        if name.endswith("weight"):
            t = torch.arange(module.weight.numel())
            rows.append(t // in_eff)
            cols.append(t % in_eff)
        else:
            t = torch.arange(module.bias.numel())
            rows.append(t)
            cols.append(torch.full_like(t, in_eff))
    has_bias = any(n.endswith("bias") for n in names)
    return torch.cat(rows), torch.cat(cols), in_eff + has_bias


def patches(module: nn.Module, x: Tensor) -> Tensor:
    """Rows ā_l (L, in_eff + 1) of one sample x (*input_shape), by slicing the padded input per output location."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(1, -1)
    else:
        d = x.dim() - 1
        pad = [p for p in reversed(module.padding) for _ in range(2)]
        xp = nnf.pad(x, pad)
        k, s, dl = module.kernel_size, module.stride, module.dilation
        out_sizes = [(xp.shape[1 + i] - dl[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(d)]
        rows = []
        for loc in torch.cartesian_prod(*[torch.arange(o) for o in out_sizes]).reshape(-1, d):
            idx = [slice(None)] + [slice(int(loc[i]) * s[i], int(loc[i]) * s[i] + dl[i] * (k[i] - 1) + 1, dl[i])
                                   for i in range(d)]
            rows.append(xp[tuple(idx)].reshape(-1))
        rows = torch.stack(rows)
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


def layer_input_output(model: nn.Module, layer: str, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(layer input (*in), layer output (1, out, *spatial) with the graph kept, model output z (C,)), one sample."""
    store = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.update(a=i[0], y=o))
    z = model(x.unsqueeze(0))[0]
    h.remove()
    return store["a"][0].detach(), store["y"], z


def output_jacobian(model: nn.Module, layer: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """(J (C, out, L) = ∂z/∂(layer output at each location), z (C,)) for one sample, one backward per output."""
    _, y, z = layer_input_output(model, layer, x)
    J = torch.stack([torch.autograd.grad(z[c], y, retain_graph=True)[0][0] for c in range(z.shape[0])])
    return J.reshape(J.shape[0], J.shape[1], -1), z.detach()


def output_factors(kind: str, lik: ref.RefLikelihood, z: Tensor, y: Tensor, labels: Tensor | None) -> Tensor:
    """Q (C, C) with the sample's S-contribution Σ_l J_lᵀ Q J_l: Λ(z) (true), g gᵀ (empirical), mean g_s g_sᵀ (mc)."""
    def grad(target: Tensor) -> Tensor:
        zz = z.detach().clone().requires_grad_(True)
        return torch.autograd.grad(lik.nll(zz, target), zz)[0]

    if kind == "true":
        return lik.output_fisher(z)
    if kind == "empirical":
        g = grad(y)
        return torch.outer(g, g)
    gs = [grad(t) for t in labels]
    return sum(torch.outer(g, g) for g in gs) / len(gs)


def kfac_factors(model: nn.Module, layer: str, X: Tensor, Y: Tensor, lik: ref.RefLikelihood, kind: str,
                 labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """KFC-expand factors with a bias column: A = mean_n (1/L) Σ_l ā ā ᵀ, S = mean_n Σ_l J_lᵀ Q_n J_l."""
    module = model.get_submodule(layer)
    A, S = 0, 0
    for n in range(X.shape[0]):
        a, _, _ = layer_input_output(model, layer, X[n])
        P = patches(module, a)
        A = A + P.T @ P / P.shape[0]
        J, z = output_jacobian(model, layer, X[n])
        Q = output_factors(kind, lik, z, Y[n], None if labels is None else labels[n])
        S = S + sum(J[:, :, i].T @ Q @ J[:, :, i] for i in range(J.shape[2]))
    return A / X.shape[0], S / X.shape[0]


def kron_block(A: Tensor, S: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """The block with entries S[i_a, i_b] · A[j_a, j_b] for flat positions with W̄ coordinates (i, j)."""
    return S[rows][:, rows] * A[cols][:, cols]


def rel_fro(approx: Tensor, exact: Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F."""
    return float(torch.linalg.matrix_norm(approx - exact) / torch.linalg.matrix_norm(exact))
