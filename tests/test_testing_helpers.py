"""fisherlab.testing (assert_dataset_close) and the golden-Dataset pytest plugin (run in pytester sessions)."""

from __future__ import annotations

import h5netcdf  # noqa: F401 - imported once here: in-process pytester runs must not re-import h5py
import h5py  # noqa: F401
import numpy as np
import pytest

from fisherlab.errors import InputError
from fisherlab.results import new_dataset
from fisherlab.testing import assert_dataset_close, dataset_differences

pytest_plugins = ["pytester"]


def make(cosine=None, **extra_vars):
    cosine = np.array([[1.0, 0.5], [0.25, np.nan]]) if cosine is None else cosine
    data = {"cosine": (("rule", "damping"), cosine),
            "reason": (("rule",), np.array(["", "too big"])), **extra_vars}
    return new_dataset("fidelity", data, {"rule": ["ngd", "gd"], "damping": [1e-3, 1e-1]},
                       config={"a": 1}, seed=0, device="cpu", dtype="float64")


def test_identical_and_within_tolerance_pass():
    assert_dataset_close(make(), make())
    a = make(np.array([[1.0, 0.5 + 1e-9], [0.25, np.nan]]))
    assert_dataset_close(a, make(), {"cosine": (1e-8, 0.0)})
    assert dataset_differences(a, make(), {"cosine": None}) == []  # None skips the values


def test_failure_names_variable_size_and_worst_point():
    a = make(np.array([[1.0, 0.5], [0.26, np.nan]]))
    with pytest.raises(AssertionError) as info:
        assert_dataset_close(a, make(), {"cosine": (1e-3, 1e-6)})
    msg = str(info.value)
    assert "variable 'cosine': 1 of 4 values outside rtol=0.001, atol=1e-06" in msg
    assert "max abs diff 1.000e-02" in msg and "max rel diff 4.000e-02" in msg
    assert "worst at rule=gd, damping=0.001: 0.26 vs golden 0.25" in msg


def test_nan_mismatch_strings_dims_coords_and_missing_variables():
    nan_moved = make(np.array([[1.0, np.nan], [0.25, 0.3]]))
    problems = dataset_differences(nan_moved, make())
    assert len(problems) == 1 and "NaN in one but not the other at 2 point(s)" in problems[0]

    other_reason = make()
    other_reason["reason"] = ("rule",), np.array(["", "unsupported"])
    (problem,) = dataset_differences(other_reason, make())
    assert "variable 'reason': 1 of 2 values differ; first at rule=gd: 'unsupported' != golden 'too big'" in problem

    extra = make(loss=((), 1.0))
    assert dataset_differences(extra, make()) == ["data variable(s) not in the golden Dataset: ['loss']"]
    assert dataset_differences(make(), extra) == ["data variable(s) missing from the result: ['loss']"]

    shifted = make().assign_coords(damping=[1e-3, 2e-1])
    (problem,) = dataset_differences(shifted, make())
    assert problem.startswith("variable 'damping'")

    smaller = make().isel(damping=[0])
    assert "dims differ" in dataset_differences(smaller, make())[0]


def test_attrs_and_bad_tolerances():
    other = make()
    other.attrs["ngd_solver"] = "cg"
    assert dataset_differences(other, make(), check_attrs=["ngd_solver"]) == [
        "attribute 'ngd_solver': 'cg' != golden '<missing>'"]
    with pytest.raises(InputError, match="neither Dataset"):
        assert_dataset_close(make(), make(), {"cosin": (1e-6, 0)})
    with pytest.raises(InputError, match="pair"):
        assert_dataset_close(make(), make(), {"cosine": (1e-6,)})


# ------------------------------------------------------------------------------------------- the plugin
TEST_FILE = """
import numpy as np
from fisherlab.results import new_dataset

def test_golden(golden):
    ds = new_dataset("fidelity", {{"cosine": (("rule",), np.array([1.0, {value}]))}}, {{"rule": ["ngd", "gd"]}},
                     config={{}}, seed=0, device="cpu", dtype="float64")
    golden.check("demo", ds, {{"cosine": (1e-6, 0.0)}})
"""

# Load the plugin by module name and block an installed entry point of the same plugin (no double registration).
PLUGIN_ARGS = ("-p", "no:fisherlab", "-p", "fisherlab.pytest_plugin", "-p", "no:cacheprovider")


@pytest.fixture(autouse=True)
def no_other_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner sessions load only the plugin under test: no other installed pytest11 plugin autoloads.

    pytester's in-process runs drop the modules they imported afterwards, so an autoloaded plugin that imports
    its package late (hypothesis: ~150 modules, assertion-rewritten) was imported again by every run.
    """
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def test_plugin_writes_compares_and_reports(pytester):
    pytester.makepyfile(test_demo=TEST_FILE.format(value=0.5))
    missing = pytester.runpytest(*PLUGIN_ARGS)
    missing.assert_outcomes(failed=1)
    missing.stdout.fnmatch_lines(["*golden Dataset*demo.nc does not exist*--fisherlab-update-golden*"])

    pytester.runpytest(*PLUGIN_ARGS, "--fisherlab-update-golden").assert_outcomes(passed=1)
    golden_file = pytester.path / "data" / "golden" / "demo.nc"
    assert golden_file.is_file()
    pytester.runpytest(*PLUGIN_ARGS).assert_outcomes(passed=1)

    pytester.makepyfile(test_demo=TEST_FILE.format(value=0.6))
    changed = pytester.runpytest(*PLUGIN_ARGS)
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(["*variable 'cosine': 1 of 2 values outside rtol=1e-06*worst at rule=gd*"])


def test_plugin_golden_dir_ini_option(pytester):
    pytester.makeini("[pytest]\nfisherlab_golden_dir = refs/fid\n")
    pytester.makepyfile(test_demo=TEST_FILE.format(value=0.5))
    pytester.runpytest(*PLUGIN_ARGS, "--fisherlab-update-golden").assert_outcomes(passed=1)
    assert (pytester.path / "refs" / "fid" / "demo.nc").is_file()
