"""Where a benchmark number came from: command line, date, machine and package versions.

Every bench writes :func:`environment` into its JSON; ``torchdyn-snopt report`` prints it as
the footer of each table it generates.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from typing import Any


def cpu_info(field: str, fallback: str) -> str:
    """The first ``field`` of ``/proc/cpuinfo`` (e.g. ``"model name"``, ``"vendor_id"``), or
    ``fallback`` where there is none (no such file, other platforms)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return fallback


def environment(command: str = "") -> dict[str, Any]:
    """Command line, date, machine and versions for the JSON and markdown headers."""
    import torch
    import torchdyn

    import torchdyn_snopt

    try:
        import pytorch_optimizer

        popt = getattr(pytorch_optimizer, "__version__", None) or _dist_version("pytorch_optimizer")
    except ImportError:
        popt = None
    return {
        "command": command or short_command(" ".join(sys.argv)),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu_info("model name", platform.processor() or "unknown"),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchdyn": getattr(torchdyn, "__version__", None) or _dist_version("torchdyn"),
            "torchdyn_snopt": torchdyn_snopt.__version__,
            "pytorch_optimizer": popt,
        },
    }


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def short_command(command: str) -> str:
    """``command`` with its program named without its folder (``/x/.venv/bin/torchdyn-snopt
    bench ...`` → ``torchdyn-snopt bench ...``): the line a reader types. A package run with
    ``python -m`` has its ``__main__.py`` as program (``sys.argv[0]``); it is named as
    ``python -m <package>`` (``torchdyn_snopt`` when the folder is gone, as in records that
    were shortened before this rule)."""
    program, _, rest = command.partition(" ")
    name = os.path.basename(program)
    if name == "__main__.py":
        package = os.path.basename(os.path.dirname(program)) or "torchdyn_snopt"
        name = f"python -m {package}"
    return f"{name} {rest}".strip()


def footer(env: dict[str, Any] | None) -> str:
    """One markdown line: command, date, machine and versions of a run (or that it is unknown)."""
    if not env:
        return "_Run record without command, date or machine (written before they were kept)._"
    m, v = env.get("machine", {}), env.get("versions", {})
    versions = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    command = short_command(env.get("command", "?"))
    return (
        f"_`{command}` on {env.get('date', '?')}; {m.get('cpu', '?')}, "
        f"{m.get('cpu_count', '?')} CPUs, {m.get('torch_threads', '?')} torch threads; "
        f"{versions}._"
    )
