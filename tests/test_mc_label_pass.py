"""The MC labels of a layer-wise build's first pass: what the model sees, and labels that do not depend on the
layer chunking.

The engine draws kind ``mc``'s labels per piece of its own ``chunk_size`` samples, one ``sample`` call per piece
with one generator seeded by ``seed`` (torch's normal, Bernoulli and multi-sample multinomial draws of a piece
differ from those of its parts, so the piece is the unit of the stream). A layer-wise pass whose chunks split a
piece (``KFACFisher.from_engine(engine, chunk_size=c)`` with c below the engine's chunk size) so has each piece
evaluated once more without grad, on its first chunk; chunks that hold whole pieces draw on their own outputs.
The labels are the independent draw's (multinomial per piece of the float64 outputs) for every layer chunking,
and the factors are the float64 per-sample references' (``layer_reference``) at those labels.
"""

from __future__ import annotations

import layer_reference as lref
import pytest
import reference as ref
import torch
from torch import nn

from fisherlab.engine import FisherEngine
from fisherlab.structures.ekfac import EKFACFisher
from fisherlab.structures.kfac import KFACFisher

F64 = torch.float64
RTOL = 1e-10
N, SEED = 6, 3


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).to(F64)
    return model, torch.randn(N, 3, dtype=F64), torch.randint(0, 4, (N,))


def _independent_labels(model: nn.Module, X: torch.Tensor, piece: int) -> torch.Tensor:
    """One sample per row, torch.multinomial piece by piece of ``piece`` rows, one generator seeded by SEED."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        p = torch.softmax(model(X), dim=-1)
    return torch.cat([torch.multinomial(q, 1, replacement=True, generator=gen) for q in p.split(piece)])


#: (engine chunk size, layer chunk size) -> what the model sees after construction: (batch, grad enabled).
CASES = {
    (None, None): [(6, True)],
    (None, 6): [(6, True)],
    (None, 3): [(3, True), (6, False), (3, True)],
    (None, 2): [(2, True), (6, False), (2, True), (2, True)],
    (None, 1): [(1, True), (6, False)] + [(1, True)] * 5,
    (2, None): [(6, True)],
    (2, 3): [(2, True)] * 3,  # the layer chunks hold whole pieces: 2 · max(1, 3 // 2)
    (2, 1): [(1, True), (2, False), (1, True)] * 3,
    (3, 2): [(2, True), (3, False), (1, True)] * 2,
    (3, None): [(6, True)],  # fisher(..., structure="kfac", chunk_size=3): the engine's chunk size
    (3, 3): [(3, True)] * 2,
}


@pytest.mark.parametrize("engine_chunk, layer_chunk", list(CASES))
def test_kfac_mc_first_pass_calls_labels_and_factors(engine_chunk, layer_chunk):
    """The batches of the KFAC build's first pass (one no-grad evaluation of each piece its chunks split, no
    other pass); labels equal to the independent per-piece multinomial draw whatever the layer chunking; A and S
    equal to the float64 per-sample references' at those labels."""
    model, X, y = _problem()
    eng = FisherEngine(model, (X, y), "categorical", kind="mc", seed=SEED, chunk_size=engine_chunk)
    calls: list[tuple[int, bool]] = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append((i[0].shape[0], torch.is_grad_enabled())))
    try:
        K = KFACFisher.from_engine(eng, chunk_size=layer_chunk)
        labels = eng._labels
    finally:
        handle.remove()
    assert calls == CASES[engine_chunk, layer_chunk]
    expected = _independent_labels(model, X, min(eng.chunk_size, N))
    assert torch.equal(labels, expected), (labels.flatten().tolist(), expected.flatten().tolist())
    lik = ref.RefLikelihood("categorical")
    for layer in ("0", "2"):
        A, S = lref.kfac_factors(model, layer, X, y, lik, "mc", labels)
        ref.assert_close(K.factors[layer].A, A, RTOL, f"A of layer {layer}")
        ref.assert_close(K.factors[layer].S, S, RTOL, f"S of layer {layer}")


def test_ekfac_first_pass_is_kfacs():
    """EKFAC's first pass is its KFAC factor pass (the same batches, one no-grad evaluation of the piece its
    chunks split); its scaling pass reuses the kept rows; the labels are the independent draw's."""
    model, X, y = _problem()
    eng = FisherEngine(model, (X, y), "categorical", kind="mc", seed=SEED)
    calls: list[tuple[int, bool]] = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append((i[0].shape[0], torch.is_grad_enabled())))
    try:
        EKFACFisher.from_engine(eng, chunk_size=3)
    finally:
        handle.remove()
    assert calls == CASES[None, 3]
    assert torch.equal(eng._labels, _independent_labels(model, X, N))
