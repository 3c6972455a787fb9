"""Fixtures built from tests/cases.py, and the ``gpu`` marker (skipped cleanly when CUDA is absent)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import pytest
import reference as ref
import torch
from cases import CASES, CASES_BY_NAME, Case
from forked import PRELOADED, Spawner
from torch import Tensor, nn

from fisherlab import structures
from fisherlab.engine import FisherEngine
from fisherlab.structures.base import FisherMatrix

# The test problems are tiny: with several intra-op threads, thread hand-off costs more than the arithmetic
# (small convolutions and batch norms run ~100× slower on a busy 2-core machine).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test marked ``@pytest.mark.gpu`` when no CUDA device is present."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@dataclass
class Problem:
    """A built case: the model, its data, the engine's likelihood and cached float64 references."""

    case: Case
    model: nn.Module
    X: Tensor
    y: Tensor
    _refs: dict[tuple, Tensor] = field(default_factory=dict, repr=False)

    @property
    def likelihood(self):
        return self.case.make_likelihood()

    @property
    def ref_likelihood(self) -> ref.RefLikelihood:
        return ref.RefLikelihood(self.case.likelihood, self.case.sigma)

    @property
    def data(self) -> tuple[Tensor, Tensor]:
        return self.X, self.y

    def engine(self, kind: str = "true", **kw: Any) -> FisherEngine:
        return FisherEngine(self.model, self.data, self.likelihood, kind=kind, **kw)

    def fisher(self, kind: str = "true", structure: str = "dense", *, engine_kw: dict | None = None,
               **options: Any) -> FisherMatrix:
        return structures.build(structure, self.engine(kind, **(engine_kw or {})), **options)

    def reference(self, kind: str, labels: Tensor | None = None, names: list[str] | None = None) -> Tensor:
        """The float64 brute-force Fisher of ``kind`` (cached unless it depends on sampled labels)."""
        if kind == "mc":
            return ref.fisher(kind, self.model, self.X, self.y, self.ref_likelihood, labels=labels, names=names)
        key = (kind, tuple(names) if names else None)
        if key not in self._refs:
            self._refs[key] = ref.fisher(kind, self.model, self.X, self.y, self.ref_likelihood, names=names)
        return self._refs[key]


@cache
def get_problem(name: str) -> Problem:
    """The built case ``name`` (built once per session; tests must not modify it)."""
    case = CASES_BY_NAME[name]
    return Problem(case, *case.build())


@pytest.fixture(params=[c.name for c in CASES])
def problem(request: pytest.FixtureRequest) -> Problem:
    """Every case of cases.CASES in turn."""
    return get_problem(request.param)


@pytest.fixture(scope="session")
def problems():
    """``problems(name)`` → the built case ``name`` (shared across tests; do not modify it)."""
    return get_problem


@pytest.fixture(scope="session")
def spawner() -> Iterator[Spawner]:
    """Children forked from one process per test worker that imported :data:`forked.PRELOADED` once (a fresh
    interpreter pays 8-9 CPU s for them), single-threaded, Agg plots, gloo on the loopback interface."""
    server = Spawner(PRELOADED, env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
                                     "GLOO_SOCKET_IFNAME": "lo"})
    yield server
    server.close()
