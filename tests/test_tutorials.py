"""Every notebook in ``tutorials/`` runs top to bottom without an error.

Each ``tutorials/*.ipynb`` is executed with ``nbclient`` in a fresh IPython kernel, with the
notebook's folder as working directory; a cell that raises fails the test (300 s per cell at
most). New notebooks are picked up automatically.

Budget: a tutorial that trains for a wall-clock budget assigns it in its first code cell as
``BUDGET_S = <seconds>`` on a line of its own. Before execution that line is rewritten to
``BUDGET_S = 2.0`` (:data:`TEST_BUDGET_S`), so the test trains for 2 s per optimizer instead of
the tutorial's default. Notebooks without such a line run unchanged.

Kernel: the test writes a throwaway ``python3`` kernelspec whose command is the interpreter
running pytest (``sys.executable``, i.e. the virtual environment's python), and gives nbclient a
kernel manager that looks only there. Kernelspecs installed elsewhere (user or system
``python3`` specs pointing at another interpreter) are ignored, and no
``ipykernel install`` step is needed. Needs ``nbformat``, ``nbclient`` and ``ipykernel``
(all in the ``test`` extra; ``jupyter_client`` comes with them).
"""

import re
from pathlib import Path

import ipykernel.kernelspec
import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

TUTORIALS_DIR = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS_DIR.glob("*.ipynb"))
TEST_BUDGET_S = 2.0
CELL_TIMEOUT_S = 300
KERNEL_NAME = "python3"
_BUDGET_LINE = re.compile(r"^BUDGET_S[ \t]*=[^#\n]*?(?=[ \t]*(?:#|$))", flags=re.MULTILINE)


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks in {TUTORIALS_DIR}"


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec folder holding ``python3`` → ``sys.executable -m ipykernel_launcher``."""
    root = tmp_path_factory.mktemp("kernels")
    ipykernel.kernelspec.write_kernel_spec(path=root / KERNEL_NAME)
    return root


def _with_test_budget(nb) -> None:
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    if code_cells:
        code_cells[0].source = _BUDGET_LINE.sub(
            f"BUDGET_S = {TEST_BUDGET_S!r}", code_cells[0].source
        )


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_tutorial_runs(path: Path, kernel_dir: Path):
    nb = nbformat.read(path, as_version=4)
    _with_test_budget(nb)
    km = KernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]),
    )
    client = nbclient.NotebookClient(
        nb,
        km=km,
        kernel_name=KERNEL_NAME,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
