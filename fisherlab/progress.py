"""Progress bars: one on/off rule for all of fisherlab, and no flashes of empty inner bars.

Every ``progress`` argument in fisherlab means the same: ``True`` shows bars, ``False`` hides them, ``None`` shows
them only when standard error is a terminal (:func:`enabled`). :func:`bar` creates every bar (``tqdm.auto``:
a widget in Jupyter, text elsewhere). While a bar is shown, an *inner* bar (the per-chunk loops of
:class:`~fisherlab.FisherEngine`, dozens of short passes per part) stays hidden, and another outer bar is drawn
one line below it and removed when it closes, so a part shows its own count and the count of the whole job.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["Bar", "bar", "enabled"]

#: Bars shown now (weak: a bar dropped without close() stops counting when it is garbage-collected).
_SHOWN: weakref.WeakSet[Bar] = weakref.WeakSet()


def enabled(progress: bool | None) -> bool:
    """The one on/off rule: ``True``/``False`` as given; ``None`` — on only when stderr is a terminal."""
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return bool(progress)


class Bar:
    """A tqdm bar (or nothing, when hidden) that knows whether it is shown; use as a context or iterate it."""

    def __init__(self, iterable: Iterable[Any] | None, *, total: int | None, desc: str | None, show: bool,
                 depth: int) -> None:
        self.iterable = iterable
        self.shown = show
        self._tqdm: Any = None
        if show:
            from tqdm.auto import tqdm

            self._tqdm = tqdm(iterable, total=total, desc=desc, position=depth or None, leave=depth == 0)
            _SHOWN.add(self)

    def update(self, n: int = 1) -> None:
        """Advance by ``n``."""
        if self._tqdm is not None:
            self._tqdm.update(n)

    def set_postfix_str(self, text: str) -> None:
        """Show ``text`` after the count."""
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text)

    def close(self) -> None:
        """Remove the bar (idempotent)."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        _SHOWN.discard(self)

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from (self._tqdm if self._tqdm is not None else () if self.iterable is None else self.iterable)
        finally:
            self.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None,
        progress: bool | None = None, inner: bool = False) -> Bar:
    """A progress bar over ``iterable`` (or of ``total`` steps, advanced by :meth:`Bar.update`).

    Args:
        iterable: What to iterate (optional).
        total: Number of steps (default: ``len(iterable)`` when it has one).
        desc: Label.
        progress: ``True``, ``False`` or ``None`` (on only when stderr is a terminal), see :func:`enabled`.
        inner: A bar of a short inner loop: hidden while another bar is shown.
    """
    depth = len(_SHOWN)
    show = enabled(progress) and not (inner and depth)
    return Bar(iterable, total=total, desc=desc, show=show, depth=depth)
