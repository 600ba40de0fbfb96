"""Layer adapters behind an open registry (module type → adapter) and curvature sampling."""

import torch.nn as nn
from torchdyn.nn import GalConv2d, GalLinear

from torchdyn_snopt.curvature.base import LayerAdapter
from torchdyn_snopt.curvature.conv import Conv2dAdapter
from torchdyn_snopt.curvature.galerkin import GalConv2dAdapter, GalLinearAdapter
from torchdyn_snopt.curvature.gru import GatePreactivationAdapter
from torchdyn_snopt.curvature.linear import LinearAdapter
from torchdyn_snopt.curvature.registry import adapter_for, register_adapter, registered_types
from torchdyn_snopt.nn import GatePreactivation

register_adapter(nn.Linear, LinearAdapter)
register_adapter(nn.Conv2d, Conv2dAdapter)
register_adapter(GalLinear, GalLinearAdapter)
register_adapter(GalConv2d, GalConv2dAdapter)
register_adapter(GatePreactivation, GatePreactivationAdapter)

__all__ = [
    "Conv2dAdapter",
    "GalConv2dAdapter",
    "GalLinearAdapter",
    "GatePreactivationAdapter",
    "LayerAdapter",
    "LinearAdapter",
    "adapter_for",
    "register_adapter",
    "registered_types",
]
