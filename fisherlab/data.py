"""Datasets for fisherlab: small, seeded, standardized train/test splits.

Every loader returns a :class:`SplitData`. Conventions shared by all loaders:

- Inputs ``X`` are floating tensors of shape ``(N, *input_shape)``, standardized with statistics of the
  *training* split only (the test split is transformed with the same mean and standard deviation) — except
  token data (``meta["layout"] == "tokens"``: :func:`make_sort_task`, :func:`make_sort_lm`, :func:`load_text`),
  whose ``X`` are int64 token ids of shape ``(N, T)`` in ``[0, meta["vocab"])``.
- Targets depend on the task:

  ========== ======================= ==========================================
  task       dtype                   shape / values
  ========== ======================= ==========================================
  multiclass ``torch.int64``         ``(N,)``, labels in ``[0, n_outputs)``; for token data also
                                     ``(N, T)``: the next token at each position, :data:`IGNORE_INDEX`
                                     (−100) where a position has no target
  binary     floating (as ``X``)     ``(N, 1)``, values in ``{0, 1}``
  regression floating (as ``X``)     ``(N, n_outputs)``
  ========== ======================= ==========================================

- Randomness (splits, synthetic teachers, minibatch order) comes from local generators built from the
  ``seed`` argument; the global ``torch``, ``numpy`` and ``random`` states are never changed.
- Nothing is downloaded. ``digits`` ships with scikit-learn, ``mnist1d``, ``sort`` and ``sort-lm`` are
  generated procedurally, and ``mnist`` / ``cifar10`` / ``text`` are read from files the user already has on disk.
- ``meta`` holds only JSON-friendly values (str, int, float, bool) so it can be written into results
  files as is.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import inspect
import math
import pickle
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fisherlab.errors import InputError
from fisherlab.vocabulary import IGNORE_INDEX

__all__ = [
    "DATASETS",
    "DIGITS_STD_FLOOR",
    "IGNORE_INDEX",
    "SplitData",
    "TASKS",
    "iterate_minibatches",
    "load",
    "load_cifar10",
    "load_digits",
    "load_mnist1d",
    "load_mnist_idx",
    "load_text",
    "make_sort_lm",
    "make_sort_task",
    "make_synthetic",
]

TASKS: tuple[str, ...] = ("multiclass", "binary", "regression")
"""Valid values of :attr:`SplitData.task`."""

DATASETS: tuple[str, ...] = (
    "digits",
    "mnist1d",
    "synthetic-regression",
    "synthetic-binary",
    "synthetic-multiclass",
    "mnist",
    "cifar10",
    "sort",
    "sort-lm",
    "text",
)
"""Names accepted by :func:`load`."""


DIGITS_STD_FLOOR: float = 0.05
"""Floor on the per-pixel training standard deviation used to standardize ``digits``.

