"""The hyperparameters of :class:`~torchdyn_snopt.SNOptPreconditioner`, validated in one place.

:class:`PrecondConfig` is built once per optimizer; its constructor checks every field (a bad
value raises ``ValueError``/``TypeError`` naming the argument, its value and what is accepted)
and normalises the choices given as strings to their enums, before anything touches the model.
"""

from __future__ import annotations

import enum
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


class Damping(str, enum.Enum):
    """How ``eps`` damps the curvature eigenvalues (a string works too).

    ``RELATIVE`` (default): ``m + eps·mean(m)``, a fraction of the layer's mean second moment,
    so the same ``eps`` fits every layer and loss scale. ``FIXED``: ``m + eps``, the paper's
    Tikhonov damping (§3.2) in the per-sample squared-gradient units of ``m``.
    """

    RELATIVE = "relative"
    FIXED = "fixed"


class Graft(str, enum.Enum):
    """Where :class:`~torchdyn_snopt.SNOpt`'s step length comes from (a string works too).

    ``ADAM`` (default): each layer moves along SNOpt's preconditioned direction by the length
    of Adam's step on the raw gradient (grafting, Agarwal et al. 2020), so ``lr`` means what
    it means for Adam. ``NONE``: ``lr`` times the preconditioned gradient (the paper's Alg. 1).
    """

    ADAM = "adam"
    NONE = "none"


def parse_choice(name: str, value: Any, kind: type[enum.Enum]) -> Any:
    """``value`` as a member of the string enum ``kind``; ``ValueError`` naming ``name``."""
    try:
        return kind(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"{name}={value!r} is invalid; accepted: {accepted}") from None


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int >= {low}")
    if value < low:
        raise ValueError(f"{name}={value!r} is invalid; accepted: an int >= {low}")


@dataclass(frozen=True)
class PrecondConfig:
    """SNOpt's curvature settings (defaults as in :class:`~torchdyn_snopt.SNOptPreconditioner`,
    where each is documented).

    ``eps`` (damping, see ``damping``), ``update_freq`` (steps per refresh),
    ``alpha`` (running-average weight of ``m``), ``full_precond``, ``grid_size`` (points of
    eq. 13's grid), ``weight_decay`` (``γ``), ``kl_clip`` (None = off), ``lr`` (initial
    learning rate, read by ``kl_clip``), ``process_group`` (:class:`Group`, None or a
    ``ProcessGroup``), ``distribute_eigh``, ``refresh`` (:class:`Refresh`), ``damping``
    (:class:`Damping`).
    """

    eps: float = 0.1
    update_freq: int = 10
    alpha: float = 0.75
    full_precond: bool = True
    grid_size: int = 100
    weight_decay: float = 0.0
    kl_clip: float | None = None
    lr: float = 1.0
    process_group: Any = AUTO
    distribute_eigh: bool = False
    refresh: Refresh | str = Refresh.EXACT
    damping: Damping | str = Damping.RELATIVE

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
        damping = parse_choice("damping", self.damping, Damping)
        group = check_process_group(self.process_group)
        if not isinstance(self.distribute_eigh, bool):
            raise TypeError(f"distribute_eigh={self.distribute_eigh!r} must be a bool")
        # normalised: floats as floats, choices as enums
        for name in ("eps", "alpha", "weight_decay", "lr"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "refresh", refresh)
        object.__setattr__(self, "damping", damping)
        object.__setattr__(self, "process_group", group)


@dataclass(frozen=True)
class StepConfig:
    """:class:`~torchdyn_snopt.SNOpt`'s own step settings (documented there): ``lr``,
    ``momentum``, ``graft`` (:class:`Graft`), Adam's ``betas`` and ``graft_eps`` of the graft,
    the ``warmup`` steps of the rate, the graft's ``length_cap`` (None = off), the rate's
    ``backoff`` (0 = off) and the graft's ``spike_ratio`` (None = off). No field has
    a default: the defaults are :class:`~torchdyn_snopt.SNOpt`'s signature, which passes
    every field.
    """

    lr: float
    momentum: float
    graft: Graft | str
    betas: tuple[float, float]
    graft_eps: float
    warmup: int
    length_cap: float | None
    backoff: float
    spike_ratio: float | None

    def __post_init__(self) -> None:
        check_lr(self.lr)
        backoff = self.backoff
        if isinstance(backoff, bool) or not (_finite_number(backoff) and backoff >= 0):
            raise ValueError(
                f"backoff={backoff!r} is invalid; accepted: a finite float >= 0 (0 = off)"
            )
        cap = self.length_cap
        if cap is not None and (isinstance(cap, bool) or not (_finite_number(cap) and cap >= 1)):
            raise ValueError(
                f"length_cap={cap!r} is invalid; accepted: None (off) or a finite float >= 1"
            )
        spike = self.spike_ratio
        if spike is not None and (
            isinstance(spike, bool) or not (_finite_number(spike) and spike > 1)
        ):
            raise ValueError(
                f"spike_ratio={spike!r} is invalid; accepted: None (off) or a finite float > 1"
            )
        mom = self.momentum
        if not (isinstance(mom, int | float) and 0.0 <= mom < 1.0):
            raise ValueError(f"momentum={mom!r} is invalid; accepted: a float in [0, 1)")
        graft = parse_choice("graft", self.graft, Graft)
        betas = self.betas
        if not (
            isinstance(betas, tuple | list)
            and len(betas) == 2
            and all(isinstance(b, int | float) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise ValueError(
                f"betas={betas!r} is invalid; accepted: two floats in [0, 1) (Adam's beta1, beta2)"
            )
        if not (_finite_number(self.graft_eps) and self.graft_eps > 0):
            raise ValueError(
                f"graft_eps={self.graft_eps!r} is invalid; accepted: a finite float > 0"
            )
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(
                f"warmup={self.warmup!r} is invalid; accepted: an int >= 0 (steps; 0 = none)"
            )
        object.__setattr__(self, "graft", graft)
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        for name in ("lr", "momentum", "graft_eps", "backoff"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if cap is not None:
            object.__setattr__(self, "length_cap", float(cap))
        if spike is not None:
            object.__setattr__(self, "spike_ratio", float(spike))


__all__ = [
    "Damping",
    "Graft",
    "Group",
    "PrecondConfig",
    "Refresh",
    "StepConfig",
    "check_lr",
    "parse_choice",
]
