"""Unit-wise blocks against float64 references: the exact variant equals the (row of W̄) sub-blocks of the dense
Fisher from per-sample autograd; the SNGD variant equals its metric computed by an explicit per-sample loop
(Liu & Liu's released code: E[x̃x̃ᵀ] for the first and last layer, E[sigmoid(z_i)² x̃x̃ᵀ] otherwise).
"""

from __future__ import annotations

import dataclasses

import layer_reference as lref
import pytest
import reference as ref
import torch

from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError, SingularMatrixError, UnsupportedLayerError
from fisherlab.structures.running import ema_update
from fisherlab.structures.unitwise import UnitwiseFisher

F64 = torch.float64
RTOL = 1e-10
MC_SEED, MC_SAMPLES = 2, 3


def unit_positions(problem, spec, layer: str) -> list[torch.Tensor]:
    """For each unit i, the flat indices of row i of W̄ (weights by column, then the bias)."""
    rows, cols, _ = lref.wbar_coords(problem.model, layer, list(spec.layers()[layer]))
    ix = spec.blocks("layer")[layer]
    return [ix[(rows == i).nonzero().reshape(-1)[torch.argsort(cols[rows == i])]] for i in range(int(rows.max()) + 1)]


@pytest.mark.parametrize("name", ["mlp", "mlp_bernoulli", "cnn2d", "cnn1d"])
@pytest.mark.parametrize("kind", ["true", "mc", "empirical"])
def test_exact_variant_equals_subblocks_of_the_dense_fisher(problems, name, kind):
    problem = problems(name)
    engine = FisherEngine(problem.model, problem.data, problem.likelihood, kind=kind, mc_samples=MC_SAMPLES,
                          seed=MC_SEED)
    U = UnitwiseFisher.from_engine(engine)
    F = ref.fisher(kind, problem.model, problem.X, problem.y, problem.ref_likelihood, labels=engine._labels)
    for layer, f in U.factors.items():
        for i, pos in enumerate(unit_positions(problem, engine.spec, layer)):
            ref.assert_close(f.blocks[i], F[pos][:, pos], RTOL, f"{name} {kind} layer {layer} unit {i}")
    # and nothing else: the dense form is zero outside the unit blocks
    D = U.to_dense()
    mask = torch.zeros_like(D, dtype=torch.bool)
    for layer in U.factors:
        for pos in unit_positions(problem, engine.spec, layer):
            mask[pos.unsqueeze(1), pos] = True
    assert D[~mask].abs().max() == 0
    ref.assert_close(D[mask], F[mask], RTOL, "dense form")


def sngd_reference(model, X, layers: list[str]) -> dict[str, torch.Tensor]:
    """The SNGD metric by a per-sample loop: layer → (out, in + 1, in + 1)."""
    out = {}
    for k, layer in enumerate(layers):
        module = model.get_submodule(layer)
        total = torch.zeros(module.out_features, module.in_features + 1, module.in_features + 1, dtype=F64)
        for n in range(X.shape[0]):
            a, y, _ = lref.layer_input_output(model, layer, X[n])
            xt = torch.cat([a, torch.ones(1, dtype=F64)])
            outer = torch.outer(xt, xt)
            for i in range(module.out_features):
                weight = 1.0 if k in (0, len(layers) - 1) else torch.sigmoid(y[0, i].detach()) ** 2
                total[i] += weight * outer
        out[layer] = total / X.shape[0]
    return out


def test_sngd_variant_matches_the_released_metric(problems):
    problem = problems("mlp")
    U = problem.fisher("empirical", "unit", variant="sngd")
    expected = sngd_reference(problem.model, problem.X, ["0", "2", "4"])
    for layer, f in U.factors.items():
        ref.assert_close(f.blocks, expected[layer], RTOL, f"SNGD metric, layer {layer}")
    assert U.meta["variant"] == "sngd"
    # labels play no role
    other = problem.fisher("true", "unit", variant="sngd")
    assert all(torch.equal(other.factors[k].blocks, f.blocks) for k, f in U.factors.items())
    with pytest.raises(UnsupportedLayerError, match=r"nn.Linear layers only.*'0' is Conv2d"):
        problems("cnn2d").fisher("true", "unit", variant="sngd")
    with pytest.raises(InputError, match="variant"):
        problem.fisher("true", "unit", variant="relative")


