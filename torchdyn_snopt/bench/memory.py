"""Peak memory of a training step: CUDA allocator statistics or live CPU heap bytes."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn


def _heap_in_use() -> Callable[[], int] | None:
    """Bytes the C heap has handed out and not freed (glibc ``mallinfo2``: all arenas, mmapped
    blocks included), i.e. live CPU tensor memory without the allocator's cached free pages."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None

    class _MallInfo2(ctypes.Structure):
        _fields_ = [
            (n, ctypes.c_size_t)
            for n in (
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            )
        ]

    fn.restype = _MallInfo2

    def in_use() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return in_use


def peak_memory_mb(step: Callable[[], None], model: nn.Module, device: torch.device) -> float:
    """Peak memory above the starting level during ``step()`` (max over 2 calls after a warm-up).

    CUDA: the allocator's peak statistics. CPU: live heap bytes (glibc ``mallinfo2``) sampled at
    every module call (every RK stage of every solve) and after each step; NaN where unavailable.
    """
    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(2):
            step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    in_use = _heap_in_use()
    if in_use is None:
        return float("nan")
    peak = [0]

    def sample(*_: Any) -> None:
        peak[0] = max(peak[0], in_use())

    handles = [m.register_forward_hook(sample) for m in model.modules()]
    try:
        step()  # warm-up: optimizer state, lazily created buffers
        gc.collect()
        base = in_use()
        peak[0] = base
        for _ in range(2):
            step()
            sample()
    finally:
        for h in handles:
            h.remove()
    return (peak[0] - base) / 2**20
