"""KFAC-NGD and SNGD(structure="kfac") on a GPT (Embedding, LayerNorm and Linear layers) against a dense solve.

One step from θ on a batch must be −η G⁻¹ g with g the batch gradient (autograd on the mean loss) and G the
damped KFAC matrix of the batch: per layer (S + sI) ⊗ (A + aI) with the π split of λ (a = π√λ, s = √λ/π,
π² = (tr A / dim A) / (tr S / dim S), written out here), the Embedding's A diagonal (token counts), and the
LayerNorm blocks B + λI, formed densely with ``to_dense`` and solved with ``torch.linalg.solve`` in float64.
"""

from __future__ import annotations

import copy

import pytest
import reference as ref
import torch
from torch import nn

from fisherlab import SNGD, fisher
from fisherlab.data import iterate_minibatches, make_sort_task
from fisherlab.errors import SingularMatrixError
from fisherlab.likelihoods import get_likelihood
from fisherlab.models import GPT
from fisherlab.params import ParamSpec
from fisherlab.train import _KFACStepper, train

F64 = torch.float64
LAM, LR, BATCH = 0.05, 0.5, 24


@pytest.fixture(scope="module")
def setup() -> tuple[GPT, object, tuple[torch.Tensor, torch.Tensor]]:
    """A 1-layer GPT (P = 2166) on the sort task, float64, LayerNorm affines off (1, 0); train's first batch."""
    data = make_sort_task(n_samples=96, length=4, n_values=6, seed=1)
    torch.manual_seed(0)
    model = GPT(vocab=data.meta["vocab"], seq_len=5, n_outputs=6, d_model=12, n_layers=1, n_heads=2,
                output="last").to(F64).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.startswith("norm"):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=F64))
    batch = next(iterate_minibatches(data.X_train, data.y_train, BATCH, 0))  # train's first batch (seed 0)
    return model, data, batch


def _reference_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(−η G⁻¹ g, g), both (P,), with G the damped KFAC of the batch as a dense matrix (module docstring)."""
    G = ref.damped_kfac_dense(fisher(model, batch, "categorical", structure="kfac"), LAM)
    spec = ParamSpec.from_model(model)
    params = dict(model.named_parameters())
    loss = get_likelihood("categorical").nll(model(batch[0]), batch[1]).mean()
    g = spec.flatten(torch.autograd.grad(loss, [params[n] for n in spec.names]))
    return -LR * torch.linalg.solve(G, g), g


@pytest.fixture(scope="module")
def reference(setup) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference step and gradient at the setup's model and batch."""
    model, _, batch = setup
    return _reference_step(model, batch)


def _moved(before: nn.Module, after: nn.Module) -> torch.Tensor:
    spec = ParamSpec.from_model(before)
    return spec.vector(after) - spec.vector(before)


def _check(delta: torch.Tensor, reference: torch.Tensor, g: torch.Tensor, spec: ParamSpec) -> None:
    """Every parameter tensor moved by the reference step (rel 1e-9), and none stands still where g ≠ 0."""
    for name, d, r, gi in zip(spec.names, spec.unflatten(delta).values(), spec.unflatten(reference).values(),
                              spec.unflatten(g).values(), strict=True):
        assert torch.allclose(d, r, rtol=1e-9, atol=1e-9 * float(reference.abs().max())), name
        assert (d[gi != 0] != 0).all(), f"{name} not updated where its gradient is nonzero"


def test_setup_has_every_kind_of_block(setup) -> None:
    model, _, batch = setup
    kfac = fisher(model, batch, "categorical", structure="kfac")
    assert 2000 <= ParamSpec.from_model(model).dim <= 5000
    assert {p for p, f in kfac.factors.items() if f.A.dim() == 1} == {"embed", "position"}  # diagonal A
    assert set(kfac.exact_blocks) == {"blocks.0.ln1", "blocks.0.ln2", "norm"} == set(kfac.meta["norm_blocks"])


@pytest.mark.parametrize("precondition", ["dense", "factored", "auto"])
def test_kfac_ngd_step_is_the_damped_kfac_solve(setup, reference, precondition) -> None:
    model, _, batch = setup
    reference, g = reference
    work = copy.deepcopy(model)
    stepper = _KFACStepper(work, get_likelihood("categorical"), LR, LAM, "true", "pi", 0, precondition)
    stepper.step(*batch, True)
    _check(_moved(model, work), reference, g, ParamSpec.from_model(model))
    stepper.step(*batch, False)  # cached inverses: the same step again from the new θ's gradient
    assert stepper.refreshes == 1


def test_train_kfac_ngd_first_step(setup, reference) -> None:
    """train's recorded losses after one update are those of θ − η G⁻¹ g (the public entry point, end to end)."""
    model, data, _ = setup
    reference, _ = reference
    moved = copy.deepcopy(model)
    spec = ParamSpec.from_model(model)
    with torch.no_grad():
        for name, d in spec.unflatten(reference).items():
            moved.get_parameter(name).add_(d)
    ds = train(model, data, rule="kfac-ngd", lr=LR, steps=1, batch_size=BATCH, damping=LAM, eval_every=1)
    lik = get_likelihood("categorical")
    with torch.no_grad():
        expected = float(lik.nll(moved(data.X_train), data.y_train).mean())
        start = float(lik.nll(model(data.X_train), data.y_train).mean())
    assert abs(float(ds.train_loss[1]) - expected) < 1e-11 * expected
    assert abs(expected - start) > 1e-3  # the step is large enough for the comparison to mean something


def test_sngd_kfac_step_is_the_damped_kfac_solve(setup, reference) -> None:
    model, _, batch = setup
    reference, g = reference
    work = copy.deepcopy(model)
    opt = SNGD(work, batch, "categorical", lr=LR, structure="kfac", damping=LAM)
    get_likelihood("categorical").nll(work(batch[0]), batch[1]).mean().backward()
    opt.step()
    _check(_moved(model, work), reference, g, ParamSpec.from_model(model))


def test_unseen_token_without_damping_is_singular(setup) -> None:
    """A token id absent from the batch has a zero count: λ = 0 leaves (A + 0·I) singular, named."""
    model, _, (x, y) = setup
    keep = x[:, -1] != x[:, -1].max()  # drop the samples with the last query token
    x, y = x[keep], y[keep]
    stepper = _KFACStepper(copy.deepcopy(model), get_likelihood("categorical"), LR, 0.0, "true", "pi", 0)
    assert torch.bincount(x.reshape(-1), minlength=model.embed.num_embeddings).min() == 0
    with pytest.raises(SingularMatrixError, match="never occurs"):
        stepper.step(x, y, True)


def test_kfac_ngd_with_frozen_weight_and_bias(setup) -> None:
    """A frozen head bias and a frozen MLP weight stay as they are; the rest takes the reference step."""
    model, _, batch = setup
    model = copy.deepcopy(model)
    model.head.bias.requires_grad_(False)
    model.blocks[0].mlp.fc.weight.requires_grad_(False)
    reference, g = _reference_step(model, batch)
    work = copy.deepcopy(model)
    _KFACStepper(work, get_likelihood("categorical"), LR, LAM, "true", "pi", 0, "factored").step(*batch, True)
    _check(_moved(model, work), reference, g, ParamSpec.from_model(model))
    assert torch.equal(work.head.bias, model.head.bias)
    assert torch.equal(work.blocks[0].mlp.fc.weight, model.blocks[0].mlp.fc.weight)
