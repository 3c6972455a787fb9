"""Seeded reference networks for fisherlab.

Every model is a plain :class:`torch.nn.Module` whose ``forward`` maps a batch ``(B, *input_shape)`` to
``(B, n_outputs)`` (logits for classification, means for regression) — except :class:`GPT` with
``output="sequence"``, which maps token ids ``(B, T)`` to next-token logits ``(B, T, n_outputs)`` at every
position. The two transformers (:class:`GPT`, :class:`EncoderClassifier`) take int64 token ids. All of them can be
evaluated per sample with ``torch.func.functional_call`` inside ``torch.func.vmap`` (feed each sample as a batch
of one, ``x.unsqueeze(0)``): the forwards use no in-place operation on inputs, no ``.item()`` and no control flow
that depends on tensor values (the transformers' token-id range check reads values only outside ``torch.func``
transforms).

Two caveats the Fisher engines rely on:

- :class:`ResNet` contains BatchNorm layers. In training mode BatchNorm couples the samples of a batch
  and updates its running statistics in place, which neither matches the per-sample model the Fisher
  assumes nor works under ``vmap``. Put the model in eval mode (``model.eval()``) before computing any
  Fisher, Jacobian or reconstruction; :func:`build_model` returns models in PyTorch's default training mode.
- :class:`LSTMClassifier` keeps its weights in an :class:`torch.nn.LSTM` (standard names and
  initialisation) but runs the recurrence with explicit tensor operations, because the fused
  ``aten::lstm`` kernel has no ``vmap`` batching rule (the engine would fall back to a slower loop over
  samples). :meth:`LSTMClassifier.forward_fused` runs the fused kernel for comparison.

:func:`build_model` builds any of them by name, inferring shapes from a :class:`~fisherlab.data.SplitData`,
and initialises parameters from a seed without touching the global random state.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from fisherlab.checks import parse_enum
from fisherlab.errors import InputError
from fisherlab.vocabulary import GPTOutput

if TYPE_CHECKING:
    from fisherlab.data import SplitData

__all__ = [
    "ACTIVATIONS",
    "CNN",
    "EncoderClassifier",
    "GPT",
    "GPTOutput",
    "GPT_SIZES",
    "LSTMClassifier",
    "MLP",
    "MODELS",
    "REFERENCE_MLP_PARAMS",
    "ResNet",
    "build_model",
    "gpt_param_count",
    "reference_mlp",
    "seeded_init",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
"""Activation names accepted by the models, and their module classes."""

MODELS: tuple[str, ...] = ("mlp", "cnn", "lstm", "resnet", "gpt", "encoder")
"""Names accepted by :func:`build_model`."""

REFERENCE_MLP_PARAMS: int = 3466
"""Number of parameters of :func:`reference_mlp` (64·32+32 + 32·32+32 + 32·10+10)."""


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise InputError(f"unknown activation {name!r}; valid activations are {tuple(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be a positive int, got {value!r}")
    return value


def _shape(input_shape: Sequence[int], what: str) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise InputError(
            f"{what}: input_shape must be a non-empty tuple of positive ints, got {input_shape!r}"
        )
    return shape


def _spatial_shape(input_shape: Sequence[int], what: str) -> tuple[int, ...]:
    """A per-sample (C, H, W) or (C, L) shape, or InputError naming ``what`` and the layout to load."""
    shape = _shape(input_shape, what)
    if len(shape) not in (2, 3):
        raise InputError(
            f"{what} needs a per-sample input_shape (C, H, W) or (C, L), got {shape}; "
            "flat inputs need a channel layout"
        )
    return shape


class MLP(nn.Module):
    """Fully connected network: a plain stack of :class:`torch.nn.Linear` and activation modules.

    The stack is ``self.layers`` (an :class:`torch.nn.Sequential`), so parameters are named
    ``layers.0.weight``, ``layers.0.bias``, ``layers.2.weight``, ... and the Linear layers appear in
    order in ``model.modules()``. No activation follows the last Linear layer.

    Args:
        in_features: Number of input features; inputs ``(B, ...)`` are flattened to ``(B, in_features)``.
        widths: Hidden layer widths, e.g. ``[32, 32]``; empty for a linear model.
        out_features: Number of outputs.
        activation: One of ``"tanh"``, ``"relu"``, ``"sigmoid"``, ``"gelu"``.

    Shapes:
        input ``(B, *s)`` with ``prod(s) == in_features``; output ``(B, out_features)``.
    """

    def __init__(
        self, in_features: int, widths: Sequence[int], out_features: int, activation: str = "tanh"
    ) -> None:
        super().__init__()
        self.in_features = _positive_int(in_features, "MLP in_features")
        self.out_features = _positive_int(out_features, "MLP out_features")
        self.widths = tuple(_positive_int(w, "MLP widths entry") for w in widths)
        self.activation = activation
        _activation(activation)  # validate early
        mods: list[nn.Module] = []
        prev = self.in_features
        for w in self.widths:
            mods += [nn.Linear(prev, w), _activation(activation)]
            prev = w
        mods.append(nn.Linear(prev, self.out_features))
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, *s)`` to ``(B, out_features)``."""
        return self.layers(torch.flatten(x, 1))


