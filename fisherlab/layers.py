"""Per-layer rules: how a weight layer's input and parameters map onto one combined matrix W̄ (BackPACK style).

Kronecker-factored structures (KFAC, EKFAC, unit-wise blocks) and the reconstruction of local Fisher layers
see every supported layer as one linear map applied at L locations (docs/method.md):

    y_l = W̄ ā_l,   ā_l = [a_l; 1] (the 1 only when the layer's bias is selected),   l = 1 … L,

with W̄ = [W_flat, b] of shape (out, in_eff [+ 1]). For ``nn.Linear`` on (n, in) inputs L = 1 and a_l is the
input, on (n, T₁, …, in) inputs the L = T₁·… positions share W; for ``nn.Conv1d``/``nn.Conv2d`` a_l is the
unfolded input patch at output location l (length in_eff = in_channels · ∏ kernel_size, in the order of
``weight.reshape(out, -1)``) and L is the number of output locations; for ``nn.Embedding`` (y_l = E[x_l]) a_l is
the one-hot vector of token x_l (in_eff = num_embeddings), W̄ = Eᵀ (embedding_dim, num_embeddings) — the weight
*transposed* — and the rows are kept as token ids (:class:`OneHotRows`), never as one-hot vectors; for
self-attention ``nn.MultiheadAttention`` W̄ = [in_proj_weight, in_proj_bias] (3E × (E + 1), q, k, v rows) maps each
position's input to its packed q, k, v (a capture recomputes the attention in module-visible steps,
:class:`MultiheadAttentionRule`), and ``out_proj`` is a Linear layer. The per-sample gradient of W̄ for an
output-gradient row δ is Σ_l δ_l ā_lᵀ.

**Flat ordering.** fisherlab's flat parameter vector (:mod:`fisherlab.params`) holds ``weight`` row-major, then
``bias`` (each in the module's ``named_parameters()`` order) — not the row-major order of W̄, where each bias
entry follows its weight row. :meth:`LayerLayout.permutation` maps one to the other; :meth:`LayerLayout.gather`
and :meth:`LayerLayout.scatter` move vectors between the two.

**Registry.** :data:`LAYER_RULES` maps a module type to its :class:`LayerRule` (Linear, Conv1d, Conv2d, Embedding,
self-attention MultiheadAttention and its out_proj, a ``NonDynamicallyQuantizableLinear``);
:func:`register_layer_rule` adds one for a user module (subclass :class:`LayerRule`). :func:`rule_for` raises
:class:`~fisherlab.errors.UnsupportedLayerError` naming the module, its type and the structures that work for
every module. :func:`iter_layer_rows` walks over the data of a :class:`~fisherlab.engine.FisherEngine` and yields,
per chunk and layer, the expanded inputs ā, the pre-activation outputs and the output gradients δ of the
engine's factor rows (the raw material of every Kronecker-factored structure) and, when asked, the per-sample
gradients of normalisation modules' affine parameters (:data:`NORM_TYPES`, :func:`norm_gradients`) from the same
pass.

**Weight sharing that the rows cannot express** is refused with :class:`~fisherlab.errors.UnsupportedLayerError`:
a module called twice per forward pass, a parameter tensor owned by two modules (tied input/output embeddings),
a layer called on an input without the batch dimension (e.g. a position table called on ``arange(T)``: call it
on ``arange(T).expand(N, T)`` instead), and a layer whose parameters the forward pass reads without calling it
(``position.weight[:T]``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from fisherlab.engine import DEFAULT_CHUNK_BYTES, FisherEngine, ModuleCalls
from fisherlab.errors import InputError, UnsupportedLayerError
from fisherlab.linalg.threads import serial
from fisherlab.params import ParamSpec

#: What the error for a module without a rule recommends.
GENERIC_STRUCTURES = ("'dense', 'block', 'diag' and 'implicit' work for every module")


@dataclass(frozen=True)
class OneHotRows:
    """Input rows ā_{n,l} = e_{ids[n, l]} (one-hot vectors of length ``width``), kept as their ids.

    Attributes:
        ids: Token ids (n, L), integers in [0, width).
        width: in_eff, the length of a one-hot row (the vocabulary size).
    """

    ids: Tensor
    width: int

    @property
    def shape(self) -> torch.Size:
        """(n, L, width), the shape of the one-hot rows this stands for."""
        return torch.Size((*self.ids.shape, self.width))

    def numel(self) -> int:
        """Scalars held (the ids), for memory estimates."""
        return self.ids.numel()

    def counts(self, dtype: torch.dtype) -> Tensor:
        """Σ_{n,l} ā_{n,l} ā_{n,l}ᵀ's diagonal (width,): how often each id occurs (the rest is zero)."""
        return torch.bincount(self.ids.reshape(-1), minlength=self.width).to(dtype)

    def per_sample_counts(self, dtype: torch.dtype) -> Tensor:
        """Σ_l ā_{n,l} (n, width): the ids' counts per sample."""
        out = torch.zeros(self.ids.shape[0], self.width, dtype=dtype, device=self.ids.device)
        return out.scatter_add_(1, self.ids, torch.ones(self.ids.shape, dtype=dtype, device=self.ids.device))


class LayerRule:
    """How one module type maps onto the combined matrix W̄ = [W_flat, b] (out, in_eff [+ 1]).

    A subclass states the layer's sizes, how its input unfolds into L rows of length in_eff, and how a gradient
    with respect to its output becomes L rows of length out. The weight must have shape (out, *rest) with
    ∏ rest = in_eff, and the bias (if any) shape (out,); the parameters must be called ``weight`` and ``bias``.
    """

    #: Local names of the parameters the rule understands, in the order of W̄'s columns.
    param_names: tuple[str, ...] = ("weight", "bias")
    #: Whether a capture replaces the module's output by :meth:`recompute` (internals that are no module calls).
    recomputes: bool = False
    #: Whether W̄ is the weight transposed (weight (in_eff, out), as ``nn.Embedding``'s) instead of (out, *rest).
    weight_transposed: bool = False

    def check(self, module: nn.Module, path: str) -> None:
        """Raise :class:`UnsupportedLayerError` if this instance's configuration is not covered by the rule."""

    def in_features(self, module: nn.Module) -> int:
        """in_eff, the length of one unfolded input row a_l."""
        raise NotImplementedError

    def out_features(self, module: nn.Module) -> int:
        """out, the number of rows of W̄."""
        raise NotImplementedError

    def unfold_input(self, module: nn.Module, a: Tensor) -> Tensor | OneHotRows:
        """The module input (n, *input_shape) as rows (n, L, in_eff) (or their token ids, :class:`OneHotRows`)."""
        raise NotImplementedError

    def output_rows(self, module: nn.Module, g: Tensor, lead: int = 0) -> Tensor:
        """Output-shaped (*B, n, *output_shape), ``lead`` = len(B), as rows (*B, n, L, out)."""
        raise NotImplementedError


class LinearRule(LayerRule):
    """``nn.Linear`` on (n, in) inputs: L = 1, a_1 = the input. Inputs (n, …, in) share W over the … axes."""

    def in_features(self, module: nn.Module) -> int:
        return int(module.in_features)

    def out_features(self, module: nn.Module) -> int:
        return int(module.out_features)

    def unfold_input(self, module: nn.Module, a: Tensor) -> Tensor:
        return a.reshape(a.shape[0], -1, a.shape[-1])

    def output_rows(self, module: nn.Module, g: Tensor, lead: int = 0) -> Tensor:
        return g.flatten(lead + 1, -2) if g.dim() > lead + 2 else g.unsqueeze(-2)


class EmbeddingRule(LinearRule):
    """``nn.Embedding`` (y_l = E[x_l]): a Linear layer without bias on one-hot inputs, W̄ = Eᵀ.

    Token ids (n, T₁, …) (or (n,)) become :class:`OneHotRows` (n, L, num_embeddings). ``padding_idx`` (its row
    gets no gradient) and ``scale_grad_by_freq`` (the gradient depends on the batch) are refused (``max_norm``, which
    rescales rows of E in place in the forward pass, already by :func:`fisherlab.checks.check_model`).
    """

    param_names = ("weight",)
    weight_transposed = True

    def check(self, module: nn.Module, path: str) -> None:
        refused = {"padding_idx": module.padding_idx, "scale_grad_by_freq": module.scale_grad_by_freq or None}
        given = {k: v for k, v in refused.items() if v is not None}
        if given:
            raise UnsupportedLayerError(
                f"module {display_path(path)} (Embedding) has {given}; the Kronecker-factored Embedding rule "
                f"covers padding_idx=None, scale_grad_by_freq=False only. Structures "
                f"{GENERIC_STRUCTURES}."
            )

    def in_features(self, module: nn.Module) -> int:
        return int(module.num_embeddings)

    def out_features(self, module: nn.Module) -> int:
        return int(module.embedding_dim)

    def unfold_input(self, module: nn.Module, a: Tensor) -> OneHotRows:
        return OneHotRows(a.reshape(a.shape[0], -1), int(module.num_embeddings))