Pixels are first scaled to ``[0, 1]``. A few border pixels of the 8x8 digits are (almost) always zero in
the training split; their standard deviation is 0 or about 1e-3, and dividing by it would map a rare
non-zero test pixel to values in the hundreds. With a floor of 0.05 (typical pixel standard deviations are
0.2 to 0.45) such a pixel stays below about 20 and ordinary pixels are unaffected.
"""

_LAYOUTS = {
    "digits": ("flat", "image"),
    "mnist1d": ("flat", "channels", "sequence"),
    "mnist": ("flat", "image"),
    "cifar10": ("image", "flat"),
}


# ----------------------------------------------------------------------------------------------------------
# The container
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SplitData:
    """A train/test split of one dataset, with the facts a model builder needs.

    Attributes:
        X_train: Training inputs, floating, shape ``(n_train, *input_shape)``; for ``meta["layout"] == "tokens"``
            int64 token ids of shape ``(n_train, T)`` in ``[0, meta["vocab"])``.
        y_train: Training targets: ``int64`` ``(n_train,)`` for multiclass (token data also ``(n_train, T)``, the
            target at each position in ``[0, n_outputs)`` or :data:`IGNORE_INDEX`), floating ``(n_train, 1)`` in
            ``{0, 1}`` for binary, floating ``(n_train, n_outputs)`` for regression.
        X_test: Test inputs, same dtype and per-sample shape as ``X_train``, shape ``(n_test, *input_shape)``.
        y_test: Test targets, same convention as ``y_train``.
        name: Dataset name (one of :data:`DATASETS`, or a free name for hand-made splits).
        task: One of ``"multiclass"``, ``"binary"``, ``"regression"``.
        n_outputs: Number of network outputs: classes for multiclass, 1 for binary, target dimension for
            regression.
        input_shape: Per-sample input shape, e.g. ``(64,)``, ``(1, 8, 8)``, ``(1, 40)`` or ``(40, 1)``.
        meta: JSON-friendly facts: ``seed``, ``source``, ``layout``, ``test_fraction``, standardization, ...

    Equality is identity (``eq=False``): comparing tensors field by field has no single truth value.
    """

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    name: str
    task: str
    n_outputs: int
    input_shape: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check that tensors, task and sizes agree; raise :class:`InputError` otherwise."""
        if self.task not in TASKS:
            raise InputError(f"SplitData.task must be one of {TASKS}, got {self.task!r}")
        if not isinstance(self.n_outputs, int) or self.n_outputs < 1:
            raise InputError(f"SplitData.n_outputs must be a positive int, got {self.n_outputs!r}")
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        for split in ("train", "test"):
            X = getattr(self, f"X_{split}")
            y = getattr(self, f"y_{split}")
            if not (isinstance(X, torch.Tensor) and isinstance(y, torch.Tensor)):
                raise InputError(f"SplitData.X_{split} and y_{split} must be torch tensors")
            tokens = self.meta.get("layout") == "tokens"
            if tokens:
                _check_tokens(X, y, self.meta, self.task, self.n_outputs, split)
            elif not X.is_floating_point():
                raise InputError(f"SplitData.X_{split} must be floating point, got {X.dtype}")
            if tuple(X.shape[1:]) != self.input_shape:
                raise InputError(
                    f"SplitData.X_{split} has per-sample shape {tuple(X.shape[1:])}, "
                    f"but input_shape is {self.input_shape}"
                )
            if X.shape[0] != y.shape[0]:
                raise InputError(
                    f"SplitData.X_{split} has {X.shape[0]} samples but y_{split} has {y.shape[0]}"
                )
            if self.task == "multiclass":
                if y.dtype != torch.int64 or not (y.dim() == 1 or tokens and y.shape == X.shape):
                    raise InputError(
                        f"SplitData.y_{split} must be int64 of shape (N,) for multiclass (or (N, T) = "
                        f"{tuple(X.shape)} for token data), got {y.dtype} {tuple(y.shape)}"
                    )
            else:
                want = 1 if self.task == "binary" else self.n_outputs
                if not y.is_floating_point() or y.dim() != 2 or y.shape[1] != want:
                    raise InputError(
                        f"SplitData.y_{split} must be floating of shape (N, {want}) for {self.task}, "
                        f"got {y.dtype} {tuple(y.shape)}"
                    )
        if self.task == "binary" and self.n_outputs != 1:
            raise InputError(f"SplitData.n_outputs must be 1 for binary, got {self.n_outputs}")

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return int(self.X_train.shape[0])

    @property
    def n_test(self) -> int:
        """Number of test samples."""
        return int(self.X_test.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SplitData:
        """Return a copy on another device and/or with another floating dtype.

        Args:
            device: Target device; ``None`` keeps the current one.
            dtype: Floating dtype for the inputs, and for the targets of binary and regression tasks.
                Multiclass labels and token ids stay ``int64``. ``None`` keeps the current dtype.

        Returns:
            A new :class:`SplitData`; ``self`` is unchanged.

        Raises:
            InputError: If ``dtype`` is not a floating dtype.
        """
        if dtype is not None and not dtype.is_floating_point:
            raise InputError(f"SplitData.to: dtype must be a floating dtype, got {dtype}")
        y_dtype = None if self.task == "multiclass" else dtype
        x_dtype = None if self.meta.get("layout") == "tokens" else dtype
        return dataclasses.replace(
            self,
            X_train=self.X_train.to(device=device, dtype=x_dtype),
            y_train=self.y_train.to(device=device, dtype=y_dtype),
            X_test=self.X_test.to(device=device, dtype=x_dtype),
            y_test=self.y_test.to(device=device, dtype=y_dtype),
            meta=dict(self.meta),
        )

    def train_subset(self, n: int) -> SplitData:
        """Return a copy whose training split keeps only the first ``n`` samples (test split unchanged).

        Args:
            n: Number of training samples to keep, ``1 <= n <= n_train``.

        Raises:
            InputError: If ``n`` is out of range.
        """
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.n_train:
            raise InputError(f"train_subset: n must be an int in [1, {self.n_train}], got {n!r}")
        meta = dict(self.meta)
        meta["train_subset"] = n
        return dataclasses.replace(self, X_train=self.X_train[:n], y_train=self.y_train[:n], meta=meta)


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def _check_tokens(X: torch.Tensor, y: torch.Tensor, meta: dict[str, Any], task: str, n_outputs: int,
                  split: str) -> None:
    """Token data: X int64 (N, T) ids in [0, meta["vocab"]); per-position targets in [0, n_outputs) or −100."""
    if X.dtype != torch.int64 or X.dim() != 2:
        raise InputError(f"SplitData.X_{split} of layout 'tokens' must be int64 token ids of shape (N, T), got "
                         f"{X.dtype} {tuple(X.shape)}")
    vocab = meta.get("vocab")
    if not isinstance(vocab, int) or vocab < 1:
        raise InputError(f"SplitData.meta['vocab'] of layout 'tokens' must be a positive int, got {vocab!r}")
    if X.numel() and not 0 <= int(X.min()) <= int(X.max()) < vocab:
        raise InputError(f"SplitData.X_{split} holds token ids from {int(X.min())} to {int(X.max())}, outside "
                         f"[0, vocab = {vocab})")
    if task == "multiclass" and y.dtype == torch.int64 and y.dim() == 2 and y.numel():
        bad = (y != IGNORE_INDEX) & ((y < 0) | (y >= n_outputs))
        if bool(bad.any()):
            raise InputError(f"SplitData.y_{split} holds per-position target {int(y[bad][0])}; targets are in "
                             f"[0, n_outputs = {n_outputs}) or IGNORE_INDEX = {IGNORE_INDEX}")


def _check_dtype(dtype: torch.dtype, where: str) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"{where}: dtype must be a floating torch dtype, got {dtype!r}")


def _check_fraction(test_fraction: float, where: str) -> None:
    if not isinstance(test_fraction, (int, float)) or not 0.0 < float(test_fraction) < 1.0:
        raise InputError(f"{where}: test_fraction must be in (0, 1), got {test_fraction!r}")


def _check_layout(layout: str, dataset: str) -> None:
    valid = _LAYOUTS[dataset]
    if layout not in valid:
        raise InputError(f"{dataset}: unknown layout {layout!r}; valid layouts are {valid}")


