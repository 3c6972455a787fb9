"""The front door: ``fisher(model, data, ...)`` returns a Fisher matrix in the requested structure."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fisherlab import structures
from fisherlab.engine import FisherEngine
from fisherlab.likelihoods import Likelihood
from fisherlab.structures.base import FisherMatrix
from fisherlab.vocabulary import FisherKind


def fisher(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    kind: str | FisherKind = "true",
    structure: str = "dense",
    params: list[str] | None = None,
    mc_samples: int = 1,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    progress: bool | None = None,
    **options: Any,
) -> FisherMatrix:
    """A Fisher matrix of ``model`` on ``data`` (docs/method.md).

    Args:
        model: Any ``nn.Module`` mapping (N, *input_shape) → (N, C), in eval mode if it has batch-norm or dropout.
        data: ``(X, y)`` tensors, a :class:`~fisherlab.data.SplitData` (its training split), or a DataLoader.
        likelihood: ``"categorical"`` (cross-entropy), ``"gaussian"`` (squared error / 2σ², σ = 1; pass
            ``likelihoods.Gaussian(sigma)`` for another σ), ``"bernoulli"``, or a :class:`Likelihood`.
        kind: ``"true"`` (closed-form expectation), ``"mc"`` (``mc_samples`` sampled labels per input,
            seeded by ``seed``), ``"empirical"`` (observed labels) or ``"ggn"``.
        mc_samples: S, labels sampled per input for ``kind="mc"``.
        seed: Seed of the Monte-Carlo label draws (same seed, same matrix).
        structure: One of ``fisherlab.structures.STRUCTURES``: ``"dense"``, ``"block"`` (option ``by="tensor"`` or
            ``"layer"``), ``"diag"``, ``"implicit"``, and the approximations registered by later modules.
        params: Parameter names to include (default: every trainable parameter, in model order).
        dtype: Compute dtype; default the model's. Use ``torch.float64`` for reference computations.
        device: Compute device; default the model's.
        chunk_size: Samples per chunk (bounds peak memory; default from ``memory_budget``).
        memory_budget: Bytes any dense object may take; default half the available memory.
        progress: Progress bars (``None``: only on a terminal).
        **options: Structure-specific options.

    Returns:
        A :class:`~fisherlab.structures.FisherMatrix` of shape (P, P).

    Example:
        >>> F = fisher(model, (X, y), "categorical", kind="true", structure="dense", dtype=torch.float64)
        >>> F.to_dense().shape, F.trace()
    """
    engine = FisherEngine(
        model, data, likelihood, kind=kind, params=params, mc_samples=mc_samples, seed=seed, dtype=dtype,
        device=device, chunk_size=chunk_size, memory_budget=memory_budget, progress=progress,
    )
    return structures.build(structure, engine, **options)