def test_relative_damping_of_the_released_code(problems):
    """relative_damping=ε gives B_i + ε tr(B_i) I (the released code inverts that plus ε₀ I = damping)."""
    problem = problems("mlp")
    eps = 1e-2
    U = problem.fisher("empirical", "unit", variant="sngd", relative_damping=eps)
    expected = sngd_reference(problem.model, problem.X, ["0", "2", "4"])
    for layer, f in U.factors.items():
        B = expected[layer]
        eye = torch.eye(B.shape[-1], dtype=B.dtype)
        ref.assert_close(f.blocks, B + eps * B.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] * eye, RTOL,
                         f"relatively damped SNGD metric, layer {layer}")
    assert U.meta["relative_damping"] == eps
    with pytest.raises(InputError, match="relative_damping"):
        problem.fisher("true", "unit", relative_damping=-1.0)


def test_operations_against_dense_and_ema(problems):
    problem = problems("cnn1d")
    U = problem.fisher("true", "unit")
    D = U.to_dense()
    V = torch.randn(U.spec.dim, 3, dtype=F64)
    ref.assert_close(U @ V, D @ V, RTOL, "matmat")
    ref.assert_close(U.diag(), D.diagonal(), RTOL, "diag")
    ref.assert_close(U.eigvalsh(), torch.linalg.eigvalsh(D), 1e-10, "eigvalsh")
    lam = 1e-2
    ref.assert_close(U.solve(V, lam), torch.linalg.solve(D + lam * torch.eye(len(D), dtype=F64), V), 1e-9, "solve")
    with pytest.raises(SingularMatrixError, match="unit block"):
        U.solve(V, 0.0)
    W = problem.fisher("empirical", "unit")
    avg = ema_update(U, W, 0.995)
    for layer in U.factors:
        ref.assert_close(avg.factors[layer].blocks,
                         0.995 * U.factors[layer].blocks + 0.005 * W.factors[layer].blocks, 1e-14, "EMA")


def test_kept_unit_factorisations_solve_like_dense_in_and_out_of_cache_order(problems):
    """Solves at dampings that revisit kept ones and evict others against torch.linalg.solve of the reference
    Fisher's unit sub-blocks + λI; kept factors are reused, the budget bounds how many dampings are kept."""
    problem = problems("mlp")
    engine = FisherEngine(problem.model, problem.data, problem.likelihood, kind="true")
    U = UnitwiseFisher.from_engine(engine)
    F = ref.fisher("true", problem.model, problem.X, problem.y, problem.ref_likelihood, labels=engine._labels)
    B = torch.zeros_like(F)
    for layer in U.factors:
        for pos in unit_positions(problem, engine.spec, layer):
            B[pos.unsqueeze(1), pos] = F[pos][:, pos]
    V = torch.randn(U.spec.dim, 2, dtype=F64, generator=torch.Generator().manual_seed(41))
    eye = torch.eye(len(B), dtype=F64)
    for lam in (1e-1, 1e-3, 1e-1, 1e-2, 1e-4, 3e-3, 1e-3, 1e-1):  # 3e-3 evicts 1e-3 (damped_kept = 4)
        ref.assert_close(U.solve(V, lam), torch.linalg.solve(B + lam * eye, V), 1e-9, f"solve at {lam}")
    first = U.damped_factors(1e-2)
    assert all(U.damped_factors(1e-2)[p] is first[p] for p in first)
    assert not torch.equal(U.damped_factors(1e-4)["0"], first["0"])
    with pytest.raises(InputError, match="damping"):
        U.solve(V, -1.0)
    assert U.damped_factors(1e-2)["0"] is first["0"]  # the refused damping evicted nothing
    # a budget for the blocks and one setting: each new damping replaces the last
    size = sum(L.numel() * L.element_size() for L in first.values())
    small = dataclasses.replace(U, memory_budget=2 * size)
    one = small.damped_factors(1e-2)
    small.damped_factors(1e-1)
    again = small.damped_factors(1e-2)
    assert again["0"] is not one["0"] and torch.equal(again["0"], one["0"])


def test_unsupported_block(problems):
    problem = problems("lstm")
    with pytest.raises(UnsupportedLayerError, match="LSTMCell"):
        problem.fisher("true", "unit")
    U = problem.fisher("true", "unit", unsupported="block")
    F = problem.reference("true")
    ix = U.index["cell"]
    ref.assert_close(U.to_dense()[ix][:, ix], F[ix][:, ix], RTOL, "exact LSTM block")
