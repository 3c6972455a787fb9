"""Every notebook in notebooks/ runs top to bottom (small settings), shows every plot, and is stored without outputs.

Importing fisherlab (its report module included) must leave the kernel's inline backend alone: a plot drawn after
the import is shown.

One kernel serves the whole module (its start-up and the imports of torch, fisherlab and seaborn are paid once):
the inline-backend check runs first, in the fresh kernel; every notebook then starts with ``%reset -f``, so it
runs on its own names only. The kernel runs one intra-op thread (the tests are small; on a busy 2-core machine
two threads spin against the other test worker).
"""

import os
import re
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from jupyter_client.asynchronous import AsyncKernelClient
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))

#: A code cell that draws: a seaborn or pyplot plotting call, or a method of xarray/pandas' ``.plot``.
PLOTTING = re.compile(r"\bsns\.(relplot|lineplot|scatterplot|barplot|heatmap|histplot|displot|catplot)\(|"
                      r"\bplt\.(plot|figure|subplots|imshow|scatter)\(|\.plot(\.\w+)?\(")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelManager]:
    """One python3 kernel for the module, started in an empty folder, single-threaded."""
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path_factory.mktemp("notebooks")), env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield km
    km.shutdown_kernel(now=True)


def execute(nb: nbformat.NotebookNode, km: KernelManager, reset: bool = True) -> nbformat.NotebookNode:
    """Run every cell of ``nb`` in the kernel of ``km``, after a ``%reset -f`` cell unless ``reset`` is False."""
    if reset:
        nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))
    client = NotebookClient(nb, km=km, timeout=300)
    client.kc = AsyncKernelClient()
    client.kc.load_connection_info(km.get_connection_info())
    client.kc.start_channels()
    try:
        client.execute()
    finally:
        client.kc.stop_channels()
    return nb


def images(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs if o.output_type in ("display_data",
                                                                                          "execute_result"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


def test_a_plot_is_shown_inline_after_importing_fisherlab(kernel):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import sys\nassert 'fisherlab' not in sys.modules  # this kernel's first import\n"
                                  "import matplotlib\nbackend = matplotlib.get_backend()\n"
                                  "import fisherlab, fisherlab.report\n"
                                  "assert matplotlib.get_backend() == backend, (backend, matplotlib.get_backend())\n"
                                  "backend"),
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2]);"),
    ])
    execute(nb, kernel, reset=False)
    assert not [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert "inline" in nb.cells[0].outputs[0]["data"]["text/plain"]  # the kernel's backend, before and after
    assert images(nb.cells[1]) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_shows_every_plot(path, kernel):
    nb = execute(nbformat.read(path, as_version=4), kernel)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    plotting = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and PLOTTING.search(c.source)]
    blank = [i for i in plotting if images(nb.cells[i]) == 0]
    assert not blank, f"plotting cells without an image: {blank}"
