"""pytest plugin: golden results Datasets, compared in tests and regenerated on request.

Installed as the ``pytest11`` entry point ``fisherlab``: active in every pytest run once fisherlab is installed
(``pip install -e .``). Without the entry point, load it with ``python -m pytest -p fisherlab.pytest_plugin``
(the command-line option exists only when the plugin is loaded at start-up); a test module can also import the
fixture itself, ``from fisherlab.pytest_plugin import golden``, which then compares (the update flag reads as
off when the plugin is not loaded).

* Fixture ``golden``: ``golden.check(name, dataset, tolerances=None, default=..., check_attrs=())`` compares
  ``dataset`` with ``<golden_dir>/<name>.nc`` by :func:`fisherlab.testing.assert_dataset_close`; a missing file
  fails with the command that creates it.
* Option ``--fisherlab-update-golden``: ``golden.check`` (re)writes the file instead of comparing (atomically,
  by :func:`fisherlab.results.save_dataset`) and the test passes. Review the diff of the golden files before
  committing them. Regenerate fisherlab's own golden files with::

      python -m pytest tests/test_golden.py --fisherlab-update-golden

* ini option ``fisherlab_golden_dir`` (default ``data/golden``): the golden folder, relative to the pytest root
  directory (where ``pyproject.toml`` / ``pytest.ini`` lives) unless absolute.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # the plugin loads in every pytest run: torch, xarray and fisherlab come only with the fixture
    import xarray as xr

    from fisherlab.testing import Tolerance

UPDATE_OPTION = "--fisherlab-update-golden"
UPDATE_DEST = "fisherlab_update_golden"
DIR_INI = "fisherlab_golden_dir"
DEFAULT_DIR = "data/golden"


class GoldenStore:
    """Golden Datasets in one folder, compared (or rewritten when ``update`` is set).

    Args:
        directory: The golden folder.
        update: Rewrite the golden files instead of comparing.
    """

    def __init__(self, directory: Path, update: bool = False) -> None:
        self.directory = Path(directory)
        self.update = bool(update)

    def path(self, name: str) -> Path:
        """The file of golden Dataset ``name`` (letters, digits, ``-``, ``_``, ``.`` only)."""
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or name.startswith("."):
            from fisherlab.errors import InputError

            raise InputError(f"golden name must use letters, digits, '-', '_', '.' only; got {name!r}")
        return self.directory / f"{name}.nc"

    def check(
        self,
        name: str,
        dataset: xr.Dataset,
        tolerances: Mapping[str, Tolerance] | None = None,
        *,
        default: tuple[float, float] | None = None,
        check_attrs: Iterable[str] = (),
    ) -> Path:
        """Compare ``dataset`` with the golden file ``name`` (or write it in update mode).

        ``tolerances``, ``default`` (None: :data:`fisherlab.testing.DEFAULT_TOLERANCE`) and ``check_attrs`` are
        those of :func:`~fisherlab.testing.assert_dataset_close`.

        Returns:
            The golden file's path.

        Raises:
            AssertionError: If the Datasets differ (the diff of :func:`~fisherlab.testing.assert_dataset_close`),
                or the golden file does not exist (with the command that creates it).
        """
        from fisherlab.results import load_dataset, save_dataset
        from fisherlab.testing import DEFAULT_TOLERANCE, assert_dataset_close

        path = self.path(name)
        if self.update:
            save_dataset(dataset, path)
            return path
        if not path.is_file():
            raise AssertionError(f"golden Dataset {path} does not exist; create it with "
                                 f"`python -m pytest <this test file> {UPDATE_OPTION}`")
        assert_dataset_close(dataset, load_dataset(path), tolerances,
                             default=DEFAULT_TOLERANCE if default is None else default, check_attrs=check_attrs)
        return path


def pytest_addoption(parser: pytest.Parser) -> None:
    """Register ``--fisherlab-update-golden`` and the ini option ``fisherlab_golden_dir``."""
    group = parser.getgroup("fisherlab")
    group.addoption(UPDATE_OPTION, action="store_true", default=False, dest=UPDATE_DEST,
                    help="rewrite the golden Datasets compared by the `golden` fixture instead of comparing")
    parser.addini(DIR_INI, default=DEFAULT_DIR,
                  help=f"folder of golden Datasets, relative to the root directory (default {DEFAULT_DIR})")


def golden_store(config: pytest.Config) -> GoldenStore:
    """The :class:`GoldenStore` configured by ``config`` (ini directory, update flag)."""
    try:
        directory = Path(config.getini(DIR_INI) or DEFAULT_DIR)
    except ValueError:  # the plugin was not loaded at start-up (fixture imported by a test module)
        directory = Path(DEFAULT_DIR)
    if not directory.is_absolute():
        directory = Path(config.rootpath) / directory
    return GoldenStore(directory, update=bool(config.getoption(UPDATE_DEST, default=False)))


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> GoldenStore:
    """Golden Datasets: ``golden.check(name, dataset, tolerances)`` (see the module docstring)."""
    return golden_store(request.config)


__all__ = ["DEFAULT_DIR", "DIR_INI", "UPDATE_OPTION", "GoldenStore", "golden", "golden_store",
           "pytest_addoption"]
