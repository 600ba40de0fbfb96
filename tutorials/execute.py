"""Execute the tutorial notebooks and store their outputs in them.

From the repository root, with the ``test`` extra installed (nbclient, nbformat, ipykernel)::

    python tutorials/execute.py                 # every tutorials/*.ipynb, outputs written back
    python tutorials/execute.py 01 04           # only the notebooks named 01*, 04*
    python tutorials/execute.py --budget 2 --check   # at BUDGET_S = 2, writing nothing

Budget: a tutorial that trains for a wall-clock budget assigns it in its first code cell as
``BUDGET_S = <seconds>`` on a line of its own. Without ``--budget`` each notebook runs at the
value it holds (the budget of its committed outputs); ``--budget S`` rewrites that line to
``BUDGET_S = S`` first, so a notebook written back always shows the budget its outputs came from.

Each notebook runs top to bottom in a fresh IPython kernel (plots inline as PNG), with the
``tutorials/`` folder as working directory and ``OMP_NUM_THREADS=1`` unless the environment
sets it; the first cell that raises stops it, and nothing
is written for that notebook. ``tests/test_tutorials.py`` calls :func:`execute` at a 2 s budget
on in-memory copies, so the test never touches the stored outputs.

Kernel: a throwaway ``python3`` kernelspec whose command is this interpreter
(``sys.executable``), so the kernel imports what this environment has installed, whatever
kernelspecs the user or the system hold; no ``ipykernel install`` step is needed.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import ipykernel.kernelspec
import nbclient
import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

TUTORIALS_DIR = Path(__file__).resolve().parent
KERNEL_NAME = "python3"
CELL_TIMEOUT_S = 600
# the assignment's value, up to an optional trailing comment
BUDGET_LINE = re.compile(r"^BUDGET_S[ \t]*=[^#\n]*?(?=[ \t]*(?:#|$))", flags=re.MULTILINE)


def notebooks(selectors: list[str] | None = None) -> list[Path]:
    """``tutorials/*.ipynb`` in name order; with selectors, those whose name starts with one."""
    found = sorted(TUTORIALS_DIR.glob("*.ipynb"))
    if not selectors:
        return found
    chosen = [p for p in found if any(p.name.startswith(s) for s in selectors)]
    unknown = [s for s in selectors if not any(p.name.startswith(s) for p in found)]
    if unknown:
        raise SystemExit(f"no notebook in {TUTORIALS_DIR} starts with {', '.join(unknown)}")
    return chosen


def write_kernel_spec(root: Path) -> Path:
    """Write a ``python3`` kernelspec under ``root`` that runs ``sys.executable``."""
    ipykernel.kernelspec.write_kernel_spec(path=root / KERNEL_NAME)
    return root


def set_budget(nb, budget_s: float) -> bool:
    """Rewrite ``BUDGET_S = ...`` in the first code cell that assigns it; False if none does."""
    for cell in nb.cells:
        if cell.cell_type == "code" and BUDGET_LINE.search(cell.source):
            cell.source = BUDGET_LINE.sub(f"BUDGET_S = {float(budget_s)!r}", cell.source, count=1)
            return True
    return False


def execute(nb, kernel_dir: Path, cwd: Path = TUTORIALS_DIR, timeout: int = CELL_TIMEOUT_S):
    """Run every cell of ``nb`` (changed in place) in a fresh kernel from ``kernel_dir``.

    Raises ``nbclient.exceptions.CellExecutionError`` naming the first cell that fails.
    """
    km = KernelManager(
        kernel_name=KERNEL_NAME,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]),
    )
    client = nbclient.NotebookClient(
        nb,
        km=km,
        kernel_name=KERNEL_NAME,
        timeout=timeout,
        allow_errors=False,
        record_timing=False,  # no timestamps in the stored notebook
        resources={"metadata": {"path": str(cwd)}},
    )
    # A backend chosen for scripts would replace the inline one and the plots would not land
    # in the outputs; the tutorials compare wall-clock on one thread.
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        client.execute(env=env)
    finally:
        # nbclient does not shut down a kernel whose manager it was given; each notebook would
        # leave its kernel process (and the memory of its models) behind until this one exits
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook name prefixes (default: all)")
    parser.add_argument(
        "--budget", type=float, help="BUDGET_S to run at (default: each notebook's own value)"
    )
    parser.add_argument("--check", action="store_true", help="execute only; write nothing")
    args = parser.parse_args(argv)
    if args.budget is not None and not args.budget > 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    paths = notebooks(args.names)
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        kernel_dir = write_kernel_spec(Path(tmp))
        for path in paths:
            nb = nbformat.read(path, as_version=4)
            if args.budget is not None:
                set_budget(nb, args.budget)
            start = time.perf_counter()
            print(f"{path.name}: executing", flush=True)
            execute(nb, kernel_dir)
            took = time.perf_counter() - start
            if not args.check:
                nbformat.write(nb, path)
            done = "executed" if args.check else "written"
            print(f"{path.name}: {done} in {took:.0f} s", flush=True)
    print(f"{len(paths)} notebook(s) in {time.perf_counter() - total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
