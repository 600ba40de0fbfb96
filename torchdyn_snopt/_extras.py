"""Optional dependencies and the pip extra that installs each.

The core (the sensitivities, the optimizers, the second-order tools) needs torch and torchdyn
only. The Neural CDE route, the bundled datasets, plotting and the benchmark CLI import their
packages when first used, through :func:`require`, so a missing one fails with the command
that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: Top-level module -> the extra of ``torchdyn-snopt`` that installs it.
EXTRA_OF: dict[str, str] = {
    "torchcde": "cde",
    "matplotlib": "bench",
    "sklearn": "bench",
    "sktime": "bench",
    "tqdm": "bench",
    "mlxtend": "bench",
    "river": "data",
}


def install_hint(module: str) -> str:
    """The pip command that installs ``module`` (a top-level name) as an extra."""
    extra = EXTRA_OF.get(module.partition(".")[0])
    if extra is None:
        return f"pip install {module.partition('.')[0]}"
    if extra == "cde":
        return 'pip install "torchdyn-snopt[cde]" (or "torchdyn-snopt[bench]")'
    return f'pip install "torchdyn-snopt[{extra}]"'


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise ``ModuleNotFoundError`` saying that ``purpose`` needs it and
    which extra installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.partition(".")[0]
        missing = (err.name or top).partition(".")[0]
        what = top if missing == top else f"{top} ({missing} is missing)"
        raise ModuleNotFoundError(
            f"{purpose} needs {what}: {install_hint(top)}", name=missing
        ) from err
