"""Geometry of the reconstructed networks against dense float64 references (scipy generalized eigenproblems)."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import scipy.linalg
import torch

from fisherlab.errors import SingularMatrixError
from fisherlab.fidelity import fisher_geometry
from fisherlab.fidelity.geometry import preconditioned_eigvalsh
from fisherlab.models import MLP

D = torch.float64
DAMPINGS = [1e-3, 1e-1]


def make(n: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = MLP(6, [5], 3, "tanh").double().eval()  # P = 53, layers of 35 and 18 parameters
    return model, torch.randn(n, 6, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(scope="module")
def case():
    model, X, y = make(32)
    F = ref.true_fisher(model, X, ref.RefLikelihood("categorical")).numpy()
    ds = fisher_geometry(model, (X, y), structures=["dense", "block", "diag"], damping=DAMPINGS)
    return F, ds, [np.arange(0, 35), np.arange(35, 53)]


def generalized(A, G):
    return scipy.linalg.eigh(A, G, eigvals_only=True)


def test_preconditioned_eigvalsh_against_scipy():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(7, 7, generator=g, dtype=D), torch.randn(7, 7, generator=g, dtype=D)
    A, G = A @ A.T, B @ B.T + 0.5 * torch.eye(7, dtype=D)
    np.testing.assert_allclose(preconditioned_eigvalsh(A, G).numpy(), generalized(A.numpy(), G.numpy()), rtol=1e-10)
    np.testing.assert_allclose(preconditioned_eigvalsh(A, None).numpy(), np.linalg.eigvalsh(A.numpy()), rtol=1e-10)
    with pytest.raises(SingularMatrixError):
        preconditioned_eigvalsh(A, -G)


def test_original_coordinates(case):
    F, ds, blocks = case
    assert ds.attrs["spectrum_method"] == "eigvalsh" and ds.attrs["fisherlab_kind"] == "geometry"
    for lam in DAMPINGS:
        at = ds.sel(structure="original", damping=lam)
        want = np.linalg.eigvalsh(F) + lam
        np.testing.assert_allclose(at["eigenvalue"].values, want, rtol=1e-8, atol=1e-12)
        assert float(at["condition_number"]) == pytest.approx(want[-1] / want[0], rel=1e-6)
        for k, ix in enumerate(blocks):
            w = np.linalg.eigvalsh(F[np.ix_(ix, ix)]) + lam
            np.testing.assert_allclose(at["layer_eigenvalue"].values[k, : len(ix)], w, rtol=1e-8, atol=1e-12)
            assert np.isnan(at["layer_eigenvalue"].values[k, len(ix):]).all()


def test_exact_reconstruction_sees_the_identity(case):
    _, ds, _ = case
    at = ds.sel(structure="dense")
    np.testing.assert_allclose(at["eigenvalue"].values, 1.0, atol=1e-8)
    np.testing.assert_allclose(at["condition_number"].values, 1.0, atol=1e-7)
    # block reconstruction: each layer's own block is exactly whitened
    np.testing.assert_allclose(ds.sel(structure="block")["layer_condition_number"].values, 1.0, atol=1e-7)


def test_block_layer_spectra_are_ones_in_closed_form(case):
    """Under ``block`` read off the same F, a layer's spectrum is stored as P_l exact ones (own_blocks); numpy's
    eigvalsh of L_l⁻¹ (F_ll + λI) L_l⁻ᵀ from the reference F gives 1 to round-off; other block sets are not F's."""
    from fisherlab import fisher
    from fisherlab.fidelity.geometry import own_blocks
    from fisherlab.structures.block import BlockDiagonalFisher

    F, ds, blocks = case
    for lam in DAMPINGS:
        at = ds.sel(structure="block", damping=lam)["layer_eigenvalue"].values
        for k, ix in enumerate(blocks):
            A = F[np.ix_(ix, ix)] + lam * np.eye(len(ix))
            L = np.linalg.cholesky(A)
            M = np.linalg.solve(L, np.linalg.solve(L, A).T)
            np.testing.assert_allclose(np.linalg.eigvalsh(M), 1.0, atol=1e-10)
            assert (at[k, : len(ix)] == 1.0).all() and np.isnan(at[k, len(ix):]).all()
    model, X, y = make(32)
    dense = fisher(model, (X, y), structure="dense")
    Ft, index = dense.to_dense(), [torch.from_numpy(ix) for ix in blocks]
    block = BlockDiagonalFisher.from_dense(dense)
    assert own_blocks(Ft, block, index)
    assert not own_blocks(Ft * (1 + 1e-12), block, index) and not own_blocks(Ft, dense, index)


