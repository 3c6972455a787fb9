"""fisherlab: Fisher geometry for deep learning.

Exact and structured Fisher matrices of any PyTorch model (``torch.func``), reconstructed networks whose plain
gradient descent is natural gradient descent (Liu & Liu, arXiv:2109.10100), and measurements of how closely an
update tracks exact NGD — every result an ``xarray.Dataset``. The method: ``docs/method.md``.

The public API (stable names, imported on first use so that ``import fisherlab`` stays cheap):

* :func:`fisher` — a Fisher matrix (``kind``: true, mc, empirical, ggn; ``structure``: dense, block, diag,
  implicit, kfac, ekfac, unit, lowrank) on one interface, :class:`FisherMatrix`.
* :func:`reconstruct` — a :class:`~fisherlab.reconstruction.ReconstructedNetwork` whose plain GD is NGD with a
  structured Fisher G (subpackage :mod:`fisherlab.reconstruction`).
* :func:`evaluate_fidelity`, :func:`fidelity_trajectory`, :func:`fisher_geometry` — fidelity to exact NGD at one
  state, along training, and the preconditioned geometry (subpackage :mod:`fisherlab.fidelity`);
  :class:`OptimizerRule` and :class:`FidelityProbe` — any ``torch.optim`` optimizer measured like a rule, in
  fisherlab's trajectories or the user's own loop.
* :class:`SNGD` (:mod:`fisherlab.optim`) — structured NGD by the reconstructed-network method as a
  ``torch.optim`` optimizer.
* :func:`fisher_spectra`, :func:`spectral_density` — spectra, condition numbers and SLQ densities.
* :class:`FisherEngine` (per-sample factor rows, matrix-free products), :class:`ParamSpec` (the parameter
  ordering: ``model.named_parameters()`` order, row-major), the option enums of :mod:`fisherlab.vocabulary`
  and the errors of :mod:`fisherlab.errors`.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

__version__ = "0.1.0"

#: Public name → module that defines it (imported lazily by :func:`__getattr__`).
_EXPORTS: dict[str, str] = {
    "fisher": "fisherlab.fisher_matrix",
    "FisherEngine": "fisherlab.engine",
    "FisherMatrix": "fisherlab.structures.base",
    "ParamSpec": "fisherlab.params",
    "reconstruct": "fisherlab.reconstruction",
    "ReconstructedNetwork": "fisherlab.reconstruction",
    "evaluate_fidelity": "fisherlab.fidelity",
    "fidelity_trajectory": "fisherlab.fidelity",
    "fisher_geometry": "fisherlab.fidelity",
    "FidelityProbe": "fisherlab.fidelity",
    "OptimizerRule": "fisherlab.fidelity",
    "SNGD": "fisherlab.optim",
    "fisher_spectra": "fisherlab.spectra",
    "spectral_density": "fisherlab.density",
    "FisherKind": "fisherlab.vocabulary",
    "FisherType": "fisherlab.vocabulary",
    "Structure": "fisherlab.vocabulary",
    "BlockBy": "fisherlab.vocabulary",
    "RootMethod": "fisherlab.vocabulary",
    "KronSplit": "fisherlab.vocabulary",
    "FoldMode": "fisherlab.vocabulary",
    "Unsupported": "fisherlab.vocabulary",
    "KFACPrecondition": "fisherlab.vocabulary",
    "KFACApprox": "fisherlab.vocabulary",
    "GPTOutput": "fisherlab.vocabulary",
    "Backend": "fisherlab.vocabulary",
    **{name: "fisherlab.errors" for name in (
        "ConvergenceError", "FallbackWarning", "FisherlabError", "InputError", "MemoryBudgetError",
        "MetricMismatchError", "NonFiniteError", "RankFailedError", "ReadOnlyTensorError", "ResultsFileError",
        "ResultsIntegrityWarning", "SchemaUpgradeWarning", "SingularMatrixError", "UnsupportedLayerError")},
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fisherlab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # importing a submodule may have bound a module to this name: the function wins
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _RenamedModule(types.ModuleType):
    """``fisherlab.reconstruct`` as a module: the old path of :mod:`fisherlab.reconstruction` (deprecated)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        warnings.warn("the module fisherlab.reconstruct is now fisherlab.reconstruction (and fisherlab.reconstruct "
                      "is the function): import from fisherlab.reconstruction", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("fisherlab.reconstruction"), name)


# Registered up front so that ``import fisherlab.reconstruct`` finds this shim and never rebinds the top-level
# function ``fisherlab.reconstruct``.
sys.modules.setdefault("fisherlab.reconstruct", _RenamedModule("fisherlab.reconstruct", _RenamedModule.__doc__))