class CNN(nn.Module):
    """Small convolutional network, 2-D for ``(C, H, W)`` inputs and 1-D for ``(C, L)`` inputs.

    For each entry of ``channels``: convolution (odd ``kernel_size``, ``padding=kernel_size // 2`` so
    spatial sizes are kept), activation, then average pooling by 2 while every spatial size is at least
    2. The feature map is flattened into one :class:`torch.nn.Linear` head. On 8x8 digits with the
    defaults this has 1,898 parameters; on MNIST-1D ``(1, 40)`` it has 2,042.

    Submodules: ``features`` (:class:`torch.nn.Sequential` of Conv/activation/AvgPool) and ``head``.

    Args:
        input_shape: Per-sample shape, ``(C, H, W)`` or ``(C, L)``.
        n_outputs: Number of outputs.
        channels: Output channels of the successive convolutions.
        kernel_size: Convolution kernel size, odd.
        activation: One of ``"tanh"``, ``"relu"``, ``"sigmoid"``, ``"gelu"``.

    Shapes:
        input ``(B, *input_shape)``; output ``(B, n_outputs)``.

    Raises:
        InputError: If ``input_shape`` does not have 2 or 3 entries, or ``kernel_size`` is even.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_outputs: int,
        channels: Sequence[int] = (8, 16),
        kernel_size: int = 3,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        shape = _spatial_shape(input_shape, "CNN")
        self.input_shape = shape
        self.n_outputs = _positive_int(n_outputs, "CNN n_outputs")
        self.channels = tuple(_positive_int(c, "CNN channels entry") for c in channels)
        if not self.channels:
            raise InputError("CNN channels must name at least one convolution")
        k = _positive_int(kernel_size, "CNN kernel_size")
        if k % 2 == 0:
            raise InputError(f"CNN kernel_size must be odd (same-size padding kernel_size // 2), got {k}")
        _activation(activation)
        conv, pool = (nn.Conv2d, nn.AvgPool2d) if len(shape) == 3 else (nn.Conv1d, nn.AvgPool1d)
        c_in, spatial = shape[0], list(shape[1:])
        mods: list[nn.Module] = []
        for c_out in self.channels:
            pad = k // 2  # odd k: spatial sizes are kept
            mods += [conv(c_in, c_out, k, padding=pad), _activation(activation)]
            if min(spatial) >= 2:
                mods.append(pool(2))
                spatial = [s // 2 for s in spatial]
            c_in = c_out
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(c_in * math.prod(spatial), self.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, *input_shape)`` to ``(B, n_outputs)``."""
        return self.head(torch.flatten(self.features(x), 1))


