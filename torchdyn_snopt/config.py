"""The hyperparameters of :class:`~torchdyn_snopt.SNOptPreconditioner`, validated in one place.

:class:`PrecondConfig` is built once per optimizer; its constructor checks every field (a bad
value raises ``ValueError``/``TypeError`` naming the argument, its value and what is accepted)
and normalises the choices given as strings to their enums, before anything touches the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torchdyn_snopt.curvature.eigenbasis import Refresh, parse_refresh
from torchdyn_snopt.distributed import AUTO, Group, check_process_group


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def check_lr(lr: Any) -> None:
    """``lr`` must be a finite number > 0."""
    if not (_finite_number(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} is invalid; accepted: a finite float > 0")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int >= {low}")
    if value < low:
        raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= {low}")


@dataclass(frozen=True)
class PrecondConfig:
    """SNOpt's curvature settings (defaults as in :class:`~torchdyn_snopt.SNOptPreconditioner`,
    where each is documented).

    ``eps`` (damping, per-sample squared-gradient scale), ``update_freq`` (steps per refresh),
    ``alpha`` (running-average weight of ``m``), ``full_precond``, ``grid_size`` (points of
    eq. 13's grid), ``weight_decay`` (``γ``), ``kl_clip`` (None = off), ``lr`` (initial
    learning rate, read by ``kl_clip``), ``process_group`` (:class:`Group`, None or a
    ``ProcessGroup``), ``distribute_eigh``, ``refresh`` (:class:`Refresh`).
    """

    eps: float = 0.05
    update_freq: int = 100
    alpha: float = 0.75
    full_precond: bool = False
    grid_size: int = 100
    weight_decay: float = 0.0
    kl_clip: float | None = None
    lr: float = 1.0
    process_group: Any = AUTO
    distribute_eigh: bool = False
    refresh: Refresh | str = Refresh.EXACT

    def __post_init__(self) -> None:
        check_lr(self.lr)
        kl = self.kl_clip
        if kl is not None and not (_finite_number(kl) and kl > 0):
            raise ValueError(f"kl_clip={kl!r} is invalid; accepted: None or a float > 0")
        if not (_finite_number(self.eps) and self.eps > 0):
            raise ValueError(f"eps={self.eps!r} is invalid; accepted: a finite float > 0")
        _check_int("update_freq", self.update_freq, 1)
        if not (isinstance(self.alpha, int | float) and 0.0 <= self.alpha < 1.0):
            raise ValueError(f"alpha={self.alpha!r} is invalid; accepted: a float in [0, 1)")
        _check_int("grid_size", self.grid_size, 2)
        wd = self.weight_decay
        if not (_finite_number(wd) and wd >= 0):
            raise ValueError(f"weight_decay={wd!r} is invalid; accepted: a float >= 0")
        refresh = parse_refresh(self.refresh)
        group = check_process_group(self.process_group)
        if not isinstance(self.distribute_eigh, bool):
            raise TypeError(f"distribute_eigh={self.distribute_eigh!r} must be a bool")
        # normalised: floats as floats, choices as enums
        for name in ("eps", "alpha", "weight_decay", "lr"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "refresh", refresh)
        object.__setattr__(self, "process_group", group)


__all__ = ["Group", "PrecondConfig", "Refresh", "check_lr"]
