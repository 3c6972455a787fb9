"""Test cases declared once: small float64 models, data and likelihoods (turned into fixtures in conftest.py).

Every case builds a seeded model (float64, eval mode) and a dataset ``(X, y)`` whose targets fit the likelihood:
int64 labels for ``"categorical"``, floats of shape (N, C) for ``"gaussian"``, 0/1 floats for ``"bernoulli"``.
The models are written here with ``torch.nn`` (not taken from ``fisherlab.models``) so that the engine tests do
not depend on the code under test elsewhere. They cover linear/logistic/softmax regression (closed forms), an
MLP, 2-D and 1-D convolutions, an LSTM (an ``nn.LSTMCell`` unrolled over time: the fused ``nn.LSTM`` kernel has
no ``vmap`` rule), a residual network with BatchNorm in eval mode, and a user-defined module with a bare
parameter and functional ops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from fisherlab.likelihoods import Gaussian, Likelihood, get_likelihood

DTYPE = torch.float64


# ------------------------------------------------------------------------------------------------- models
class LSTMClassifier(nn.Module):
    """An ``nn.LSTMCell`` unrolled over T steps, read out from the last hidden state: (B, T, F) → (B, C)."""

    def __init__(self, features: int, hidden: int, outputs: int):
        super().__init__()
        self.cell = nn.LSTMCell(features, hidden)
        self.head = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = x.new_zeros(x.shape[0], self.cell.hidden_size)
        c = h
        for xt in x.unbind(1):
            h, c = self.cell(xt, (h, c))
        return self.head(h)


class ResidualBlock(nn.Module):
    """x ↦ tanh(x + BN(conv(relu(BN(conv(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResNetBN(nn.Module):
    """Stem conv + BN, one residual block, global average pooling, linear head: (B, 1, H, W) → (B, C)."""

    def __init__(self, channels: int, outputs: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                  nn.Tanh())
        self.block = ResidualBlock(channels)
        self.head = nn.Linear(channels, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(self.stem(x)).mean(dim=(2, 3)))


class GatedNet(nn.Module):
    """A user-defined module: a bare weight, a per-feature log-scale, a buffer and functional ops (silu, linear).

    z = proj(silu(tanh(x Wᵀ − shift) · exp(log_scale))); parameters ``weight`` and ``log_scale`` belong to the top
    level module (layer ``""``).
    """

    def __init__(self, features: int, hidden: int, outputs: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(hidden, features) / math.sqrt(features))
        self.log_scale = nn.Parameter(0.3 * torch.randn(hidden))
        self.register_buffer("shift", 0.1 * torch.randn(hidden))
        self.proj = nn.Linear(hidden, outputs)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(nnf.linear(x, self.weight) - self.shift) * self.log_scale.exp()
        return self.proj(nnf.silu(h))


def mlp(features: int, hidden: int, outputs: int, activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    """Linear → act → Linear → act → Linear."""
    return nn.Sequential(nn.Linear(features, hidden), activation(), nn.Linear(hidden, hidden), activation(),
                         nn.Linear(hidden, outputs))


def cnn2d(outputs: int) -> nn.Sequential:
    """Conv2d on (1, 8, 8) images → tanh → 2×2 max-pool → linear."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 4 * 4, outputs))


def cnn1d(outputs: int) -> nn.Sequential:
    """Conv1d on (2, 10) signals → relu → flatten → linear."""
    return nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8, outputs))


def resnet_bn(outputs: int) -> ResNetBN:
    """A ResNetBN whose BatchNorm layers carry non-trivial running statistics and affine parameters."""
    model = ResNetBN(3, outputs)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.copy_(0.2 * torch.randn(bn.num_features))
        bn.running_var.copy_(0.5 + torch.rand(bn.num_features))
        bn.weight.data.copy_(1 + 0.2 * torch.randn(bn.num_features))
        bn.bias.data.copy_(0.1 * torch.randn(bn.num_features))
    return model


# ------------------------------------------------------------------------------------ a non-canonical likelihood
class SoftplusGaussian(Likelihood):
    """Gaussian with mean softplus(z) and fixed σ: a non-canonical link, so ∇²_z ℓ ≠ Λ(z) and GGN ≠ Fisher.

    ℓ = (softplus(z) − y)² / (2σ²); Λ(z) = diag(sigmoid(z)²) / σ²; ∇²_z ℓ = Λ(z) + diag((softplus(z) − y) s'(z))
    / σ², s' = sigmoid' > 0, which is PSD (and larger than Λ) whenever every residual softplus(z) − y is ≥ 0.
    """

    name = "softplus_gaussian"
    ggn_equals_fisher = False

    def __init__(self, sigma: float = 1.0):
        self.sigma = sigma

    def check_targets(self, z: Tensor, y: Tensor) -> Tensor:
        return get_likelihood("gaussian").check_targets(z, y)

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        return ((nnf.softplus(z) - y) ** 2).sum(-1) / (2 * self.sigma**2)

    def grad_z(self, z: Tensor, y: Tensor) -> Tensor:
        return (nnf.softplus(z) - y) * torch.sigmoid(z) / self.sigma**2

    def fisher_factor(self, z: Tensor) -> Tensor:
        return torch.diag_embed(torch.sigmoid(z) / self.sigma)

    def fisher_apply(self, z: Tensor, w: Tensor) -> Tensor:
        return torch.sigmoid(z) ** 2 * w / self.sigma**2


# ---------------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One model + data + likelihood problem.

    Attributes:
        name: Test id.
        make_model: Builds the (float32) model from the global RNG (seeded by :meth:`build`).
        input_shape: Per-sample input shape.
        likelihood: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"``.
        outputs: C.
        n: Number of samples N.
        sigma: σ of the Gaussian likelihood.
        seed: Seed of the model and the data.
    """

    name: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    likelihood: str
    outputs: int
    n: int = 8
    sigma: float = 1.0
    seed: int = 0

    def build(self, dtype: torch.dtype = DTYPE) -> tuple[nn.Module, Tensor, Tensor]:
        """(model in eval mode, X (N, *input_shape), y), all seeded; the global RNG state is restored."""
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = self.make_model().to(dtype).eval()
        gen = torch.Generator().manual_seed(self.seed + 1)
        X = torch.randn((self.n, *self.input_shape), generator=gen, dtype=dtype)
        if self.likelihood == "categorical":
            y = torch.randint(0, self.outputs, (self.n,), generator=gen)
        elif self.likelihood == "gaussian":
            y = torch.randn((self.n, self.outputs), generator=gen, dtype=dtype)
        else:
            y = torch.randint(0, 2, (self.n, self.outputs), generator=gen).to(dtype)
        return model, X, y

    def make_likelihood(self) -> Likelihood:
        """The engine's likelihood object for this case (a Gaussian carries σ)."""
        return Gaussian(self.sigma) if self.likelihood == "gaussian" else get_likelihood(self.likelihood)


LINREG = Case("linreg", lambda: nn.Linear(4, 3), (4,), "gaussian", 3, n=10, sigma=0.7)
LOGREG = Case("logreg", lambda: nn.Linear(4, 1), (4,), "bernoulli", 1, n=10)
SOFTMAX = Case("softmax", lambda: nn.Linear(4, 3), (4,), "categorical", 3, n=10)
MLP = Case("mlp", lambda: mlp(5, 6, 3), (5,), "categorical", 3)
MLP_GAUSS = Case("mlp_gaussian", lambda: mlp(5, 4, 2, nn.Sigmoid), (5,), "gaussian", 2, sigma=1.3)
MLP_BERN = Case("mlp_bernoulli", lambda: mlp(5, 4, 3), (5,), "bernoulli", 3)
CNN2D = Case("cnn2d", lambda: cnn2d(3), (1, 8, 8), "categorical", 3, n=6)
CNN1D = Case("cnn1d", lambda: cnn1d(3), (2, 10), "categorical", 3, n=6)
LSTM = Case("lstm", lambda: LSTMClassifier(2, 3, 3), (4, 2), "categorical", 3, n=6)
RESNET = Case("resnet_bn", lambda: resnet_bn(3), (1, 6, 6), "categorical", 3, n=6)
CUSTOM = Case("custom", lambda: GatedNet(4, 5, 2), (4,), "gaussian", 2, sigma=0.8)

#: Every case; the engine-against-reference tests run on all of them.
CASES: tuple[Case, ...] = (LINREG, LOGREG, SOFTMAX, MLP, MLP_GAUSS, MLP_BERN, CNN2D, CNN1D, LSTM, RESNET, CUSTOM)
CASES_BY_NAME: dict[str, Case] = {c.name: c for c in CASES}


class Bag(nn.Module):
    """Mean of 10 token embeddings, then a linear head: (N, T) int64 → (N, 3), float64; an index ≥ 10 cannot be
    evaluated."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(10, 4).double(), nn.Linear(4, 3).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.emb(x).mean(1))