class MultiheadAttentionRule(LinearRule):
    """Self-attention ``nn.MultiheadAttention``: its packed input projection as one Linear layer over T positions.

    W̄ = [in_proj_weight, in_proj_bias] (3E, E + 1): rows 0..E−1 are q, E..2E−1 k, 2E..3E−1 v, all of one
    input x, so qkv_t = W̄ [x_t; 1] and the Kronecker factors are those of a Linear layer with 3E outputs (as the
    ``qkv`` Linear of :class:`fisherlab.models.GPT`). ``out_proj`` is a Linear layer of its own. torch computes
    both inside one functional call, so a capture replaces the module's output by :meth:`recompute` — the same
    attention, decomposed into module-visible steps: x → qkv (recorded) → softmax(q kᵀ/√d_h + mask) v per head →
    ``out_proj(·)`` (a module call, so its own hook records it).

    ``attn_mask`` (bool or additive, (T, T) or (n·H, T, T)), ``is_causal`` and ``key_padding_mask`` (bool or additive,
    (n, T)) are applied as torch applies them. Refused (:class:`~fisherlab.errors.UnsupportedLayerError`): separate
    q/k/v weights (``kdim``/``vdim``), ``add_bias_kv``, ``add_zero_attn``, dropout in training mode (these by
    :meth:`check`: such a module counts as one without a rule, so ``unsupported="block"`` and the generic structures
    cover it), and at call time cross-attention (query, key and value not one tensor) and unbatched (T, E) inputs.
    """

    param_names = ("in_proj_weight", "in_proj_bias")
    recomputes = True

    def check(self, module: nn.Module, path: str) -> None:
        refused = [name for name, bad in (("kdim/vdim different from embed_dim", not module._qkv_same_embed_dim),
                                          ("add_bias_kv", module.bias_k is not None),
                                          ("add_zero_attn", module.add_zero_attn),
                                          ("dropout in training mode", module.training and module.dropout > 0))
                   if bad]
        if refused:
            raise UnsupportedLayerError(
                f"module {display_path(path)} (MultiheadAttention) has {', '.join(refused)}; the Kronecker-factored "
                f"rule covers packed self-attention projections only. Structures {GENERIC_STRUCTURES}."
            )

    def in_features(self, module: nn.Module) -> int:
        return int(module.embed_dim)

    def out_features(self, module: nn.Module) -> int:
        return 3 * int(module.embed_dim)

    def recompute(self, module: nn.Module, path: str, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, tuple]:
        """(x (n, T, E), qkv (n, T, 3E), the module's output) for the call ``module(*args, **kwargs)``."""
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                 "is_causal")
        call = {"key_padding_mask": None, "need_weights": True, "attn_mask": None, "average_attn_weights": True,
                "is_causal": False, **dict(zip(names[:len(args)], args, strict=True)), **kwargs}
        x = call["query"]
        problem = ("cross-attention (query, key and value are not one tensor)"
                   if not (x is call["key"] is call["value"]) else
                   f"an unbatched input of shape {tuple(x.shape)}" if x.dim() != 3 else None)
        if problem:
            raise UnsupportedLayerError(
                f"module {display_path(path)} (MultiheadAttention) is called with {problem}; the Kronecker-factored "
                f"rule covers batched self-attention. Structures {GENERIC_STRUCTURES}."
            )
        x = x if module.batch_first else x.transpose(0, 1)  # (n, T, E)
        n, T, E = x.shape
        H = module.num_heads
        qkv = nnf.linear(x, module.in_proj_weight, module.in_proj_bias)
        q, k, v = (t.reshape(n, T, H, E // H).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (n, H, T, d_h)
        scores = q @ k.mT / math.sqrt(E // H)
        mask = call["attn_mask"]
        if call["is_causal"] and not call["need_weights"]:  # torch then ignores attn_mask (a causal hint)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        if mask is not None:
            mask = mask.reshape(n, H, T, T) if mask.dim() == 3 else mask  # (n·H, T, T): per sample and head
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        padding = call["key_padding_mask"]
        if padding is not None:  # (n, T) over the keys
            padding = padding.reshape(n, 1, 1, T)
            scores = scores.masked_fill(padding, float("-inf")) if padding.dtype == torch.bool else scores + padding
        weights = torch.softmax(scores, dim=-1)
        out = module.out_proj((weights @ v).transpose(1, 2).reshape(n, T, E))
        out = out if module.batch_first else out.transpose(0, 1)
        if not call["need_weights"]:
            return x, qkv, (out, None)
        return x, qkv, (out, weights.mean(1) if call["average_attn_weights"] else weights)


class ConvRule(LayerRule):
    """``nn.Conv1d`` / ``nn.Conv2d`` (groups = 1): patches of the padded input, one row per output location.

    Padding of any mode (``zeros``, ``reflect``, …, and ``padding="same"``) is applied as the module applies it,
    so Σ_l W̄ ā_l reproduces the convolution exactly.
    """

    def __init__(self, spatial_dims: int):
        self.spatial_dims = spatial_dims

    def check(self, module: nn.Module, path: str) -> None:
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"module {display_path(path)} ({type(module).__name__}) has groups={module.groups}; the KFAC "
                f"convolution rule covers groups=1 only. Structures {GENERIC_STRUCTURES}."
            )

    def in_features(self, module: nn.Module) -> int:
        return int(module.in_channels * math.prod(module.kernel_size))

    def out_features(self, module: nn.Module) -> int:
        return int(module.out_channels)

    def unfold_input(self, module: nn.Module, a: Tensor) -> Tensor:
        pad = module._reversed_padding_repeated_twice  # torch's own per-side padding, also for "same"
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        a = nnf.pad(a, pad, mode=mode) if any(pad) else a
        if self.spatial_dims == 1:  # treat (n, C, T) as (n, C, 1, T)
            a = a.unsqueeze(2)
            geometry = [(1, *module.kernel_size), (1, *module.dilation), (1, *module.stride)]
        else:
            geometry = [module.kernel_size, module.dilation, module.stride]
        if _patches_by_convolution(a):
            return _conv_patches(a, *geometry)
        cols = nnf.unfold(a, geometry[0], dilation=geometry[1], stride=geometry[2])  # (n, in_eff, L)
        return cols.transpose(1, 2)


    def output_rows(self, module: nn.Module, g: Tensor, lead: int = 0) -> Tensor:
        return g.flatten(-self.spatial_dims).transpose(-1, -2)


#: Module type → rule. Extend with :func:`register_layer_rule`.


def _patches_by_convolution(a: Tensor) -> bool:
    """Whether :func:`_conv_patches` copies the patches of ``a`` exactly and faster than ``F.unfold``.

    On the CPU in float32 with oneDNN at IEEE precision (no bf16/tf32 mode set): ``F.unfold`` loops over the samples
    (the CNN's 512 × 32 × 6 × 6 padded inputs, 3 × 3 kernels, 2 threads, wall medians: 8.9 ms with the copy into
    rows, 5.8 ms by the convolution; 512 × 1 × 10 × 10: 2.9 and 0.39 ms; 1 thread 10.5 and 10.1 ms minima).
    """
    if a.device.type != "cpu" or a.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    mkldnn = torch.backends.mkldnn  # a precision of "none" is its parent's; IEEE when none is set
    chain = (getattr(getattr(mkldnn, "conv", None), "fp32_precision", "none"),
             getattr(mkldnn, "fp32_precision", "none"), getattr(torch.backends, "fp32_precision", "none"))
    return next((p for p in chain if p != "none"), "ieee") == "ieee"


def _conv_patches(a: Tensor, kernel: Sequence[int], dilation: Sequence[int], stride: Sequence[int]) -> Tensor:
    """The patches of the padded input a (n, C, H, W) as rows (n, L, C·kh·kw) in ``weight.reshape(out, -1)`` order.

    A grouped convolution with one-hot kernels (group c: the kh·kw filters e_(i,j) on channel c, so output channel
    c·kh·kw + i·kw + j is the input at offset (i, j)) on channels-last memory, whose output is the rows, contiguous:
    each entry is one input times 1 plus zeros, so equal to ``F.unfold``'s bit for bit.
    """
    n, C = a.shape[:2]
    k = kernel[0] * kernel[1]
    eye = torch.eye(k, dtype=a.dtype, device=a.device).reshape(k, 1, *kernel).repeat(C, 1, 1, 1)
    out = nnf.conv2d(a.contiguous(memory_format=torch.channels_last), eye, stride=tuple(stride),
                     dilation=tuple(dilation), groups=C)
    return out.permute(0, 2, 3, 1).reshape(n, -1, C * k)


LAYER_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(1),
    nn.Conv2d: ConvRule(2),
    nn.Embedding: EmbeddingRule(),
    nn.MultiheadAttention: MultiheadAttentionRule(),
    # MHA's out_proj: called as a module only inside MultiheadAttentionRule.recompute
    nn.modules.linear.NonDynamicallyQuantizableLinear: LinearRule(),
}


def register_layer_rule(cls: type[nn.Module], rule: LayerRule) -> None:
    """Make Kronecker-factored structures support modules of type ``cls`` (exact type match) with ``rule``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InputError(f"register_layer_rule needs an nn.Module subclass; got {cls!r}")
    if not isinstance(rule, LayerRule):
        raise InputError(f"rule must be a fisherlab.layers.LayerRule instance; got {type(rule)}")
    LAYER_RULES[cls] = rule


def display_path(path: str) -> str:
    """A module path for messages (the root module is ``'<root>'``)."""
    return repr(path) if path else "'<root>'"


def rule_for(module: nn.Module, path: str = "") -> LayerRule:
    """The rule of ``module`` (exact type match), checked against the instance's configuration.

    Raises:
        UnsupportedLayerError: No rule for the type, or a configuration the rule does not cover; the message
            names the module path and type and the structures that work for every module.
    """
    rule = LAYER_RULES.get(type(module))
    if rule is None:
        known = ", ".join(sorted(c.__name__ for c in LAYER_RULES))
        raise UnsupportedLayerError(
            f"module {display_path(path)} ({type(module).__name__}) has no Kronecker-factored layer rule (rules "
            f"exist for {known}; add one with fisherlab.layers.register_layer_rule). Structures "
            f"{GENERIC_STRUCTURES}; for kfac/ekfac/unit pass unsupported='block' to keep an exact dense block "
            "for its parameters, or params=[...] to leave them out."
        )
    rule.check(module, path)
    return rule


def in_features_eff(module: nn.Module) -> int:
    """in_eff of a supported module (Linear: in_features; Conv: in_channels · ∏ kernel_size)."""
    return rule_for(module).in_features(module)


def out_features(module: nn.Module) -> int:
    """The out size of a supported module (Linear: out_features; Conv: out_channels)."""
    return rule_for(module).out_features(module)


def expand_input(module: nn.Module, a: Tensor, bias: bool | None = None) -> Tensor | OneHotRows:
    """The rows ā_l of the module input: (n, *input_shape) → (n, L, in_eff [+ 1]) (ids for one-hot rows).

    Args:
        module: A supported module.
        a: Its input, shape (n, *input_shape).
        bias: Append the constant 1 (default: whether the module has a bias).
    """
    rows = rule_for(module).unfold_input(module, a)
    if bias if bias is not None else getattr(module, "bias", None) is not None:
        rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
    return rows


def to_combined(module: nn.Module, weight: Tensor, bias: Tensor | None) -> Tensor:
    """W̄ = [W_flat, b]: weight (*B, out, *rest), bias (*B, out) or None → (*B, out, in_eff [+ 1]).

    For a rule with ``weight_transposed`` (Embedding) the weight is (*B, in_eff, out) and W̄ its transpose.
    """
    if rule_for(module).weight_transposed:
        return weight.mT
    w = weight.flatten(weight.dim() - module.weight.dim() + 1)
    return w if bias is None else torch.cat([w, bias.unsqueeze(-1)], dim=-1)


def from_combined(module: nn.Module, combined: Tensor, has_bias: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """Split W̄ (*B, out, in_eff [+ 1]) into (weight (*B, *module.weight.shape), bias (*B, out) or None)."""
    has_bias = getattr(module, "bias", None) is not None if has_bias is None else has_bias
    if rule_for(module).weight_transposed:
        return combined.mT, None
    batch = combined.shape[:-2]
    w = combined[..., :-1] if has_bias else combined
    return w.reshape(*batch, *module.weight.shape), (combined[..., -1] if has_bias else None)


# ------------------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class LayerLayout:
    """Where one supported layer's selected parameters sit, in W̄ and in the flat vector.

    Attributes:
        layer: Module path (``"layers.0"``; ``""`` for the root module).
        module_type: Class name of the module (``"Linear"``).
        param_names: The layer's selected parameter names, in :class:`ParamSpec` order.
        has_weight: Whether the weight is selected (W̄ then has its in_eff weight columns).
        has_bias: Whether the bias is selected (W̄ then has a last column of biases, ā a trailing 1).
        in_features: in_eff.
        out_features: out.
        weight_transposed: W̄ is the weight transposed (Embedding: weight (in_eff, out)).
        one_hot: The input rows are one-hot (:class:`OneHotRows`), so Σ ā āᵀ is diagonal.
    """

    layer: str
    module_type: str
    param_names: tuple[str, ...]
    has_weight: bool
    has_bias: bool
    in_features: int
    out_features: int
    weight_transposed: bool = field(default=False, kw_only=True)
    one_hot: bool = field(default=False, kw_only=True)

    @property
    def width(self) -> int:
        """Columns of W̄: in_eff·[weight selected] + [bias selected]."""
        return self.in_features * self.has_weight + self.has_bias

    @property
    def numel(self) -> int:
        """P_l = out · width, the layer's number of selected scalars."""
        return self.out_features * self.width

    @cached_property
    def permutation(self) -> Tensor:
        """Index map p (P_l,): entry j of the layer's flat block is W̄.flatten()[p[j]]."""
        out, w = self.out_features, self.width
        pos = torch.arange(out * w).reshape(out, w)
        weight = pos[:, : self.in_features]
        parts = {"weight": (weight.T if self.weight_transposed else weight).reshape(-1), "bias": pos[:, -1]}
        return torch.cat([parts["bias" if name.endswith("bias") else "weight"] for name in self.param_names])

    def gather(self, V: Tensor) -> Tensor:
        """The layer's flat block (P_l, k) of a matrix in fisherlab order → (k, out, width) in W̄ layout."""
        X = V.new_empty(V.shape[1], self.numel)
        X[:, self.permutation.to(V.device)] = V.T
        return X.reshape(V.shape[1], self.out_features, self.width)

    def scatter(self, X: Tensor) -> Tensor:
        """(k, out, width) in W̄ layout → the layer's flat block (P_l, k) in fisherlab order."""
        return X.reshape(X.shape[0], -1)[:, self.permutation.to(X.device)].T

    def permute_dense(self, D: Tensor) -> Tensor:
        """A (P_l, P_l) matrix in row-major W̄ order → the same matrix in fisherlab's flat order."""
        p = self.permutation.to(D.device)
        return D[p][:, p]


def layer_layouts(model: nn.Module, spec: ParamSpec) -> tuple[dict[str, LayerLayout], dict[str, list[str]]]:
    """Group the spec's parameters by owning module: layouts of the supported layers, and the rest by module.

    Returns:
        ``(layouts, unsupported)``: path → :class:`LayerLayout` for modules with a rule whose selected
        parameters are all ``weight``/``bias``; module path → parameter names for every other module.

    A module whose rule refuses its configuration (e.g. a convolution with groups > 1, a MultiheadAttention with
    kdim ≠ embed_dim), or that only such a module's recomputation would call (that MultiheadAttention's out_proj,
    which torch reads functionally), counts as one without a rule (:func:`unsupported_error` gives the reason).

    Raises:
        UnsupportedLayerError: A selected parameter tensor that another module also owns (tied weights).
    """
    _check_untied(model, spec)
    layouts: dict[str, LayerLayout] = {}
    unsupported: dict[str, list[str]] = {}
    for path, names in spec.layers().items():
        module = model.get_submodule(path)
        local = [n.rpartition(".")[2] for n in names]  # every rule's names end in "weight" or "bias"
        if type(module) not in LAYER_RULES or not set(local) <= set(LAYER_RULES[type(module)].param_names):
            unsupported[path] = list(names)
            continue
        try:
            rule = _covered_rule(model, path)
        except UnsupportedLayerError:
            unsupported[path] = list(names)
            continue
        layouts[path] = LayerLayout(path, type(module).__name__, tuple(names),
                                    any(n.endswith("weight") for n in local), any(n.endswith("bias") for n in local),
                                    rule.in_features(module), rule.out_features(module),
                                    weight_transposed=rule.weight_transposed,
                                    one_hot=isinstance(rule, EmbeddingRule))
    return layouts, unsupported


def _covered_rule(model: nn.Module, path: str) -> LayerRule:
    """:func:`rule_for` of the module at ``path``, also checking the parent whose recomputation calls it.

    torch's own cross-attention, ``nn.TransformerDecoderLayer.multihead_attn`` (queries from the target, keys and
    values from the memory), is known before any call: it and its out_proj count as modules without a rule.

    Raises:
        UnsupportedLayerError: The module's rule, or the rule of a recomputing parent (a MultiheadAttention
            calling ``out_proj``), refuses its configuration, or the module is a decoder's cross-attention; the
            message says why.
    """
    if path:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if getattr(LAYER_RULES.get(type(parent)), "recomputes", False):
            _covered_rule(model, parent_path)
        if isinstance(parent, nn.TransformerDecoderLayer) and name == "multihead_attn":
            raise UnsupportedLayerError(
                f"module {display_path(path)} (MultiheadAttention) is the cross-attention of a "
                "TransformerDecoderLayer (keys and values from the memory); the Kronecker-factored rule covers "
                f"self-attention only. Structures {GENERIC_STRUCTURES}; for kfac/ekfac/unit pass "
                "unsupported='block' to keep an exact dense block for it."
            )
    return rule_for(model.get_submodule(path), path)


def _check_untied(model: nn.Module, spec: ParamSpec) -> None:
    """Raise UnsupportedLayerError if a selected parameter tensor is also a parameter of another module.

    The spec holds a tied tensor under one name; per-layer statistics of its owner would miss the other
    module's use of it.
    """
    aliases: dict[int, list[str]] = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(tensor), []).append(name)
    named = dict(model.named_parameters(remove_duplicate=False))
    for name in spec.names:
        tied = aliases[id(named[name])]
        if len(tied) > 1:
            modules = ", ".join(f"{display_path(n.rpartition('.')[0])} ({n.rpartition('.')[2]})" for n in tied)
            raise UnsupportedLayerError(
                f"parameter {name!r} is one tensor shared by modules {modules} (tied weights); layer-wise "
                f"structures need each weight in one module. Structures {GENERIC_STRUCTURES} (with params=[...] "
                "naming one of the tied names), or untie the weights."
            )


