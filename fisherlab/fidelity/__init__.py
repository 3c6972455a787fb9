"""Fidelity: how closely update rules track exact natural gradient descent (docs/fidelity.md).

* :func:`evaluate_fidelity` — every rule's update at one state compared with exact NGD (cosine, relative and
  Fisher-norm errors, predicted vs measured KL, loss change), as an xarray Dataset.
* :mod:`~fisherlab.fidelity.rules` — the update-rule registry (:data:`RULES`, :func:`register_rule`).
* :mod:`~fisherlab.fidelity.metrics` — the metrics as pure tensor functions.
* :func:`fidelity_trajectory` — train with one method, or the user's optimizer, and measure every rule every few
  steps (staleness of reconstructed networks: ``steps_since_refresh``); :class:`FidelityProbe` — the same
  measurements inside the user's own training loop.
* :mod:`~fisherlab.fidelity.optimizers` — any ``torch.optim`` optimizer as an update rule
  (:class:`OptimizerRule`, measured by a dry run), and the built-in optimizer rules (:func:`optimizer_rules`).
* :func:`fisher_geometry` — spectra and condition numbers of F + λI and of G^{-1/2}(F + λI)G^{-1/2}.
* :func:`run_sweep` — sweeps that save each finished configuration and resume after an interruption (from
  :mod:`fisherlab.results.sweep`).
"""

from fisherlab.fidelity import metrics
from fisherlab.fidelity.evaluate import DEFAULT_RULES, evaluate_fidelity
from fisherlab.fidelity.geometry import fisher_geometry
from fisherlab.fidelity.optimizers import OptimizerRule, optimizer_rules
from fisherlab.fidelity.rules import RULES, RuleContext, SolveInfo, get_rule, register_rule
from fisherlab.fidelity.trajectory import FidelityProbe, fidelity_trajectory
from fisherlab.results.sweep import run_sweep

__all__ = ["DEFAULT_RULES", "RULES", "FidelityProbe", "OptimizerRule", "RuleContext", "SolveInfo", "evaluate_fidelity",
           "fidelity_trajectory", "fisher_geometry", "get_rule", "metrics", "optimizer_rules", "register_rule",
           "run_sweep"]
