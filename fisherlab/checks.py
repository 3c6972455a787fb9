"""Argument checks shared by every public entry point (validate once, at the API boundary).

Each check raises a named :mod:`fisherlab.errors` error that names the argument and the offending value, so a
user can act on it without reading the source. :func:`renamed` turns an old keyword spelling into the new one
with a :class:`DeprecationWarning` that names both.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar

from fisherlab.errors import InputError, NonFiniteError

E = TypeVar("E", bound=Enum)

__all__ = ["check_damping", "check_dampings", "check_eval_mode", "check_fraction", "check_lr", "check_positive_int",
           "parse_enum", "renamed"]


def parse_enum(enum: type[E], value: Any, what: str) -> E:
    """``enum(value)`` with an :class:`InputError` that lists the valid values."""
    try:
        return enum(value)
    except ValueError:
        raise InputError(f"unknown {what} {value!r}; valid: {[e.value for e in enum]}") from None


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_damping(damping: Any, what: str = "damping") -> float:
    """One damping λ: a finite real number ≥ 0 (a one-element tensor is read once)."""
    if hasattr(damping, "numel") and hasattr(damping, "item"):
        if damping.numel() != 1:
            raise InputError(f"{what} must be a scalar; got a tensor of shape {tuple(damping.shape)}")
        damping = damping.item()
    if not _real(damping):
        raise InputError(f"{what} must be a real number ≥ 0; got {damping!r}")
    value = float(damping)
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} must be finite; got {value}")
    if value < 0:
        raise InputError(f"{what} must be ≥ 0; got {value}")
    return value


def check_dampings(damping: Any, what: str = "damping") -> list[float]:
    """``damping`` as a non-empty list of distinct finite floats ≥ 0 (a float or a sequence of floats)."""
    if _real(damping) or hasattr(damping, "numel") and damping.numel() == 1:
        values: Sequence[Any] = [damping]
    elif isinstance(damping, (str, bytes, Mapping)) or not hasattr(damping, "__iter__"):
        raise InputError(f"{what} must be a number or a sequence of numbers; got {damping!r}")
    else:
        values = list(damping)
    out = [check_damping(d, what) for d in values]
    if not out:
        raise InputError(f"no {what} given")
    if len(set(out)) != len(out):
        raise InputError(f"duplicate {what} values in {out}")
    return out


def check_lr(lr: Any, what: str = "lr") -> float:
    """A finite learning rate > 0."""
    if not _real(lr) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"{what} must be a finite number > 0; got {lr!r}")
    return float(lr)


def check_positive_int(value: Any, what: str, minimum: int = 1) -> int:
    """An ``int`` (not a bool) ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{what} must be an integer ≥ {minimum}; got {value!r}")
    return int(value)


def check_fraction(value: Any, what: str, *, closed: bool = False) -> float:
    """A real number in [0, 1) (``closed``: [0, 1])."""
    if not _real(value) or not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise InputError(f"{what} must be in [0, 1{']' if closed else ')'}; got {value!r}")
    return float(value)


def check_eval_mode(model: Any) -> None:
    """Raise :class:`InputError` naming any batch-norm or dropout module left in training mode."""
    from torch import nn

    for name, module in model.named_modules():
        stochastic = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
        rnn_dropout = isinstance(module, nn.RNNBase) and module.dropout > 0
        if module.training and (stochastic or rnn_dropout):
            raise InputError(
                f"module {name!r} ({type(module).__name__}) is in training mode: its output depends on the batch "
                "or on random masks, so per-sample Fishers are undefined. Call model.eval() first."
            )


def renamed(kwargs: dict[str, Any], old: str, new: str, current: Any, default: Any, where: str) -> Any:
    """Accept the deprecated keyword ``old`` for ``new``: pop it from ``kwargs``, warn, and return its value.

    Args:
        kwargs: The caller's ``**kwargs`` (modified: ``old`` is removed).
        old: The deprecated keyword.
        new: The keyword that replaces it.
        current: The value passed as ``new``.
        default: ``new``'s default (passing both ``old`` and a non-default ``new`` is an error).
        where: The function's name, for the messages.

    Returns:
        The value to use for ``new``.
    """
    if old not in kwargs:
        return current
    value = kwargs.pop(old)
    if current is not default and current != default:
        raise InputError(f"{where}: pass {new}= only ({old}= is its deprecated spelling)")
    warnings.warn(f"{where}: {old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=3)
    return value