def unsupported_error(model: nn.Module, unsupported: Mapping[str, Sequence[str]], structure: str) -> Exception:
    """The :class:`UnsupportedLayerError` for parameters owned by modules without a rule."""
    path, names = next(iter(unsupported.items()))
    module = model.get_submodule(path)
    others = sum(len(v) for v in unsupported.values()) - len(names)
    more = f" (and {others} more parameter(s) in {len(unsupported) - 1} other module(s))" if others else ""
    try:
        _covered_rule(model, path)
        reason = f"parameters {list(names)} of module {display_path(path)} ({type(module).__name__}) are not " \
                 f"its weight/bias"
    except UnsupportedLayerError as exc:
        reason = str(exc)
    return UnsupportedLayerError(f"structure {structure!r} cannot cover parameters {list(names)}{more}: {reason}")


# -------------------------------------------------------------------------------------- per-layer rows
@dataclass
class LayerRows:
    """One chunk's raw material for one layer.

    Attributes:
        unfolded: The unfolded input rows a_l (n, L, in_eff) without the bias's 1 ((n, L, 0) when the weight is not
            selected); :class:`OneHotRows` for a one-hot layer (Embedding). From a pass with ``pool``
            (:func:`layer_rows`) possibly their mean over the positions, (n, 1, in_eff).
        outputs: The layer output (pre-activation) as rows (n, L, out), detached; (n, L, 0) from a pass with
            ``pool`` (its shape and dtype: the outputs are freed in the reverse pass).
        grads: δ rows (R, n, L, out): J_lᵀ M_{n,r}, the engine's output factor rows pulled back to the layer
            output (F = (1/N) Σ_n Σ_r of the outer products of the per-sample gradients Σ_l δ_l ā_lᵀ); None when
            no backward pass was asked for, or when the reverse pass summed them over the positions (``grad_sum``).
        bias: Whether ā ends with the constant 1 (the bias is selected).
        grad_sum: Σ_l δ_{r,n,l} (R, n, out) when the reverse pass summed each δ row over the positions as it arrived
            (:func:`layer_rows` with ``pool``; ``grads`` is then None), else None.
        grad_xhat_sum: Σ_l δ_{n,l} ⊙ x̂_{n,l} (1, n, d), a norm module's rows from such a pass (x̂ its normalised
            input, :func:`normalized_input`; the per-sample gradient of its scale, :func:`norm_gradients`), else None.
    """

    unfolded: Tensor | OneHotRows
    outputs: Tensor
    grads: Tensor | None
    bias: bool = False
    grad_sum: Tensor | None = None
    grad_xhat_sum: Tensor | None = None

    def grad_sums(self) -> Tensor:
        """Σ_l δ_{r,n,l} (R, n, out): :attr:`grad_sum`, or :attr:`grads` summed over the positions."""
        return self.grads.sum(2) if self.grad_sum is None else self.grad_sum

    @cached_property
    def inputs(self) -> Tensor | OneHotRows:
        """ā rows (n, L, width): ``unfolded`` with the trailing 1 when the bias is selected, formed on first use.

        KFAC adds the bias's row and column of A from ``unfolded`` without forming it.
        """
        if not self.bias:
            return self.unfolded
        a = self.unfolded
        return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


