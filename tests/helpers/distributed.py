"""Multi-process tests: a gloo group on localhost, the environment of child interpreters and
the local spawner (re-exported from :mod:`torchdyn_snopt.distributed`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from torchdyn_snopt.distributed import free_port, spawn

__all__ = ["free_port", "init_gloo", "repo_env", "spawn"]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo group on localhost (one intra-op thread: the machine's cores are shared)."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def repo_env() -> dict[str, str]:
    """``os.environ`` with this checkout first on ``PYTHONPATH`` and one thread per process,
    for child interpreters (torchrun, scripts) that must import this tree's package."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env
