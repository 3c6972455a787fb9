"""Re-rooting at other dampings: eigh spectra kept per G (SpectrumCache), chunked batches, shared root buffers.

References are independent of fisherlab's roots: numpy's float64 eigendecomposition and Cholesky factor of each
block's sym(B) + λI, and evaluate_fidelity at one damping at a time (a fresh reconstruction per λ) for the rows of
an evaluation at several dampings (which re-roots one network).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fisherlab.reconstruction.roots as roots
from fisherlab import data as fdata
from fisherlab import fisher, models
from fisherlab.errors import NonFiniteError, SingularMatrixError
from fisherlab.fidelity import evaluate_fidelity
from fisherlab.fidelity.rules import ReconstructedGD, RuleContext, get_rule
from fisherlab.reconstruction.roots import SpectrumCache, batched_damped_roots, damped_roots, reuse_spectra

D = torch.float64
DAMPINGS = (1e-4, 1e-3, 1e-2, 1e-1)
LR = 0.05
EIGH_UNIT = ReconstructedGD("sngd-unit-eigh", "unit", "eigh")


def mlp_case():
    """A 2-hidden-layer tanh MLP (P = 133) on 24 points, 4 classes, float64."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = models.MLP(6, [7, 5], 4, "tanh").double().eval()
    X = torch.randn(24, 6, generator=g, dtype=D)
    return model, (X, torch.randint(0, 4, (24,), generator=g))


def gpt_case():
    """A 1-block GPT (output="sequence": Embedding, attention, MLP, LayerNorms, head) on 4 sort-lm sequences."""
    split = fdata.make_sort_lm(n_samples=16, length=3, n_values=4, seed=1)
    model = models.build_model("gpt", split, seed=2, dtype=D, d_model=8, n_layers=1, n_heads=2, output="sequence")
    return model, (split.X_train[:4].clone(), split.y_train[:4].clone())


CASES = {"mlp": mlp_case, "gpt": gpt_case}


def unit_blocks(name):
    """Every block batch of the unit-wise metric: the layers' unit blocks (m, n, n), each exact block (1, P_g, P_g)."""
    model, data = CASES[name]()
    struct = fisher(model, data, "categorical", structure="unit", dtype=D)
    batches = {k: f.blocks for k, f in struct.factors.items()}
    batches.update({k: B.unsqueeze(0) for k, B in struct.exact_blocks.items()})
    return batches


def numpy_roots(G, lam):
    """Symmetric roots (sym(B) + λI)^{±1/2} of every block by numpy's eigh, and sym(B) + λI itself."""
    S = 0.5 * (G + G.mT).numpy() + lam * np.eye(G.shape[-1])
    w, V = np.linalg.eigh(S)
    return (V * np.sqrt(w)[:, None, :]) @ V.transpose(0, 2, 1), (V / np.sqrt(w)[:, None, :]) @ V.transpose(0, 2, 1), S


def assert_roots(R, R_inv, S, tol=1e-12):
    """RᵀR = S relative to ‖S‖ and R R⁻¹ = I, block by block, to ``tol``."""
    R, R_inv = R.numpy(), R_inv.numpy()
    eye = np.eye(S.shape[-1])
    gram = np.linalg.norm(R.transpose(0, 2, 1) @ R - S, axis=(1, 2)) / np.linalg.norm(S, axis=(1, 2))
    assert gram.max() < tol, gram.max()
    assert np.abs(R @ R_inv - eye).max() < tol


def count_eighs(monkeypatch):
    """Patch torch.linalg.eigh to count its calls (a list to read the count)."""
    calls, eigh = [], torch.linalg.eigh

    def counted(A, *args, **kwargs):
        calls.append(tuple(A.shape))
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counted)
    return calls


@pytest.fixture(params=["whole", "chunked"])
def chunks(request, monkeypatch):
    """The default chunk size (every test batch in one chunk), or chunks of about 3 blocks of 9 × 9."""
    if request.param == "chunked":
        monkeypatch.setattr(roots, "CHUNK_BYTES", 3 * 8 * 81)
    return request.param


