"""The bench names earlier releases (and the tutorials) import from here, re-exported.

New code imports from the module that owns each name: :mod:`~torchdyn_snopt.bench.loop`,
:mod:`~torchdyn_snopt.bench.records`, :mod:`~torchdyn_snopt.bench.optimizers`,
:mod:`~torchdyn_snopt.bench.memory`, :mod:`~torchdyn_snopt.bench.outputs` and
:mod:`~torchdyn_snopt.bench.session`.
"""

from torchdyn_snopt.bench.loop import evaluate, train_for
from torchdyn_snopt.bench.memory import peak_memory_mb
from torchdyn_snopt.bench.optimizers import OPTIMIZERS, make_optimizer
from torchdyn_snopt.bench.outputs import write_outputs
from torchdyn_snopt.bench.records import Point, RunResult, format_table, summary_rows
from torchdyn_snopt.bench.session import check_run_args

__all__ = [
    "OPTIMIZERS",
    "Point",
    "RunResult",
    "check_run_args",
    "evaluate",
    "format_table",
    "make_optimizer",
    "peak_memory_mb",
    "summary_rows",
    "train_for",
    "write_outputs",
]
