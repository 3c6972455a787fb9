"""``FisherEngine.loss_and_gradient`` in 1, 2 and 4 chunks against one float64 ``torch.autograd`` pass.

The reference evaluates a float64 copy of the model on the whole data set outside fisherlab, takes the mean loss
with torch's own loss functions (a sequence model's mean over the counted tokens: ``F.cross_entropy`` with
``ignore_index``) and differentiates it by one ``torch.autograd.grad``. The engine's chunks must not change the
result (the mean divides the sums of all chunks by the global N, or N_tok, not each chunk by its own), and the
sequences' ignored tokens are spread unevenly over the chunks so that a per-chunk mean would differ.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherlab.engine import FisherEngine
from fisherlab.models import CNN, GPT, MLP

F64 = torch.float64
N = 8
#: chunk_size → chunks of the N = 8 samples.
CHUNKINGS = {8: 1, 4: 2, 2: 4}
IGNORE = -100


def _mlp() -> tuple[nn.Module, Tensor, Tensor, str]:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    X, y = torch.randn(N, 5, generator=gen), torch.randint(0, 3, (N,), generator=gen)
    return MLP(5, (7, 6), 3, "tanh").eval(), X, y, "categorical"


def _mlp_gaussian() -> tuple[nn.Module, Tensor, Tensor, str]:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    return MLP(4, (6,), 2, "tanh").eval(), torch.randn(N, 4, generator=gen), torch.randn(N, 2, generator=gen), \
        "gaussian"


def _cnn() -> tuple[nn.Module, Tensor, Tensor, str]:
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    return CNN((1, 6, 6), 4, channels=(3, 4)).eval(), torch.randn(N, 1, 6, 6, generator=gen), \
        torch.randint(0, 4, (N,), generator=gen), "categorical"


def _gpt(tied: bool) -> tuple[nn.Module, Tensor, Tensor, str]:
    """Sequences of 6 tokens of 7; sequence n has its first n mod 4 targets ignored, sequence 1 all of them.

    Chunks of 2 then count 6, 7, 11 and 7 tokens, chunks of 4 count 13 and 18.
    """
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = GPT(7, 6, d_model=8, n_layers=2, n_heads=2, output="sequence", tie_embeddings=tied).eval()
    X = torch.randint(0, 7, (N, 6), generator=gen)
    y = torch.randint(0, 7, (N, 6), generator=gen)
    for n in range(N):
        y[n, : n % 4] = IGNORE
    y[1] = IGNORE  # a sequence without a counted token
    return model, X, y, "categorical"


CASES = {"mlp": _mlp, "mlp-gaussian": _mlp_gaussian, "cnn": _cnn, "gpt": lambda: _gpt(False),
         "gpt-tied": lambda: _gpt(True)}


def _reference(model: nn.Module, X: Tensor, y: Tensor, likelihood: str) -> tuple[Tensor, Tensor]:
    """Loss and gradient (P,) of a float64 copy of ``model``: one forward on all of X, one ``autograd.grad``."""
    model = copy.deepcopy(model).double()
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights once, as fisherlab names them
    x = X.double() if X.is_floating_point() else X
    z = model(x)
    if likelihood == "gaussian":  # ℓ = ‖z − y‖² / 2 (σ = 1), summed over outputs, mean over samples
        loss = 0.5 * ((z - y.double()) ** 2).sum(-1).mean()
    elif z.dim() == 3:  # tokens: mean over the counted ones
        loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=IGNORE)
    else:
        loss = F.cross_entropy(z, y)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("name", CASES)
def test_gradient_is_the_single_pass_gradient_in_any_chunking(name: str) -> None:
    model, X, y, likelihood = CASES[name]()
    expected_loss, expected = _reference(model, X, y, likelihood)
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # a tied tensor under its first name
    for chunk_size, chunks in CHUNKINGS.items():
        engine = FisherEngine(model, (X, y), likelihood, params=names, dtype=F64, chunk_size=chunk_size,
                              progress=False)
        assert -(-N // engine.gradient_chunk_size()) == chunks
        assert engine.spec.dim == expected.numel()
        for first in (True, False):  # the first pass (which checks the outputs) and a later one
            loss, g = engine.loss_and_gradient()
            what = f"{name}, {chunks} chunk(s), {'first' if first else 'later'} pass"
            torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-14, msg=what)
            torch.testing.assert_close(loss, expected_loss, rtol=1e-13, atol=0.0, msg=what)


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_float32_gradient_in_any_chunking_is_the_float64_one_to_float32_rounding(name: str) -> None:
    """In float32 (the benchmarks' dtype) every chunking is within float32 rounding of the float64 gradient."""
    model, X, y, likelihood = CASES[name]()
    _, expected = _reference(model, X, y, likelihood)
    for chunk_size in CHUNKINGS:
        engine = FisherEngine(model, (X, y), likelihood, dtype=torch.float32, chunk_size=chunk_size, progress=False)
        _, g = engine.loss_and_gradient()
        assert g.dtype == torch.float32
        error = float((g.double() - expected).norm() / expected.norm())
        assert error < 1e-5, f"{name}, chunks of {chunk_size}: relative error {error:.2e}"


def test_default_gradient_chunk_takes_the_whole_batch_when_it_fits() -> None:
    """Without chunk_size the gradient runs in one chunk when gradient_bytes(N) fits the working bytes, else in
    balanced chunks that each fit (a smaller memory budget)."""
    model, X, y, likelihood = CASES["gpt"]()
    engine = FisherEngine(model, (X, y), likelihood, dtype=F64, progress=False)
    assert engine.gradient_chunk_size() == N
    tight = FisherEngine(model, (X, y), likelihood, dtype=F64, progress=False,
                         memory_budget=4 * engine.gradient_bytes(3))
    size = tight.gradient_chunk_size()
    assert size == 3  # 8 samples with at most 3 a chunk: ⌈8/3⌉ = 3 chunks of 3, 3, 2
    assert tight.gradient_bytes(size) <= tight.memory_budget // 4 < tight.gradient_bytes(size + 1)
    _, expected = _reference(model, X, y, likelihood)
    torch.testing.assert_close(tight.loss_and_gradient()[1], expected, rtol=1e-12, atol=1e-14)