@pytest.mark.parametrize("name", list(CASES))
def test_eigh_roots_from_one_spectrum_per_block_at_four_dampings(name, chunks, monkeypatch):
    """Under reuse_spectra each block batch is decomposed once (eigh calls counted) and its roots at every λ are
    numpy's symmetric roots of sym(B) + λI (1e-12), with RᵀR = sym(B) + λI and R R⁻¹ = I to 1e-12; a call without
    the cache gives the same roots, bit for bit."""
    batches = unit_blocks(name)
    calls = count_eighs(monkeypatch)
    cache = SpectrumCache()
    with reuse_spectra(cache):
        got = {lam: {k: batched_damped_roots(G, lam, "eigh") for k, G in batches.items()} for lam in DAMPINGS}
    decomposed = len(calls)
    chunk_counts = sum(len(list(roots._chunks(G))) for G in batches.values())
    assert decomposed == chunk_counts  # the first λ only
    assert cache.nbytes == sum(8 * G.shape[0] * G.shape[-1] * (G.shape[-1] + 1) for G in batches.values())
    for lam in DAMPINGS:
        for k, G in batches.items():
            R, R_inv = got[lam][k]
            R_ref, R_inv_ref, S = numpy_roots(G, lam)
            assert_roots(R, R_inv, S)
            scale = np.linalg.norm(R_ref, axis=(1, 2)).max()
            assert np.abs(R.numpy() - R_ref).max() < 1e-12 * scale, (k, lam)
            assert np.abs(R_inv.numpy() - R_inv_ref).max() < 1e-12 * np.linalg.norm(R_inv_ref, axis=(1, 2)).max()
            fresh = batched_damped_roots(G, lam, "eigh")
            assert torch.equal(fresh[0], R) and torch.equal(fresh[1], R_inv)
    assert len(calls) == decomposed + len(DAMPINGS) * chunk_counts  # the cache-free calls decompose each time


@pytest.mark.parametrize("name", list(CASES))
def test_cholesky_roots_in_chunks_against_numpy(name, chunks):
    """Cholesky roots of each batch at 4 dampings: R = numpy's Lᵀ of sym(B) + λI (1e-12), upper triangular,
    RᵀR = sym(B) + λI and R R⁻¹ = I to 1e-12; R contiguous, R⁻¹ column-major (the layout unchunked batches had)."""
    for k, G in unit_blocks(name).items():
        n = G.shape[-1]
        for lam in DAMPINGS:
            R, R_inv = batched_damped_roots(G, lam, "cholesky")
            S = numpy_roots(G, lam)[2]
            R_ref = np.linalg.cholesky(S).transpose(0, 2, 1)
            assert np.abs(R.numpy() - R_ref).max() < 1e-12 * np.abs(R_ref).max(), (k, lam)
            assert torch.equal(R, R.triu())
            assert_roots(R, R_inv, S)
            assert R.stride() == (n * n, n, 1) and R_inv.stride() == (n * n, 1, n)


def spd_blocks(b=7, n=9, singular=(4,)):
    """b random SPD blocks n × n (eigenvalues in [0.5, 2]), those in ``singular`` of rank n − 2."""
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(b, n, n, generator=g, dtype=D))[0]
    w = 0.5 + 1.5 * torch.rand(b, n, generator=g, dtype=D)
    w[list(singular), :2] = 0.0
    return (Q * w.unsqueeze(-2)) @ Q.mT


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_singular_blocks_refused_by_global_index_and_rooted_once_damped(method, chunks):
    """λ = 0 on a batch whose block 4 is singular: refused, naming block 4 of 7 whatever the chunks; the kept
    spectrum then roots λ > 0 (numpy reference), and NaN is refused by name."""
    G = spd_blocks()
    cache = SpectrumCache()
    with reuse_spectra(cache), pytest.raises(SingularMatrixError, match=r"1 of 7 blocks \(first: block 4\)"):
        batched_damped_roots(G, 0.0, method)
    with reuse_spectra(cache):
        R, R_inv = batched_damped_roots(G, 1e-3, method)
    assert (cache.get(G) is not None) == (method == "eigh")
    assert_roots(R, R_inv, numpy_roots(G, 1e-3)[2])
    bad = G.clone()
    bad[5, 1, 2] = float("nan")
    with reuse_spectra(cache), pytest.raises(NonFiniteError, match="NaN or inf"):
        batched_damped_roots(bad, 1e-3, method)


