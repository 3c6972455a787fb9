"""The docs stay true to the code: their Python blocks run, their links and file references resolve, and the
variable tables of docs/results.md list exactly what each kind of results Dataset holds.

Convention (docs/README.md): every ```python block of a page in docs/ is runnable; the blocks of one page run in
order in one namespace, in a temporary working directory. Formulas and sample output use ```text blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
RUNNABLE = [p for p in PAGES if "```python" in p.read_text()]

#: Markdown links [text](target "title"); images too (the leading ! is irrelevant here).
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
#: Backticked references to files of this repository: `tests/test_x.py::test_name`, `analyses/y.py`, ...
FILE_REF = re.compile(r"`((?:tests|analyses|benchmarks|notebooks|fisherlab|docs|data)/[\w./-]+?)(?:::(\w+))?`")


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def readme_section(title: str) -> str:
    """The README section whose level-2 heading is ``title`` (up to the next level-2 heading)."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end > 0 else None]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", path.read_text(), flags=re.M)}


def run_blocks(path: Path, namespace: dict, blocks: list[str] | None = None) -> dict:
    """Execute the Python blocks of ``path`` (or ``blocks``) in ``namespace``; each block is named in tracebacks."""
    import matplotlib.pyplot as plt

    for i, code in enumerate(python_blocks(path.read_text()) if blocks is None else blocks):
        exec(compile(code, f"{path.name} (python block {i + 1})", "exec"), namespace)  # noqa: S102
    plt.close("all")
    return namespace


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[dict, Path]]]:
    """Page name → (namespace, working directory) of each runnable page, executed once and on demand."""

    class Pages(dict):
        def __missing__(self, name: str) -> tuple[dict, Path]:
            work = tmp_path_factory.mktemp(Path(name).stem)
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(work)
                mp.setenv("MPLBACKEND", "Agg")
                self[name] = (run_blocks(DOCS / name, {"__name__": "__docs__"}), work)
            return self[name]

    yield Pages()


def test_there_are_runnable_pages() -> None:
    assert {"results.md", "method.md", "fidelity.md"} <= {p.name for p in RUNNABLE}


@pytest.mark.filterwarnings("ignore::fisherlab.errors.FallbackWarning")
@pytest.mark.parametrize("name", [p.name for p in RUNNABLE])
def test_python_blocks_run(name: str, executed: dict) -> None:
    namespace, work = executed[name]
    if name == "results.md":  # the page's own claims about what it computed
        assert namespace["ds"].attrs["fisherlab_kind"] == "fidelity"
        assert namespace["two"].sizes["rule"] == 2
        assert (work / "cosine.png").stat().st_size > 0 and (work / "cosine_layer.png").stat().st_size > 0
        since = namespace["traj"].steps_since_refresh.values
        gap = abs(namespace["fresh"] - namespace["stale"]).values
        assert list(since) == [0, 1, 0, 1, 0] and gap[since == 0].max() < 1e-10 < gap[since == 1].min()