@pytest.mark.parametrize("structure", ["block", "diag"])
def test_structured_reconstruction_against_generalized_eigenproblem(case, structure):
    F, ds, blocks = case
    for lam in DAMPINGS:
        if structure == "block":
            G = np.zeros_like(F)
            for ix in blocks:
                G[np.ix_(ix, ix)] = F[np.ix_(ix, ix)]
        else:
            G = np.diag(np.diag(F))
        G = G + lam * np.eye(len(F))
        A = F + lam * np.eye(len(F))
        want = generalized(A, G)
        at = ds.sel(structure=structure, damping=lam)
        np.testing.assert_allclose(at["eigenvalue"].values, want, rtol=1e-7, atol=1e-10)
        assert float(at["condition_number"]) == pytest.approx(want[-1] / want[0], rel=1e-6)
        for k, ix in enumerate(blocks):
            w = generalized(A[np.ix_(ix, ix)], G[np.ix_(ix, ix)])
            np.testing.assert_allclose(at["layer_eigenvalue"].values[k, : len(ix)], w, rtol=1e-7, atol=1e-10)
    # G is the block-diagonal part of A = F + λI, and A ≼ k·bdiag(A) for k PSD blocks: λ_max ≤ k
    k = len(blocks) if structure == "block" else len(F)
    assert np.all(ds.sel(structure=structure)["eigenvalue"].values <= k * (1 + 1e-10))


@pytest.mark.parametrize("n", [16, 48])  # N·R = 32 < P = 53 (F singular) and 96 > P
def test_lanczos_path_beyond_the_budget(n):
    """Matrix-free: F + λI, and each structure's B = G^{-1/2}(F + λI)G^{-1/2} through its reconstructed network."""
    model, X, y = make(n)
    F = ref.true_fisher(model, X, ref.RefLikelihood("categorical")).numpy()
    ds = fisher_geometry(model, (X, y), structures=["dense", "block", "diag"], damping=DAMPINGS,
                         memory_budget=20_000, num_eigs=5, chunk_size=8)
    assert ds.attrs["spectrum_method"] == "lanczos" and ds.sizes["eig"] == 5
    ev = np.linalg.eigvalsh(F)
    eye = np.eye(len(F))
    for lam in DAMPINGS:
        at = ds.sel(structure="original", damping=lam)
        np.testing.assert_allclose(at["eigenvalue"].values, ev[-5:] + lam, rtol=1e-8)
        lo = 0.0 if n == 16 else ev[0]
        assert float(at["condition_number"]) == pytest.approx((ev[-1] + lam) / (lo + lam), rel=1e-5)
        blocks = np.zeros_like(F)
        for ix in (np.arange(0, 35), np.arange(35, 53)):
            blocks[np.ix_(ix, ix)] = F[np.ix_(ix, ix)]
        for structure, G in (("block", blocks), ("diag", np.diag(np.diag(F)))):
            want = generalized(F + lam * eye, G + lam * eye)  # P = 53 ≤ the Lanczos steps: exact extremes
            at = ds.sel(structure=structure, damping=lam)
            np.testing.assert_allclose(at["eigenvalue"].values, want[-5:], rtol=1e-8)
            assert float(at["condition_number"]) == pytest.approx(want[-1] / want[0], rel=1e-6)
    # the dense reconstruction needs the P×P Fisher: beyond this budget
    assert ds["available"].sel(structure="dense").item() == 0
    assert "budget" in str(ds.sel(structure="dense")["unavailable_reason"].values)
    assert ds["available"].sel(structure="block").item() == 1


