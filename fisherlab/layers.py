"""Per-layer rules: how a weight layer's input and parameters map onto one combined matrix W̄ (BackPACK style).

Kronecker-factored structures (KFAC, EKFAC, unit-wise blocks) and the reconstruction of local Fisher layers
see every supported layer as one linear map applied at L locations (docs/method.md):

    y_l = W̄ ā_l,   ā_l = [a_l; 1] (the 1 only when the layer's bias is selected),   l = 1 … L,

with W̄ = [W_flat, b] of shape (out, in_eff [+ 1]). For ``nn.Linear`` L = 1 and a_l is the input; for
``nn.Conv1d``/``nn.Conv2d`` a_l is the unfolded input patch at output location l (length in_eff =
in_channels · ∏ kernel_size, in the order of ``weight.reshape(out, -1)``) and L is the number of output
locations. The per-sample gradient of W̄ for an output-gradient row δ is Σ_l δ_l ā_lᵀ.

**Flat ordering.** fisherlab's flat parameter vector (:mod:`fisherlab.params`) holds ``weight`` row-major, then
``bias`` (each in the module's ``named_parameters()`` order) — not the row-major order of W̄, where each bias
entry follows its weight row. :meth:`LayerLayout.permutation` maps one to the other; :meth:`LayerLayout.gather`
and :meth:`LayerLayout.scatter` move vectors between the two.

**Registry.** :data:`LAYER_RULES` maps a module type to its :class:`LayerRule` (Linear, Conv1d, Conv2d);
:func:`register_layer_rule` adds one for a user module (subclass :class:`LayerRule`). :func:`rule_for` raises
:class:`~fisherlab.errors.UnsupportedLayerError` naming the module, its type and the structures that work for
every module. :func:`iter_layer_rows` walks over the data of a :class:`~fisherlab.engine.FisherEngine` and yields,
per chunk and layer, the expanded inputs ā, the pre-activation outputs and the output gradients δ of the
engine's factor rows (the raw material of every Kronecker-factored structure).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from fisherlab.engine import DEFAULT_CHUNK_BYTES, FisherEngine
from fisherlab.errors import InputError, UnsupportedLayerError
from fisherlab.params import ParamSpec

#: What the error for a module without a rule recommends.
GENERIC_STRUCTURES = ("'dense', 'block', 'diag' and 'implicit' work for every module")


class LayerRule:
    """How one module type maps onto the combined matrix W̄ = [W_flat, b] (out, in_eff [+ 1]).

    A subclass states the layer's sizes, how its input unfolds into L rows of length in_eff, and how a gradient
    with respect to its output becomes L rows of length out. The weight must have shape (out, *rest) with
    ∏ rest = in_eff, and the bias (if any) shape (out,); the parameters must be called ``weight`` and ``bias``.
    """

    #: Local names of the parameters the rule understands, in the order of W̄'s columns.
    param_names: tuple[str, ...] = ("weight", "bias")

    def check(self, module: nn.Module, path: str) -> None:
        """Raise :class:`UnsupportedLayerError` if this instance's configuration is not covered by the rule."""

    def in_features(self, module: nn.Module) -> int:
        """in_eff, the length of one unfolded input row a_l."""
        raise NotImplementedError

    def out_features(self, module: nn.Module) -> int:
        """out, the number of rows of W̄."""
        raise NotImplementedError

    def unfold_input(self, module: nn.Module, a: Tensor) -> Tensor:
        """The module input (n, *input_shape) as rows (n, L, in_eff)."""
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
        cols = nnf.unfold(a, geometry[0], dilation=geometry[1], stride=geometry[2])  # (n, in_eff, L)
        return cols.transpose(1, 2)

    def output_rows(self, module: nn.Module, g: Tensor, lead: int = 0) -> Tensor:
        return g.flatten(-self.spatial_dims).transpose(-1, -2)


#: Module type → rule. Extend with :func:`register_layer_rule`.
LAYER_RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(1),
    nn.Conv2d: ConvRule(2),
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


