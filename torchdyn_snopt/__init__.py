"""torchdyn_snopt: SNOpt, the second-order Neural ODE optimizer, as a torchdyn plugin.

Importing the package registers the ``"snopt"`` and ``"snopt_adjoint"`` sensitivities with
torchdyn's ``NeuralODE``/``ODEProblem``.
"""

from torchdyn_snopt.registration import SENSITIVITIES, register

register()

from torchdyn_snopt.curvature import LayerAdapter, register_adapter  # noqa: E402
from torchdyn_snopt.optim import SNOpt, SNOptPreconditioner, read_nfe  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "SENSITIVITIES",
    "LayerAdapter",
    "SNOpt",
    "SNOptPreconditioner",
    "read_nfe",
    "__version__",
    "register_adapter",
]
