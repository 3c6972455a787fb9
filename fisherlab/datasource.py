"""One way to walk over data in chunks: tensors, a train split, or a DataLoader.

Every engine takes ``data`` as ``(X, y)`` tensors, a :class:`fisherlab.data.SplitData` (its training split), or
a re-iterable of ``(x, y)`` batches such as a ``torch.utils.data.DataLoader``. :class:`DataSource` re-chunks any
of them into pieces of at most ``chunk_size`` samples, moves them to the compute device and dtype, and checks
them once at the boundary.

**Every pass must see the same samples in the same order.** fisherlab passes over the data several times and
pairs what it computed in one pass with the samples of the next (Monte-Carlo labels drawn in one pass are used
in the next; the measured KL compares outputs of two passes). A re-iterable is therefore fingerprinted batch by
batch on its first pass — the batch size and, per sample, fixed random projections of its inputs and targets —
and every later pass is compared with it: a ``DataLoader(shuffle=True)``, a random sampler or random augmentation
is refused with an :class:`~fisherlab.errors.InputError` (use ``shuffle=False`` or pass tensors), and so is a
one-shot iterator such as a generator (consumed by the first pass).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from fisherlab.checks import check_device, check_dtype
from fisherlab.errors import InputError
from fisherlab.params import check_finite

#: What to do about data whose batches change between passes.
SAME_ORDER = ("fisherlab passes over the data several times and pairs the samples of one pass with those of the "
              "next, so every pass must give the same batches in the same order: use DataLoader(..., shuffle=False) "
              "without random augmentation, or pass (X, y) tensors")


class DataSource:
    """Chunked, checked access to ``(x, y)`` samples.

    Args:
        data: ``(X, y)`` with X of shape (N, *input_shape) and y of shape (N, ...); an object with ``X_train`` and
            ``y_train`` attributes; or a re-iterable of such batches (e.g. a DataLoader without shuffling) that
            gives the same batches on every pass.
        device: Device the chunks are moved to.
        dtype: Floating dtype for floating inputs and floating targets (integer labels stay int64).

    Raises:
        InputError: Data of another type, mismatched sample counts, an empty dataset, a one-shot iterator, or (on a
            later pass) a re-iterable whose batches changed since its first pass.
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
        elif isinstance(data, Iterator):
            raise InputError(
                f"data is a one-shot iterator ({type(data).__name__}): it is consumed by the first pass over it, and "
                "fisherlab passes over the data several times. Pass a list of (x, y) batches, a DataLoader "
                "(shuffle=False) or (X, y) tensors"
            )
        elif isinstance(data, Iterable) and not isinstance(data, (Tensor, str, bytes)):
            self._iterable = data
        else:
            raise InputError(
                f"data must be (X, y) tensors, a SplitData, or an iterable of (x, y) batches; got {type(data)}"
            )
        self.device = check_device(device) if device is not None else None
        self.dtype = check_dtype(dtype)
        self._n: int | None = None if self._tensors is None else int(self._tensors[0].shape[0])
        self._prints: list[Tensor] = []  # fingerprint of each batch of the first pass (iterables only)
        self._num_batches: int | None = None  # batches of the first complete pass
        self._last_iterator: Any = None  # the iterator of the latest pass (a re-iterable gives a new one each)
        self._weights: dict[tuple[int, torch.device], Tensor] = {}

    # ------------------------------------------------------------------------------------------ passes
    def _batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass over the raw batches; an iterable's batches are compared with its first pass."""
        if self._tensors is not None:
            yield self._tensors
            return
        it = iter(self._iterable)  # type: ignore[arg-type]
        if not isinstance(self._iterable, DataLoader):  # (a DataLoader with persistent workers reuses its iterator)
            if it is self._last_iterator:
                raise InputError(f"the data iterable ({type(self._iterable).__name__}) returns the same iterator on "
                                 f"every pass, so the first pass consumed it. {SAME_ORDER}")
            self._last_iterator = it
        count = 0
        for batch in it:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise InputError("each batch of the data iterable must be an (x, y) pair")
            x, y = batch[0], batch[1]
            if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
                raise InputError(f"each batch of the data iterable must be a pair of tensors; got "
                                 f"({type(x).__name__}, {type(y).__name__})")
            if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
                raise InputError(f"batch has {x.shape[0] if x.dim() else 0} inputs but "
                                 f"{y.shape[0] if y.dim() else 0} targets")
            self._check_same(count, x, y)
            count += 1
            yield x, y
        expected = len(self._prints) if self._num_batches is None else self._num_batches
        if count < expected or self._num_batches is not None and count != expected:
            raise InputError(f"the data iterable gave {count} batches on this pass but {expected} on an earlier one "
                             f"(it was consumed, or changed, by an earlier pass). {SAME_ORDER}")
        self._num_batches = count

    def _check_same(self, i: int, x: Tensor, y: Tensor) -> None:
        """Record (first pass) or compare (later passes) the fingerprint of batch ``i``."""
        fp = self._fingerprint(x, y)
        if i >= len(self._prints):
            self._prints.append(fp)
            return
        old = self._prints[i]
        same = fp.shape == old.shape and bool(torch.allclose(fp, old, rtol=1e-5, atol=1e-8 * float(old.abs().max())))
        if not same:
            raise InputError(f"the data iterable gave a different batch {i} on this pass than on its first "
                             f"(shuffled, sampled at random or augmented at random?). {SAME_ORDER}")

    def _fingerprint(self, x: Tensor, y: Tensor) -> Tensor:
        """Batch size, then per sample a fixed random projection of its inputs and one of its targets (CPU float64)."""
        parts = [torch.tensor([float(x.shape[0])], dtype=torch.float64)]
        with torch.no_grad():
            for t in (x, y):
                flat = t.detach().reshape(t.shape[0], -1)
                dt = torch.float32 if flat.device.type == "mps" else torch.float64
                key = (flat.shape[1], flat.device)
                if key not in self._weights:
                    gen = torch.Generator().manual_seed(flat.shape[1])
                    self._weights[key] = torch.randn(flat.shape[1], generator=gen, dtype=torch.float64).to(flat.device)
                proj = flat.to(dt) @ self._weights[key].to(dt)
                parts.append(proj.cpu().double().nan_to_num(0.0, 1e300, -1e300))
        return torch.cat(parts)

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
