"""sqrt="lowrank": Kronecker factors replaced by their top-k eigen-part plus mean remainder (docs/method.md, Nyström
roots for large blocks), checked against a metric assembled here from the Fisher factors.

The reference takes only the subspace U from the network (the randomized eigensolver is checked on its own in
test_linalg_randomized.py and, on these small factors, is an exact eigendecomposition, checked below) and builds
M̃ = U (UᵀMU) Uᵀ + σ (I − UUᵀ), σ = (tr M − tr UᵀMU)/(n − k), the damping split and the Kronecker blocks itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_reconstruct_invariants import (
    DT,
    LAM,
    LR,
    coordinate_map,
    mean_gradient,
    pi_split,
    problem,
    rel,
    sgd_steps,
    wbar_permutation,
)
from torch import Tensor, nn

from fisherlab import fisher
from fisherlab.errors import InputError
from fisherlab.params import ParamSpec
from fisherlab.reconstruction import reconstruct
from fisherlab.reconstruction.roots import damped_roots, lowrank_roots

CASES = [(name, k) for name in ("mlp", "cnn2d", "cnn1d") for k in (1, 2)]


def truncated(M: Tensor, U: Tensor | None) -> Tensor:
    """M̃ for the subspace U (n, k); M itself when the factor has no low-rank form."""
    if U is None:
        return M
    n, k = U.shape
    C = U.T @ M @ U
    sigma = (M.trace() - C.trace()).clamp_min(0) / (n - k)
    return U @ C @ U.T + sigma * (torch.eye(n, dtype=DT) - U @ U.T)


def lowrank_metric(net: nn.Module, model: nn.Module, X: Tensor, y: Tensor, k: int, structure: str = "kfac") -> Tensor:
    """G̃ (P, P) in flat order: blocks (S̃ + sI) ⊗ (Ã + aI), π-split of λ from the full factors (kfac), or
    I ⊗ (Ã + λI) (input)."""
    spec = ParamSpec.from_model(model)
    G = torch.zeros(spec.dim, spec.dim, dtype=DT)
    struct = fisher(model, (X, y), structure="kfac")
    for path, f in struct.factors.items():
        layer = net.net.get_submodule(path)
        roots = {"A": (f.A, layer.input_whitening)}
        if structure == "kfac":
            roots["S"] = (f.S, layer.output_fisher)
        for M, root in roots.values():
            assert (root.basis is not None) == (len(M) > 2 * k)  # the low-rank form only where it saves work
        At = truncated(f.A, layer.input_whitening.basis)
        if structure == "kfac":
            St = truncated(f.S, layer.output_fisher.basis)
            a, s = pi_split(f.A, f.S, LAM)
        else:
            assert layer.output_fisher is None
            St, a, s = torch.zeros_like(f.S), LAM, 1.0
        block = torch.kron(St + s * torch.eye(len(St), dtype=DT), At + a * torch.eye(len(At), dtype=DT))
        p = wbar_permutation([spec.shapes[spec.names.index(n)] for n in f.param_names])
        ix = struct.index[path]
        G[ix.unsqueeze(1), ix.unsqueeze(0)] = block[p][:, p]
    return G


def build(name: str, k: int, structure: str = "kfac") -> nn.Module:
    model, X, y, _, _ = problem(name)
    return reconstruct(model, (X, y), structure=structure, damping=LAM, sqrt="lowrank", root_rank=k)


@pytest.mark.parametrize("structure", ["kfac", "input"])
@pytest.mark.parametrize(("name", "k"), CASES)
def test_invariants_1_and_2(name: str, k: int, structure: str) -> None:
    model, X, y, _, _ = problem(name)
    net = build(name, k, structure)
    with torch.no_grad():
        assert rel(net(X), model(X)) < 1e-10
    G = lowrank_metric(net, model, X, y, k, structure)
    assert rel(net.gd_update((X, y), LR), -LR * torch.linalg.solve(G, mean_gradient(model, X, y))) < 1e-9
    R = coordinate_map(net)
    assert rel(R, R.T) < 1e-12 and rel(R @ R, G) < 1e-9  # symmetric roots: R = G̃^{1/2}


@pytest.mark.parametrize(("name", "k"), CASES)
def test_invariant_4_refresh(name: str, k: int) -> None:
    model, X, y, X2, y2 = problem(name)
    net = build(name, k)
    sgd_steps(net, X, y, LR, 2)
    moved = net.load_into(copy.deepcopy(model))
    with torch.no_grad():
        before = net(X)
    theta = net.original_vector()
    net.refresh((X2, y2))
    with torch.no_grad():
        assert rel(net(X), before) < 1e-10
    R = coordinate_map(net)
    assert rel(R @ R, lowrank_metric(net, moved, X2, y2, k)) < 1e-9
    assert rel(net.reconstructed_vector(), R @ theta) < 1e-9


def test_small_factors_use_the_exact_top_eigenspace() -> None:
    """On the test MLP the eigensolver is exact: U spans the top-k eigenvectors of each wide factor."""
    model, X, y, _, _ = problem("mlp")
    net = build("mlp", 2)
    for path, f in fisher(model, (X, y), structure="kfac").factors.items():
        U = net.net.get_submodule(path).input_whitening.basis
        w, Q = torch.linalg.eigh(f.A)
        assert w[-2] - w[-3] > 1e-6 * w[-1]  # a gap: the top-2 eigenspace is unique
        top = Q[:, -2:]
        assert rel(U @ U.T, top @ top.T) < 1e-10


def test_lowrank_roots_of_a_large_factor_with_a_gap() -> None:
    """The randomized path (n > k + 10): roots of the truncated factor, against an explicit eigendecomposition."""
    n, k, delta = 120, 6, 1e-3
    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT)).Q
    w = torch.cat([torch.linspace(5, 1, k, dtype=DT), 1e-3 * torch.rand(n - k, generator=gen, dtype=DT)])
    M = (Q * w) @ Q.T
    sqrt, inv_sqrt, (U, c, s) = lowrank_roots(M, delta, k)
    sigma = w[k:].mean()
    Mt = (Q[:, :k] * w[:k]) @ Q[:, :k].T + sigma * (torch.eye(n, dtype=DT) - Q[:, :k] @ Q[:, :k].T)
    eye = torch.eye(n, dtype=DT)
    ref_inv = torch.linalg.inv(torch.linalg.cholesky(Mt + delta * eye))
    assert rel(inv_sqrt @ inv_sqrt, ref_inv.T @ ref_inv) < 1e-8  # (M̃ + δI)⁻¹
    assert rel(sqrt @ inv_sqrt, eye) < 1e-12
    assert rel(s * eye + (U * c) @ U.T, inv_sqrt) < 1e-12  # the low-rank form is the same matrix
    # a factor of width ≤ 2k has no low-rank form: exact eigh roots
    small = M[:10, :10]
    exact = damped_roots(small, delta, "eigh")
    got = lowrank_roots(small, delta, 5)
    assert got[2] is None and rel(got[0], exact[0]) < 1e-14 and rel(got[1], exact[1]) < 1e-14


@pytest.mark.parametrize("name", ["mlp", "cnn2d"])
def test_float32_outputs(name: str) -> None:
    model, X, y, X2, y2 = problem(name)
    model32 = copy.deepcopy(model).float()
    net = reconstruct(model32, (X.float(), y), structure="kfac", damping=LAM, sqrt="lowrank", root_rank=1)
    with torch.no_grad():
        assert rel(net(X.float()), model32(X.float())) < 1e-5
        net.refresh((X2.float(), y2))
        assert rel(net(X.float()), model32(X.float())) < 1e-5


def test_dense_blocks_under_lowrank_get_exact_roots_and_bad_rank_is_refused() -> None:
    model, X, y, _, _ = problem("lstm")
    net = reconstruct(model, (X, y), structure="kfac", damping=LAM, sqrt="lowrank", root_rank=1, unsupported="block")
    with torch.no_grad():
        assert rel(net(X), model(X)) < 1e-10
    assert "rank=1" in repr(net)
    for bad in (0, 2.5, None):
        with pytest.raises(InputError, match="root_rank"):
            reconstruct(model, (X, y), structure="block", sqrt="lowrank", root_rank=bad)


def test_state_dict_is_the_same_for_every_root_method() -> None:
    """The low-rank form is a non-persistent cache: state dicts load across root methods, same function."""
    model, X, y, _, _ = problem("mlp")
    low, exact = build("mlp", 1), reconstruct(model, (X, y), structure="kfac", damping=LAM)
    assert list(low.state_dict()) == list(exact.state_dict())
    exact.load_state_dict(low.state_dict())
    with torch.no_grad():
        assert rel(exact(X), low(X)) < 1e-12


@pytest.mark.parametrize("fold", ["never", "always"])
@pytest.mark.parametrize("name", ["mlp", "cnn2d", "cnn1d"])
def test_low_rank_roots_on_activations_and_folded(name: str, fold: str) -> None:
    """Both places a low-rank root can act (rows of activations, including conv channels; the weight) agree."""
    model, X, y, _, _ = problem(name)
    net = reconstruct(model, (X, y), structure="kfac", damping=LAM, sqrt="lowrank", root_rank=1, fold=fold)
    with torch.no_grad():
        assert rel(net(X), model(X)) < 1e-10
    assert rel(net.gd_update((X, y), LR), build(name, 1).gd_update((X, y), LR)) < 1e-10
