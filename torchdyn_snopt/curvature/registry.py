"""Open registry: module type → adapter class.

Lookup walks the module's MRO, so a subclass of ``nn.Linear`` gets the Linear adapter unless
a more specific adapter is registered for it. Users add their own with
:func:`register_adapter`.
"""

from __future__ import annotations

import torch.nn as nn

from torchdyn_snopt.curvature.base import LayerAdapter

_REGISTRY: dict[type, type[LayerAdapter]] = {}


def register_adapter(module_type: type, adapter: type[LayerAdapter]) -> None:
    """Use ``adapter`` for every module whose type is (or derives from) ``module_type``.

    Raises ``TypeError`` unless ``module_type`` is an ``nn.Module`` subclass and
    ``adapter`` a :class:`LayerAdapter` subclass. Registering again replaces the entry.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type={module_type!r} must be a subclass of torch.nn.Module")
    if not (isinstance(adapter, type) and issubclass(adapter, LayerAdapter)):
        raise TypeError(f"adapter={adapter!r} must be a subclass of torchdyn_snopt.LayerAdapter")
    _REGISTRY[module_type] = adapter


def adapter_for(module: nn.Module, name: str) -> LayerAdapter | None:
    """An adapter for ``module`` or ``None`` when no registered type matches (or it declines)."""
    for cls in type(module).__mro__:
        adapter_cls = _REGISTRY.get(cls)
        if adapter_cls is not None:
            try:
                return adapter_cls(module, name)
            except NotImplementedError:
                return None
    return None


def registered_types() -> tuple[type, ...]:
    """The module types that currently have an adapter."""
    return tuple(_REGISTRY)
