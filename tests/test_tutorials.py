"""Every notebook in ``tutorials/`` runs top to bottom without an error, and keeps the outputs
of its last full execution.

Execution goes through ``tutorials/execute.py`` (the command that stores the outputs): each
``tutorials/*.ipynb`` runs in a fresh IPython kernel started from this interpreter, with the
notebook's folder as working directory; a cell that raises fails the test. New notebooks are
picked up automatically.

Budget: a tutorial that trains for a wall-clock budget assigns it in its first code cell as
``BUDGET_S = <seconds>`` on a line of its own. The test rewrites that line to
``BUDGET_S = 2.0`` (:data:`TEST_BUDGET_S`) in an in-memory copy, so it trains for 2 s per
optimizer instead of the tutorial's budget and never writes the notebook: the stored outputs
stay those of ``python tutorials/execute.py``. Notebooks without such a line run unchanged.
Needs ``nbformat``, ``nbclient`` and ``ipykernel`` (all in the ``test`` extra).
"""

import importlib.util
from pathlib import Path

import nbformat
import pytest

TUTORIALS_DIR = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS_DIR.glob("*.ipynb"))
TEST_BUDGET_S = 2.0
CELL_TIMEOUT_S = 300


def _load_executor():
    spec = importlib.util.spec_from_file_location("tutorials_execute", TUTORIALS_DIR / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


executor = _load_executor()


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks in {TUTORIALS_DIR}"


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory) -> Path:
    return executor.write_kernel_spec(tmp_path_factory.mktemp("kernels"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_tutorial_stores_outputs(path: Path):
    """The committed notebook was executed in full, in order, without errors, at a budget of
    its own (not the test's), and shows at least one plot."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.get("execution_count") for c in code]
    assert counts == list(range(1, len(code) + 1)), f"not executed top to bottom: {counts}"
    outputs = [out for c in code for out in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no inline plot stored"
    first = next((c.source for c in code if executor.BUDGET_LINE.search(c.source)), None)
    if first is not None:
        assert f"BUDGET_S = {TEST_BUDGET_S!r}" not in first, "outputs of a test-budget run"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_tutorial_runs(path: Path, kernel_dir: Path):
    nb = nbformat.read(path, as_version=4)
    executor.set_budget(nb, TEST_BUDGET_S)
    # raises CellExecutionError, naming the cell, on the first error; writes nothing
    executor.execute(nb, kernel_dir, cwd=TUTORIALS_DIR, timeout=CELL_TIMEOUT_S)
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
