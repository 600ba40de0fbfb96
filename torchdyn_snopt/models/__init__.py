"""Ready-made Neural-ODE models of the paper's experiments."""

from torchdyn_snopt.models.ffjord import FFJORD, ConcatSquashLinear
from torchdyn_snopt.models.image import ImageClassifier
from torchdyn_snopt.models.ncde import NeuralCDE
from torchdyn_snopt.models.odernn import ODERNN

__all__ = ["FFJORD", "ConcatSquashLinear", "ImageClassifier", "NeuralCDE", "ODERNN"]