class LSTMClassifier(nn.Module):
    """LSTM over a sequence, read out from the last time step by a Linear head.

    Weights live in ``self.lstm``, an :class:`torch.nn.LSTM` with ``batch_first=True`` (names
    ``lstm.weight_ih_l0``, ``lstm.weight_hh_l0``, ``lstm.bias_ih_l0``, ``lstm.bias_hh_l0``, ...), and
    ``self.head`` (:class:`torch.nn.Linear`). :meth:`forward` evaluates the same recurrence as the fused
    kernel (gate order i, f, g, o; zero initial state) with explicit operations so that it works under
    ``torch.func.vmap``; :meth:`forward_fused` calls ``nn.LSTM`` itself.

    Args:
        input_size: Features per time step.
        hidden_size: LSTM hidden size.
        n_outputs: Number of outputs.
        num_layers: Number of stacked LSTM layers.

    Shapes:
        input ``(B, T, input_size)``; output ``(B, n_outputs)``.
    """

    def __init__(self, input_size: int, hidden_size: int, n_outputs: int, num_layers: int = 1) -> None:
        super().__init__()
        self.input_size = _positive_int(input_size, "LSTMClassifier input_size")
        self.hidden_size = _positive_int(hidden_size, "LSTMClassifier hidden_size")
        self.n_outputs = _positive_int(n_outputs, "LSTMClassifier n_outputs")
        self.num_layers = _positive_int(num_layers, "LSTMClassifier num_layers")
        self.lstm = nn.LSTM(self.input_size, self.hidden_size, num_layers=self.num_layers, batch_first=True)
        self.head = nn.Linear(self.hidden_size, self.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, T, input_size)`` to ``(B, n_outputs)`` with an explicit (vmap-safe) recurrence."""
        seq = x.unbind(1)  # T tensors of shape (B, input_size)
        for layer in range(self.num_layers):
            w_ih = getattr(self.lstm, f"weight_ih_l{layer}")
            w_hh = getattr(self.lstm, f"weight_hh_l{layer}")
            bias = getattr(self.lstm, f"bias_ih_l{layer}") + getattr(self.lstm, f"bias_hh_l{layer}")
            x_proj = [torch.nn.functional.linear(xt, w_ih, bias) for xt in seq]
            h = x_proj[0].new_zeros(x_proj[0].shape[:-1] + (self.hidden_size,))
            c = h
            outs = []
            for xp in x_proj:
                gates = xp + torch.nn.functional.linear(h, w_hh)
                i, f, g, o = gates.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                outs.append(h)
            seq = outs
        return self.head(seq[-1])

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """Compute :meth:`forward` through the fused ``nn.LSTM`` kernel (faster; not vmap-compatible)."""
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class _ResidualBlock(nn.Module):
    """``act(x + BN(conv(act(BN(conv(x))))))`` with 3-wide convolutions that keep the shape."""

    def __init__(self, channels: int, dims: int, activation: str) -> None:
        super().__init__()
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv1 = conv(channels, channels, 3, padding=1, bias=False)
        self.bn1 = norm(channels)
        self.act1 = _activation(activation)
        self.conv2 = conv(channels, channels, 3, padding=1, bias=False)
        self.bn2 = norm(channels)
        self.act2 = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block; shape is preserved."""
        h = self.act1(self.bn1(self.conv1(x)))
        return self.act2(x + self.bn2(self.conv2(h)))


class ResNet(nn.Module):
    """Small residual CNN with BatchNorm, global average pooling and a Linear head.

    Stem: 3-wide convolution (no bias) to ``channels`` channels, BatchNorm, activation. Then ``n_blocks``
    residual blocks conv-BN-act-conv-BN + skip, activation. Then the mean over spatial positions and
    ``head`` (:class:`torch.nn.Linear`). 2-D layers for ``(C, H, W)`` inputs, 1-D for ``(C, L)``. On 8x8
    digits with the defaults it has 2,546 parameters.

    **Fisher engines require eval mode** (``model.eval()``): in training mode BatchNorm mixes the samples
    of a batch and updates running statistics in place, so per-sample Jacobians are neither defined nor
    computable under ``vmap``.

    Args:
        input_shape: Per-sample shape, ``(C, H, W)`` or ``(C, L)``.
        n_outputs: Number of outputs.
        channels: Width of the stem and of every block.
        n_blocks: Number of residual blocks (0 allowed).
        activation: One of ``"tanh"``, ``"relu"``, ``"sigmoid"``, ``"gelu"``.

    Shapes:
        input ``(B, *input_shape)``; output ``(B, n_outputs)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_outputs: int,
        channels: int = 8,
        n_blocks: int = 2,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        shape = _spatial_shape(input_shape, "ResNet")
        self.input_shape = shape
        self.n_outputs = _positive_int(n_outputs, "ResNet n_outputs")
        width = _positive_int(channels, "ResNet channels")
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or n_blocks < 0:
            raise InputError(f"ResNet n_blocks must be an int >= 0, got {n_blocks!r}")
        dims = len(shape) - 1
        conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.stem = nn.Sequential(
            conv(shape[0], width, 3, padding=1, bias=False), norm(width), _activation(activation)
        )
        self.blocks = nn.Sequential(*[_ResidualBlock(width, dims, activation) for _ in range(n_blocks)])
        self.head = nn.Linear(width, self.n_outputs)
        self._pool_dims = tuple(range(2, 2 + dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, *input_shape)`` to ``(B, n_outputs)``."""
        h = self.blocks(self.stem(x))
        return self.head(h.mean(dim=self._pool_dims))


