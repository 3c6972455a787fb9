"""The parameter-ordering convention shared by every fisherlab object.

**Convention.** The flat parameter vector θ ∈ R^P lists the selected parameter tensors in the order of
``model.named_parameters()``, each flattened in row-major (C) order, exactly as
``torch.nn.utils.parameters_to_vector`` does. Row ``i`` and column ``i`` of every Fisher matrix, entry ``i`` of
every gradient, update and diagonal refer to the same scalar parameter. A **layer** is the module that owns a
parameter tensor (``"layers.0"`` owns ``"layers.0.weight"`` and ``"layers.0.bias"``); layer blocks group the
tensors of one module, in the same order.

:class:`ParamSpec` carries that convention: names, shapes, offsets, and the maps between flat vectors and named
tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from fisherlab.errors import InputError, NonFiniteError


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and flat offsets of the parameter tensors a Fisher is taken over.

    Attributes:
        names: Parameter names, in ``model.named_parameters()`` order.
        shapes: Shape of each tensor.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_model(cls, model: nn.Module, names: Iterable[str] | None = None) -> ParamSpec:
        """The spec of ``model``'s trainable parameters, or of the subset ``names`` (kept in model order).

        Raises:
            InputError: If a requested name is not a parameter of the model, a parameter is shared between two
                names (tied weights), or no parameter is selected.
        """
        all_params = dict(model.named_parameters(remove_duplicate=False))
        if names is None:
            chosen = [n for n, p in all_params.items() if p.requires_grad]
        else:
            wanted = set(names)
            unknown = sorted(wanted - set(all_params))
            if unknown:
                raise InputError(f"unknown parameter name(s) {unknown}; the model has {list(all_params)}")
            chosen = [n for n in all_params if n in wanted]
        if not chosen:
            raise InputError("no parameters selected: the model has no trainable parameters or params=[] was given")
        owner: dict[int, str] = {}
        for n in chosen:
            first = owner.setdefault(id(all_params[n]), n)
            if first != n:
                raise InputError(
                    f"parameters {first!r} and {n!r} are the same tensor (shared between layers); select one "
                    "of the names with params=[...] (its Fisher then covers every use of the shared tensor)"
                )
        return cls(tuple(chosen), tuple(all_params[n].shape for n in chosen))

    @cached_property
    def numels(self) -> tuple[int, ...]:
        """Number of scalars in each tensor."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start index of each tensor in the flat vector (length ``len(names) + 1``; the last entry is P)."""
        out = [0]
        for n in self.numels:
            out.append(out[-1] + n)
        return tuple(out)

    @cached_property
    def dim(self) -> int:
        """P, the total number of scalar parameters."""
        return self.offsets[-1]

    def slice(self, name: str) -> slice:
        """Slice of the flat vector that holds parameter ``name``."""
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i + 1])

    def indices(self, names: Iterable[str]) -> Tensor:
        """Flat indices (LongTensor) of the tensors ``names``, concatenated in the order given."""
        slices = [self.slice(n) for n in names]
        if all(a.stop == b.start for a, b in zip(slices, slices[1:], strict=False)):  # one run (weight, bias): no cat
            return torch.arange(slices[0].start if slices else 0, slices[-1].stop if slices else 0)
        return torch.cat([torch.arange(s.start, s.stop) for s in slices])

    def layers(self) -> dict[str, tuple[str, ...]]:
        """Parameter names grouped by owning module, in order: ``{"layers.0": ("layers.0.weight", ...)}``."""
        groups: dict[str, list[str]] = {}
        for name in self.names:
            groups.setdefault(layer_of(name), []).append(name)
        return {k: tuple(v) for k, v in groups.items()}

    def blocks(self, by: str = "layer") -> dict[str, Tensor]:
        """Index sets of the diagonal blocks: one per layer (``by="layer"``) or per parameter tensor (``"tensor"``).

        Formed once per spec and grouping (P int64 indices in all: a fresh 9 MB for the MLP 64-1024-1024-10, 0.3 ms,
        3.7 ms where the allocation page-faults in) and shared by every caller: a new dict of the same tensors,
        which are not to be modified in place.

        Returns:
            Mapping from block name to a LongTensor of flat indices (ascending).
        """
        if by not in ("tensor", "layer"):
            raise InputError(f"unknown block grouping {by!r}; valid: 'tensor', 'layer'")
        if by not in self._blocks:
            groups = {n: (n,) for n in self.names} if by == "tensor" else self.layers()
            self._blocks[by] = {name: self.indices(members) for name, members in groups.items()}
        return dict(self._blocks[by])

    @cached_property
    def _blocks(self) -> dict[str, dict[str, Tensor]]:
        """Grouping → :meth:`blocks`, those formed so far."""
        return {}

    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate named tensors (a mapping or a sequence in spec order) into a flat vector of shape (P,).

        Tensors may carry leading batch dims that are shared: shape (*B, *shape_i) gives (*B, P).
        """
        seq = [tensors[n] for n in self.names] if isinstance(tensors, Mapping) else list(tensors)
        if len(seq) != len(self.names):
            raise InputError(f"expected {len(self.names)} tensors, got {len(seq)}")
        batch = seq[0].shape[: seq[0].dim() - len(self.shapes[0])]
        for t, s, n in zip(seq, self.shapes, self.names, strict=True):
            if tuple(t.shape[len(batch):]) != tuple(s):
                raise InputError(f"tensor for {n!r} has shape {tuple(t.shape)}, expected (*batch, {tuple(s)})")
        return torch.cat([t.reshape(*batch, -1) for t in seq], dim=-1)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat vector of shape (*B, P) into named tensors of shapes (*B, *shape_i) (views, no copy)."""
        if vec.shape[-1] != self.dim:
            raise InputError(f"vector has last dimension {vec.shape[-1]}, expected P = {self.dim}")
        batch = vec.shape[:-1]
        return {
            n: vec[..., self.offsets[i]: self.offsets[i + 1]].reshape(*batch, *self.shapes[i])
            for i, n in enumerate(self.names)
        }

    def get(self, model: nn.Module) -> dict[str, Tensor]:
        """The model's current (detached) parameter tensors for the names of this spec."""
        params = dict(model.named_parameters(remove_duplicate=False))
        return {n: params[n].detach() for n in self.names}

    def vector(self, model: nn.Module) -> Tensor:
        """The model's current parameters as one flat vector of shape (P,)."""
        return self.flatten(self.get(model))


