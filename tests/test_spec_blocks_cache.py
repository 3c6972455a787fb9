"""ParamSpec.blocks forms its index sets once per spec and grouping (issue 15: a P-long index per structure).

Reference: the flat index sets written out from the parameter shapes alone (offsets by running sums of numels).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fisherlab.errors import InputError
from fisherlab.params import ParamSpec


def test_blocks_are_the_index_sets_of_the_shapes_formed_once() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False), nn.LayerNorm(2))
    spec = ParamSpec.from_model(model)
    start, tensors, layers = 0, {}, {}
    for name, p in model.named_parameters():
        tensors[name] = torch.arange(start, start + p.numel())
        layers.setdefault(name.rpartition(".")[0], []).append(tensors[name])
        start += p.numel()
    expected = {"tensor": tensors, "layer": {k: torch.cat(v) for k, v in layers.items()}}
    for by, sets in expected.items():
        first = spec.blocks(by)
        assert list(first) == list(sets) and all(torch.equal(first[k], v) for k, v in sets.items()), by
        first.pop(next(iter(first)))  # the caller's dict is its own
        again = spec.blocks(by)
        assert list(again) == list(sets) and all(again[k] is spec.blocks(by)[k] for k in again), by
    assert spec == ParamSpec.from_model(model) and hash(spec) == hash(ParamSpec.from_model(model))
    with pytest.raises(InputError, match="unknown block grouping 'unit'"):
        spec.blocks("unit")
