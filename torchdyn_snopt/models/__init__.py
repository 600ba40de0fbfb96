"""Ready-made Neural-ODE models of the paper's experiments."""

from torchdyn_snopt.models.ffjord import FFJORD, ConcatSquashLinear
from torchdyn_snopt.models.image import ImageClassifier

__all__ = ["FFJORD", "ConcatSquashLinear", "ImageClassifier"]