def expand_input(module: nn.Module, a: Tensor, bias: bool | None = None) -> Tensor:
    """The rows ā_l of the module input: (n, *input_shape) → (n, L, in_eff [+ 1]).

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
    """W̄ = [W_flat, b]: weight (*B, out, *rest), bias (*B, out) or None → (*B, out, in_eff [+ 1])."""
    w = weight.flatten(weight.dim() - module.weight.dim() + 1)
    return w if bias is None else torch.cat([w, bias.unsqueeze(-1)], dim=-1)


def from_combined(module: nn.Module, combined: Tensor, has_bias: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """Split W̄ (*B, out, in_eff [+ 1]) into (weight (*B, *module.weight.shape), bias (*B, out) or None)."""
    has_bias = getattr(module, "bias", None) is not None if has_bias is None else has_bias
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
    """

    layer: str
    module_type: str
    param_names: tuple[str, ...]
    has_weight: bool
    has_bias: bool
    in_features: int
    out_features: int

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
        parts = {"weight": pos[:, : self.in_features].reshape(-1), "bias": pos[:, -1]}
        return torch.cat([parts[name.rpartition(".")[2]] for name in self.param_names])

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

    Raises:
        UnsupportedLayerError: A module with a rule but a configuration it does not cover (e.g. groups > 1).
    """
    layouts: dict[str, LayerLayout] = {}
    unsupported: dict[str, list[str]] = {}
    for path, names in spec.layers().items():
        module = model.get_submodule(path)
        local = [n.rpartition(".")[2] for n in names]
        if type(module) not in LAYER_RULES or not set(local) <= set(LAYER_RULES[type(module)].param_names):
            unsupported[path] = list(names)
            continue
        rule = rule_for(module, path)
        layouts[path] = LayerLayout(path, type(module).__name__, tuple(names), "weight" in local, "bias" in local,
                                    rule.in_features(module), rule.out_features(module))
    return layouts, unsupported


def unsupported_error(model: nn.Module, unsupported: Mapping[str, Sequence[str]], structure: str) -> Exception:
    """The :class:`UnsupportedLayerError` for parameters owned by modules without a rule."""
    path, names = next(iter(unsupported.items()))
    module = model.get_submodule(path)
    others = sum(len(v) for v in unsupported.values()) - len(names)
    more = f" (and {others} more parameter(s) in {len(unsupported) - 1} other module(s))" if others else ""
    try:
        rule_for(module, path)
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
        inputs: ā rows (n, L, width): the unfolded input, with the trailing 1 when the bias is selected (only
            the 1 when the weight is not).
        outputs: The layer output (pre-activation) as rows (n, L, out), detached.
        grads: δ rows (R, n, L, out): J_lᵀ M_{n,r}, the engine's output factor rows pulled back to the layer
            output (F = (1/N) Σ_n Σ_r of the outer products of the per-sample gradients Σ_l δ_l ā_lᵀ); None when
            no backward pass was asked for.
    """

    inputs: Tensor
    outputs: Tensor
    grads: Tensor | None


