"""Bad input raises the right fisherlab exception, with a message that names the problem."""

from __future__ import annotations

import pytest
import torch
from cases import MLP, MLP_BERN, MLP_GAUSS, RESNET, Case
from torch import Tensor, nn

from fisherlab import fisher
from fisherlab.errors import InputError, NonFiniteError, SingularMatrixError, UnsupportedLayerError

F64 = torch.float64


def build(case: Case = MLP) -> tuple[nn.Module, Tensor, Tensor]:
    """A fresh copy of a case (these tests may modify it)."""
    return case.build()


# ------------------------------------------------------------------------------------------------ options
def test_unsupported_likelihood_lists_valid_ones():
    model, X, y = build()
    with pytest.raises(InputError, match=r"unsupported likelihood 'poisson'.*'bernoulli'.*'categorical'.*'gaussian'"):
        fisher(model, (X, y), "poisson")


@pytest.mark.parametrize(("option", "match"), [
    ({"kind": "exact"}, r"unknown Fisher kind 'exact'; valid: \['true', 'mc', 'empirical', 'ggn'\]"),
    ({"structure": "sparse"}, r"unknown Fisher structure 'sparse'; valid: .*'dense'.*'implicit'"),
    ({"structure": "block", "by": "module"}, r"unknown block grouping 'module'"),
    ({"kind": "mc", "mc_samples": 0}, "mc_samples must be a positive integer; got 0"),
    ({"dtype": torch.int32}, "dtype must be a floating dtype; got torch.int32"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer; got 0"),
    ({"memory_budget": -1}, "memory budget must be positive"),
    ({"params": ["0.weight", "9.bias"]}, r"unknown parameter name\(s\) \['9.bias'\]"),
    ({"params": []}, "no parameters selected"),
])
def test_bad_options(option, match):
    model, X, y = build()
    with pytest.raises(InputError, match=match):
        fisher(model, (X, y), "categorical", **option)


def test_model_must_be_a_module():
    _, X, y = build()
    with pytest.raises(InputError, match="model must be an nn.Module"):
        fisher(lambda x: x, (X, y))


# ---------------------------------------------------------------------------------------------------- data
def test_mismatched_lengths():
    model, X, y = build()
    with pytest.raises(InputError, match=r"share their first \(sample\) dimension; got X \(8, 5\) and y \(7,\)"):
        fisher(model, (X, y[:7]))
    with pytest.raises(InputError, match="batch has 3 inputs but 2 targets"):
        fisher(model, [(X[:3], y[:2])])


@pytest.mark.parametrize("data", ["nonsense", 3.0])
def test_data_of_the_wrong_type(data):
    model, _, _ = build()
    with pytest.raises(InputError, match="data must be"):
        fisher(model, data)


def test_batches_must_be_pairs():
    model, X, _ = build()
    with pytest.raises(InputError, match=r"each batch of the data iterable must be an \(x, y\) pair"):
        fisher(model, (X,))


def test_empty_dataset():
    model, X, y = build()
    with pytest.raises(InputError, match=r"empty \(0 samples\)"):
        fisher(model, (X[:0], y[:0]))
    with pytest.raises(InputError, match=r"empty \(0 samples\)"):
        fisher(model, [])


def test_integer_inputs_for_an_mlp():
    model, X, y = build()
    with pytest.raises(InputError, match="integer dtype torch.int64 .* no nn.Embedding.*X.float"):
        fisher(model, (X.round().long(), y))


def test_inputs_of_the_wrong_shape():
    model, X, y = build()
    with pytest.raises(InputError, match=r"could not be evaluated on inputs of shape \(2, 7\)"):
        fisher(model, (torch.randn(8, 7, dtype=F64), y))


# ----------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_categorical_targets(kind):
    model, X, y = build()
    with pytest.raises(InputError, match="categorical targets must be integer class labels; got dtype torch.float"):
        fisher(model, (X, y.double()), kind=kind)
    with pytest.raises(InputError, match=r"categorical targets must have shape \(N,\)"):
        fisher(model, (X, y.unsqueeze(1)), kind=kind)
    for bad in (3, -1):  # C = 3; the bad label is the last one, beyond any first-batch check
        y_bad = y.clone()
        y_bad[-1] = bad
        with pytest.raises(InputError, match=r"labels must lie in \[0, 3\)"):
            fisher(model, (X, y_bad), kind=kind)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_gaussian_targets(kind):
    model, X, y = build(MLP_GAUSS)  # C = 2
    with pytest.raises(InputError, match=r"Gaussian targets must have the outputs' shape \(2, 2\); got \(2, 3\)"):
        fisher(model, (X, torch.randn(8, 3, dtype=F64)), "gaussian", kind=kind)
    with pytest.raises(InputError, match="Gaussian targets must have the outputs' shape"):
        fisher(model, (X, y[:, 0]), "gaussian", kind=kind)


@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_bernoulli_targets(kind):
    model, X, y = build(MLP_BERN)
    y_bad = y.clone()
    y_bad[-1, 0] = 0.5
    with pytest.raises(InputError, match="Bernoulli targets must be 0 or 1"):
        fisher(model, (X, y_bad), "bernoulli", kind=kind)
    with pytest.raises(InputError, match="Bernoulli targets must have the outputs' shape"):
        fisher(model, (X, y[:, :2]), "bernoulli", kind=kind)


# ------------------------------------------------------------------------------------------------ non-finite
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_parameters(value):
    model, X, y = build()
    with torch.no_grad():
        model[2].bias[1] = value
    with pytest.raises(NonFiniteError, match="parameter '2.bias' contains NaN or infinite values"):
        fisher(model, (X, y))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_data(value):
    model, X, y = build(MLP_GAUSS)
    X_bad = X.clone()
    X_bad[-1, 2] = value  # in the last chunk, not the first
    with pytest.raises(NonFiniteError, match="input data contains NaN or infinite values"):
        fisher(model, (X_bad, y), "gaussian", chunk_size=3)
    y_bad = y.clone()
    y_bad[-1, 0] = value
    with pytest.raises(NonFiniteError, match="targets contains NaN or infinite values"):
        fisher(model, (X, y_bad), "gaussian", kind="empirical", chunk_size=3)


# ---------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize(("make", "input_shape", "module"), [
    (lambda: build(RESNET)[0], (1, 6, 6), r"'stem.1' \(BatchNorm2d\)"),
    (lambda: nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.1), nn.Linear(4, 3)).double(), (5,), r"'1' \(Dropout\)"),
])
def test_train_mode_with_batchnorm_or_dropout(make, input_shape, module):
    model = make().train()
    X = torch.randn(4, *input_shape, dtype=F64)
    with pytest.raises(InputError, match=module + " is in training mode.*model.eval"):
        fisher(model, (X, torch.zeros(4, dtype=torch.long)))