def _token_embeddings(embed: nn.Embedding, position: nn.Embedding, x: torch.Tensor, what: str) -> torch.Tensor:
    """``embed(x) + position(p)``, p = 0..T−1 for every sample, shape (B, T, d), after checking the ids ``x`` (B, T).

    The position table is called on the (B, T) positions (not on one ``arange(T)`` broadcast over the batch), so
    that per-layer statistics (KFAC's input factor of ``position``) see a per-sample input.

    Raises InputError unless ``x`` is an int64 tensor of shape (B, T) with 1 ≤ T ≤ ``position.num_embeddings``
    and every id in ``[0, embed.num_embeddings)``. The id range is read from the values (one device
    synchronisation per call); it is skipped for tensors inside a ``torch.func`` transform (a vmapped sample
    cannot be read) and on the meta device — fisherlab's engines evaluate every sample by a plain forward pass
    before they differentiate, so bad ids are refused there.
    """
    vocab, seq_len = embed.num_embeddings, position.num_embeddings
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or x.dim() != 2 or not 1 <= x.shape[1] <= seq_len:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{what} takes int64 token ids of shape (B, T) with 1 ≤ T ≤ seq_len = {seq_len}; got {got}")
    if x.numel() and x.device.type != "meta" and not torch._C._functorch.is_functorch_wrapped_tensor(x):
        low, high = (int(v) for v in torch.aminmax(x))
        if low < 0 or high >= vocab:
            raise InputError(f"{what} takes token ids in [0, vocab = {vocab}); got ids from {low} to {high}")
    positions = torch.arange(x.shape[1], device=x.device).expand(x.shape)  # per sample: layers see (B, T) ids
    return embed(x) + position(positions)


class _CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention: packed ``qkv`` (Linear d → 3d), SDPA with ``is_causal=True``, ``proj``.

    The rows of ``qkv.weight`` are the q, k and v blocks (d rows each, in that order, as in
    ``nn.MultiheadAttention.in_proj_weight``); within each block, head h owns rows ``h·d_h .. (h+1)·d_h − 1``
    (``d_h = d / n_heads``). Heads are split and merged by reshapes, so every parameter sits in a Linear layer.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.n_heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Map (B, T, d) to (B, T, d); position t attends to positions ≤ t."""
        B, T, d = h.shape
        q, k, v = self.qkv(h).reshape(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n_heads, T, d_h)
        return self.proj(a.transpose(1, 2).reshape(B, T, d))


class _MLPBlock(nn.Module):
    """``proj(GELU(fc(h)))``: Linear d → d_ff, exact GELU, Linear d_ff → d."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Map (B, T, d) to (B, T, d), position by position."""
        return self.proj(self.act(self.fc(h)))


class _Block(nn.Module):
    """Pre-LN decoder block: ``h + attn(ln1(h))``, then ``h + mlp(ln2(h))``."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = _CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = _MLPBlock(width, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Map (B, T, d) to (B, T, d)."""
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


def gpt_param_count(vocab: int, seq_len: int, d_model: int = 16, n_layers: int = 1, d_ff: int | None = None,
                    n_outputs: int | None = None, tie_embeddings: bool = False) -> int:
    """The number of parameters of ``GPT(vocab, seq_len, n_outputs, d_model, n_layers, n_heads, d_ff, ...)``.

    With V = vocab, S = seq_len, d = d_model, L = n_layers, F = d_ff (default 4d), O = n_outputs (default V)::

        P = (V + S)·d  +  L·(4d² + 2dF + 9d + F)  +  2d  +  (d + 1)·O  −  [tie_embeddings]·V·d

    (embeddings; per block: ``qkv`` 3d² + 3d, ``proj`` d² + d, ``fc`` dF + F, ``mlp.proj`` Fd + d, two
    LayerNorms 4d; the final LayerNorm; the head; a tied head shares the embedding's V·d weights). The number of
    heads does not enter. Arguments are not validated here (the constructor does that).
    """
    hidden = 4 * d_model if d_ff is None else d_ff
    outputs = vocab if n_outputs is None else n_outputs
    block = 4 * d_model**2 + 2 * d_model * hidden + 9 * d_model + hidden
    tied = vocab * d_model if tie_embeddings else 0
    return (vocab + seq_len) * d_model + n_layers * block + 2 * d_model + (d_model + 1) * outputs - tied