class LayerCapture:
    """Forward hooks that record each layer's input and output (called once per forward pass).

    ``records[path]`` = (input, output) of the layer at ``path``; the output is the tensor the layer produced
    (the forward pass continues from a clone), so ``torch.autograd.grad(loss, output)`` is the output gradient.
    A layer called twice in one forward pass raises UnsupportedLayerError.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]):
        self.model, self.paths = model, list(paths)
        self.records: dict[str, tuple[Tensor, Tensor]] = {}
        self.handles: list = []

    def __enter__(self) -> LayerCapture:
        for path in self.paths:
            self.handles.append(self.model.get_submodule(path).register_forward_hook(self._hook(path)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, path: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            if path in self.records:
                raise UnsupportedLayerError(
                    f"module {display_path(path)} ({type(module).__name__}) is called more than once per forward "
                    f"pass (shared weights); Kronecker-factored structures need one call. Structures "
                    f"{GENERIC_STRUCTURES}."
                )
            self.records[path] = (inputs[0], output)
            return output.clone()  # later in-place ops (e.g. ReLU(inplace=True)) must not alter the captured output

        return hook


def layer_rows(
    engine: FisherEngine, layouts: Mapping[str, LayerLayout], x: Tensor, y: Tensor, labels: Tensor | None,
    *, backward: bool = True,
) -> dict[str, LayerRows]:
    """Inputs, outputs and output-gradient rows of every layer in ``layouts`` for one chunk.

    One forward pass with hooks, then the R rows of the engine's output factor M (n, R, C) are pulled back to all
    layer outputs at once (one batched reverse pass, ``torch.autograd.grad(is_grads_batched=True)``). Layers that
    the forward pass does not call are absent from the result (their Fisher block is zero).
    """
    model = engine.model
    params = {n: p.detach().requires_grad_(backward) for n, p in engine.params.items()}
    with torch.enable_grad(), LayerCapture(model, list(layouts)) as cap:
        z = engine.forward(params, x)
    called = [p for p in layouts if p in cap.records]
    grads: list[Tensor | None] = [None] * len(called)
    if backward and called:
        M = engine.output_factor(z.detach(), y, labels).transpose(0, 1)  # (R, n, C)
        outs = [cap.records[p][1] for p in called]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            if M.shape[0] == 1:
                grads = [g.unsqueeze(0) for g in torch.autograd.grad(z, outs, M[0], allow_unused=True,
                                                                     materialize_grads=True)]
            else:
                grads = list(torch.autograd.grad(z, outs, M.contiguous(), is_grads_batched=True, allow_unused=True,
                                                 materialize_grads=True))
    result = {}
    for path, g in zip(called, grads, strict=True):
        module, lay = model.get_submodule(path), layouts[path]
        rule = rule_for(module, path)
        a, out = cap.records[path]
        rows = expand_input(module, a.detach(), bias=lay.has_bias)
        if not lay.has_weight:  # bias alone: ā is the constant 1
            rows = rows[..., -1:]
        result[path] = LayerRows(rows, rule.output_rows(module, out.detach()),
                                 None if g is None else rule.output_rows(module, g, lead=1))
    return result


def squared_gradient_sum(grads: Tensor, inputs: Tensor) -> Tensor:
    """Σ_{r,n} G_{r,n} ⊙ G_{r,n} (out, width) for the per-sample gradients G_{r,n} = Σ_l δ_{r,n,l} ā_{n,l}ᵀ.

    Args:
        grads: δ rows (R, n, L, out) (:attr:`LayerRows.grads`, or rotated into an eigenbasis).
        inputs: ā rows (n, L, width).

    With one location (L = 1) each G_{r,n} is rank one and its square is (δ ⊙ δ)(ā ⊙ ā)ᵀ, so the sum is one
    (out × n)(n × width) product; with L > 1 the per-sample gradients are formed (R·n·out·width scalars: ask
    :func:`iter_layer_rows` for ``per_sample_gradients``).
    """
    if inputs.shape[1] == 1:
        return grads[:, :, 0].square().sum(0).T @ inputs[:, 0].square()
    return torch.einsum("rnlo,nli->rnoi", grads, inputs).square().sum((0, 1))


def iter_layer_rows(
    engine: FisherEngine, layouts: Mapping[str, LayerLayout], *, backward: bool = True,
    per_sample_gradients: bool = False, chunk_size: int | None = None, desc: str | None = None,
) -> Iterator[dict[str, LayerRows]]:
    """Yield :func:`layer_rows` chunk by chunk over the engine's data.

    The chunk size (unless given) is chosen so that one chunk's rows take at most
    ``min(256 MiB, memory_budget / 4)``, plus, with ``per_sample_gradients``, the per-sample gradients a consumer
    forms one layer at a time (R·out·width scalars per sample for a layer with L > 1 locations, out·width for
    L = 1, where the R rows can be summed first). It is independent of the engine's own chunk size, which is
    sized for P-wide factor rows; results do not depend on it (MC labels are drawn once by the engine).
    """
    if chunk_size is None:
        chunk_size = _rows_chunk_size(engine, layouts, per_sample_gradients)
    for x, y, labels in engine.chunks(desc, chunk_size=chunk_size):
        yield layer_rows(engine, layouts, x, y, labels, backward=backward)


def _rows_chunk_size(engine: FisherEngine, layouts: Mapping[str, LayerLayout], per_sample_gradients: bool) -> int:
    """Samples per chunk from a one-sample forward probe (rows ×3 for autograd buffers and temporaries)."""
    x, y = engine.data.first(1)
    probe = layer_rows(engine, layouts, x, y, None, backward=False)
    R = engine.rows_per_sample
    scalars = 3 * sum(r.inputs.numel() + (R + 1) * r.outputs.numel() for r in probe.values())
    if per_sample_gradients:
        scalars += max((r.outputs.shape[-1] * r.inputs.shape[-1] * (R if r.inputs.shape[1] > 1 else 1)
                        for r in probe.values()), default=0)
    per_sample = scalars * torch.empty((), dtype=engine.dtype).element_size()
    return max(1, min(DEFAULT_CHUNK_BYTES, engine.memory_budget // 4) // max(per_sample, 1))


__all__ = ["LAYER_RULES", "ConvRule", "LayerCapture", "LayerLayout", "LayerRows", "LayerRule", "LinearRule",
           "display_path", "expand_input", "from_combined", "in_features_eff", "iter_layer_rows", "layer_layouts",
           "layer_rows", "out_features", "register_layer_rule", "rule_for", "squared_gradient_sum", "to_combined",
           "unsupported_error"]
