"""Offline datasets (nothing downloads at run time)."""

from torchdyn_snopt.data.digits import load_digits

__all__ = ["load_digits"]