def _check_int(value: Any, name: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _n_test(n: int, test_fraction: float, where: str) -> int:
    """``round(n · test_fraction)``, or InputError unless both splits keep at least one of the ``n`` samples."""
    n_test = int(round(n * test_fraction))
    if not 1 <= n_test <= n - 1:
        raise InputError(f"{where}: test_fraction={test_fraction} leaves {n_test} of {n} samples for testing; both "
                         "splits need at least one sample")
    return n_test


def _token_split(X: torch.Tensor, y: torch.Tensor, train: torch.Tensor, test: torch.Tensor, name: str,
                 n_outputs: int, meta: dict[str, Any]) -> SplitData:
    """The multiclass token :class:`SplitData` of rows ``train`` and ``test`` of (X, y), ``meta`` plus the layout."""
    return SplitData(X_train=X[train], y_train=y[train], X_test=X[test], y_test=y[test], name=name,
                     task="multiclass", n_outputs=n_outputs, input_shape=(X.shape[1],),
                     meta={"layout": "tokens", **meta})


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of indices ``0..len(y)-1``.

    Each class contributes ``round(n_c * test_fraction)`` samples to the test split (at least one sample of
    every class with two or more members stays in training). Both index arrays are shuffled.
    """
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        n_test = min(n_test, len(idx) - 1) if len(idx) > 1 else n_test
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _standardize(
    train: np.ndarray, test: np.ndarray, axis: tuple[int, ...], floor: float
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Standardize with the training mean/std over ``axis`` (std floored at ``floor``), in float64.

    Returns the two standardized arrays and the min/max of the std actually used (for ``meta``).
    """
    train = train.astype(np.float64, copy=False)
    test = test.astype(np.float64, copy=False)
    mean = train.mean(axis=axis, keepdims=True)
    std = np.maximum(train.std(axis=axis, keepdims=True), floor)
    return (train - mean) / std, (test - mean) / std, float(std.min()), float(std.max())


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _labels(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).astype(np.int64))


# ----------------------------------------------------------------------------------------------------------
# scikit-learn digits
# ----------------------------------------------------------------------------------------------------------
def _ten_class_split(name: str, Xtr: np.ndarray, ytr: np.ndarray, Xte: np.ndarray, yte: np.ndarray,
                     shape: tuple[int, ...], dtype: torch.dtype, meta: dict) -> SplitData:
    """The SplitData of a 10-class image or signal set: inputs reshaped to (N, *shape) in ``dtype``, int64 labels."""
    return SplitData(
        X_train=_tensor(Xtr.reshape(-1, *shape), dtype),
        y_train=_labels(ytr),
        X_test=_tensor(Xte.reshape(-1, *shape), dtype),
        y_test=_labels(yte),
        name=name,
        task="multiclass",
        n_outputs=10,
        input_shape=shape,
        meta=meta,
    )


def _digits_table() -> np.ndarray:
    """scikit-learn's bundled ``datasets/data/digits.csv.gz`` as float64 (1797, 65): 64 pixels (0..16), the label.

    Read as :func:`sklearn.datasets.load_digits` reads it (``np.loadtxt`` of the gzipped CSV, comma-delimited),
    but found with :func:`importlib.util.find_spec` without importing scikit-learn (≈ 1 CPU s of imports).

    Raises:
        InputError: scikit-learn is not installed or its bundled file is missing.
    """
    spec = importlib.util.find_spec("sklearn")
    roots = [] if spec is None or spec.submodule_search_locations is None else spec.submodule_search_locations
    for root in roots:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, mode="rt", encoding="utf-8") as f:
                return np.loadtxt(f, delimiter=",")
    raise InputError("load_digits reads scikit-learn's bundled datasets/data/digits.csv.gz: install scikit-learn")


def load_digits(
    seed: int = 0, test_fraction: float = 0.25, dtype: torch.dtype = torch.float32, layout: str = "flat"
) -> SplitData:
    """Load scikit-learn's 8x8 handwritten digits (1,797 samples, 10 classes; bundled, no download).

    Pixels (0..16) are scaled to ``[0, 1]``, then standardized per pixel with the training mean and
    standard deviation, the latter floored at :data:`DIGITS_STD_FLOOR`. The split is stratified by class
    and determined by ``seed``.

    Args:
        seed: Seed of the split.
        test_fraction: Fraction of each class put in the test split, in ``(0, 1)``.
        dtype: Floating dtype of the inputs.
        layout: ``"flat"`` for inputs of shape ``(N, 64)``, ``"image"`` for ``(N, 1, 8, 8)``.

    Returns:
        A multiclass :class:`SplitData` with ``n_outputs=10`` and ``int64`` labels of shape ``(N,)``; with
        the defaults ``n_train=1347`` and ``n_test=450``.

    Raises:
        InputError: On an unknown layout, a non-floating dtype or a fraction outside ``(0, 1)``.
    """
    where = "load_digits"
    _check_layout(layout, "digits")
    _check_dtype(dtype, where)
    _check_fraction(test_fraction, where)
    table = _digits_table()
    X = table[:, :-1] / 16.0
    y = table[:, -1].astype(np.int64)
    tr, te = _stratified_split(y, float(test_fraction), seed)
    Xtr, Xte, smin, _ = _standardize(X[tr], X[te], axis=(0,), floor=DIGITS_STD_FLOOR)
    shape: tuple[int, ...] = (64,) if layout == "flat" else (1, 8, 8)
    meta = {
        "seed": seed,
        "source": "sklearn.datasets.load_digits (its digits.csv.gz)",
        "layout": layout,
        "test_fraction": float(test_fraction),
        "standardization": f"per pixel, train statistics, std floored at {DIGITS_STD_FLOOR}",
        "n_std_floored": int(np.sum(X[tr].std(axis=0) < DIGITS_STD_FLOOR)),
    }
    return _ten_class_split("digits", Xtr, y[tr], Xte, y[te], shape, dtype, meta)