def test_spectrum_cache_follows_the_tensor_its_version_and_budget(monkeypatch):
    """A G changed in place is decomposed again (its version counter); a view of the same memory (a unit's
    ``unsqueeze``) hits; a cache of budget 0 keeps nothing; every result is numpy's root."""
    G = spd_blocks(singular=())
    calls = count_eighs(monkeypatch)
    cache = SpectrumCache()
    with reuse_spectra(cache):
        batched_damped_roots(G, 1e-2, "eigh")
        R, R_inv = batched_damped_roots(G.view(G.shape), 1e-1, "eigh")
        assert len(calls) == 1
        assert_roots(R, R_inv, numpy_roots(G, 1e-1)[2])
        G.mul_(2.0)
        R, R_inv = batched_damped_roots(G, 1e-1, "eigh")
        assert len(calls) == 2
        assert_roots(R, R_inv, numpy_roots(G, 1e-1)[2])
        R, R_inv = damped_roots(G[0], 1e-2, "eigh")  # a batch of one: G[0].unsqueeze(0)
        R2, _ = damped_roots(G[0], 1e-1, "eigh")
        assert len(calls) == 3
        assert_roots(R.unsqueeze(0), R_inv.unsqueeze(0), numpy_roots(G[:1], 1e-2)[2])
        assert_roots(R2.unsqueeze(0), torch.linalg.inv(R2).unsqueeze(0), numpy_roots(G[:1], 1e-1)[2])
    empty = SpectrumCache(budget=0)
    with reuse_spectra(empty):
        batched_damped_roots(G, 1e-2, "eigh")
        batched_damped_roots(G, 1e-1, "eigh")
    assert empty.nbytes == 0 and len(calls) == 5


def rows(ds):
    """The Dataset's numeric (rule, damping) variables, by name."""
    return {k: v for k, v in ds.data_vars.items()
            if "rule" in v.dims and "damping" in v.dims and np.issubdtype(v.dtype, np.number)}


@pytest.mark.parametrize("name", list(CASES))
def test_rows_at_several_dampings_equal_separate_evaluations(name):
    """sngd-unit (Cholesky), the eigh unit rule and sngd-kfac, evaluated at 4 dampings in one context (one
    network re-rooted per λ), equal evaluations at one damping each (float64, 1e-10); the model is untouched."""
    model, data = CASES[name]()
    before = copy.deepcopy(model.state_dict())
    rules = ["sngd-unit", EIGH_UNIT, "sngd-kfac"]
    together = evaluate_fidelity(model, data, rules=rules, damping=list(DAMPINGS), lr=LR, dtype=D)
    got = rows(together)
    assert {"cosine", "rel_error", "kl_measured", "loss_change"} <= set(got)
    for j, lam in enumerate(DAMPINGS):
        alone = rows(evaluate_fidelity(model, data, rules=rules, damping=lam, lr=LR, dtype=D))
        for k, v in got.items():
            np.testing.assert_allclose(v.isel(damping=j).values, alone[k].isel(damping=0).values,
                                       rtol=1e-10, atol=1e-14, err_msg=f"{k} at {lam:g}")
    assert bool(together.available.all())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("rule", ["sngd-unit", EIGH_UNIT, "sngd-kfac"])
def test_rerooted_copies_leave_the_first_network_as_it_was(rule):
    """The network of the first λ keeps its roots and θ' (bit for bit) while its copies are re-rooted at the other
    dampings, and each copy's step is the step of a network reconstructed at that λ alone (1e-10)."""
    model, data = gpt_case()
    rule = get_rule(rule)
    ctx = RuleContext(model, data, "categorical", dtype=D, dampings=DAMPINGS)
    base = ctx.reconstructed(rule, DAMPINGS[0])
    state = {k: v.clone() for k, v in base.state_dict().items()}
    for lam in DAMPINGS[1:]:
        net = ctx.reconstructed(rule, lam)
        assert net is not base and net.damping == lam
        alone = RuleContext(model, data, "categorical", dtype=D)
        want = rule.network(alone, lam).gd_update(data, LR)
        got = net.gd_update(data, LR)
        assert float((got - want).norm() / want.norm()) < 1e-10
    assert ctx.reconstructed(rule, DAMPINGS[0]) is base
    for k, v in base.state_dict().items():
        assert torch.equal(v, state[k]), k