GPT_SIZES: dict[str, dict[str, int]] = {
    "10k": {"d_model": 16, "n_layers": 3, "n_heads": 2},
    "1M": {"d_model": 128, "n_layers": 5, "n_heads": 4},
    "10M": {"d_model": 384, "n_layers": 6, "n_heads": 6},
}
"""(d_model, n_layers, n_heads) of a GPT of about 10k, 1M and 10M parameters (``d_ff`` = 4·d_model).

Pass one as keywords: ``build_model("gpt", data, **GPT_SIZES["1M"])``. The blocks hold 4d² + 2dF + 9d + F
parameters each (:func:`gpt_param_count`): 3,280 at d = 16, 198,272 at d = 128 and 1,774,464 at d = 384; the
embeddings and head add (V + S + 2 + O)·d + O. So on :func:`fisherlab.data.make_sort_lm` (V = O = 9, S = 12)
"10k" has 10,361 parameters; on a character text (V = O = 65, S = 64) "1M" has 1,016,513 and "10M" 10,722,113
("10M" has the width, depth and heads of nanoGPT's character-level Shakespeare model). The last two are meant
for batches of 32 sequences of length 64.
"""


class GPT(nn.Module):
    """Decoder-only transformer (nanoGPT-style): token and learned position embeddings, pre-LN causal blocks, a head.

    ``embed`` (:class:`torch.nn.Embedding`, V × d) plus ``position`` (Embedding, S × d), then ``blocks``, a
    :class:`torch.nn.ModuleList` of ``n_layers`` pre-LN blocks, each ``h + attn.proj(SDPA(attn.qkv(ln1(h))))``
    (causal: position t attends to positions ≤ t, through ``F.scaled_dot_product_attention(..., is_causal=True)``;
    ``attn.qkv`` packs q, k, v) followed by ``h + mlp.proj(GELU(mlp.fc(ln2(h))))``; then the final
    :class:`torch.nn.LayerNorm` ``norm`` and ``head`` (Linear d → n_outputs). Every parameter belongs to an
    Embedding, a LayerNorm or a Linear layer (names ``blocks.i.ln1``, ``blocks.i.attn.qkv``, ``blocks.i.attn.proj``,
    ``blocks.i.ln2``, ``blocks.i.mlp.fc``, ``blocks.i.mlp.proj``); there is no dropout and no buffer.

    The parameter count is exactly (:func:`gpt_param_count`, V = vocab, S = seq_len, d = d_model, L = n_layers,
    F = d_ff, O = n_outputs)::

        P = (V + S)·d  +  L·(4d² + 2dF + 9d + F)  +  2d  +  (d + 1)·O  −  [tie_embeddings]·V·d

    With the defaults on :func:`fisherlab.data.make_sort_task` (V = 14, S = 7, 8 classes) that is 3,784;
    :data:`GPT_SIZES` lists configurations of about 10k, 1M and 10M parameters.

    Args:
        vocab: Token ids the embedding takes, ``[0, vocab)``.
        seq_len: Longest sequence (rows of the position table).
        n_outputs: Outputs of the head (default ``vocab``: next-token logits).
        d_model: Width of the residual stream.
        n_layers: Transformer blocks.
        n_heads: Attention heads (must divide ``d_model``).
        d_ff: Width of the MLP (default ``4 * d_model``).
        output: ``"last"`` (:class:`GPTOutput`): the logits at the last position, (B, n_outputs) — a sequence
            classifier or the next token after the sequence; ``"sequence"``: the logits at every position,
            (B, T, n_outputs) — position t predicts token t + 1 (language modelling).
        tie_embeddings: Make ``head.weight`` the very tensor ``embed.weight`` (needs ``n_outputs == vocab``);
            the head keeps its own bias.

    Shapes:
        input ``(B, T)`` int64 token ids in ``[0, vocab)`` with ``1 ≤ T ≤ seq_len``; output ``(B, n_outputs)``
        (``output="last"``) or ``(B, T, n_outputs)`` (``output="sequence"``).

    Raises:
        InputError: On bad sizes, ``n_heads`` not dividing ``d_model``, an unknown ``output``, tied embeddings with
            ``n_outputs != vocab``; in ``forward``, on inputs that are not int64 (B, T) ids with T ≤ seq_len or
            hold ids outside ``[0, vocab)``.
    """

    def __init__(self, vocab: int, seq_len: int, n_outputs: int | None = None, d_model: int = 16,
                 n_layers: int = 1, n_heads: int = 2, d_ff: int | None = None,
                 output: GPTOutput | str = GPTOutput.LAST, tie_embeddings: bool = False) -> None:
        super().__init__()
        self.vocab = _positive_int(vocab, "GPT vocab")
        self.seq_len = _positive_int(seq_len, "GPT seq_len")
        self.n_outputs = self.vocab if n_outputs is None else _positive_int(n_outputs, "GPT n_outputs")
        width = _positive_int(d_model, "GPT d_model")
        heads = _positive_int(n_heads, "GPT n_heads")
        if width % heads:
            raise InputError(f"GPT n_heads={heads} must divide d_model={width}")
        hidden = 4 * width if d_ff is None else _positive_int(d_ff, "GPT d_ff")
        self.output = parse_enum(GPTOutput, output, "GPT output")
        if not isinstance(tie_embeddings, bool):
            raise InputError(f"GPT tie_embeddings must be a bool, got {tie_embeddings!r}")
        if tie_embeddings and self.n_outputs != self.vocab:
            raise InputError(f"GPT tie_embeddings needs n_outputs == vocab = {self.vocab}, got {self.n_outputs}")
        self.embed = nn.Embedding(self.vocab, width)
        self.position = nn.Embedding(self.seq_len, width)
        layers = _positive_int(n_layers, "GPT n_layers")
        self.blocks = nn.ModuleList([_Block(width, heads, hidden) for _ in range(layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.n_outputs)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map token ids (B, T) to logits (B, n_outputs) at the last position or (B, T, n_outputs) at every one."""
        h = _token_embeddings(self.embed, self.position, x, "GPT")
        for block in self.blocks:
            h = block(h)
        if self.output is GPTOutput.LAST:
            h = h[:, -1]
        return self.head(self.norm(h))


class EncoderClassifier(nn.Module):
    """Sequence classifier: token + position embeddings, an :class:`torch.nn.TransformerEncoder`, mean-pooled head.

    ``embed`` (Embedding V × d) plus ``position`` (Embedding S × d), then ``encoder``, an
    :class:`torch.nn.TransformerEncoder` of ``n_layers`` :class:`torch.nn.TransformerEncoderLayer` (post-LN as in
    torch's default, ``batch_first=True``, GELU, no dropout, no mask: every position attends to every position;
    each layer initialised on its own — ``nn.TransformerEncoder`` alone would deep-copy one layer), the mean over
    the T positions, and ``head`` (Linear d → n_outputs). In eval mode without gradients torch may run the
    encoder through its fused fast path; fisherlab's engines switch that path off inside their own calls.

    Args:
        vocab: Token ids the embedding takes, ``[0, vocab)``.
        seq_len: Longest sequence (rows of the position table).
        n_outputs: Classes.
        d_model: Width.
        n_layers: Encoder layers.
        n_heads: Attention heads (must divide ``d_model``).
        d_ff: Width of the feed-forward layers (default ``4 * d_model``).

    Shapes:
        input ``(B, T)`` int64 token ids in ``[0, vocab)`` with ``1 ≤ T ≤ seq_len``; output ``(B, n_outputs)``.

    Raises:
        InputError: On bad sizes or ``n_heads`` not dividing ``d_model``; in ``forward``, on bad token ids (as
            :class:`GPT`).
    """

    def __init__(self, vocab: int, seq_len: int, n_outputs: int, d_model: int = 16, n_layers: int = 1,
                 n_heads: int = 2, d_ff: int | None = None) -> None:
        super().__init__()
        self.vocab = _positive_int(vocab, "EncoderClassifier vocab")
        self.seq_len = _positive_int(seq_len, "EncoderClassifier seq_len")
        self.n_outputs = _positive_int(n_outputs, "EncoderClassifier n_outputs")
        width = _positive_int(d_model, "EncoderClassifier d_model")
        heads = _positive_int(n_heads, "EncoderClassifier n_heads")
        if width % heads:
            raise InputError(f"EncoderClassifier n_heads={heads} must divide d_model={width}")
        hidden = 4 * width if d_ff is None else _positive_int(d_ff, "EncoderClassifier d_ff")
        layers = _positive_int(n_layers, "EncoderClassifier n_layers")

        def layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(width, heads, hidden, dropout=0.0, activation="gelu", batch_first=True)

        self.embed = nn.Embedding(self.vocab, width)
        self.position = nn.Embedding(self.seq_len, width)
        self.encoder = nn.TransformerEncoder(layer(), layers, enable_nested_tensor=False)
        self.encoder.layers = nn.ModuleList([self.encoder.layers[0], *(layer() for _ in range(layers - 1))])
        self.head = nn.Linear(width, self.n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map token ids (B, T) to class logits (B, n_outputs)."""
        h = self.encoder(_token_embeddings(self.embed, self.position, x, "EncoderClassifier"))
        return self.head(h.mean(dim=1))


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------
_CLASSES: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "lstm": LSTMClassifier, "resnet": ResNet, "gpt": GPT,
                                       "encoder": EncoderClassifier}

# The layout each dataset needs for a channel (conv) model and for a sequence (LSTM) model.
_CONV_LAYOUT = {"digits": "image", "mnist1d": "channels", "mnist": "image", "cifar10": "image"}
_SEQ_LAYOUT = {"mnist1d": "sequence"}


def _layout_error(name: str, data: SplitData, want: str, hint: dict[str, str]) -> InputError:
    layout = data.meta.get("layout", "?")
    msg = (
        f"build_model({name!r}) needs per-sample inputs of shape {want}, but dataset {data.name!r} has "
        f"input_shape {data.input_shape} (layout={layout!r}); "
    )
    if data.name in hint:
        msg += f'load it with layout="{hint[data.name]}"'
    else:
        msg += f"datasets that offer such a layout: {', '.join(f'{k} ({v!r})' for k, v in hint.items())}"
    return InputError(msg)


def _kwargs_from_data(name: str, data: SplitData) -> dict[str, Any]:
    shape, layout = tuple(data.input_shape), data.meta.get("layout")
    if name == "mlp":
        return {"in_features": math.prod(shape), "out_features": data.n_outputs}
    if name in ("cnn", "resnet"):
        if len(shape) not in (2, 3) or layout == "sequence":
            raise _layout_error(name, data, "(C, H, W) or (C, L)", _CONV_LAYOUT)
        return {"input_shape": shape, "n_outputs": data.n_outputs}
    if name in ("gpt", "encoder"):
        if layout != "tokens":
            raise InputError(f"build_model({name!r}) needs token data (layout 'tokens', int64 ids), but dataset "
                             f"{data.name!r} has layout {layout!r}; make some with fisherlab.data.make_sort_task "
                             "(a class per sequence), make_sort_lm or load_text (a next token per position)")
        per_position = data.y_train.dim() == 2
        if name == "encoder" and per_position:
            raise InputError(f"build_model('encoder') classifies whole sequences, but dataset {data.name!r} has a "
                             "target per position; use build_model('gpt', ...) (output='sequence') for it")
        found = {"vocab": int(data.meta["vocab"]), "seq_len": shape[0], "n_outputs": data.n_outputs}
        return {**found, "output": GPTOutput.SEQUENCE if per_position else GPTOutput.LAST} if name == "gpt" else found
    # lstm
    if len(shape) != 2 or layout == "channels":
        raise _layout_error(name, data, "(T, features)", _SEQ_LAYOUT)
    return {"input_size": shape[1], "n_outputs": data.n_outputs}


_DEFAULTS: dict[str, dict[str, Any]] = {"mlp": {"widths": (32, 32)}, "lstm": {"hidden_size": 32}}


def build_model(
    name: str,
    data: SplitData | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a reference network by name, with parameters drawn deterministically from ``seed``.

    Shapes are inferred from ``data`` when it is given: ``mlp`` takes ``in_features = prod(input_shape)``
    and ``out_features = n_outputs`` (any layout; inputs are flattened); ``cnn`` and ``resnet`` take
    ``input_shape`` (must be ``(C, H, W)`` or ``(C, L)``) and ``n_outputs``; ``lstm`` takes
    ``input_size = input_shape[-1]`` (input_shape must be ``(T, features)``) and ``n_outputs``; ``gpt`` and
    ``encoder`` take ``vocab = meta["vocab"]``, ``seq_len = input_shape[0]`` and ``n_outputs`` (token data,
    ``layout="tokens"``), and ``gpt`` takes ``output="sequence"`` when the targets are per position (y of shape
    (N, T)), else ``output="last"``; ``encoder`` refuses per-position targets.
    Keywords given explicitly override inferred values. Defaults beyond the class signatures: ``widths=(32, 32)``
    for ``mlp`` and ``hidden_size=32`` for ``lstm``.

    Parameters are initialised by PyTorch's default initialisers inside :func:`seeded_init` (on the CPU, in
    float32 whatever ``torch.get_default_dtype()`` and the default device are, from the CPU generator seeded
    by ``seed``; the caller's global RNG state and default dtype are restored afterwards, CUDA generators are
    never touched). The model is then moved to ``device`` and cast to ``dtype``, so a float64 model is the
    exact upcast of the float32 model with the same seed, and the same seed gives the same parameters on every
    device and under every default dtype. The model is returned in training mode (PyTorch's default); call
    ``.eval()`` before Fisher computations (required for ``resnet``).

    Args:
        name: One of :data:`MODELS`: ``"mlp"``, ``"cnn"``, ``"lstm"``, ``"resnet"``, ``"gpt"``, ``"encoder"``.
        data: Optional :class:`~fisherlab.data.SplitData` to infer shapes from.
        seed: Initialisation seed.
        dtype: Floating dtype of parameters and buffers.
        device: Target device (``None``: CPU).
        **kwargs: Constructor arguments of :class:`MLP`, :class:`CNN`, :class:`LSTMClassifier`,
            :class:`ResNet`, :class:`GPT` or :class:`EncoderClassifier` (e.g. ``**GPT_SIZES["1M"]``).

    Returns:
        The model, an :class:`torch.nn.Module` mapping ``(B, *input_shape)`` to ``(B, n_outputs)`` (a sequence
        GPT: to ``(B, T, n_outputs)``).

    Raises:
        InputError: On an unknown name (the message lists :data:`MODELS`), a data layout the model cannot
            take (the message says which ``layout=`` to load), an unknown or missing constructor argument,
            or a non-floating dtype.
    """
    if name not in _CLASSES:
        raise InputError(f"unknown model {name!r}; valid names are {', '.join(MODELS)}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"build_model: dtype must be a floating torch dtype, got {dtype!r}")
    cls = _CLASSES[name]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise InputError(
            f"build_model({name!r}): unknown argument(s) {unknown}; {cls.__name__} takes {accepted}"
        )
    merged: dict[str, Any] = dict(_DEFAULTS.get(name, {}))
    if data is not None:
        merged.update(_kwargs_from_data(name, data))
    merged.update(kwargs)
    missing = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in merged]
    if missing:
        raise InputError(
            f"build_model({name!r}): missing argument(s) {missing}; pass data= or give them as keywords"
        )
    with seeded_init(seed):
        model = cls(**merged)
    return model.to(device=device, dtype=dtype)


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Context in which module constructors draw reproducible parameters from ``seed``.

    Inside it, new tensors are created on the CPU in float32 (whatever ``torch.get_default_dtype()`` and
    ``torch.set_default_device`` say outside) and the CPU generator is seeded by ``seed``. On exit the global
    RNG state and the default dtype are restored. Cast the module afterwards (``module.to(dtype=...)``): the
    same seed then gives the same weights under every default dtype, and a float64 module is the exact upcast
    of the float32 one. The default dtype is process-global while the context is open, so do not construct
    modules in other threads meanwhile.

    Raises:
        InputError: If ``seed`` is not an int.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InputError(f"seed must be an int, got {seed!r}")
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(int(seed))
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def reference_mlp(
    seed: int = 0, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> MLP:
    """Return the project's reference network: ``MLP(64, [32, 32], 10, "tanh")`` for flat digits.

    It has :data:`REFERENCE_MLP_PARAMS` = 3,466 parameters and is built by :func:`build_model` (same
    seeding rules).
    """
    model = build_model(
        "mlp",
        seed=seed,
        dtype=dtype,
        device=device,
        in_features=64,
        widths=(32, 32),
        out_features=10,
        activation="tanh",
    )
    return cast(MLP, model)
