"""Exceptions raised by fisherlab.

Every error names the offending object (a layer, a parameter, a field, a number) so that a user can act on
it without reading the source.
"""

from __future__ import annotations

from collections.abc import Mapping


class FisherlabError(Exception):
    """Base class of every fisherlab error."""


class InputError(FisherlabError, ValueError):
    """Bad input at an API boundary: wrong shape, dtype, emptiness, or an unknown option."""


class NonFiniteError(FisherlabError, FloatingPointError):
    """A NaN or infinity was found in parameters, data or a computed quantity."""


class UnsupportedLayerError(FisherlabError, NotImplementedError):
    """A module has no rule for the requested structure or operation."""


class MemoryBudgetError(FisherlabError, MemoryError):
    """Forming an object would exceed the caller's memory budget."""


class SingularMatrixError(FisherlabError, ArithmeticError):
    """A matrix that must be symmetric positive definite is not (and no damping was requested)."""


class ResultsFileError(FisherlabError, OSError):
    """A results file is missing, corrupt, foreign, or lacks a required field."""


class ConvergenceError(FisherlabError, ArithmeticError):
    """An iterative method missed its tolerance within ``max_iter`` and the caller asked for a bare result.

    Functions that can report convergence (``sqrtm``, ``cg``) return a result with ``converged=False`` instead.
    """


class ReadOnlyTensorError(InputError, AttributeError):
    """Assignment to an effective original-coordinate tensor of a reconstructed network (``layer.weight``).

    Such a tensor is computed from the reconstructed coordinates θ' and the roots on every read; set θ with
    :meth:`~fisherlab.reconstruction.ReconstructedNetwork.load_original` or train θ'. An InputError and an
    AttributeError (what assigning a read-only attribute raises in Python).
    """


class MetricMismatchError(InputError):
    """A ``metric`` given to :func:`~fisherlab.reconstruction.reconstruct` is not the structure it would compute.

    It differs in structure, kind, dtype, device, block grouping or parameters (the message says which).
    """


class RankFailedError(FisherlabError):
    """A rank of a data-parallel run failed (an error, killed, or silent past the timeout): the run is stopped.

    Raised on every surviving rank by the collective that found the peer gone (:mod:`fisherlab.distributed`,
    which re-exports it); ``.failed`` holds ``{rank: what the board says}`` of the ranks that failed (empty when the
    board could not be read).
    """

    def __init__(self, message: str, failed: Mapping[int, str] | None = None):
        super().__init__(message)
        self.failed = dict(failed or {})


class FallbackWarning(UserWarning):
    """fisherlab took a slower path that computes the same result (e.g. a loop over samples instead of ``vmap``)."""


class SchemaUpgradeWarning(UserWarning):
    """A results file of an older schema was upgraded on load (dims or attributes renamed); the message says how."""


class ResultsIntegrityWarning(UserWarning):
    """A results file changed after it was written, or out of range, was loaded because ``strict=False`` asked."""
