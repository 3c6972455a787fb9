"""``reconstruct(model, data, ...)``: rebuild a model around local Fisher layers (docs/method.md).

Structures and the metric G each one reconstructs with (λ = ``damping``; every block is also the unit that
holds its roots):

==========  ==================================================================  ===============================
structure   G                                                                   units
==========  ==================================================================  ===============================
``dense``   F + λI over all parameters (exact NGD; small models only)           one parametrization of θ
``block``   one dense block F_l + λI per layer (module)                         a parametrization per layer
``kfac``    (S_l + sI) ⊗ (A_l + aI) per Linear/Conv layer, a·s = λ (``split``)  layer forms (or parametrizations)
``input``   I ⊗ (A_l + λI) per Linear/Conv layer (input whitening only)         layer forms (or parametrizations)
``ekfac``   EKFAC eigenbasis and re-fitted scaling + λ per layer                parametrizations per layer
``unit``    one dense block + λI per output unit (row of W̄ = [W, b])            parametrizations per layer
``diag``    diag(F) + λI                                                        a parametrization per tensor
==========  ==================================================================  ===============================

Linear and Conv layers get the **layer form** under ``kfac`` and ``input`` (explicit InputWhitening / W̄' /
OutputFisher modules, see :mod:`~fisherlab.reconstruction.local_layers`) unless ``layer_form=False``; every
other tensor, and every tensor under the other structures, gets the **parametrization form**
(:mod:`~fisherlab.reconstruction.parametrize`). Fallback rule: a layer that has Kronecker factors (a rule in
:data:`fisherlab.layers.LAYER_RULES`) but no layer form (:data:`~fisherlab.reconstruction.LAYER_FORMS`), or whose
weight or bias is not trainable, gets a :class:`~fisherlab.reconstruction.KroneckerRoot` parametrization with the
same G. Under ``kfac``/``input``/``ekfac``/``unit`` a module without a
Kronecker rule (an LSTM, a user module) raises :class:`~fisherlab.errors.UnsupportedLayerError`
naming it; pass ``unsupported="block"`` to give such modules an exact dense block (a dense parametrization) instead.

Transformer modules under the layer-wise structures (``dense``/``block``/``diag``: every tensor a parametrization):

========================================  =====================================================================
module                                    form under ``kfac`` / ``input`` (``ekfac``, ``unit``: the same roots'
                                          parametrizations, EigenbasisRoot / UnitRoot)
========================================  =====================================================================
``nn.Linear`` (also over positions)       layer form :class:`~fisherlab.reconstruction.LocalFisherLinear`
``nn.Embedding``                          KroneckerRoot parametrization of ``weight``, W̄ = weightᵀ
                                          (:class:`~fisherlab.reconstruction.TransposedLayout`); under "expand"
                                          its A is diagonal and its roots are kept as (V,) vectors
``nn.LayerNorm`` / ``nn.RMSNorm``         DenseRoot parametrization of weight and bias (the exact block the
                                          structures keep for norms without asking)
``nn.MultiheadAttention``                 ``in_proj_weight``/``in_proj_bias`` and ``out_proj`` are read by torch
                                          functionally, so always parametrizations: KroneckerRoots (the
                                          packed q/k/v rows one W̄); a configuration the rule refuses
                                          (``kdim``, ``unsupported="block"``): DenseRoots per module
========================================  =====================================================================

Every effective original-coordinate tensor — a layer form's ``weight``/``bias``, a parametrized tensor — reads θ
and is read-only: assigning it raises :class:`~fisherlab.reconstruction.ReadOnlyTensorError` (for a parametrized
tensor an ``nn.Parameter`` value is refused by torch itself with a KeyError, "attribute already exists").
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fisherlab.checks import check_damping, check_device, check_dtype, check_eval_mode, parse_enum, renamed
from fisherlab.errors import InputError, MetricMismatchError
from fisherlab.likelihoods import Likelihood, get_likelihood
from fisherlab.params import ParamSpec
from fisherlab.reconstruction.local_layers import LAYER_FORMS
from fisherlab.reconstruction.network import (
    ReconstructConfig,
    ReconstructedNetwork,
    UnitPlan,
    _describe,
    compute_structure,
)
from fisherlab.reconstruction.parametrize import (
    DenseRoot,
    DiagonalRoot,
    EigenbasisRoot,
    FisherRoot,
    KroneckerRoot,
    UnitRoot,
    parametrize_group,
)
from fisherlab.structures.base import FisherMatrix
from fisherlab.structures.kfac import diagonal_input
from fisherlab.vocabulary import (
    RECONSTRUCTIBLE,
    STRUCTURE_ALIASES,
    STRUCTURE_TABLE,
    FisherKind,
    FoldMode,
    KronSplit,
    RootMethod,
    Structure,
)

__all__ = ["STRUCTURES", "MetricMismatchError", "reconstruct"]

#: Reconstruction structure → (fisherlab.fisher structure, its default options), from the one structure table.
STRUCTURES: dict[str, tuple[str, dict[str, Any]]] = {
    s.value: (STRUCTURE_TABLE[s].fisher.value, dict(STRUCTURE_TABLE[s].options))  # type: ignore[union-attr]
    for s in map(Structure, RECONSTRUCTIBLE)
}


def reconstruct(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    structure: str = "kfac",
    kind: str = "true",
    damping: float = 1e-3,
    sqrt: str = "eigh",
    mc_samples: int = 1,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    layer_form: bool = True,
    ema_decay: float | None = None,
    inplace: bool = False,
    split: str = "pi",
    fold: str = "auto",
    root_rank: int = 64,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    metric: FisherMatrix | None = None,
    **options: Any,
) -> ReconstructedNetwork:
    """Rebuild ``model`` in coordinates θ' = G^{1/2} θ so that plain GD on it is NGD with metric G.

    Args:
        model: Any ``nn.Module`` mapping (N, *input_shape) → (N, C), in eval mode if it has dropout or batch norm.
            Not modified unless ``inplace=True``.
        data: ``(X, y)``, a :class:`~fisherlab.data.SplitData` (training split) or a DataLoader: G is the Fisher
            of ``kind`` on these samples (also the default data of :meth:`~ReconstructedNetwork.refresh`).
        likelihood: ``"categorical"``, ``"gaussian"``, ``"bernoulli"`` or a Likelihood.
        structure: ``"dense"``, ``"block"``, ``"kfac"``, ``"input"``, ``"ekfac"``, ``"unit"`` or ``"diag"`` (module
            docstring table).
        kind: Fisher kind: ``"true"``, ``"mc"``, ``"empirical"`` or ``"ggn"`` (``fisher=`` is its deprecated
            spelling; ``structure="full"`` that of ``"dense"``).
        damping: λ ≥ 0 (for ``kfac`` split between the factors, see ``split``).
        sqrt: Root method: ``"eigh"``, ``"denman_beavers"`` or ``"newton_schulz"`` (the symmetric root
            θ' = G^{1/2} θ), or ``"cholesky"`` (θ' = Lᵀθ with G = L Lᵀ per block or Kronecker factor: the same
            NGD steps in other coordinates, at about a quarter of eigh's cost per refresh), or ``"lowrank"``: a
            different G, in which every Kronecker factor wider than 2·``root_rank`` is its top-k eigen-part plus its
            mean remainder (:func:`~fisherlab.reconstruction.roots.lowrank_roots`), so that a layer form applies
            its roots in O(n·k) per row instead of O(n²); all other blocks get eigh roots.
        mc_samples: Labels per input for ``kind="mc"``.
        seed: Seed of the Monte-Carlo labels (refresh k uses ``seed + k``).
        dtype: Dtype of the reconstructed network and its roots (default: the model's).
        device: Its device (default: the model's).
        layer_form: Give Linear/Conv layers the explicit layer form under ``kfac``/``input`` (else parametrizations
            with the same G).
        ema_decay: β ∈ [0, 1): refreshes average the statistics, β · old + (1 − β) · new (None: no averaging).
        inplace: Rebuild ``model`` itself instead of a copy.
        split: KFAC damping split: ``"pi"`` (a = π√λ, s = √λ/π; as KFACFisher.solve) or ``"sqrt"`` (a = s = √λ).
        fold: Where layer forms apply their roots: ``"auto"`` (cheaper side), ``"never"`` (on activations, the
            paper's form) or ``"always"`` (folded into the weight).
        root_rank: k of ``sqrt="lowrank"``.
        chunk_size: Samples per chunk in Fisher computations and gradients.
        memory_budget: Bytes any dense object may take (default: half the available memory).
        metric: The Fisher structure G is read from, already built (e.g. a
            :class:`~fisherlab.fidelity.rules.RuleContext`'s), instead of computing it from ``data``: a P×P
            structure over ``model``'s parameters (its ``spec``: the same names and shapes, P = ``spec.dim``) at
            their current values, of the structure ``structure`` is computed from (``STRUCTURES[structure][0]``,
            e.g. ``"dense"``, ``"block"``, ``"kfac"``), of Fisher kind ``kind``, in ``dtype`` on ``device``, with
            the structure's options (``by`` of a block Fisher). The damping is not part of it (λ = ``damping``).
            ``refresh`` still recomputes G from the data.
        **options: Options of the Fisher structure (e.g. ``unsupported="block"`` for kfac/ekfac/unit).

    Returns:
        The :class:`ReconstructedNetwork`; at construction it computes the same outputs as ``model``.

    Raises:
        InputError: Unknown option, a model in training mode with dropout/batch norm, shared parameters.
        UnsupportedLayerError: The structure has no rule for a module (names it; use block/diag/dense, or
            ``unsupported="block"``).
        SingularMatrixError: G is singular at ``damping`` (e.g. 0): pass damping > 0.
        MemoryBudgetError: A dense block would exceed the memory budget.
        MetricMismatchError: ``metric`` is not a structure this reconstruction could have computed (names what
            differs: its structure, parameters, kind, dtype, device or block grouping).
    """
    kind = renamed(options, "fisher", "kind", kind, "true", "reconstruct")
    if structure in STRUCTURE_ALIASES:
        warnings.warn(f"reconstruct: structure={structure!r} is deprecated; use {STRUCTURE_ALIASES[structure]!r}",
                      DeprecationWarning, stacklevel=2)
        structure = STRUCTURE_ALIASES[structure]
    if structure not in STRUCTURES:
        raise InputError(f"unknown reconstruction structure {structure!r}; valid: {list(STRUCTURES)}")
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module; got {type(model)}")
    kind = parse_enum(FisherKind, kind, "Fisher kind").value
    sqrt = parse_enum(RootMethod, sqrt, "sqrt method").value
    split = parse_enum(KronSplit, split, "damping split").value
    fold = parse_enum(FoldMode, fold, "fold mode").value
    damping = check_damping(damping)
    if not (isinstance(root_rank, int) and root_rank >= 1):
        raise InputError(f"root_rank must be an integer ≥ 1; got {root_rank!r}")
    if ema_decay is not None and not (isinstance(ema_decay, (int, float)) and 0 <= ema_decay < 1):
        raise InputError(f"ema_decay must be None or in [0, 1); got {ema_decay!r}")
    check_eval_mode(model)
    _check_unshared(model)
    spec = ParamSpec.from_model(model)
    first = next(iter(model.parameters()))
    dtype = check_dtype(dtype) or first.dtype
    device = check_device(device) if device is not None else first.device

    fisher_structure, defaults = STRUCTURES[structure]
    config = ReconstructConfig(structure, fisher_structure, kind, float(damping), sqrt, get_likelihood(likelihood),
                               mc_samples, seed, ema_decay, split, fold, layer_form, chunk_size, memory_budget,
                               {**defaults, **options}, root_rank)
    template = copy.deepcopy(model).to(device=device, dtype=dtype)
    struct = compute_structure(template, data, config, seed) if metric is None else _check_metric(
        metric, spec, config, dtype, device)
    net = model.to(device=device, dtype=dtype) if inplace else copy.deepcopy(template)
    net, plans = _BUILDERS[structure](net, spec, struct, config)
    network = ReconstructedNetwork(net, template, spec, plans, config, data)
    network.set_metric(struct)
    return network


def _check_metric(metric: Any, spec: ParamSpec, config: ReconstructConfig, dtype: torch.dtype,
                  device: torch.device) -> FisherMatrix:
    """``metric`` if it can stand for :func:`compute_structure` of ``config``; else MetricMismatchError."""
    if not isinstance(metric, FisherMatrix):
        raise MetricMismatchError(f"metric must be a Fisher structure (FisherMatrix); got {type(metric)}")
    want = {"structure": config.fisher_structure, "kind": config.kind, "dtype": dtype, "device": device}
    have = {"structure": metric.structure, "kind": metric.kind.value, "dtype": metric.dtype,
            "device": metric.device}
    if "by" in config.options:
        want["block grouping"], have["block grouping"] = config.options["by"], metric.meta.get("blocks_by")
    for what, value in want.items():
        if have[what] != value:
            raise MetricMismatchError(f"the metric given to reconstruct has {what} {have[what]!r}; this "
                                      f"reconstruction needs {value!r}")
    if _describe(metric.spec) != _describe(spec):
        raise MetricMismatchError(
            f"the metric given to reconstruct is over other parameters ({metric.spec.dim} in "
            f"{len(metric.spec.names)} tensors) than the model's ({spec.dim} in {len(spec.names)} tensors), or in "
            "another order; build it from this model")
    return metric


def _check_unshared(model: nn.Module) -> None:
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = seen.setdefault(id(p), name)
        if first != name:
            raise InputError(
                f"parameters {first!r} and {name!r} are the same tensor (shared between layers): a reconstructed "
                "network needs one coordinate system per tensor. Untie them (give each layer its own copy) first."
            )


# ------------------------------------------------------------------------------------------------ building
Built = tuple[nn.Module, list[UnitPlan]]


def _root_path(name: str) -> str:
    """Module path of the root registered on parameter ``name`` (its first member)."""
    owner, _, attr = name.rpartition(".")
    return f"{owner + '.' if owner else ''}parametrizations.{attr}.0.root"


def _group(net: nn.Module, spec: ParamSpec, names: tuple[str, ...], root_cls: type[FisherRoot],
           source: tuple[str, str], **kwargs: Any) -> UnitPlan:
    """Parametrize the tensors ``names`` of ``net`` with a new ``root_cls`` root; its plan."""
    first = next(iter(net.parameters()))
    root = root_cls([spec.shapes[spec.names.index(n)] for n in names], first.dtype, first.device, **kwargs)
    parametrize_group(net, names, root)
    return UnitPlan(_root_path(names[0]), names, source, "parametrization")


def _build_dense(net: nn.Module, spec: ParamSpec, struct: FisherMatrix, config: ReconstructConfig) -> Built:
    return net, [_group(net, spec, spec.names, DenseRoot, ("matrix", ""))]


def _build_block(net: nn.Module, spec: ParamSpec, struct: FisherMatrix, config: ReconstructConfig) -> Built:
    layers = spec.layers() if struct.meta.get("blocks_by", "layer") == "layer" else {n: (n,) for n in spec.names}
    return net, [_group(net, spec, layers[key], DenseRoot, ("blocks", key)) for key in struct.index]


def _build_diag(net: nn.Module, spec: ParamSpec, struct: FisherMatrix, config: ReconstructConfig) -> Built:
    return net, [_group(net, spec, (n,), DiagonalRoot, ("diagonal", n)) for n in spec.names]


def _replace(net: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` of ``net``; returns the (possibly new) root module."""
    if not path:
        return new
    parent, _, child = path.rpartition(".")
    setattr(net.get_submodule(parent), child, new)
    return net


def _build_layerwise(net: nn.Module, spec: ParamSpec, struct: FisherMatrix, config: ReconstructConfig) -> Built:
    """Units of KFAC, input, EKFAC and unit-wise structures: one per supported layer, a dense one per exact block."""
    kronecker = config.structure in ("kfac", "input")
    output = config.structure != "input"
    root_cls = _LAYERWISE_ROOTS[config.structure]
    kwargs = {"split": config.split, "output": output} if kronecker else {}
    plans = []
    for path, f in struct.factors.items():  # type: ignore[attr-defined]
        diagonal = {"diagonal_input": diagonal_input(f)} if config.structure != "unit" else {}
        layout = {"transposed": f.weight_transposed, **diagonal}
        module = net.get_submodule(path)
        names = tuple(f.param_names)
        factory = LAYER_FORMS.get(type(module))
        whole = f.has_weight and f.has_bias == (getattr(module, "bias", None) is not None)
        if kronecker and config.layer_form and factory is not None and whole:
            net = _replace(net, path, factory(module, output=output, split=config.split, fold=config.fold))
            plans.append(UnitPlan(path, names, ("factors", path), "layer"))
        else:
            plans.append(_group(net, spec, names, root_cls, ("factors", path), **kwargs, **layout))
    plans += [_group(net, spec, spec.layers()[path], DenseRoot, ("exact_blocks", path))
              for path in struct.exact_blocks]  # type: ignore[attr-defined]
    return net, plans


_BUILDERS: dict[str, Callable[[nn.Module, ParamSpec, FisherMatrix, ReconstructConfig], Built]] = {
    "dense": _build_dense,
    "block": _build_block,
    "diag": _build_diag,
    "kfac": _build_layerwise,
    "input": _build_layerwise,
    "ekfac": _build_layerwise,
    "unit": _build_layerwise,
}

#: Root of a layer-wise structure's parametrization form.
_LAYERWISE_ROOTS: dict[str, type[FisherRoot]] = {
    "kfac": KroneckerRoot,
    "input": KroneckerRoot,
    "ekfac": EigenbasisRoot,
    "unit": UnitRoot,
}
