"""The optimizers a bench compares, built by name over all of a model's parameters."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from torchdyn_snopt.optim import SNOpt

#: The optimizers every equal-budget bench compares.
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd", "snopt")
#: Every name :func:`make_optimizer` builds (``bench suite`` also compares the last two).
KNOWN_OPTIMIZERS: tuple[str, ...] = (*OPTIMIZERS, "soap", "snopt-default")
#: The rate ``snopt-default`` would pass if ``SNOpt``'s ``lr`` had no default (it has one
#: now): the reference rate of the released image experiments (implementation notes).
SNOPT_REFERENCE_LR = 0.01
BENCH_EXTRA_HINT = 'pip install "torchdyn-snopt[bench]"'


def snopt_default_lr() -> float | None:
    """``SNOpt``'s default ``lr``; None while it has none (``SNOpt(model)`` fails)."""
    default = inspect.signature(SNOpt).parameters["lr"].default
    return None if default is inspect.Parameter.empty else float(default)


def snopt_lr_has_default() -> bool:
    """Whether ``SNOpt(model)`` works, i.e. its ``lr`` argument has a default."""
    return snopt_default_lr() is not None


#: ``SNOpt``'s default learning rate: the rate of the benches' ``snopt`` (run at its defaults).
SNOPT_LR: float = snopt_default_lr() or SNOPT_REFERENCE_LR


def require_soap() -> Any:
    """``pytorch_optimizer.SOAP``; ImportError naming the bench extra when it is missing."""
    try:
        from pytorch_optimizer import SOAP
    except ImportError as err:
        raise ImportError(
            f"the soap optimizer needs pytorch-optimizer: {BENCH_EXTRA_HINT}"
        ) from err
    return SOAP


def make_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    snopt_options: Mapping[str, Any],
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Adam, SGD (momentum 0.9), SOAP (``pytorch_optimizer``'s defaults otherwise) or
    ``SNOpt(**snopt_options)`` over all of ``model``'s parameters, each with the weight decay
    ``weight_decay`` (default 0): coupled L2 (``γθ`` added to the gradient, so Adam, SGD and
    SNOpt minimise the same regularised loss; SNOpt also adds ``γ`` to its damping, §3.2),
    decoupled for SOAP (its own rule).

    ``snopt-default`` is SNOpt with every argument at its default except ``lr``: exactly
    ``SNOpt(model)`` when ``lr`` is ``SNOpt``'s default rate, else ``SNOpt(model, lr=lr)``
    (``bench suite``'s headline runs pass the default, ``--lr-sensitivity`` a grid around
    it; while ``SNOpt``'s ``lr`` has no default, the suite passes
    :data:`SNOPT_REFERENCE_LR`). ``snopt_options`` are ignored and it takes no weight decay
    (ValueError if ``weight_decay`` is not 0). Every SNOpt argument after ``lr`` is passed
    by keyword.
    """
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "soap":
        return require_soap()(model.parameters(), lr=lr, weight_decay=weight_decay)
    if name == "snopt":
        return SNOpt(model, lr=lr, weight_decay=weight_decay, **snopt_options)
    if name == "snopt-default":
        if weight_decay:
            raise ValueError(
                f"weight_decay={weight_decay!r} is invalid for snopt-default; accepted: 0"
            )
        if lr == snopt_default_lr():
            return SNOpt(model)  # type: ignore[call-arg]  # lr has a default in this case
        return SNOpt(model, lr=lr)
    raise ValueError(f"optimizer={name!r} is unknown; accepted: {', '.join(KNOWN_OPTIMIZERS)}")