class ChunkRows(dict):
    """One chunk's :class:`LayerRows` by layer path (a dict), and those of the captured norm modules.

    Attributes:
        norms: Norm module path (:func:`captured_norms`) → its rows: inputs x̂ (n, L, d), the input normalised
            without the affine map (:func:`normalized_input`), outputs (n, L, d) and δ rows (R, n, L, d), with
            d = ∏ normalized_shape and L the positions the module normalises (from a pass with ``pool`` only their
            sums, :func:`_pooled_norm_rows`); empty unless :func:`layer_rows` was given ``norms``.
            :func:`norm_gradients` turns them into per-sample gradients.
        cloned_outputs: Whether the pass captured the layers' outputs on clones (:func:`layer_rows`: the model
            alters one in place).
        live: The live positions of the ``masked`` layers of :func:`layer_rows` (:class:`LivePositions`).
    """

    def __init__(self, rows: Mapping[str, LayerRows] = (), norms: Mapping[str, LayerRows] = (), *,
                 cloned_outputs: bool = False) -> None:
        super().__init__(rows)
        self.norms: dict[str, LayerRows] = dict(norms)
        self.cloned_outputs = cloned_outputs
        self.live = LivePositions()


class LivePositions(dict[int, Tensor | None]):
    """Per number of positions L > 1, the live positions (n, L) of a chunk's layers with L positions (None: all).

    A position (n, l) is live when δ_{r,n,l} ≠ 0 for some row r in some of those layers (KFAC's padding,
    :mod:`fisherlab.structures.kfac`); once every position of an L is live, later layers with L are not looked at.
    """

    def all_live(self, L: int) -> bool:
        """Whether every position of the layers with L positions is live already (L = 1: always)."""
        return L <= 1 or (L in self and self[L] is None)

    def add(self, grads: Tensor) -> None:
        """Take one layer's δ rows (R, n, L, out) into account (nothing for L = 1)."""
        L = grads.shape[2]
        if self.all_live(L):
            return
        live = grads.ne(0).any(-1).any(0)
        live = self[L] | live if L in self else live
        self[L] = None if bool(live.all()) else live


# ------------------------------------------------------------------------------------------------ norm modules
#: Normalisation modules whose affine parameters' per-sample gradients the layer rows can carry (exact types: a
#: subclass may change the forward pass).
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)


def normalized_input(module: nn.Module, a: Tensor) -> Tensor:
    """x̂, the input a (…, *normalized_shape) of a :data:`NORM_TYPES` module normalised without its affine map.

    LayerNorm: (a − mean) / √(var + ε); RMSNorm: a / √(mean(a²) + ε) (ε = ``eps``, torch's default when None);
    the module's output is x̂ ⊙ weight (+ bias).
    """
    shape = tuple(module.normalized_shape)
    if isinstance(module, nn.LayerNorm):  # a weight of ones: the same values, and torch's CPU kernel with a weight
        # is faster (0.27 ms against 0.43 ms without, a (32, 64, 128) input, 1 thread)
        return nnf.layer_norm(a, shape, a.new_ones(shape), None, module.eps)
    return nnf.rms_norm(a, shape, None, module.eps)


def norm_gradients(rows: LayerRows, names: Sequence[str]) -> Tensor:
    """Per-sample (per-row) gradients (R, n, P_m) of a norm module's parameters, from its :attr:`ChunkRows.norms`.

    For y_l = x̂_l ⊙ γ + β at the L positions of a sample: ∂/∂γ = Σ_l δ_l ⊙ x̂_l (γ flattened), ∂/∂β = Σ_l δ_l.

    Args:
        rows: The module's rows (inputs x̂ (n, L, d), δ rows (R, n, L, d); from a pass with ``pool`` their
            sums :attr:`LayerRows.grad_sum` and :attr:`LayerRows.grad_xhat_sum`, :func:`_pooled_norm_rows`).
        names: Its selected local parameter names (``"weight"``, ``"bias"``), in flat order.
    """
    # the weight's by a product summed over the positions (an einsum copies both into (n, d, L) order)
    parts = {"weight": lambda: (rows.grads * rows.inputs).sum(2) if rows.grad_xhat_sum is None else rows.grad_xhat_sum,
             "bias": rows.grad_sums}
    return torch.cat([parts[name]() for name in names], dim=-1)