# ----------------------------------------------------------------------------------------------------------
# MNIST-1D (procedural)
# ----------------------------------------------------------------------------------------------------------
def load_mnist1d(
    n_samples: int = 4000,
    seed: int = 0,
    test_fraction: float = 0.2,
    dtype: torch.dtype = torch.float32,
    layout: str = "flat",
) -> SplitData:
    """Generate MNIST-1D (Greydanus, 2020) procedurally with the ``mnist1d`` package; never downloads.

    Calls ``mnist1d.data.make_dataset`` with ``num_samples=n_samples`` and ``seed=seed`` (4,000 samples take
    about a second). ``make_dataset`` draws ``n_samples // 10`` signals per class, so the total is rounded
    down to a multiple of 10. It seeds Python's and NumPy's global generators; their states are saved and
    restored around the call, so the caller's global RNG state is unchanged. The package's own train/test
    cut is discarded: all samples are pooled and split again, stratified by class, with ``seed`` and
    ``test_fraction``. Signals (length 40) are standardized with a single scalar mean and standard deviation
    of the training split (one statistic for all positions keeps the signal translation-equivariant).

    Args:
        n_samples: Number of signals to generate (rounded down to a multiple of 10), at least 10.
        seed: Seed of the generator and of the split.
        test_fraction: Fraction of each class put in the test split, in ``(0, 1)``.
        dtype: Floating dtype of the inputs.
        layout: ``"flat"`` → ``(N, 40)`` (MLP), ``"channels"`` → ``(N, 1, 40)`` (Conv1d),
            ``"sequence"`` → ``(N, 40, 1)`` (LSTM with ``batch_first=True``).

    Returns:
        A multiclass :class:`SplitData` with ``n_outputs=10`` and ``int64`` labels of shape ``(N,)``.

    Raises:
        ImportError: If the ``mnist1d`` package is not installed.
        InputError: On an unknown layout, bad ``n_samples``, dtype or fraction.
    """
    where = "load_mnist1d"
    _check_layout(layout, "mnist1d")
    _check_dtype(dtype, where)
    _check_fraction(test_fraction, where)
    n_samples = _check_int(n_samples, "n_samples", where, 10)
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_mnist1d needs the 'mnist1d' package (pip install mnist1d, or pip install -e '.[dev]'); "
            f"importing it failed: {exc}"
        ) from exc

    args = get_dataset_args()
    args.num_samples = n_samples
    args.seed = seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    X = np.concatenate([raw["x"], raw["x_test"]]).astype(np.float64)
    y = np.concatenate([raw["y"], raw["y_test"]]).astype(np.int64)
    length = X.shape[1]
    tr, te = _stratified_split(y, float(test_fraction), seed)
    Xtr, Xte, _, _ = _standardize(X[tr], X[te], axis=(0, 1), floor=1e-12)
    shape = {"flat": (length,), "channels": (1, length), "sequence": (length, 1)}[layout]
    meta = {
        "seed": seed,
        "source": "mnist1d.data.make_dataset (generated)",
        "layout": layout,
        "test_fraction": float(test_fraction),
        "n_requested": n_samples,
        "n_generated": int(len(y)),
        "standardization": "scalar mean/std of the training split",
    }
    return _ten_class_split("mnist1d", Xtr, y[tr], Xte, y[te], shape, dtype, meta)