def block_problem(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A random PSD A (9, 9) and SPD diagonal blocks of G on the index sets a = 0..3, b = 4..8."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(9, 9, generator=g, dtype=D)
    A = A @ A.T
    index = {"a": torch.arange(0, 4), "b": torch.arange(4, 9)}
    blocks = {}
    for k, ix in index.items():
        B = torch.randn(len(ix), len(ix), generator=g, dtype=D)
        blocks[k] = B @ B.T + 0.3 * torch.eye(len(ix), dtype=D)
    return A, blocks, index


def test_preconditioned_block_eigvalsh_against_scipy():
    from fisherlab.fidelity.geometry import preconditioned_block_eigvalsh

    A, blocks, index = block_problem(3)
    G = scipy.linalg.block_diag(blocks["a"].numpy(), blocks["b"].numpy())
    np.testing.assert_allclose(preconditioned_block_eigvalsh(A, blocks, index).numpy(), generalized(A.numpy(), G),
                               rtol=1e-10)
    with pytest.raises(SingularMatrixError):
        preconditioned_block_eigvalsh(A, {"a": blocks["a"], "b": -blocks["b"]}, index)


@pytest.mark.parametrize("structure", ["kfac", "diag", "dense"])
def test_inverse_blocks_are_the_blocks_of_the_solve(structure):
    """G_λ⁻¹ block by block: the layer blocks of the solve's matrix when that is block-diagonal, else None."""
    from fisherlab.fidelity.geometry import inverse_blocks
    from fisherlab.fidelity.rules import RuleContext

    model, X, y = make(32)
    ctx = RuleContext(model, (X, y), "categorical", dtype=D)
    S = ctx.structure(structure)
    Ginv = np.stack([S.solve(e, 1e-2).numpy() for e in torch.eye(53, dtype=D)], axis=1)  # column by column
    blocks = inverse_blocks(ctx, structure, 1e-2)
    if structure == "dense":
        assert blocks is None
        return
    Ginv = 0.5 * (Ginv + Ginv.T)
    for B, ix in zip(blocks.values(), [np.arange(0, 35), np.arange(35, 53)], strict=True):
        np.testing.assert_allclose(B.numpy(), Ginv[np.ix_(ix, ix)], rtol=1e-12, atol=1e-15)


def test_kfac_geometry_against_the_kfac_formula():
    """A structure seen through its solve (KFAC: G_λ⁻¹ block-diagonal by layer, Kᵀ(F + λI)K): the generalised
    eigenvalues of F + λI (per-sample reference) against (S + sI) ⊗ (A + aI) written from the formula, and per
    layer those of the layer blocks."""
    from fisherlab.fidelity.rules import RuleContext

    model, X, y = make(32)
    F = ref.true_fisher(model, X, ref.RefLikelihood("categorical")).numpy()
    data = (X, y)
    ctx = RuleContext(model, data, "categorical", dtype=D)
    ds = fisher_geometry(model, data, structures=["kfac"], damping=DAMPINGS, context=ctx)
    eye = np.eye(len(F))
    for lam in DAMPINGS:
        G = ref.damped_kfac_dense(ctx.structure("kfac"), lam).numpy()
        at = ds.sel(structure="kfac", damping=lam)
        np.testing.assert_allclose(at["eigenvalue"].values, generalized(F + lam * eye, G), rtol=1e-9)
        for k, ix in enumerate([np.arange(0, 35), np.arange(35, 53)]):
            want = generalized(F[np.ix_(ix, ix)] + lam * np.eye(len(ix)), G[np.ix_(ix, ix)])
            np.testing.assert_allclose(at["layer_eigenvalue"].values[k, : len(ix)], want, rtol=1e-9)


def test_block_congruence_against_scipy():
    """Kᵀ A K with K_k K_kᵀ = G_kk⁻¹ has the generalised eigenvalues of (A, G) (scipy), and its diagonal blocks
    those of (A_kk, G_kk)."""
    from fisherlab.fidelity.geometry import block_congruence

    A, blocks, index = block_problem(4)
    factors = {k: torch.linalg.cholesky(torch.linalg.inv(B)) for k, B in blocks.items()}
    M = block_congruence(A, factors, index)
    G = scipy.linalg.block_diag(blocks["a"].numpy(), blocks["b"].numpy())
    np.testing.assert_allclose(np.linalg.eigvalsh(M.numpy()), generalized(A.numpy(), G), rtol=1e-10)
    for k, ix in index.items():
        sub = A[ix][:, ix].numpy()
        np.testing.assert_allclose(np.linalg.eigvalsh(M[ix][:, ix].numpy()),
                                   generalized(sub, blocks[k].numpy()), rtol=1e-10)


def test_geometry_in_a_shared_context_is_the_same_and_refuses_other_data(case):
    from fisherlab.errors import InputError
    from fisherlab.fidelity.rules import RuleContext

    _, ds, _ = case
    model, X, y = make(32)
    data = (X, y)
    ctx = RuleContext(model, data, "categorical", dtype=D, dampings=tuple(DAMPINGS))
    ctx.structure("block")  # work done before, reused
    shared = fisher_geometry(model, data, structures=["dense", "block", "diag"], damping=DAMPINGS, context=ctx)
    for var in ("eigenvalue", "condition_number", "layer_eigenvalue", "layer_condition_number"):
        np.testing.assert_allclose(shared[var].values, ds[var].values, rtol=1e-10, atol=1e-13)
    with pytest.raises(InputError, match="same data"):
        fisher_geometry(model, (X, y), structures=["block"], damping=DAMPINGS, context=ctx)
    with pytest.raises(InputError, match="seed"):
        fisher_geometry(model, data, structures=["block"], damping=DAMPINGS, context=ctx, seed=1)


def test_kron_factor_transform_against_the_kfac_formula():
    """KFAC's own factors (kron_layers: L_S ⊗ L_A per layer, in W̄ order) give L⁻¹ A L⁻ᵀ with the generalised
    eigenvalues of (A, G_λ), G_λ written from the KFAC formula (reference), and per layer those of its blocks;
    structures that are not KFAC have no such factors."""
    from fisherlab.fidelity.geometry import kept_factors, kron_factor_transform, kron_layers
    from fisherlab.fidelity.rules import RuleContext

    model, X, y = make(32)
    ctx = RuleContext(model, (X, y), "categorical", dtype=D)
    g = torch.Generator().manual_seed(5)
    B = torch.randn(53, 80, generator=g, dtype=D)
    A = B @ B.T / 80 + 1e-2 * torch.eye(53, dtype=D)  # any SPD matrix, not only F + λI
    for lam in DAMPINGS:
        layers = kron_layers(ctx.structure("kfac"), lam)
        assert layers is not None and kept_factors(ctx, "kfac", lam) is not None
        G = ref.damped_kfac_dense(ctx.structure("kfac"), lam).numpy()
        M = kron_factor_transform(A, layers)
        assert torch.equal(M, M.T)
        np.testing.assert_allclose(np.linalg.eigvalsh(M.numpy()), generalized(A.numpy(), G), rtol=1e-10)
        for ix in (np.arange(0, 35), np.arange(35, 53)):
            sub = M[torch.from_numpy(ix)][:, torch.from_numpy(ix)].numpy()
            np.testing.assert_allclose(np.linalg.eigvalsh(sub), generalized(A.numpy()[np.ix_(ix, ix)],
                                                                            G[np.ix_(ix, ix)]), rtol=1e-10)
    for structure in ("block", "diag", "ekfac"):
        assert kron_layers(ctx.structure(structure), 1e-2) is None


def test_own_blocks_transform_against_scipy():
    """With L_k L_kᵀ = A_kk, L⁻¹ A L⁻ᵀ has exact identity diagonal blocks and the generalised eigenvalues of
    (A, blockdiag(A_kk)) (scipy)."""
    from fisherlab.fidelity.geometry import own_blocks_transform

    A, _, index = block_problem(6)
    A = A + 0.1 * torch.eye(9, dtype=D)
    factors = {k: torch.linalg.cholesky(A[ix][:, ix]) for k, ix in index.items()}
    M = own_blocks_transform(A, factors, index)
    assert torch.equal(M, M.T)
    for ix in index.values():
        assert torch.equal(M[ix][:, ix], torch.eye(len(ix), dtype=D))
    G = scipy.linalg.block_diag(*[A[ix][:, ix].numpy() for ix in index.values()])
    np.testing.assert_allclose(np.linalg.eigvalsh(M.numpy()), generalized(A.numpy(), G), rtol=1e-10)