def test_readme_reading_the_results_runs(executed: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's plot reads the main job's fidelity.nc; here a small stand-in written by docs/results.md."""
    from fisherlab.results import save_dataset

    (code,) = python_blocks(readme_section("Reading the results"))
    ds = executed["results.md"][0]["ds"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    save_dataset(ds, tmp_path / "results" / "fidelity" / "fidelity.nc")
    namespace = run_blocks(README, {}, [code])
    assert namespace["ds"].equals(ds)


def links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # not inside code blocks
    return LINK.findall(text)


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    bad = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, bad


def test_docs_are_linked_from_the_readme_and_the_index() -> None:
    readme, index = set(links(README)), set(links(DOCS / "README.md"))
    for page in ("method.md", "fidelity.md", "results.md"):
        assert f"docs/{page}" in {t.partition("#")[0] for t in readme}, page
        assert page in {t.partition("#")[0] for t in index}, page
    assert "METHOD.md" not in README.read_text()


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_file_and_test_references_resolve(path: Path) -> None:
    """`tests/test_x.py::test_name`, `analyses/x.py`, ... name files (and test functions) that exist."""
    bad = []
    for file, func in FILE_REF.findall(path.read_text()):
        target = ROOT / file
        if not target.exists():
            bad.append(file)
        elif func and not re.search(rf"^def {func}\(", target.read_text(), flags=re.M):
            bad.append(f"{file}::{func}")
    assert not bad, bad


# ------------------------------------------------------------------------ docs/results.md tables vs the code
def documented_variables() -> dict[str, dict[str, tuple[tuple[str, ...], str]]]:
    """Kind → {variable: (dims, units cell)} from the tables under the headings ``... (kind `<kind>`)``."""
    out: dict[str, dict[str, tuple[tuple[str, ...], str]]] = {}
    sections = re.split(r"^#{2,3} ", (DOCS / "results.md").read_text(), flags=re.M)[1:]
    for section in sections:
        match = re.search(r"\(kind `(\w+)`\)$", section.splitlines()[0])
        if not match:
            continue
        table = out.setdefault(match.group(1), {})
        for row in re.findall(r"^\| `.*\|$", section, flags=re.M):
            names, dims, _, units = (c.strip() for c in row.strip("|").split(" | "))
            dims_t = () if dims == "—" else tuple(d.strip() for d in dims.split(","))
            for name in re.findall(r"`(\w+)`", names):
                table[name] = (dims_t, units)
    return out


def units_cell(attrs: dict) -> str:
    """How results.md writes a variable's units: `1`, `1` (nats), `s`, or none."""
    from fisherlab.results import NATS_COMMENT

    if "units" not in attrs:
        return "none"
    nats = attrs.get("comment") == NATS_COMMENT
    return f"`{attrs['units']}`" + (" (nats)" if nats else "")


@pytest.fixture(scope="module")
def datasets(executed: dict) -> dict:
    """One small Dataset of every kind (the fidelity and trajectory ones from docs/results.md)."""
    import fisherlab
    from fisherlab.data import load_digits
    from fisherlab.models import MLP
    from fisherlab.train import compare

    namespace = executed["results.md"][0]
    torch.manual_seed(0)
    model = MLP(64, [8], 10, activation="tanh").double().eval()
    data = load_digits().train_subset(48).to(dtype=torch.float64)
    return {
        "fidelity": namespace["ds"],
        "fidelity_trajectory": namespace["traj"],
        "geometry": fisherlab.fisher_geometry(model, data, structures=["block", "kfac"], damping=1e-2),
        "spectrum": fisherlab.fisher_spectra(model, data, kinds=["true"], progress=False),
        "spectral_density": fisherlab.spectral_density(model, data, num_probes=2, num_steps=8, progress=False),
        "training": compare(model, data, {"sgd": {"lr": 0.1}, "adam": {"lr": 1e-3}}, steps=2, batch_size=16,
                            eval_every=2, progress=False),
    }


def test_results_tables_list_every_variable_with_its_dims(datasets: dict) -> None:
    documented = documented_variables()
    assert set(documented) == set(datasets)
    for kind, ds in datasets.items():
        assert ds.attrs["fisherlab_kind"] == kind
        actual = {name: (tuple(var.dims), units_cell(var.attrs)) for name, var in ds.data_vars.items()}
        if kind == "fidelity_trajectory":  # the fidelity variables with a leading step, plus its own
            documented[kind] |= {k: (("step", *d), u) for k, (d, u) in documented["fidelity"].items()}
        assert documented[kind] == actual, kind


def test_dims_table_names_every_dim(datasets: dict) -> None:
    text = (DOCS / "results.md").read_text()
    table = text[text.index("## Dimensions"): text.index("## Selecting")]
    listed = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)?", table, flags=re.M))
    names = {n for pair in listed for n in pair if n}
    assert {d for ds in datasets.values() for d in ds.dims} <= names
