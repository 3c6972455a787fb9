"""Fisher structures on one interface (:class:`FisherMatrix`), and the registry that builds them from an engine.

``STRUCTURES`` maps a structure name to a builder ``(engine, **options) -> FisherMatrix``; :func:`register`
adds one (KFAC, EKFAC, unit-wise and low-rank register themselves the same way).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from fisherlab.engine import FisherEngine
from fisherlab.errors import InputError
from fisherlab.structures.base import FisherMatrix
from fisherlab.structures.block import BlockDiagonalFisher
from fisherlab.structures.dense import DenseFisher
from fisherlab.structures.diagonal import DiagonalFisher
from fisherlab.structures.ekfac import EKFACFisher
from fisherlab.structures.implicit import ImplicitFisher
from fisherlab.structures.kfac import KFACFisher
from fisherlab.structures.lowrank import LowRankFisher
from fisherlab.structures.unitwise import UnitwiseFisher

Builder = Callable[..., FisherMatrix]

STRUCTURES: dict[str, Builder] = {
    "dense": DenseFisher.from_engine,
    "block": BlockDiagonalFisher.from_engine,
    "diag": DiagonalFisher.from_engine,
    "implicit": ImplicitFisher.from_engine,
    "kfac": KFACFisher.from_engine,
    "ekfac": EKFACFisher.from_engine,
    "unit": UnitwiseFisher.from_engine,
    "lowrank": LowRankFisher.from_engine,
}


def register(name: str, builder: Builder) -> None:
    """Make ``fisher(..., structure=name)`` call ``builder(engine, **options)``."""
    STRUCTURES[name] = builder


def structure_options(structure: str) -> list[str] | None:
    """The keyword options the builder of ``structure`` takes (None: it takes any, ``**kwargs``)."""
    params = list(inspect.signature(STRUCTURES[structure]).parameters.values())[1:]  # after the engine
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in named]


def build(structure: str, engine: FisherEngine, **options: object) -> FisherMatrix:
    """Build ``structure`` from ``engine``.

    Raises:
        InputError: An unknown structure (the valid ones are listed) or an option the structure does not take (its
            options are listed).
    """
    if structure not in STRUCTURES:
        raise InputError(f"unknown Fisher structure {structure!r}; valid: {sorted(STRUCTURES)}")
    valid = structure_options(structure)
    unknown = [k for k in options if valid is not None and k not in valid]
    if unknown:
        raise InputError(f"unknown option(s) {unknown} of the {structure!r} structure; its options: "
                         f"{valid if valid else 'none'}")
    return STRUCTURES[structure](engine, **options)


__all__ = ["STRUCTURES", "BlockDiagonalFisher", "DenseFisher", "DiagonalFisher", "EKFACFisher", "FisherMatrix",
           "ImplicitFisher", "KFACFisher", "LowRankFisher", "UnitwiseFisher", "build", "register",
           "structure_options"]
