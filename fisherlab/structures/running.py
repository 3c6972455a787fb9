"""Running statistics: exponential moving averages of layer-wise factors (KFAC, EKFAC, unit-wise).

Optimisers that use structured Fishers (KFAC, EKFAC, the released SNGD code) do not use the factors of one batch
but their exponential moving average over batches,

    m_t = decay · m_{t−1} + (1 − decay) · new_t,        m_1 = new_1,

applied to every averaged statistic of each layer (KFAC: A and S; EKFAC: A, S and the scalings; unit-wise: the
unit blocks) and to the exact dense blocks of unsupported modules. EKFAC scalings are only comparable within one
eigenbasis: compute the new EKFAC in the running one's basis
(``EKFACFisher.from_engine(engine, basis=running.value)``); averaging scalings of two different bases raises.
"""

from __future__ import annotations

import dataclasses

import torch

from fisherlab.errors import InputError
from fisherlab.structures.layerwise import LayerwiseFisher

#: Relative tolerance within which two EKFAC eigenbases count as the same.
BASIS_RTOL = 1e-6


def _check_decay(decay: object) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
        raise InputError(f"decay must be a number in [0, 1); got {decay!r}")


def ema_update(old: LayerwiseFisher, new: LayerwiseFisher, decay: float) -> LayerwiseFisher:
    """The moving average decay · old + (1 − decay) · new, statistic by statistic, as a new object.

    Args:
        old: The running average so far.
        new: This step's factors (same structure, parameters and layers).
        decay: In [0, 1); 0 returns ``new``'s statistics.

    Raises:
        InputError: A bad decay, mismatched structures, or EKFACs in different eigenbases.
    """
    _check_decay(decay)
    if not isinstance(old, LayerwiseFisher):
        raise InputError(f"running averages exist for layer-wise structures (kfac, ekfac, unit); got {old!r}")
    new._check_compatible(old, "ema_update")
    factors = {}
    for path, f in new.factors.items():
        g = old.factors[path]
        for name in getattr(f, "shared", ()):
            a, b = getattr(f, name), getattr(g, name)
            if a.shape != b.shape or not torch.allclose(a, b, rtol=BASIS_RTOL, atol=BASIS_RTOL):
                raise InputError(
                    f"ema_update: layer {path!r} has different {name} in the two EKFACs; fit the new scalings in the "
                    "running basis with EKFACFisher.from_engine(engine, basis=running)"
                )
        averaged = {name: decay * getattr(g, name) + (1 - decay) * getattr(f, name) for name in f.averaged}
        factors[path] = dataclasses.replace(f, **averaged)
    blocks = {p: decay * old.exact_blocks[p] + (1 - decay) * B for p, B in new.exact_blocks.items()}
    meta = {**new.meta, "ema_decay": decay, "ema_updates": old.meta.get("ema_updates", 1) + 1}
    return dataclasses.replace(new, factors=factors, exact_blocks=blocks, meta=meta)


class RunningFisher:
    """An exponential moving average of layer-wise Fishers: ``value`` after each :meth:`update`.

    Args:
        decay: In [0, 1) (KFAC implementations typically use 0.95; the released SNGD code 0.995).

    Example:
        >>> running = RunningFisher(decay=0.95)
        >>> for batch in batches:
        ...     F = running.update(fisher(model, batch, structure="kfac"))
    """

    def __init__(self, decay: float):
        _check_decay(decay)
        self.decay = float(decay)
        self.value: LayerwiseFisher | None = None
        self.num_updates = 0

    def update(self, new: LayerwiseFisher) -> LayerwiseFisher:
        """Fold ``new`` in (the first update takes it as is) and return the running average."""
        self.value = new if self.value is None else ema_update(self.value, new, self.decay)
        self.num_updates += 1
        return self.value


__all__ = ["BASIS_RTOL", "RunningFisher", "ema_update"]