# ----------------------------------------------------------------------------------------------------------
# Synthetic teacher problems
# ----------------------------------------------------------------------------------------------------------
def make_synthetic(
    task: str,
    n_samples: int = 512,
    n_features: int = 10,
    n_outputs: int | None = None,
    noise: float = 0.1,
    seed: int = 0,
    test_fraction: float = 0.25,
    dtype: torch.dtype = torch.float32,
) -> SplitData:
    """Draw a seeded synthetic problem from a linear teacher.

    Inputs are ``X ~ N(0, I)`` of shape ``(n_samples, n_features)``; the teacher is
    ``W* ~ N(0, 1/n_features)`` of shape ``(n_features, n_outputs)`` (so ``X W*`` has unit variance per
    output), plus for classification a bias ``b* ~ N(0, 0.1^2)``. With ``E ~ N(0, I)``:

    - ``"regression"``: ``y = X W* + noise * E``, floating ``(N, n_outputs)``.
    - ``"binary"``: ``y ~ Bernoulli(sigmoid(3 (X W* + b*) + noise * E))``, floating ``(N, 1)`` in ``{0, 1}``.
    - ``"multiclass"``: ``y ~ Categorical(softmax(3 (X W* + b*) + noise * E))``, ``int64`` ``(N,)``.

    The factor 3 makes the teacher confident enough to be learnable. All draws come from one local
    ``torch.Generator`` seeded with ``seed`` (in float64, then cast to ``dtype``); the split is a seeded
    random permutation with ``round(n_samples * test_fraction)`` test samples. Inputs are not
    re-standardized (they are already standard normal).

    Args:
        task: ``"regression"``, ``"binary"`` or ``"multiclass"``.
        n_samples: Total number of samples, at least 2.
        n_features: Input dimension.
        n_outputs: Output dimension for regression (default 1), number of classes for multiclass
            (default 3, at least 2); must be 1 (or ``None``) for binary.
        noise: Standard deviation of the Gaussian noise on targets (regression) or logits (classification).
        seed: Seed of the teacher, the samples and the split.
        test_fraction: Fraction of samples put in the test split, in ``(0, 1)``.
        dtype: Floating dtype of the inputs (and of binary/regression targets).

    Returns:
        A :class:`SplitData` named ``"synthetic-<task>"`` with ``input_shape=(n_features,)``.

    Raises:
        InputError: On an unknown task or out-of-range arguments.
    """
    where = "make_synthetic"
    if task not in TASKS:
        raise InputError(f"{where}: unknown task {task!r}; valid tasks are {TASKS}")
    _check_dtype(dtype, where)
    _check_fraction(test_fraction, where)
    n_samples = _check_int(n_samples, "n_samples", where, 2)
    n_features = _check_int(n_features, "n_features", where, 1)
    if not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise InputError(f"{where}: noise must be a finite number >= 0, got {noise!r}")
    default_outputs = {"regression": 1, "binary": 1, "multiclass": 3}[task]
    n_outputs = default_outputs if n_outputs is None else _check_int(n_outputs, "n_outputs", where, 1)
    if task == "binary" and n_outputs != 1:
        raise InputError(f"{where}: binary tasks have n_outputs=1, got {n_outputs}")
    if task == "multiclass" and n_outputs < 2:
        raise InputError(f"{where}: multiclass tasks need n_outputs >= 2 classes, got {n_outputs}")
    n_test = _n_test(n_samples, test_fraction, where)

    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    W = torch.randn(n_features, n_outputs, generator=g, dtype=f64) / math.sqrt(n_features)
    b = 0.1 * torch.randn(n_outputs, generator=g, dtype=f64)
    X = torch.randn(n_samples, n_features, generator=g, dtype=f64)
    E = torch.randn(n_samples, n_outputs, generator=g, dtype=f64)
    if task == "regression":
        y = X @ W + noise * E
    else:
        logits = 3.0 * (X @ W + b) + noise * E
        if task == "binary":
            y = torch.bernoulli(torch.sigmoid(logits), generator=g)
        else:
            y = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=g).squeeze(1)
    perm = torch.randperm(n_samples, generator=g)
    te, tr = perm[:n_test], perm[n_test:]
    y_dtype = torch.int64 if task == "multiclass" else dtype
    meta = {
        "seed": seed,
        "source": "fisherlab.data.make_synthetic (linear teacher)",
        "layout": "flat",
        "test_fraction": float(test_fraction),
        "noise": float(noise),
        "standardization": "none (inputs are standard normal)",
    }
    return SplitData(
        X_train=X[tr].to(dtype),
        y_train=y[tr].to(y_dtype),
        X_test=X[te].to(dtype),
        y_test=y[te].to(y_dtype),
        name=f"synthetic-{task}",
        task=task,
        n_outputs=n_outputs,
        input_shape=(n_features,),
        meta=meta,
    )


def _sort_draws(where: str, n_samples: int, length: int, n_values: int, seed: int, test_fraction: float,
                ) -> tuple[int, int, int, int, torch.Generator, torch.Tensor]:
    """Checked sizes of a sort task, its test count, its seeded generator and the prompt values (N, length)."""
    _check_fraction(test_fraction, where)
    n_samples = _check_int(n_samples, "n_samples", where, 2)
    length = _check_int(length, "length", where, 1)
    n_values = _check_int(n_values, "n_values", where, 2)
    n_test = _n_test(n_samples, test_fraction, where)
    g = torch.Generator().manual_seed(seed)
    return n_samples, length, n_values, n_test, g, torch.randint(0, n_values, (n_samples, length), generator=g)


def make_sort_task(
    n_samples: int = 512,
    length: int = 6,
    n_values: int = 8,
    seed: int = 0,
    test_fraction: float = 0.25,
) -> SplitData:
    """A procedural token task with a known answer: the j-th smallest of ``length`` tokens (sorting, one position).

    Each sample is a sequence of ``length + 1`` token ids: ``length`` values a_1..a_k drawn uniformly from
    ``[0, n_values)``, then one query token ``n_values + j − 1`` asking for position j ∈ {1..k} of the sorted
    sequence. The target is sorted(a)[j − 1], a class in ``[0, n_values)``: a deterministic function of the
    inputs (Bayes error 0), which a causal transformer reads out at the last position (the query attends to the
    values). Nothing is downloaded; all draws come from one local ``torch.Generator`` seeded with ``seed``.

    Args:
        n_samples: Total number of samples, at least 2.
        length: k, values per sequence, at least 1.
        n_values: Distinct values, at least 2 (the classes).
        seed: Seed of the draws and the split.
        test_fraction: Fraction of samples put in the test split, in ``(0, 1)``.

    Returns:
        A multiclass :class:`SplitData` named ``"sort"`` with int64 token ids ``X`` of shape (N, length + 1),
        ``input_shape=(length + 1,)``, ``n_outputs = n_values`` and ``meta`` ``layout="tokens"``,
        ``vocab = n_values + length`` (the embedding size a model needs).

    Raises:
        InputError: On out-of-range arguments.
    """
    n_samples, length, n_values, n_test, g, values = _sort_draws("make_sort_task", n_samples, length, n_values,
                                                                 seed, test_fraction)
    j = torch.randint(0, length, (n_samples,), generator=g)
    X = torch.cat([values, (n_values + j).unsqueeze(1)], dim=1)
    y = values.sort(dim=1).values.gather(1, j.unsqueeze(1)).squeeze(1)
    perm = torch.randperm(n_samples, generator=g)
    meta = {
        "seed": seed,
        "source": "fisherlab.data.make_sort_task (j-th smallest of length tokens)",
        "vocab": n_values + length,
        "test_fraction": float(test_fraction),
    }
    return _token_split(X, y, perm[n_test:], perm[:n_test], "sort", n_values, meta)


