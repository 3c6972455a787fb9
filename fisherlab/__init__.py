"""fisherlab: Fisher geometry for deep learning.

Exact and structured Fisher matrices of any PyTorch model (``torch.func``), reconstructed networks whose plain
gradient descent is natural gradient descent (Liu & Liu, arXiv:2109.10100), and measurements of how closely an
update tracks exact NGD — every result an ``xarray.Dataset``. Vocabulary: ``METHOD.md``.

The public API (stable names):

* :func:`fisher` — a Fisher matrix (``kind``: true, mc, empirical, ggn; ``structure``: dense, block, diag,
  implicit, kfac, ekfac, unit, lowrank) on one interface, :class:`~fisherlab.structures.FisherMatrix`.
* :class:`FisherEngine` — per-sample factor rows, matrix-free products and gradients.
* :class:`ParamSpec` — the parameter-ordering convention (``model.named_parameters()`` order, row-major).
* :func:`fisher_spectra` — spectra and condition numbers as a Dataset; :func:`spectral_density` — the SLQ
  density, trace and λ_max of a Fisher too large to form, as a Dataset.
* modules: :mod:`fisherlab.data`, :mod:`fisherlab.models`, :mod:`fisherlab.likelihoods`, :mod:`fisherlab.linalg`,
  :mod:`fisherlab.results`, :mod:`fisherlab.report`.
"""

from fisherlab.density import spectral_density
from fisherlab.engine import FisherEngine, FisherType
from fisherlab.errors import (
    FallbackWarning,
    FisherlabError,
    InputError,
    MemoryBudgetError,
    NonFiniteError,
    ResultsFileError,
    SingularMatrixError,
    UnsupportedLayerError,
)
from fisherlab.fisher import fisher
from fisherlab.params import ParamSpec
from fisherlab.spectra import fisher_spectra
from fisherlab.structures import FisherMatrix

__version__ = "0.1.0"

__all__ = [
    "FallbackWarning",
    "FisherEngine",
    "FisherMatrix",
    "FisherType",
    "FisherlabError",
    "InputError",
    "MemoryBudgetError",
    "NonFiniteError",
    "ParamSpec",
    "ResultsFileError",
    "SingularMatrixError",
    "UnsupportedLayerError",
    "__version__",
    "fisher",
    "fisher_spectra",
    "spectral_density",
]
