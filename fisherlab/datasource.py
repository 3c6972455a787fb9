"""One way to walk over data in chunks: tensors, a train split, or a DataLoader.

Every engine takes ``data`` as ``(X, y)`` tensors, a :class:`fisherlab.data.SplitData` (its training split), or
an iterable of ``(x, y)`` batches such as a ``torch.utils.data.DataLoader``. :class:`DataSource` re-chunks any
of them into pieces of at most ``chunk_size`` samples, moves them to the compute device and dtype, and checks
them once at the boundary. The order is the data's own order (a DataLoader must not shuffle if results are to
be reproducible).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from fisherlab.errors import InputError
from fisherlab.params import check_finite


class DataSource:
    """Chunked, checked access to ``(x, y)`` samples.

    Args:
        data: ``(X, y)`` with X of shape (N, *input_shape) and y of shape (N, ...); an object with ``X_train`` and
            ``y_train`` attributes; or an iterable of such batches (e.g. a DataLoader, re-iterable).
        device: Device the chunks are moved to.
        dtype: Floating dtype for floating inputs and floating targets (integer labels stay int64).
    """

    def __init__(self, data: Any, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if hasattr(data, "X_train") and hasattr(data, "y_train"):
            data = (data.X_train, data.y_train)
        self._tensors: tuple[Tensor, Tensor] | None = None
        self._iterable: Iterable | None = None
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            X, y = data
            if X.dim() == 0 or y.dim() == 0 or X.shape[0] != y.shape[0]:
                raise InputError(
                    f"inputs and targets must share their first (sample) dimension; got X {tuple(X.shape)} "
                    f"and y {tuple(y.shape)}"
                )
            if X.shape[0] == 0:
                raise InputError("the dataset is empty (0 samples)")
            self._tensors = (X, y)
        elif isinstance(data, Iterable) and not isinstance(data, (Tensor, str, bytes)):
            self._iterable = data
        else:
            raise InputError(
                f"data must be (X, y) tensors, a SplitData, or an iterable of (x, y) batches; got {type(data)}"
            )
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self._n: int | None = None if self._tensors is None else int(self._tensors[0].shape[0])

    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self._tensors is not None:
            yield self._tensors
            return
        for batch in self._iterable:  # type: ignore[union-attr]
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise InputError("each batch of the data iterable must be an (x, y) pair")
            x, y = batch[0], batch[1]
            if x.shape[0] != y.shape[0]:
                raise InputError(f"batch has {x.shape[0]} inputs but {y.shape[0]} targets")
            yield x, y

    def _prepare(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x = x.to(device=self.device, dtype=self.dtype if x.is_floating_point() else None)
        y = y.to(device=self.device, dtype=self.dtype if y.is_floating_point() else None)
        check_finite("input data", x)
        check_finite("targets", y)
        return x, y

    def chunks(self, chunk_size: int | None = None) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield ``(start, x, y)`` with at most ``chunk_size`` samples each; ``start`` is the global index."""
        if chunk_size is not None and chunk_size < 1:
            raise InputError(f"chunk_size must be a positive integer; got {chunk_size}")
        start = 0
        for X, y in self._batches():
            step = chunk_size or max(int(X.shape[0]), 1)
            for i in range(0, X.shape[0], step):
                xc, yc = self._prepare(X[i: i + step], y[i: i + step])
                yield start, xc, yc
                start += xc.shape[0]
        if start == 0:
            raise InputError("the dataset is empty (0 samples)")
        self._n = start

    def __len__(self) -> int:
        """N, the number of samples (one pass over an iterable the first time it is asked)."""
        if self._n is None:
            self._n = sum(int(x.shape[0]) for x, _ in self._batches())
            if self._n == 0:
                raise InputError("the dataset is empty (0 samples)")
        return self._n

    def first(self, n: int = 2) -> tuple[Tensor, Tensor]:
        """The first ``n`` samples (for shape checks), prepared like every chunk."""
        for X, y in self._batches():
            if X.shape[0]:
                return self._prepare(X[:n], y[:n])
        raise InputError("the dataset is empty (0 samples)")