def make_sort_lm(
    n_samples: int = 512,
    length: int = 6,
    n_values: int = 8,
    seed: int = 0,
    test_fraction: float = 0.25,
) -> SplitData:
    """A procedural language-modelling task with a known answer: continue a prompt by its sorted values.

    Each sequence is ``a_1 … a_k SEP s_1 … s_k`` (k = ``length``, 2k + 1 tokens): values a_i drawn uniformly and
    independently from ``[0, n_values)``, the separator ``SEP = n_values``, then s = sorted(a). The inputs are
    the first 2k tokens, ``X = seq[:-1]``, and the targets the next tokens, ``y = seq[1:]``, with
    :data:`IGNORE_INDEX` (−100) at the first k positions (their next tokens a_2 … a_k, SEP belong to the
    prompt). So position k − 1 + i (input SEP for i = 1, else s_{i−1}) has target s_i, k targets per sequence.

    Known structure: every target is a deterministic function of the prompt a (Bayes error 0), so an ideal causal
    model reaches a loss (mean cross-entropy over the target tokens) of 0; predicting the V = n_values + 1 tokens
    uniformly costs ln V (2.197 with the defaults). Nothing is downloaded; all draws come from one local
    ``torch.Generator`` seeded with ``seed`` (the split is a seeded random permutation).

    Args:
        n_samples: Total number of sequences, at least 2.
        length: k, values per prompt, at least 1.
        n_values: Distinct values, at least 2.
        seed: Seed of the draws and the split.
        test_fraction: Fraction of sequences put in the test split, in ``(0, 1)``.

    Returns:
        A multiclass :class:`SplitData` named ``"sort-lm"`` with int64 ``X`` and ``y`` of shape (N, 2k),
        ``input_shape = (2k,)``, ``n_outputs = vocab = n_values + 1`` (next-token logits over every token) and
        ``meta`` ``layout="tokens"``, ``vocab``, ``ignore_index = -100``, ``targets_per_sequence = k``.

    Raises:
        InputError: On out-of-range arguments.
    """
    n_samples, length, n_values, n_test, g, values = _sort_draws("make_sort_lm", n_samples, length, n_values,
                                                                 seed, test_fraction)
    sep = torch.full((n_samples, 1), n_values, dtype=torch.int64)
    seq = torch.cat([values, sep, values.sort(dim=1).values], dim=1)
    y = seq[:, 1:].clone()
    y[:, :length] = IGNORE_INDEX
    perm = torch.randperm(n_samples, generator=g)
    meta = {
        "seed": seed,
        "source": "fisherlab.data.make_sort_lm (prompt, SEP, the prompt sorted)",
        "vocab": n_values + 1,
        "ignore_index": IGNORE_INDEX,
        "targets_per_sequence": length,
        "test_fraction": float(test_fraction),
    }
    return _token_split(seq[:, :-1], y, perm[n_test:], perm[:n_test], "sort-lm", n_values + 1, meta)


def load_text(path: str | Path, seq_len: int = 64, test_fraction: float = 0.1, encoding: str = "utf-8") -> SplitData:
    """Read a local text file as a character-level language-modelling task; nothing is downloaded.

    The vocabulary is the sorted set of the file's characters (token id = rank; ``meta["chars"]`` holds them in
    id order). The text c_0 … c_{n−1} is cut into W = (n − 1) // seq_len non-overlapping windows: window w has
    inputs ``X[w] = c[w·T : (w+1)·T]`` and targets ``y[w] = c[w·T + 1 : (w+1)·T + 1]`` (T = seq_len, the next
    character at every position; the last (n − 1) mod T characters are dropped). The test split is the last
    ``round(W · test_fraction)`` windows (at least 1, at most W − 1), the training split the windows before them,
    both in text order (no window of the test text is seen in training).

    Args:
        path: The text file.
        seq_len: T, characters per window, at least 1.
        test_fraction: Fraction of windows put in the test split, in ``(0, 1)``.
        encoding: The file's encoding.

    Returns:
        A multiclass :class:`SplitData` named ``"text"`` with int64 ``X`` and ``y`` of shape (W, T),
        ``input_shape = (T,)``, ``n_outputs = vocab`` = distinct characters, and ``meta`` ``layout="tokens"``,
        ``vocab``, ``chars``, ``n_chars``, ``source``.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        InputError: If the file cannot be decoded with ``encoding``, is empty, has fewer than 2 distinct
            characters, or is too short for one training and one test window of ``seq_len + 1`` characters.
    """
    where = "load_text"
    seq_len = _check_int(seq_len, "seq_len", where, 1)
    _check_fraction(test_fraction, where)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{where}: text file {str(path)!r} not found")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: {str(path)!r} is not {encoding} text ({exc}); pass encoding=") from None
    if not text:
        raise InputError(f"{where}: {str(path)!r} is empty")
    chars = sorted(set(text))
    if len(chars) < 2:
        raise InputError(f"{where}: {str(path)!r} holds a single distinct character {chars[0]!r}; a language "
                         "model needs at least 2")
    n_windows = (len(text) - 1) // seq_len
    if n_windows < 2:
        raise InputError(f"{where}: {str(path)!r} holds {len(text)} characters, fewer than the {2 * seq_len + 1} "
                         f"that one training and one test window of seq_len + 1 = {seq_len + 1} need; use a "
                         "longer file or a smaller seq_len")
    n_test = min(max(1, round(n_windows * test_fraction)), n_windows - 1)
    rank = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([rank[c] for c in text[: n_windows * seq_len + 1]], dtype=torch.int64)
    X = ids[:-1].reshape(n_windows, seq_len)
    y = ids[1:].reshape(n_windows, seq_len)
    windows = torch.arange(n_windows)
    meta = {
        "seed": None,
        "source": f"text file {str(path)}",
        "vocab": len(chars),
        "chars": "".join(chars),
        "n_chars": len(text),
        "test_fraction": float(test_fraction),
    }
    return _token_split(X, y, windows[: n_windows - n_test], windows[n_windows - n_test :], "text", len(chars),
                        meta)


