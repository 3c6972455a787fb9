"""Fidelity regression tests: today's results against the golden Datasets in data/golden/.

The golden files were produced by this code on a digits subset with a tiny float64 MLP. After an intended change
of the numbers (review the diff first!) regenerate them with

    python -m pytest tests/test_golden.py --fisherlab-update-golden

(needs the installed ``pytest11`` entry point of fisherlab, ``pip install -e .``; without it, add
``-p fisherlab.pytest_plugin``).
"""

from __future__ import annotations

import pytest
import torch

from fisherlab.data import load_digits
from fisherlab.fidelity import evaluate_fidelity, fidelity_trajectory, fisher_geometry
from fisherlab.models import MLP
from fisherlab.pytest_plugin import golden  # noqa: F401 - the fixture, also when the plugin is not installed

D = torch.float64
RULES = ["gd", "adam", "ngd", "block-ngd", "kfac", "ekfac", "unit", "diag", "empirical-ngd", "sngd-dense",
         "sngd-kfac"]

#: float64 round-off across BLAS builds; KL and loss changes are differences of O(1) numbers (cancellation).
TOLERANCES = {"kl_measured": (1e-6, 1e-13), "loss_change": (1e-6, 1e-12), "ngd_residual": None}
GEOMETRY_TOLERANCES = {"eigenvalue": (1e-6, 1e-10), "layer_eigenvalue": (1e-6, 1e-10),
                       "condition_number": (1e-5, 0.0), "layer_condition_number": (1e-5, 0.0)}


@pytest.fixture(scope="module")
def case():
    data = load_digits(dtype=D)
    torch.manual_seed(0)
    model = MLP(64, [8], 10, "tanh").double()  # P = 610
    return model, (data.X_train[:128], data.y_train[:128])


def test_fidelity_golden(case, golden):  # noqa: F811
    model, batch = case
    ds = evaluate_fidelity(model, batch, rules=RULES, damping=[1e-3, 1e-1], lr=0.1, dtype=D)
    golden.check("fidelity_digits_mlp", ds, TOLERANCES, default=(1e-7, 1e-10), check_attrs=["ngd_solver"])


def test_trajectory_golden(case, golden):  # noqa: F811
    model, batch = case
    ds = fidelity_trajectory(model, batch, train_rule="sngd-kfac", steps=4, every=2, refresh_every=3,
                             rules=["gd", "ngd", "kfac"], damping=[1e-2], lr=0.1, train_lr=0.3, dtype=D)
    golden.check("trajectory_digits_mlp", ds, TOLERANCES, default=(1e-7, 1e-10), check_attrs=["train_rule"])


def test_geometry_golden(case, golden):  # noqa: F811
    model, batch = case
    ds = fisher_geometry(model, batch, structures=["dense", "block", "kfac", "diag"], damping=[1e-2])
    golden.check("geometry_digits_mlp", ds, GEOMETRY_TOLERANCES, check_attrs=["spectrum_method"])