def test_tied_parameters():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared).double()
    X, y = torch.randn(5, 4, dtype=F64), torch.zeros(5, dtype=torch.long)
    with pytest.raises(InputError, match=r"parameters '0.weight' and '2.weight' are the same tensor.*params="):
        fisher(model, (X, y))


class Reshaped(nn.Module):
    """Linear(5, 6) with its outputs reshaped to (N, *shape)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.lin, self.shape = nn.Linear(5, 6), shape

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).reshape(x.shape[0], *self.shape)


def test_sequence_output_with_per_sample_targets():
    _, X, y = build()  # (N, T, C) outputs take (N, T) labels; (N,) labels are named as the mismatch
    with pytest.raises(InputError, match=r"must be class labels of shape \(N, T\); got \(2,\)"):
        fisher(Reshaped(3, 2).double(), (X, y))


def test_four_dimensional_output():
    _, X, y = build()
    with pytest.raises(InputError, match=r"outputs of shape \(N, C\), or \(N, T, C\) .*got \(2, 3, 1, 2\)"):
        fisher(Reshaped(3, 1, 2).double(), (X, y))


class Doubling(torch.autograd.Function):
    """An autograd.Function without the setup_context that torch.func transforms need."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return 2 * x

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        return 2 * g


class NotDifferentiablePerSample(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return Doubling.apply(self.head(x))


def test_model_that_cannot_be_differentiated_per_sample():
    """Neither vmap nor the per-sample loop works (a fused LSTM does work: tests/test_sample_loop.py).

    The empirical Fisher (one row per sample) needs the engine's factor rows; the true one of this network of
    linear layers is assembled from per-layer rows by plain autograd (tests/test_dense_kronecker.py).
    """
    X, y = torch.randn(4, 2, dtype=F64), torch.zeros(4, dtype=torch.long)
    match = r"(?s)cannot be differentiated per sample, neither under torch.func.vmap.*nor one sample at a time"
    with pytest.raises(UnsupportedLayerError, match=match):
        fisher(NotDifferentiablePerSample().double().eval(), (X, y), kind="empirical")


# --------------------------------------------------------------------------------------------- structures
@pytest.mark.parametrize("structure", ["dense", "block", "diag", "implicit"])
def test_operand_of_the_wrong_shape(structure):
    model, X, y = build()
    F = fisher(model, (X, y), structure=structure)
    for bad in (torch.ones(98), torch.ones(99, 2, 1), torch.ones(())):
        with pytest.raises(InputError, match=r"expected a tensor of shape \(P,\) or \(P, k\) with P = 99"):
            F @ bad


@pytest.mark.parametrize("structure", ["dense", "diag"])
def test_singular_solve_without_damping(structure):
    model, X, y = build()  # N·(C − 1) = 16 < P = 99: F is singular
    with torch.no_grad():
        model[0].weight[0] = 0  # and a hidden unit with no input: zero entries on the diagonal too
        model[0].bias[0] = -40
    F = fisher(model, (X, y), structure=structure)
    with pytest.raises(SingularMatrixError, match="damping"):
        F.solve(torch.ones(99))


def test_frozen_tied_weights_are_constants_in_every_use():
    """A frozen tied tensor (both names unselected), converted to float64: the Fisher of the rest, by autograd."""
    import torch
    from torch import nn

    import fisherlab

    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = lin.weight  # tied, and frozen
    lin.weight.requires_grad_(False)
    X = torch.randn(6, 4)
    y = torch.randint(0, 4, (6,))
    F = fisherlab.fisher(model, (X, y), kind="empirical", structure="implicit", dtype=torch.float64)
    ref = torch.zeros(8, 8, dtype=torch.float64)
    twin = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    twin.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    for n in range(6):
        loss = nn.functional.cross_entropy(twin(X[n:n + 1].double()), y[n:n + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, [twin[0].bias, twin[2].bias])])
        ref += torch.outer(g, g) / 6
    torch.testing.assert_close(F @ torch.eye(8, dtype=torch.float64), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["0.weight", "2.weight"])
def test_tied_weights_with_one_name_selected_match_the_shared_gradient(name):
    """Following the tied-weights error's advice (select one name, either) gives the Fisher of the shared tensor."""
    import torch
    from torch import nn

    import fisherlab

    torch.manual_seed(0)
    lin = nn.Linear(4, 4).double()
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 4).double())
    model[2].weight = lin.weight  # tied
    X = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    F = fisherlab.fisher(model, (X, y), kind="empirical", params=[name]).to_dense()
    # reference: per-sample gradients of the loss w.r.t. the shared tensor (both uses), by autograd
    ref = torch.zeros(16, 16, dtype=torch.float64)
    for n in range(6):
        loss = nn.functional.cross_entropy(model(X[n:n + 1]), y[n:n + 1])
        (g,) = torch.autograd.grad(loss, [lin.weight])
        ref += torch.outer(g.reshape(-1), g.reshape(-1)) / 6
    torch.testing.assert_close(F, ref, rtol=1e-10, atol=1e-12)
