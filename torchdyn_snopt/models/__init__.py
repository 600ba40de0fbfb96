"""Ready-made Neural-ODE models of the paper's experiments."""

from torchdyn_snopt.models.image import ImageClassifier
from torchdyn_snopt.models.ncde import NeuralCDE
from torchdyn_snopt.models.odernn import ODERNN

__all__ = ["ImageClassifier", "NeuralCDE", "ODERNN"]