def layer_of(name: str) -> str:
    """The module path that owns parameter ``name`` (``"layers.0.weight"`` → ``"layers.0"``; top level → ``""``)."""
    return name.rpartition(".")[0]


def all_finite(tensors: Iterable[Tensor], nan_only: Iterable[Tensor] = ()) -> bool:
    """Whether the floating / complex ``tensors`` surely hold no NaN or ±inf and ``nan_only`` no NaN, by reductions.

    One read-only reduction a tensor and one synchronisation per device, where an entry-wise check
    (``isfinite(t).all()``) makes several passes: the 2-norms of the float32 / float64 tensors of a device and dtype
    in one ``torch._foreach_norm`` (GPT 1M, 66 parameters, 2 threads: 0.89 -> 0.20 ms wall; a sum a tensor runs a
    parallel region each), the sum of each other tensor (in float32 for half precision: no early overflow). True is
    certain: a finite norm or sum has no NaN or ±inf term, one that is not NaN no NaN term (a norm sums squares, so
    ±inf entries never make it NaN). False only says that a reduction is not finite (for ``nan_only``: is NaN),
    which a NaN or ±inf entry makes, but also an overflow of finite entries (or, in a sum, +inf and −inf in one
    ``nan_only`` tensor): the caller then checks the entries (and names the tensor).
    """
    reductions: dict[tuple[torch.device, bool], list[Tensor]] = {}
    for nan, group in ((False, tensors), (True, nan_only)):
        kinds: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in group:
            if (t.is_floating_point() or t.is_complex()) and t.numel():
                kinds.setdefault((t.device, t.dtype), []).append(t)
        for (device, dtype), ts in kinds.items():
            if dtype in (torch.float32, torch.float64):
                out = list(torch._foreach_norm(ts))
            else:
                out = [t.sum(dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else None) for t in ts]
            reductions.setdefault((device, nan), []).extend(out)
    return all(bool(torch.stack(s).isnan().logical_not().all() if nan else torch.stack(s).isfinite().all())
               for (_, nan), s in reductions.items())


def check_finite(what: str, tensors: Mapping[str, Tensor] | Tensor) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` (and the tensor) if any entry is NaN or infinite."""
    items = tensors.items() if isinstance(tensors, Mapping) else [("", tensors)]
    if all_finite(t for _, t in items):
        return
    for name, t in items:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            label = f"{what} {name!r}" if name else what
            raise NonFiniteError(f"{label} contains NaN or infinite values")
