"""The notebooks: every one runs top to bottom in smoke mode (CI=1 makes them pick the smoke preset), in order,
in one folder, as a reader runs them, sharing notebook 01's base; the committed ones carry their outputs at the
`quick` preset; their prose states no result; notebooks/regenerate.py knows every one of them."""

import importlib.util
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from ministacks.report import paper

FOLDER = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
# the line every notebook names the shared base's folder with (notebook 01 pretrains into it)
BASE_LINE = 'BASE_DIR = Path("runs") / f"notebooks-{PRESET.name}"'


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ should hold the step-by-step notebooks"


def test_regenerate_runs_every_notebook_in_order():
    spec = importlib.util.spec_from_file_location("regenerate", FOLDER / "regenerate.py")
    regenerate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regenerate)
    assert list(regenerate.NOTEBOOKS) == [p.stem for p in NOTEBOOKS]  # numbered: sorted is the reading order
    # a progress bar's redraws become its last state; a bar that cleared itself leaves nothing
    assert regenerate.terminal_text("a\r 50%\r100%\nb") == "100%\nb"
    assert regenerate.terminal_text("bar\r   \r\nnext") == "next"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working folder for all the notebooks of a test session, as a reader has: 02-05 find 01's base there
    (a notebook selected alone with -k makes its own)."""
    return tmp_path_factory.mktemp("notebooks")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, workdir, monkeypatch):
    monkeypatch.setenv("CI", "1")
    base = workdir / "runs" / "notebooks-smoke" / "base" / "model.safetensors"
    before = base.stat().st_mtime_ns if base.is_file() else None
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    # every code cell ran and none raised (nbclient raises on error); outputs exist where they should
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code)
    assert base.is_file(), "every notebook leaves the shared base in runs/notebooks-smoke"
    if before is not None and not path.name.startswith("01"):  # 01 writes its base (again); the others only load it
        assert base.stat().st_mtime_ns == before, f"{path.name} pretrained again instead of loading notebook 01's base"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebooks_share_one_base(path):
    source = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    assert BASE_LINE in source
    if not path.name.startswith("01"):
        assert "ensure_base(PRESET, BASE_DIR" in source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_is_executed_at_quick(path):
    """What a reader opens: every code cell run once, in order, in one kernel, at the quick preset
    (notebooks/regenerate.py writes it so), with no error and with its figures."""
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("ministacks", {}).get("preset") == "quick", (
        f"{path.name} is not committed executed at quick: run `.venv/bin/python notebooks/regenerate.py`")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert sum(bool(c.outputs) for c in code) >= 0.8 * len(code)


def _prose(cell_source: str) -> str:
    """A markdown cell without its code (fenced and inline) and its mathematics: the sentences."""
    text = re.sub(r"```.*?```", " ", cell_source, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.S)
    return re.sub(r"`[^`]*`|\$[^$]*\$", " ", text)


def _paper_numbers() -> set[str]:
    """Every number report/paper.py quotes, as a markdown cell would write it (its printed forms)."""
    values: list[float] = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, float):
            values.append(x)

    for name in paper.__all__:
        walk(getattr(paper, name))
    forms = set()
    for v in values:
        forms |= {f"{v:.4f}", f"{v:.3f}", f"{v:.0%}", f"{v:.1%}"}
        if v >= 1e6:
            forms.add(f"{v / 1e6:.1f}M")
    forms.add(f"{paper.PAPER_EXP1['minutes']['moe'] / paper.PAPER_EXP1['minutes']['lora']:.1f}×")
    return forms


# the forms a sentence stating a result takes: a share, a loss to three decimals or more, a comparative
RESULT_FORMS = re.compile(r"\d%|\d\.\d{3,}|\b(better|worse|lower|higher) than\b|\boutperform", re.I)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_markdown_states_no_result(path):
    """Results change with the code, so the prose only describes the method and what to look for: every
    sentence that compares or concludes is printed by a code cell from the numbers just computed, and the
    paper's numbers are printed from report/paper.py. A markdown cell with a share, a loss-like number, a
    comparative or one of the paper's numbers is stating a result."""
    paper_numbers = _paper_numbers()
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        if cell.cell_type != "markdown":
            continue
        prose = _prose(cell.source)
        found = RESULT_FORMS.search(prose)
        assert not found, f"{path.name} cell {i} states a result in prose: {found.group(0)!r}"
        quoted = [n for n in paper_numbers if re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", prose)]
        assert not quoted, f"{path.name} cell {i} quotes the paper's {quoted} in prose: print it from report/paper.py"
        assert "not yet measured" not in cell.source, f"{path.name} cell {i} has a run time regenerate.py did not fill"


def test_quoted_run_times_are_measured():
    """A run time in the prose sits in a span regenerate.py fills from the tagged cell's execution (fill_times),
    and it fails on a span no code cell measures."""
    spec = importlib.util.spec_from_file_location("regenerate", FOLDER / "regenerate.py")
    regenerate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(regenerate)
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        quoted = {m[0] for c in nb.cells if c.cell_type == "markdown" for m in regenerate.TIME_SPAN.findall(c.source)}
        assert set(regenerate.tagged_seconds(nb)) >= quoted, path.name
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("pass", metadata={"tags": ["time:run"], "execution": {
            "iopub.status.busy": "2026-01-01T00:00:00Z", "iopub.status.idle": "2026-01-01T00:03:10Z"}}),
        nbformat.v4.new_markdown_cell("it took <!--time:run-->?<!--/time--> here")])
    regenerate.fill_times(nb)
    assert nb.cells[1].source == "it took <!--time:run-->about 3.2 min<!--/time--> here"
    nb.cells.append(nbformat.v4.new_markdown_cell("<!--time:other-->?<!--/time-->"))
    with pytest.raises(ValueError, match="other"):
        regenerate.fill_times(nb)
