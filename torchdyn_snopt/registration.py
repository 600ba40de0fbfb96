"""How ``"snopt"`` and ``"snopt_adjoint"`` enter torchdyn's ``ODEProblem`` dispatch.

torchdyn 1.0.6 picks the backward algorithm inside ``ODEProblem._autograd_func`` with an
if/elif on the sensitivity name and returns ``None`` for names it does not know. We wrap
``ODEProblem.__init__`` (to validate the name and keep ``seminorm``) and ``_autograd_func``
(to hand our two names to :mod:`torchdyn_snopt.adjoint`); every other name goes to torchdyn's
own code unchanged. Nothing in torchdyn's files is edited and wrapping twice is a no-op.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch.nn as nn
import torchdyn
from torchdyn.core.problems import ODEProblem

SENSITIVITIES: tuple[str, ...] = ("snopt_adjoint", "snopt")
TORCHDYN_SENSITIVITIES: tuple[str, ...] = ("autograd", "adjoint", "interpolated_adjoint")
#: The torchdyn release whose private API (below) the registration was written against.
SUPPORTED_TORCHDYN = "1.0.6"
_MARK = "__torchdyn_snopt_wrapped__"
#: ``ODEProblem.__init__`` arguments the wrapper reads, and ``ODEProblem`` attributes the
#: sensitivity reads after construction (checked by :func:`check_torchdyn`).
_INIT_ARGUMENTS = ("vector_field", "solver", "sensitivity", "solver_adjoint", "seminorm")
_PROBLEM_ATTRIBUTES = ("_autograd_func", "odeint", "forward")


def check_torchdyn() -> None:
    """Fail with one clear error when the installed torchdyn lacks what the registration patches.

    Checks ``ODEProblem.__init__``'s parameters and the methods the wrapper replaces or calls
    (torchdyn 1.0.6's private dispatch). Raises ``ImportError`` naming the supported version.
    """
    init = getattr(ODEProblem.__init__, "__wrapped__", ODEProblem.__init__)
    params = set(inspect.signature(init).parameters)
    missing = [a for a in _INIT_ARGUMENTS if a not in params]
    missing += [f"ODEProblem.{a}" for a in _PROBLEM_ATTRIBUTES if not hasattr(ODEProblem, a)]
    if missing:
        version = getattr(torchdyn, "__version__", "unknown")
        raise ImportError(
            f"torchdyn_snopt needs torchdyn=={SUPPORTED_TORCHDYN}; the installed torchdyn "
            f"({version}) lacks {', '.join(missing)}, which the 'snopt' sensitivity patches. "
            f'Install the supported release: pip install "torchdyn=={SUPPORTED_TORCHDYN}"'
        )


def is_snopt_problem(module: nn.Module) -> bool:
    """True when ``module`` is a torchdyn ODE problem using one of :data:`SENSITIVITIES`."""
    return isinstance(module, ODEProblem) and getattr(module, "sensalg", None) in SENSITIVITIES


def _wrap_init(original: Any) -> Any:
    @functools.wraps(original)
    def __init__(self: ODEProblem, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(original).bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        sensitivity = arguments["sensitivity"]
        valid = TORCHDYN_SENSITIVITIES + SENSITIVITIES
        if not isinstance(sensitivity, str) or sensitivity not in valid:
            raise ValueError(
                f"sensitivity={sensitivity!r} is not a known sensitivity; "
                f"accepted values are {', '.join(repr(v) for v in valid)}"
            )
        if sensitivity in SENSITIVITIES and not getattr(type(self)._autograd_func, _MARK, False):
            # e.g. MultipleShootingProblem: its own _autograd_func bypasses our dispatch and
            # would hand torchdyn's forward a None.
            raise ValueError(
                f"sensitivity={sensitivity!r} is not supported by {type(self).__name__}, which "
                "solves with its own backward dispatch; use NeuralODE/ODEProblem with "
                f"sensitivity={sensitivity!r}, or sensitivity='autograd'/'adjoint' here"
            )
        solver_adjoint = arguments["solver_adjoint"]
        instance_adjoint = None
        if sensitivity in SENSITIVITIES and isinstance(solver_adjoint, nn.Module):
            # torchdyn's __init__ only accepts a solver_adjoint given by name.
            instance_adjoint, arguments["solver_adjoint"] = solver_adjoint, None
        original(*bound.args, **bound.kwargs)
        if sensitivity in SENSITIVITIES:
            if instance_adjoint is not None:
                self.solver_adjoint = instance_adjoint
            self.seminorm = bool(arguments["seminorm"])

    setattr(__init__, _MARK, True)
    return __init__


def _wrap_autograd_func(original: Any) -> Any:
    @functools.wraps(original)
    def _autograd_func(self: ODEProblem) -> Any:
        if self.sensalg in SENSITIVITIES:
            from torchdyn_snopt.adjoint import snopt_odeint

            return functools.partial(snopt_odeint, self)
        return original(self)

    setattr(_autograd_func, _MARK, True)
    return _autograd_func


def register() -> None:
    """Teach torchdyn's ``ODEProblem`` (hence ``NeuralODE``) the SNOpt sensitivities.

    Idempotent: calling it again leaves the already-wrapped methods in place. Raises
    ``ImportError`` (via :func:`check_torchdyn`) when torchdyn's internals differ.
    """
    check_torchdyn()
    if not getattr(ODEProblem.__init__, _MARK, False):
        ODEProblem.__init__ = _wrap_init(ODEProblem.__init__)
    if not getattr(ODEProblem._autograd_func, _MARK, False):
        ODEProblem._autograd_func = _wrap_autograd_func(ODEProblem._autograd_func)