# ----------------------------------------------------------------------------------------------------------
# MNIST from local IDX files
# ----------------------------------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8}


def _find_file(directory: Path, names: Sequence[str], what: str) -> Path:
    """Return the first existing ``directory/name`` or ``directory/name.gz``; else FileNotFoundError."""
    for name in names:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"{what}: file {names[0]!r} (or {names[0]}.gz) not found in {str(directory)!r}")


def _read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) and check its magic number."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4:
        raise InputError(f"IDX file {str(path)!r} is truncated (less than 4 bytes)")
    zero, type_code, ndim = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in _IDX_DTYPES or ndim != expected_ndim:
        raise InputError(
            f"IDX file {str(path)!r} has magic number 0x{int.from_bytes(raw[:4], 'big'):08x}; expected "
            f"0x{0x0800 + expected_ndim:08x} (unsigned bytes, {expected_ndim} dimension(s))"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"IDX file {str(path)!r} is truncated inside its header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(dims)
    if len(raw) - header != count:
        raise InputError(
            f"IDX file {str(path)!r} declares shape {dims} ({count} values) but holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=_IDX_DTYPES[type_code], offset=header).reshape(dims)


def load_mnist_idx(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    layout: str = "flat",
    limit: int | None = None,
) -> SplitData:
    """Read MNIST (or a same-format dataset) from local IDX files; nothing is downloaded.

    ``directory`` must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally gzip-compressed with a
    ``.gz`` suffix (the variant spelling ``train-images.idx3-ubyte`` is accepted too). Pixels are scaled to
    ``[0, 1]`` and standardized with one scalar mean and standard deviation of the training split. The
    official train/test split is kept (``meta["seed"]`` is ``None``).

    Args:
        directory: Folder holding the four files.
        dtype: Floating dtype of the inputs.
        layout: ``"flat"`` → ``(N, rows*cols)``, ``"image"`` → ``(N, 1, rows, cols)``.
        limit: Keep at most the first ``limit`` samples of each split (statistics use the kept samples).

    Returns:
        A multiclass :class:`SplitData` named ``"mnist"`` with ``n_outputs=10``.

    Raises:
        FileNotFoundError: Naming the first missing file.
        InputError: On a bad magic number, truncated file, mismatched counts, labels outside 0..9, unknown
            layout or bad ``limit``.
    """
    where = "load_mnist_idx"
    _check_layout(layout, "mnist")
    _check_dtype(dtype, where)
    if limit is not None:
        limit = _check_int(limit, "limit", where, 1)
    directory = Path(directory)
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path = _find_file(
            directory, (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"), where
        )
        lab_path = _find_file(
            directory, (f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"), where
        )
        images = _read_idx(img_path, 3)
        labels = _read_idx(lab_path, 1)
        if images.shape[0] != labels.shape[0]:
            raise InputError(
                f"{where}: {img_path.name} holds {images.shape[0]} images but {lab_path.name} holds "
                f"{labels.shape[0]} labels"
            )
        if labels.size and labels.max() > 9:
            raise InputError(
                f"{where}: {lab_path.name} holds label {int(labels.max())}; MNIST labels are 0..9"
            )
        if images.shape[0] == 0:
            raise InputError(f"{where}: {img_path.name} holds no images")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        arrays[split] = (images, labels)
    (img_tr, lab_tr), (img_te, lab_te) = arrays["train"], arrays["test"]
    if img_tr.shape[1:] != img_te.shape[1:]:
        raise InputError(f"{where}: train images are {img_tr.shape[1:]} but test images {img_te.shape[1:]}")
    rows, cols = img_tr.shape[1:]
    Xtr, Xte, _, _ = _standardize(img_tr / 255.0, img_te / 255.0, axis=(0, 1, 2), floor=1e-12)
    shape: tuple[int, ...] = (rows * cols,) if layout == "flat" else (1, rows, cols)
    meta = {
        "seed": None,
        "source": f"IDX files in {str(directory)}",
        "layout": layout,
        "limit": limit,
        "standardization": "scalar mean/std of the training split, pixels scaled to [0, 1] first",
    }
    return _ten_class_split("mnist", Xtr, lab_tr, Xte, lab_te, shape, dtype, meta)


# ----------------------------------------------------------------------------------------------------------
# CIFAR-10 from local python pickles
# ----------------------------------------------------------------------------------------------------------
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = ("test_batch",)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")  # local files the user points at (see docstring)
    if not isinstance(batch, dict):
        raise InputError(f"CIFAR-10 batch {str(path)!r} does not hold a dict")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise InputError(f"CIFAR-10 batch {str(path)!r} lacks a 'data' or 'labels' entry")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise InputError(
            f"CIFAR-10 batch {str(path)!r}: data has shape {data.shape} and labels {labels.shape}; "
            "expected (N, 3072) and (N,)"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise InputError(f"CIFAR-10 batch {str(path)!r} holds labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(
    directory: str | Path,
    dtype: torch.dtype = torch.float32,
    layout: str = "image",
    limit: int | None = None,
) -> SplitData:
    """Read CIFAR-10 from the python pickle batches in a local folder; nothing is downloaded.

    ``directory`` is the ``cifar-10-batches-py`` folder (or its parent) holding ``data_batch_1`` ..
    ``data_batch_5`` and ``test_batch``. The batches are unpickled, so only point this at files you
    trust. Pixels are scaled to ``[0, 1]`` and standardized per channel with training statistics.
    The official train/test split is kept.

    Args:
        directory: Folder holding the batches.
        dtype: Floating dtype of the inputs.
        layout: ``"image"`` → ``(N, 3, 32, 32)``, ``"flat"`` → ``(N, 3072)`` (channel-major).
        limit: Keep at most the first ``limit`` samples of each split (statistics use the kept samples).

    Returns:
        A multiclass :class:`SplitData` named ``"cifar10"`` with ``n_outputs=10``.

    Raises:
        FileNotFoundError: Naming the first missing batch file.
        InputError: On a malformed batch, unknown layout or bad ``limit``.
    """
    where = "load_cifar10"
    _check_layout(layout, "cifar10")
    _check_dtype(dtype, where)
    if limit is not None:
        limit = _check_int(limit, "limit", where, 1)
    directory = Path(directory)
    if not (directory / _CIFAR_TRAIN[0]).is_file() and (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    for name in _CIFAR_TRAIN + _CIFAR_TEST:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{where}: file {name!r} not found in {str(directory)!r}")

    def read(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_cifar_batch(directory / n) for n in names]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return (data[:limit], labels[:limit]) if limit is not None else (data, labels)

    img_tr, lab_tr = read(_CIFAR_TRAIN)
    img_te, lab_te = read(_CIFAR_TEST)
    if img_tr.shape[0] == 0 or img_te.shape[0] == 0:
        raise InputError(f"{where}: the batches in {str(directory)!r} hold no training or no test images")
    Xtr, Xte, _, _ = _standardize(img_tr / 255.0, img_te / 255.0, axis=(0, 2, 3), floor=1e-12)
    shape: tuple[int, ...] = (3, 32, 32) if layout == "image" else (3 * 32 * 32,)
    meta = {
        "seed": None,
        "source": f"CIFAR-10 python batches in {str(directory)}",
        "layout": layout,
        "limit": limit,
        "standardization": "per-channel mean/std of the training split, pixels scaled to [0, 1] first",
    }
    return _ten_class_split("cifar10", Xtr, lab_tr, Xte, lab_te, shape, dtype, meta)


# ----------------------------------------------------------------------------------------------------------
# Registry and minibatches
# ----------------------------------------------------------------------------------------------------------
def load(name: str, **kwargs: Any) -> SplitData:
    """Load a dataset by name.

    Args:
        name: One of :data:`DATASETS`: ``"digits"`` (:func:`load_digits`), ``"mnist1d"``
            (:func:`load_mnist1d`), ``"synthetic-regression"`` / ``"synthetic-binary"`` /
            ``"synthetic-multiclass"`` (:func:`make_synthetic` with that task), ``"mnist"``
            (:func:`load_mnist_idx`, needs ``directory=``), ``"cifar10"`` (:func:`load_cifar10`, needs
            ``directory=``), ``"sort"`` (:func:`make_sort_task`), ``"sort-lm"`` (:func:`make_sort_lm`),
            ``"text"`` (:func:`load_text`, needs ``path=``).
        **kwargs: Passed on to the loader.

    Returns:
        The loader's :class:`SplitData`.

    Raises:
        InputError: On an unknown name (the message lists :data:`DATASETS`), a missing ``directory`` for
            ``mnist``/``cifar10`` or ``path`` for ``text``, or a keyword the loader does not accept.
    """
    loaders = {
        "digits": load_digits,
        "mnist1d": load_mnist1d,
        "mnist": load_mnist_idx,
        "cifar10": load_cifar10,
        "sort": make_sort_task,
        "sort-lm": make_sort_lm,
        "text": load_text,
    }
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; valid names are {', '.join(DATASETS)}")
    if name in ("mnist", "cifar10") and "directory" not in kwargs:
        raise InputError(f"dataset {name!r} is read from local files: pass directory=<folder>")
    if name == "text" and "path" not in kwargs:
        raise InputError("dataset 'text' is read from a local file: pass path=<file>")
    if name.startswith("synthetic-"):
        if "task" in kwargs:
            raise InputError(f"dataset {name!r} fixes the task; do not pass task=")
        fn: Any = make_synthetic
        kwargs = {"task": name.removeprefix("synthetic-"), **kwargs}
    else:
        fn = loaders[name]
    accepted = set(inspect.signature(fn).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise InputError(
            f"dataset {name!r}: unknown keyword(s) {unknown}; {fn.__name__} accepts {sorted(accepted)}"
        )
    return fn(**kwargs)


def iterate_minibatches(
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    *,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield one epoch of minibatches ``(xb, yb)`` in an order fixed by ``seed``.

    The permutation comes from a local CPU ``torch.Generator`` seeded with ``seed`` (the global RNG is
    untouched), so the same seed gives the same batches on any device; pass e.g. ``seed + epoch`` for a new
    order each epoch.

    Args:
        X: Inputs of shape ``(N, ...)``.
        y: Targets with the same first dimension ``N``.
        batch_size: Samples per batch, at least 1.
        seed: Seed of the permutation (ignored when ``shuffle=False``).
        shuffle: Whether to permute the samples; if ``False`` batches follow the stored order.
        drop_last: Drop the final batch when it has fewer than ``batch_size`` samples.

    Yields:
        ``(xb, yb)`` with shapes ``(B, ...)``, views or gathered copies of ``X`` and ``y`` on their device.

    Raises:
        InputError: If ``X`` and ``y`` disagree in length or ``batch_size`` is not a positive int.
    """
    where = "iterate_minibatches"
    batch_size = _check_int(batch_size, "batch_size", where, 1)
    if X.shape[0] != y.shape[0]:
        raise InputError(f"{where}: X has {X.shape[0]} samples but y has {y.shape[0]}")
    n = int(X.shape[0])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield X[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield X[idx.to(X.device)], y[idx.to(y.device)]