def captured_norms(engine: FisherEngine, groups: Mapping[str, Sequence[str]],
                   layouts: Mapping[str, LayerLayout]) -> dict[str, tuple[str, ...]]:
    """The groups (module path → parameter names) whose per-sample gradients :func:`layer_rows` can carry.

    Those of :data:`NORM_TYPES` modules (exact type) that one forward pass over the first (up to) two samples
    calls exactly once, on an input and with an output that lead with those samples. Any other (a norm called
    twice, or not called because the forward pass reads its parameters directly) needs the engine's factor rows.
    That forward pass is the probe of the layer-row passes over ``layouts`` (:func:`_probe_layers`); the answer is
    kept on the engine (:meth:`FisherEngine.probed`): a later structure of the same engine asks without a forward
    pass.
    """
    candidates = {p: tuple(names) for p, names in groups.items()
                  if type(engine.model.get_submodule(p)) in NORM_TYPES}
    if not candidates:
        return {}
    key = ("captured_norms", tuple(candidates.items()))
    return dict(engine.probed(key, lambda: _probe_layers(engine, layouts, candidates)[key]))


class LayerCapture(ModuleCalls):
    """Forward hooks that record each layer's input and output (called once per forward pass).

    ``records[path]`` = (input, output) of the layer at ``path``; the output is the tensor the layer produced, so
    ``torch.autograd.grad(loss, output)`` is the output gradient. With ``clone`` (the default) the forward pass
    continues from a clone of it, so that a later in-place operation (``ReLU(inplace=True)``) cannot alter it;
    without, it continues from the output itself (no copy) and :meth:`modified` tells whether an in-place
    operation did alter one (then the records are stale: capture again with ``clone``). A module whose rule
    ``recomputes`` (``nn.MultiheadAttention``) has its output replaced by the rule's decomposed recomputation —
    numerically the same attention — whenever it or a submodule (``out_proj``) is captured
    (:func:`recomputed_modules`); its record is the rule's (input, output) pair. A layer called twice in one
    forward pass raises UnsupportedLayerError (:func:`called_twice_error`), unless its path is ``repeatable``: then
    its first call is recorded and ``calls`` counts them all.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], *, clone: bool = True,
                 repeatable: Collection[str] = ()):
        super().__init__(model, paths)
        self.clone, self.repeatable = clone, set(repeatable)
        #: The modules whose output the capture replaces by their rule's recomputation (set on entering).
        self.recomputed: set[str] = set()

    def _register(self) -> None:
        self.recomputed = recomputed_modules(self.model, self.paths)
        for path in self.recomputed:
            module = self.model.get_submodule(path)
            self.handles.append(module.register_forward_hook(self._recompute_hook(path), with_kwargs=True))
        for path in self.paths:
            if path not in self.recomputed:
                self.handles.append(self.model.get_submodule(path).register_forward_hook(self._hook(path)))

    def _record(self, path: str, module: nn.Module, inputs: tuple, out: object) -> None:
        if path in self.records and path not in self.repeatable:
            raise called_twice_error(path, module)
        super()._record(path, module, inputs, out)

    def _output(self, output: Tensor) -> Tensor:
        return output.clone() if self.clone else output

    def _recompute_hook(self, path: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            rule = rule_for(module, path)
            a, out, result = rule.recompute(module, path, args, kwargs)
            if path in self.paths:
                self._record(path, module, (a,), out)
            return result

        return hook


def recomputed_modules(model: nn.Module, paths: Collection[str]) -> set[str]:
    """The modules whose rule ``recomputes`` them that a capture of ``paths`` replaces: at a path or above one."""
    return {p for p, m in model.named_modules() if getattr(LAYER_RULES.get(type(m)), "recomputes", False)
            and any(q == p or q.startswith(f"{p}.") for q in paths)}


def called_twice_error(path: str, module: nn.Module) -> UnsupportedLayerError:
    """The refusal of a layer called more than once in one forward pass."""
    return UnsupportedLayerError(
        f"module {display_path(path)} ({type(module).__name__}) is called more than once per forward "
        f"pass (shared weights); Kronecker-factored structures need one call. Structures "
        f"{GENERIC_STRUCTURES}."
    )


def layer_rows(
    engine: FisherEngine, layouts: Mapping[str, LayerLayout], x: Tensor, y: Tensor, labels: Tensor | None,
    *, backward: bool = True, norms: Mapping[str, Sequence[str]] | None = None, clone_outputs: bool = False,
    pool: bool = False, masked: Collection[str] = (),
) -> ChunkRows:
    """Inputs, outputs and output-gradient rows of every layer in ``layouts`` for one chunk.

    One forward pass with hooks (:class:`LayerCapture`; the layers' outputs are not copied unless
    ``clone_outputs``: when an in-place operation of the model alters a captured output, the chunk is captured
    again on clones, and :attr:`ChunkRows.cloned_outputs` says so), then the R rows of the engine's output factor
    M (n, R, C) are pulled back to all layer outputs at once (one batched reverse pass,
    ``torch.autograd.grad(is_grads_batched=True)``; with R = 1 a plain one, and attention may then run on fused
    SDPA kernels where the kind alone gives R = 1, :attr:`FisherEngine.reverse_only_rows`). Layers that the
    forward pass does not call are absent from the result (their Fisher block is zero); if the forward pass reads
    such a layer's parameters anyway (``position.weight[:T]``), :func:`_check_uncalled` refuses it, and a layer
    called without a positional tensor input (``fc(input=x)``) or returning no tensor is refused
    (:func:`_check_calls`).

    ``norms`` (module path → selected parameter names, from :func:`captured_norms`) adds those modules' outputs to
    the same reverse pass; their per-sample gradients are :func:`norm_gradients` of :attr:`ChunkRows.norms`.

    ``pool`` (KFAC-reduce): the layers' δ rows are only needed summed over the positions, and their inputs
    averaged. With R = 1 each layer's sum Σ_l δ_l (1, n, out) is formed as its output gradient arrives in the
    reverse pass (:func:`_pooled_backward`) and the (n, L, out) rows are freed at once (:attr:`LayerRows.grad_sum`;
    ``grads`` None), and so are the layer's outputs and, once its positions are all live, its inputs (``unfolded``
    then their mean); with R > 1 the rows are pulled back batched as without ``pool``. ``masked``: the layers whose
    δ rows mark the live positions (:attr:`ChunkRows.live`).
    """
    model = engine.model
    norms = dict(norms or {})
    params = {n: p.detach().requires_grad_(backward) for n, p in engine.params.items()}
    reverse_only = not backward or engine.reverse_only_rows  # else the reverse pass may be batched over R rows
    with torch.enable_grad(), LayerCapture(model, [*layouts, *norms], clone=clone_outputs) as cap:
        z = engine.forward(params, x, reverse_only=reverse_only)
    if cap.modified():  # an in-place operation altered a captured output: the pass again, on clones
        return layer_rows(engine, layouts, x, y, labels, backward=backward, norms=norms, clone_outputs=True,
                          pool=pool, masked=masked)
    called = [p for p in layouts if p in cap.records]
    called_norms = [p for p in norms if p in cap.records]
    _check_calls(engine, layouts, cap, x)
    grads: list[Tensor | None] = [None] * (len(called) + len(called_norms))
    if backward and grads:
        M = engine.output_factor(z.detach(), y, labels).transpose(0, 1)  # (R, n, C)
        if M.shape[0] == 1 and pool:
            rows = _chunk_rows(model, layouts, cap, called, [], [None] * len(called), x.shape[0], clone_outputs)
            _pooled_backward(model, cap, rows, called_norms, z, M[0], masked)
            return rows
        outs = [cap.records[p][1] for p in [*called, *called_norms]]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            if M.shape[0] == 1:
                grads = [g.unsqueeze(0) for g in torch.autograd.grad(z, outs, M[0], allow_unused=True,
                                                                     materialize_grads=True)]
            else:
                grads = list(torch.autograd.grad(z, outs, M.contiguous(), is_grads_batched=True, allow_unused=True,
                                                 materialize_grads=True))
    rows = _chunk_rows(model, layouts, cap, called, called_norms, grads, x.shape[0], clone_outputs)
    for p in masked:
        if p in rows and rows[p].grads is not None:
            rows.live.add(rows[p].grads)
    return rows


def _pooled_backward(model: nn.Module, cap: LayerCapture, rows: ChunkRows, called_norms: Sequence[str],
                     z: Tensor, cotangent: Tensor, masked: Collection[str]) -> None:
    """One reverse pass of one cotangent row (n, C) that pools each layer's rows over the positions on arrival.

    ``rows``: the chunk's layer rows without gradients (:func:`_chunk_rows`), completed in place;
    ``called_norms``: the called norm modules' paths (:attr:`ChunkRows.norms` is filled here,
    :func:`_pooled_norm_rows`). A tensor hook on each layer's output turns its gradient (n, *output shape) into
    :attr:`LayerRows.grad_sum` = Σ_l δ_{n,l} (1, n, out) (the same operations as ``grads.sum(2)``, so the same
    values) and marks the live positions of the ``masked`` layers (:attr:`ChunkRows.live`); the engine then frees
    the gradient. Once a layer's positions are all live
    (without padding: from the first layer's gradient on) its inputs are averaged over the positions at once,
    ``unfolded`` (n, 1, width) (:func:`_pool_grads`), and ``outputs`` becomes (n, L, 0): the layers' inputs and
    outputs are freed during the pass, as the nodes that saved them run, and the pass's own buffers reuse that
    memory. Held to the end instead, with all layers' (n, L, out) gradient rows (GPT 1M, 32 × 64 tokens: 57 MB
    of rows), they made the pass page-fault its memory in anew on every call (16-21k minor faults). curvlinops'
    KFAC-reduce reads its layers' gradients by the same hooks (``register_hook`` on each output). Each hook runs on
    one intra-op thread (:func:`~fisherlab.linalg.threads.serial`), its reductions over the positions no parallel
    region with a barrier that waits for a descheduled thread on shared cores: GPT 1M, 2 threads, 90 of the pass's
    14,419 multi-thread OpenMP regions (the others: ~14,100 of the flash-attention kernel, curvlinops' as many), the
    same bits; the build end to end 0.983–0.995 of the time before at load 1.5–2, 0.974 at load 6
    (``benchmarks/bench_gpt_ab.py``). Alone in a loop at load 2 two threads sum faster ((1, 32, 64, 512): 65 → 38
    µs; 128 wide 13 → 10 µs): at most ~0.5 ms of the pass's ~100 ms on quiet cores.

    The norms' outputs get hooks too. The pass is asked (by gradient edges, which hold no tensor) for the
    gradients of the captured outputs below which no other one lies (:func:`_lowest_outputs`: the GPT's two
    embeddings); the others' gradients pass through their hooks on the way. A layer or norm the output does not
    depend on gets zero sums (as ``materialize_grads``).
    """
    layers, n = list(rows), cotangent.shape[0]
    for p in called_norms:
        _check_batched(p, model.get_submodule(p), *cap.records[p], n)
    # until a norm's gradient arrives: its input and output shape
    pending = {p: (cap.records[p][0], cap.records[p][1].shape) for p in called_norms}
    done: dict[str, LayerRows] = {}

    def hook(path: str) -> Callable[[Tensor | None], None]:
        module, r = model.get_submodule(path), rows[path]
        rule = rule_for(module, path)

        def on_grad(g: Tensor | None) -> None:
            if g is not None:
                with serial(g.device):
                    _pool_grads(r, rule.output_rows(module, g.unsqueeze(0), lead=1), path in masked, rows.live)

        return on_grad

    def norm_hook(path: str) -> Callable[[Tensor | None], None]:
        module = model.get_submodule(path)

        def on_grad(g: Tensor | None) -> None:
            if g is not None:
                with serial(g.device):
                    done[path] = _pooled_norm_rows(module, pending.pop(path)[0], g.unsqueeze(0))

        return on_grad

    outs = [cap.records[p][1] for p in [*layers, *called_norms]]
    handles = [out.register_hook(hook(p) if p in rows else norm_hook(p))
               for p, out in zip([*layers, *called_norms], outs, strict=True)]
    lowest = _lowest_outputs(z, outs)
    edges = [torch.autograd.graph.get_gradient_edge(out) for i, out in enumerate(outs) if i in lowest]
    del outs
    cap.records.clear()  # the rows' own views (and ``pending``) are all that hold the inputs and outputs now
    try:
        torch.autograd.grad(z, edges, cotangent, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for p in layers:
        r = rows[p]
        if r.grad_sum is None:  # no gradient reached it
            shape = r.outputs.shape  # (n, L, out)
            _pool_grads(r, r.outputs.new_zeros(1, *shape[:2], 1).expand(1, *shape), p in masked, rows.live)
    for p, (a, shape) in pending.items():  # no gradient reached them
        done[p] = _pooled_norm_rows(model.get_submodule(p), a, a.new_zeros(1, *shape))
    rows.norms = {p: done[p] for p in called_norms}


def _pooled_norm_rows(module: nn.Module, a: Tensor, g: Tensor) -> LayerRows:
    """A norm module's rows from a pooled pass: its per-sample gradient pieces (:func:`norm_gradients`) alone.

    ``a``: the module's input; ``g``: the gradient (1, n, *output shape). ``grad_sum`` = Σ_l δ_l and ``grad_xhat_sum`` =
    Σ_l δ_l ⊙ x̂_l (1, n, d), formed as :func:`norm_gradients` forms them from full rows (the same values);
    ``unfolded`` and ``outputs`` are (n, L, 0).
    """
    n, d = g.shape[1], math.prod(module.normalized_shape)
    xhat = normalized_input(module, a.detach()).reshape(n, -1, d)
    grads = g.reshape(*g.shape[:2], -1, d)
    empty = xhat.new_empty(*xhat.shape[:2], 0)
    return LayerRows(empty, empty, None, grad_sum=grads.sum(2), grad_xhat_sum=(grads * xhat).sum(2))


def _pool_grads(rows: LayerRows, grads: Tensor, masked: bool, live: LivePositions) -> None:
    """Set ``rows.grad_sum`` = Σ_l δ from the δ rows (1, n, L, out), mark their live positions, free the rows.

    ``outputs`` becomes (n, L, 0); ``unfolded`` (n, 1, width), its mean over the L positions, unless some position
    of the layer can still turn out to be padding (``masked`` and not all live yet: every row is needed then).
    """
    rows.grad_sum = grads.sum(2)
    L = grads.shape[2]
    if masked:
        live.add(grads)
    if isinstance(rows.unfolded, Tensor) and L > 1 and (not masked or live.all_live(L)):
        rows.unfolded = rows.unfolded.mean(1, keepdim=True)  # needed averaged only (KFAC-reduce without padding)
    rows.outputs = rows.outputs.new_empty(*rows.outputs.shape[:2], 0)


def _lowest_outputs(z: Tensor, outs: Sequence[Tensor]) -> set[int]:
    """The indices of ``outs`` below which (in z's autograd graph) none of the others lies.

    A reverse pass asked for their gradients runs the nodes of all the others (each lies above one of them, or
    off every path from z). One walk over the graph, each node once (GPT 1M: 209 nodes, 0.16 ms); an output
    without a node (a leaf) counts as lowest.
    """
    where: dict[object, list[int]] = {}
    for i, out in enumerate(outs):
        if out.grad_fn is not None:
            where.setdefault(out.grad_fn, []).append(i)
    reaches: dict[object, bool] = {}  # node → whether an output's node is it or lies below it
    covered: set[int] = set()
    stack = [(z.grad_fn, False)] if z.grad_fn is not None else []
    while stack:
        node, done = stack.pop()
        if done:
            below = any(reaches[f] for f, _ in node.next_functions if f is not None)
            if below and node in where:
                covered.update(where[node])
            reaches[node] = below or node in where
        elif node not in reaches:
            reaches[node] = False  # (a DAG: it is final once its children are)
            stack.append((node, True))
            stack.extend((f, False) for f, _ in node.next_functions if f is not None and f not in reaches)
    return set(range(len(outs))) - covered


def _chunk_rows(model: nn.Module, layouts: Mapping[str, LayerLayout], cap: LayerCapture, called: Sequence[str],
                called_norms: Sequence[str], grads: Sequence[Tensor | None], n: int, cloned: bool) -> ChunkRows:
    """:func:`layer_rows`' result from a capture of n samples: the rows of the ``called`` layers and norms.

    ``grads``: the δ rows (R, n, *output shape) of ``[*called, *called_norms]``, in that order (None: no backward
    pass, or not yet: :func:`_pooled_backward`). Raises UnsupportedLayerError unless every input and output leads
    with the n samples.
    """
    result = ChunkRows(cloned_outputs=cloned)
    for path, g in zip(called, grads[:len(called)], strict=True):
        module, lay = model.get_submodule(path), layouts[path]
        rule = rule_for(module, path)
        a, out = cap.records[path]
        _check_batched(path, module, a, out, n)
        unfolded = rule.unfold_input(module, a.detach())
        if not lay.has_weight:  # bias alone: ā is the constant 1
            unfolded = unfolded[..., :0]
        result[path] = LayerRows(unfolded, rule.output_rows(module, out.detach()),
                                 None if g is None else rule.output_rows(module, g, lead=1), bias=lay.has_bias)
    for path, g in zip(called_norms, grads[len(called):], strict=True):
        module = model.get_submodule(path)
        a, out = cap.records[path]
        _check_batched(path, module, a, out, n)
        d = math.prod(module.normalized_shape)
        result.norms[path] = LayerRows(normalized_input(module, a.detach()).reshape(n, -1, d),
                                       out.detach().reshape(n, -1, d),
                                       None if g is None else g.reshape(*g.shape[:2], -1, d))
    return result


def _check_calls(engine: FisherEngine, layouts: Mapping[str, LayerLayout], cap: ModuleCalls, x: Tensor) -> None:
    """Raise UnsupportedLayerError unless the capture ``cap`` saw every call of the layers in ``layouts``.

    A layer in :attr:`ModuleCalls.opaque` was called without a positional tensor input (``fc(input=x)``: a forward
    hook sees no keyword argument) or returned no tensor, so its calls cannot be read; one not called at all may
    still have its parameters read by the forward pass (:func:`_check_uncalled`).
    """
    opaque = next((p for p in layouts if p in cap.opaque), None)
    if opaque is not None:
        raise UnsupportedLayerError(
            f"module {display_path(opaque)} ({layouts[opaque].module_type}) is called without a positional tensor "
            "input (e.g. fc(input=x)) or returns no tensor, so per-layer statistics cannot read its calls. Call it "
            f"as module(x) on a tensor x, returning a tensor; structures {GENERIC_STRUCTURES}."
        )
    uncalled = {p: f for p, f in layouts.items() if p not in cap.records}
    if uncalled:
        _check_uncalled(engine, uncalled, x)


def _check_uncalled(engine: FisherEngine, uncalled: Mapping[str, LayerLayout], x: Tensor) -> None:
    """Raise UnsupportedLayerError if the forward pass reads a parameter of a layer it does not call.

    Per-layer statistics come from the layer's calls; a tensor read directly (a position table used as
    ``position.weight[:T]``, the out_proj of an attention computed functionally) would get a zero block. One
    forward and backward pass on the chunk's first sample, only when some layer was not called.
    """
    names = [n for f in uncalled.values() for n in f.param_names]
    params = {n: p.detach().requires_grad_(n in names) for n, p in engine.params.items()}
    with torch.enable_grad():
        z = engine.forward(params, x[:1], reverse_only=True)
    if not z.requires_grad:
        return
    grads = torch.autograd.grad(z.sum(), [params[n] for n in names], allow_unused=True)
    read = [n for n, g in zip(names, grads, strict=True) if g is not None]
    if read:
        path = next(p for p, f in uncalled.items() if read[0] in f.param_names)
        raise UnsupportedLayerError(
            f"parameter {read[0]!r} of module {display_path(path)} ({uncalled[path].module_type}) is read by the "
            "forward pass without a call of the module (e.g. position.weight[:T]), so per-layer statistics cannot "
            f"see it. Call the module on inputs of shape (N, ...) (e.g. position(arange(T).expand(N, T))); "
            f"structures {GENERIC_STRUCTURES}."
        )


def _leads_with(a: Tensor, out: Tensor, n: int) -> bool:
    """Whether a module's input and output lead with the n samples of the pass."""
    return a.dim() > 0 and out.dim() > 0 and a.shape[0] == out.shape[0] == n


def _check_batched(path: str, module: nn.Module, a: Tensor, out: Tensor, n: int) -> None:
    """Raise UnsupportedLayerError unless the layer's input and output lead with the chunk's n samples."""
    if not _leads_with(a, out, n):
        raise UnsupportedLayerError(
            f"module {display_path(path)} ({type(module).__name__}) is called on an input of shape "
            f"{tuple(a.shape)} (output {tuple(out.shape)}) in a chunk of {n} samples: its input has no per-sample "
            "dimension (e.g. a position table called on arange(T)), so per-layer statistics cannot be read. Call "
            f"it on inputs of shape (N, ...) (e.g. arange(T).expand(N, T)); structures {GENERIC_STRUCTURES}."
        )


def per_sample_gradients(grads: Tensor, inputs: Tensor | OneHotRows) -> Tensor:
    """The per-sample (per-row) gradients G_{r,n} = Σ_l δ_{r,n,l} ā_{n,l}ᵀ, shape (R, n, out, width).

    Args:
        grads: δ rows (R, n, L, out).
        inputs: ā rows (n, L, width), or :class:`OneHotRows` (then column v of G_{r,n} is the sum of δ_{r,n,l}
            over the positions l with id v, gathered by ``index_add`` without one-hot vectors).
    """
    if isinstance(inputs, Tensor):
        return torch.einsum("rnlo,nli->rnoi", grads, inputs)
    R, n, L, out = grads.shape
    flat = (torch.arange(n, device=grads.device).unsqueeze(1) * inputs.width + inputs.ids).reshape(-1)
    G = grads.new_zeros(R, n * inputs.width, out).index_add_(1, flat, grads.reshape(R, n * L, out))
    return G.reshape(R, n, inputs.width, out).mT


def squared_gradient_sum(grads: Tensor, inputs: Tensor | OneHotRows) -> Tensor:
    """Σ_{r,n} G_{r,n} ⊙ G_{r,n} (out, width) for the per-sample gradients G_{r,n} = Σ_l δ_{r,n,l} ā_{n,l}ᵀ.

    Args:
        grads: δ rows (R, n, L, out) (:attr:`LayerRows.grads`, or rotated into an eigenbasis).
        inputs: ā rows (n, L, width), or :class:`OneHotRows`.

    With one location (L = 1) each G_{r,n} is rank one and its square is (δ ⊙ δ)(ā ⊙ ā)ᵀ, so the sum is one
    (out × n)(n × width) product; with L > 1 the per-sample gradients are formed (R·n·out·width scalars: ask
    :func:`iter_layer_rows` for ``per_sample_gradients``). For one-hot rows only the nonzero columns of each
    G_{r,n} are formed (one per distinct id of sample n: at most R·n·L·out scalars).
    """
    if isinstance(inputs, OneHotRows):
        R, n, L, out = grads.shape
        keys = (torch.arange(n, device=grads.device).unsqueeze(1) * inputs.width + inputs.ids).reshape(-1)
        distinct, where = torch.unique(keys, return_inverse=True)  # (sample, id) pairs present
        G = grads.new_zeros(R, distinct.numel(), out).index_add_(1, where, grads.reshape(R, n * L, out))
        total = grads.new_zeros(inputs.width, out).index_add_(0, distinct % inputs.width, G.square_().sum(0))
        return total.T
    if inputs.shape[1] == 1:
        return grads[:, :, 0].square().sum(0).T @ inputs[:, 0].square()
    return per_sample_gradients(grads, inputs).square_().sum((0, 1))


def reduce_inputs(inputs: Tensor | OneHotRows, dtype: torch.dtype) -> Tensor:
    """KFAC-reduce's per-sample input ā_n = (1/L) Σ_l ā_{n,l}, shape (n, width) (one-hot rows: counts / L)."""
    if isinstance(inputs, OneHotRows):
        return inputs.per_sample_counts(dtype).div_(inputs.ids.shape[1])
    return inputs.mean(1)


def iter_layer_rows(
    engine: FisherEngine, layouts: Mapping[str, LayerLayout], *, backward: bool = True,
    per_sample_gradients: bool = False, chunk_size: int | None = None, desc: str | None = None,
    norms: Mapping[str, Sequence[str]] | None = None, pool: bool = False, masked: Collection[str] = (),
) -> Iterator[ChunkRows]:
    """Yield :func:`layer_rows` (and the ``norms``' rows, :attr:`ChunkRows.norms`) chunk by chunk over the data.

    The chunk size (unless given) is chosen so that one chunk's rows (the norms' included) and its forward pass's
    autograd graph take at most ``min(DEFAULT_CHUNK_BYTES, memory_budget / 4)``, plus, with ``per_sample_gradients``,
    the per-sample gradients a consumer forms one layer at a time (R·out·width scalars per sample for a layer with L > 1
    locations, out·width for L = 1, where the R rows can be summed first). It is independent of the
    engine's own chunk size, which is sized for P-wide factor rows; results do not depend on it (MC labels are
    drawn once by the engine). The probe of :func:`_probe_layers` (one forward pass over the first two samples:
    the engine's own first evaluation where its record serves) runs first, whatever the chunk size, unless
    :func:`captured_norms` ran it: on it every layer's input and output
    must lead with the samples (a layer called on a batch-free input is refused before any chunk), and it tells
    whether the model alters a layer's output in place (then every chunk captures the outputs on clones,
    :func:`layer_rows`). What it found (the rows' size, the cloning) is kept on the engine
    (:meth:`FisherEngine.probed`, by layers, norms and ``per_sample_gradients``): a later pass of the same engine
    over the same layers runs no probe. ``pool`` and ``masked``: as :func:`layer_rows`.
    """
    key = _rows_key(layouts, norms or {}, per_sample_gradients)
    scalars, cloned = engine.probed(key, lambda: _probe_layers(engine, layouts, norms or {})[key])
    for x, y, labels in engine.chunks(desc, chunk_size=chunk_size or _rows_chunk_size(engine, scalars)):
        yield layer_rows(engine, layouts, x, y, labels, backward=backward, norms=norms, clone_outputs=cloned,
                         pool=pool, masked=masked)


def _rows_key(layouts: Mapping[str, LayerLayout], norms: Mapping[str, Sequence[str]],
              per_sample_gradients: bool) -> tuple:
    """The key under which :func:`_probe_layers` keeps what :func:`iter_layer_rows` needs (rows' size, cloning)."""
    return ("iter_layer_rows", tuple((p, f.has_weight, f.has_bias) for p, f in layouts.items()),
            tuple((p, tuple(names)) for p, names in norms.items()), per_sample_gradients)


def _probe_layers(engine: FisherEngine, layouts: Mapping[str, LayerLayout],
                  candidates: Mapping[str, Sequence[str]]) -> dict[Hashable, object]:
    """The probe of the layer-row passes over ``layouts``: one forward pass over the first (up to) two samples.

    That pass is the engine's own first evaluation where its record serves (:func:`_first_calls`: no pass is
    made here then). Else it is :meth:`FisherEngine.first_forward` (which measures the activation bytes of the
    graph on the way: the forward hooks leave it as it is, unless a rule recomputes a module, whose graph is then
    not the model's), with the hooks of a :class:`LayerCapture` on the layers and on the norm ``candidates``
    (module path → parameter names; those may be called more than once). It finds the candidates that
    :func:`captured_norms` keeps (called once, input and output leading with the samples), checks the layers as
    :func:`layer_rows` does (called once, as module(x) on inputs that lead with the samples and returning a tensor;
    an uncalled layer's parameters not read: :func:`_check_calls`), whether the model alters a captured output in
    place, and the rows' scalars per sample (:func:`_row_scalars`).

    Returns:
        What it found by :meth:`FisherEngine.probed` key, all of it kept on the engine: the captured norms (under
        :func:`captured_norms`' key) and, for :func:`iter_layer_rows` over ``layouts`` with those norms or none,
        with and without ``per_sample_gradients`` (:func:`_rows_key`), the scalars and whether to clone.

    Raises:
        UnsupportedLayerError: A layer called twice, on an input without the batch dimension, without a
            positional tensor input or returning no tensor, or whose parameters the forward pass reads without
            calling it.
    """
    x, _ = engine.data.first(2)
    n = x.shape[0]
    cap = _first_calls(engine, layouts, candidates)
    if cap is None:
        with LayerCapture(engine.model, [*layouts, *candidates], clone=False, repeatable=candidates) as cap:
            if cap.recomputed:  # the attention kernels of the pass (layer_rows)
                with torch.enable_grad():
                    engine.forward(engine.params, x, reverse_only=engine.reverse_only_rows)
            else:
                engine.first_forward(engine.reverse_only_rows)
    captured = {p: tuple(names) for p, names in candidates.items()
                if cap.calls.get(p) == 1 and _leads_with(*cap.records[p], n)}
    called = [p for p in layouts if p in cap.records]
    _check_calls(engine, layouts, cap, x)
    found: dict[Hashable, object] = {}
    if candidates:
        found[("captured_norms", tuple((p, tuple(v)) for p, v in candidates.items()))] = captured
    for norms in ({}, captured) if captured else ({},):  # (no norms captured: the same keys)
        rows = _chunk_rows(engine.model, layouts, cap, called, list(norms), [None] * (len(called) + len(norms)), n,
                           cloned=False)
        cloned = bool(cap.modified([*called, *norms]))
        for per_sample in (False, True):
            found[_rows_key(layouts, norms, per_sample)] = (_row_scalars(engine, rows, n, per_sample), cloned)
    for key, value in found.items():
        engine.probed(key, lambda value=value: value)
    return found


def _first_calls(engine: FisherEngine, layouts: Mapping[str, LayerLayout],
                 candidates: Mapping[str, Sequence[str]]) -> ModuleCalls | None:
    """The engine's record of its first evaluation (:attr:`FisherEngine.first_calls`), if it serves the probe.

    The engine keeps it until a probe reads it (here, once: a later probe of the engine makes its own pass).

    It does where it covers the probe's modules, called on tensors, and none of them is recomputed (the record is
    of the model's own forward pass); then it is what a :class:`LayerCapture` of the probe's pass records (the
    same first samples, parameters and hooks that leave every output as it is), and a layer called twice is
    refused as that capture refuses it (the first one whose second call came first).
    """
    kept, paths = engine.take_first_calls(), [*layouts, *candidates]
    if (kept is None or not set(paths) <= set(kept.paths) or kept.opaque.intersection(paths)
            or recomputed_modules(engine.model, paths)):
        return None
    twice = next((p for p in kept.repeated if p in layouts), None)
    if twice is not None:
        raise called_twice_error(twice, engine.model.get_submodule(twice))
    return kept


def _row_scalars(engine: FisherEngine, probe: ChunkRows, n: int, per_sample_gradients: bool) -> int:
    """Scalars a sample adds to the peak of :func:`layer_rows`, from the probe's rows of n samples (norms' included).

    That peak is the rows it returns (inputs, outputs, R gradient rows) plus the graph the forward pass saves for
    the reverse pass (:func:`_rows_chunk_size`). ``per_sample_gradients`` adds the R·out·width scalars per sample
    that :func:`squared_gradient_sum` forms for a layer of dense rows at L > 1 locations (one layer at a time); at
    L = 1, and for one-hot rows, it forms nothing larger than the rows. With ``pool`` and R = 1 (KFAC-reduce,
    :func:`_pooled_backward`) the figure is an upper bound, not the peak: that pass holds no layer's (n, L, out)
    gradient rows past its hook and frees the outputs (and, once live, the inputs) as it goes, so its chunks are
    smaller than the budget allows (the key, :func:`_rows_key`, has no ``pool``: the same chunks as without).
    """
    R = engine.rows_per_sample
    rows = [*probe.values(), *probe.norms.values()]
    scalars = sum(_input_scalars(r) + (R + 1) * r.outputs.numel() for r in rows) // n
    if per_sample_gradients:
        scalars += max((R * r.outputs.shape[-1] * (r.unfolded.shape[-1] + r.bias) for r in probe.values()
                        if isinstance(r.unfolded, Tensor) and r.unfolded.shape[1] > 1), default=0)
    return scalars


def _input_scalars(rows: LayerRows) -> int:
    """Scalars of ``rows.inputs`` (the bias's 1 included), without forming them."""
    a = rows.unfolded
    return a.numel() + (math.prod(a.shape[:-1]) if rows.bias else 0)


def _rows_chunk_size(engine: FisherEngine, scalars: int) -> int:
    """Samples per chunk from the rows' scalars per sample (:func:`_row_scalars`) and the forward's autograd graph.

    The graph is :meth:`FisherEngine.activation_bytes`, measured with the same attention kernels (GPT 1M, 32 × 64
    tokens, R = 1: rows 4.1 MiB + graph 2.6 MiB a sample, against a measured peak resident growth of 6.9 MiB a
    sample, with 4× headroom under the memory budget). For a pass with ``pool`` the rows' figure is an upper bound
    (:func:`_row_scalars`).
    """
    graph = engine.activation_bytes(reverse_only=engine.reverse_only_rows)  # the kernels layer_rows runs
    per_sample = scalars * torch.empty((), dtype=engine.dtype).element_size() + graph
    return max(1, min(DEFAULT_CHUNK_BYTES, engine.memory_budget // 4) // max(per_sample, 1))


__all__ = ["LAYER_RULES", "NORM_TYPES", "ChunkRows", "ConvRule", "EmbeddingRule", "LayerCapture", "LayerLayout",
           "LayerRows", "LayerRule", "LinearRule", "MultiheadAttentionRule", "OneHotRows", "captured_norms",
           "display_path", "expand_input", "from_combined", "in_features_eff", "iter_layer_rows", "layer_layouts",
           "layer_rows", "norm_gradients", "normalized_input", "out_features", "per_sample_gradients",
           "reduce_inputs", "register_layer_rule", "rule_for", "squared_gradient_sum", "to_combined",
           "unsupported_error"]
