"""Memory estimates and the budget check made before any large allocation.

Every dense object (a P×P Fisher, a block, a chunk of per-sample factor rows) is sized in bytes first; above the
caller's budget fisherlab refuses with the number and the structures that would fit instead.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from fisherlab.checks import check_device
from fisherlab.errors import InputError, MemoryBudgetError

#: Fraction of the currently available memory used as the default budget.
DEFAULT_FRACTION = 0.5

ALTERNATIVES = "structure='block' (per-layer blocks), 'kfac', 'diag' or 'implicit' (matrix-free products)"


def available_bytes(device: torch.device | str | None = None) -> int:
    """Bytes currently available on ``device``: free GPU memory for CUDA, MemAvailable (Linux) otherwise."""
    device = check_device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 8 * 2**30


def resolve_budget(budget: int | float | None, device: torch.device | str | None = None) -> int:
    """The memory budget in bytes: ``budget`` if given (bytes), else half of what is available on ``device``."""
    if budget is None:
        return int(DEFAULT_FRACTION * available_bytes(device))
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not math.isfinite(budget) or budget <= 0:
        raise InputError(f"memory budget must be positive (bytes); got {budget!r}")
    if device is not None:
        check_device(device)
    return int(budget)


def format_bytes(n: float) -> str:
    """Human-readable size (``"1.5 GiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def check_budget(nbytes: int, what: str, budget: int, alternatives: str = ALTERNATIVES) -> None:
    """Raise :class:`MemoryBudgetError` if ``nbytes`` exceeds ``budget``, naming the object and the alternatives."""
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what} needs {format_bytes(nbytes)}, above the memory budget of {format_bytes(budget)} "
            f"(set memory_budget= in bytes to raise it). Alternatives: {alternatives}."
        )


def dense_bytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes of a dense rows×cols tensor of ``dtype``."""
    return int(rows) * int(cols) * torch.empty((), dtype=dtype).element_size()
