"""torchdyn_snopt: SNOpt, the second-order Neural ODE optimizer, as a torchdyn plugin.

Importing the package registers the ``"snopt"`` and ``"snopt_adjoint"`` sensitivities with
torchdyn's ``NeuralODE``/``ODEProblem``.
"""

from importlib import metadata as _metadata

from torchdyn_snopt.registration import SENSITIVITIES, register

register()

from torchdyn_snopt import models, nn, second_order  # noqa: E402
from torchdyn_snopt.cde import CurvatureTap  # noqa: E402
from torchdyn_snopt.config import Damping, Graft  # noqa: E402
from torchdyn_snopt.curvature import LayerAdapter, register_adapter  # noqa: E402
from torchdyn_snopt.curvature.eigenbasis import Refresh  # noqa: E402
from torchdyn_snopt.horizon import FreeHorizon  # noqa: E402
from torchdyn_snopt.optim import SNOpt, SNOptPreconditioner, read_nfe  # noqa: E402

try:  # pyproject.toml is the one place for the version
    __version__ = _metadata.version("torchdyn-snopt")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0+unknown"

__all__ = [
    "SENSITIVITIES",
    "CurvatureTap",
    "Damping",
    "FreeHorizon",
    "Graft",
    "LayerAdapter",
    "Refresh",
    "SNOpt",
    "SNOptPreconditioner",
    "models",
    "nn",
    "read_nfe",
    "second_order",
    "__version__",
    "register_adapter",
]
