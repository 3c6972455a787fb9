"""The shared FisherMatrix interface of the dense, block-diagonal, diagonal and implicit structures.

Each structure is checked against the dense matrix it represents (its own blocks or diagonal of the dense true
Fisher), which test_engine.py checks against the brute-force reference. Products and diagonals agree to 1e-12
relative; solves against ``torch.linalg.solve`` to 1e-10 (Cholesky) and 1e-6 (CG at tolerance 1e-10); spectra
against ``numpy.linalg.eigvalsh`` to 1e-10 of the largest eigenvalue.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from fisherlab import structures
from fisherlab.structures import BlockDiagonalFisher, DenseFisher, DiagonalFisher, ImplicitFisher

F64 = torch.float64
NAMES = ("dense", "block_tensor", "block_layer", "diag", "implicit")


@pytest.fixture(scope="module")
def built(problems):
    """The user-defined module (top-level parameters form layer ""), true Fisher, every structure."""
    p = problems("custom")
    engine = p.engine("true")
    mats = {
        "dense": structures.build("dense", engine),
        "block_tensor": structures.build("block", engine, by="tensor"),
        "block_layer": structures.build("block", engine, by="layer"),
        "diag": structures.build("diag", engine),
        "implicit": structures.build("implicit", engine),
    }
    return p, engine, mats


def expected_dense(built, name: str) -> Tensor:
    """The matrix structure ``name`` stands for: D, D masked to its blocks, or diag(D)."""
    _, engine, mats = built
    D = mats["dense"].matrix
    if name.startswith("block"):
        mask = torch.zeros_like(D)
        for ix in engine.spec.blocks(name.split("_")[1]).values():
            mask[ix.unsqueeze(1), ix.unsqueeze(0)] = 1
        return D * mask
    if name == "diag":
        return torch.diag(D.diagonal())
    return D


def rand(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_types_shape_and_repr(built):
    p, engine, mats = built
    P = engine.spec.dim
    assert P == sum(t.numel() for t in p.model.parameters()) == 37
    for cls, name in [(DenseFisher, "dense"), (BlockDiagonalFisher, "block_tensor"), (DiagonalFisher, "diag"),
                      (ImplicitFisher, "implicit")]:
        F = mats[name]
        assert isinstance(F, cls) and F.shape == (P, P) and F.dtype == F64
        assert f"P={P}" in repr(F) and "'true'" in repr(F)
        assert F.meta["num_samples"] == p.case.n and F.meta["params"] == list(engine.spec.names)
    ref.assert_close(mats["dense"].matrix, p.reference("true"), 1e-10, "dense")
    assert torch.equal(mats["dense"].matrix, mats["dense"].matrix.T)


@pytest.mark.parametrize("name", NAMES)
def test_products_match_dense(built, name):
    F, M = built[2][name], expected_dense(built, name)
    v, V = rand(M.shape[0]), rand(M.shape[0], 5, seed=1)
    for out, want, what in [(F.matvec(v), M @ v, "matvec"), (F.matmat(V), M @ V, "matmat"), (F @ v, M @ v, "@v"),
                            (F @ V, M @ V, "@V"), (F.to_dense(), M, "to_dense")]:
        assert out.shape == want.shape, what
        ref.assert_close(out, want, 1e-12, f"{name} {what}")


@pytest.mark.parametrize("name", NAMES)
def test_to_scipy_matches_dense(built, name):
    op, M = built[2][name].to_scipy(), expected_dense(built, name).numpy()
    assert isinstance(op, LinearOperator) and op.shape == M.shape and op.dtype == np.float64
    v, V = rand(M.shape[0]).numpy(), rand(M.shape[0], 3, seed=1).numpy()
    for out, want in [(op @ v, M @ v), (op.matvec(v), M @ v), (op.matmat(V), M @ V), (op.rmatvec(v), M.T @ v)]:
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("name", NAMES)
def test_diag_and_trace_match_dense(built, name):
    F, D = built[2][name], built[2]["dense"].matrix
    ref.assert_close(F.diag(), D.diagonal(), 1e-12, f"{name} diag")
    assert F.diag().shape == (D.shape[0],)
    assert abs(float(F.trace() - torch.trace(D))) <= 1e-12 * float(torch.trace(D))


@pytest.mark.parametrize("by", ["tensor", "layer"])
def test_blocks_are_dense_sub_blocks(built, by):
    p, engine, mats = built
    F, D = mats[f"block_{by}"], mats["dense"].matrix
    groups = {"tensor": ["weight", "log_scale", "proj.weight", "proj.bias"], "layer": ["", "proj"]}[by]
    assert list(F.blocks) == groups
    covered = torch.cat(list(F.index.values()))
    assert torch.equal(covered.sort().values, torch.arange(engine.spec.dim))  # a partition of the indices
    for k, ix in F.index.items():
        ref.assert_close(F.blocks[k], D[ix][:, ix], 1e-12, f"block {k!r}")
    off = torch.ones_like(D, dtype=torch.bool)
    for ix in F.index.values():
        off[ix.unsqueeze(1), ix.unsqueeze(0)] = False
    assert bool((F.to_dense()[off] == 0).all()) and bool((D[off] != 0).any())


def solve_damping(built) -> float:
    return 1e-2 * float(built[2]["dense"].matrix.diagonal().mean())


@pytest.mark.parametrize("name", ["dense", "block_tensor", "block_layer", "diag"])
def test_solve_matches_torch_linalg_solve(built, name):
    F, M, lam = built[2][name], expected_dense(built, name), solve_damping(built)
    A = M + lam * torch.eye(M.shape[0], dtype=F64)
    g, G = rand(M.shape[0], seed=2), rand(M.shape[0], 3, seed=3)
    ref.assert_close(F.solve(g, lam), torch.linalg.solve(A, g), 1e-10, f"{name} solve vector")
    ref.assert_close(F.solve(G, lam), torch.linalg.solve(A, G), 1e-10, f"{name} solve matrix")


def test_block_solves_factorise_each_block_once_per_damping(built, monkeypatch):
    """Repeated block solves at one λ reuse its Cholesky factors: one factorisation per block and λ, same answers."""
    D = built[2]["dense"]
    F = BlockDiagonalFisher.from_dense(D)
    calls = []
    factorise = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A, **kw: calls.append(A.shape) or factorise(A, **kw))
    lam = solve_damping(built)
    M = expected_dense(built, "block_layer")
    for damping in (lam, 10 * lam):
        A = M + damping * torch.eye(M.shape[0], dtype=F64)
        for seed in range(3):
            g, G = rand(M.shape[0], seed=seed), rand(M.shape[0], 4, seed=seed + 10)
            ref.assert_close(F.solve(g, damping), torch.linalg.solve(A, g), 1e-10, f"block solve λ={damping:g}")
            ref.assert_close(F.solve(G, damping), torch.linalg.solve(A, G), 1e-10, f"block solve λ={damping:g}")
    assert len(calls) == 2 * len(F.blocks)
    assert sorted(calls) == sorted([B.shape for B in F.blocks.values()] * 2)


def test_implicit_solve_by_cg(built):
    F, D, lam = built[2]["implicit"], built[2]["dense"].matrix, solve_damping(built)
    g = rand(D.shape[0], seed=2)
    x = F.solve(g, lam, tol=1e-10)
    assert F.last_cg.converged
    ref.assert_close(x, torch.linalg.solve(D + lam * torch.eye(D.shape[0], dtype=F64), g), 1e-6, "CG")


@pytest.mark.parametrize("name", NAMES)
def test_spectrum_and_condition_number_match_numpy(built, name):
    F, M = built[2][name], expected_dense(built, name).numpy()
    expected = np.linalg.eigvalsh(M)
    ev = F.eigvalsh()
    assert ev.shape == (M.shape[0],) and bool((ev[1:] >= ev[:-1]).all())
    np.testing.assert_allclose(ev.numpy(), expected, rtol=0, atol=1e-10 * expected.max())
    lam = solve_damping(built)
    kappa = (expected.max() + lam) / (expected.min() + lam)
    assert F.condition_number(lam) == pytest.approx(kappa, rel=1e-8)


def test_block_eigvalsh_per_block(built):
    F = built[2]["block_layer"]
    for k, ev in F.block_eigvalsh().items():
        np.testing.assert_allclose(ev.numpy(), np.linalg.eigvalsh(F.blocks[k].numpy()), atol=1e-12)


def test_named_maps_flat_vectors_to_parameter_tensors(built):
    p, engine, mats = built
    v = rand(engine.spec.dim)
    named = mats["implicit"].named(v)
    assert list(named) == [n for n, _ in p.model.named_parameters()]
    for n, t in p.model.named_parameters():
        assert named[n].shape == t.shape
    assert torch.equal(engine.spec.flatten(named), v)
    assert torch.equal(named["proj.bias"], v[-2:])
