"""Layers whose internals are visible to SNOpt's Kronecker-factor adapters."""

from torchdyn_snopt.nn.gru import GatePreactivation, GRUCell

__all__ = ["GRUCell", "GatePreactivation"]
