"""Name -> constructor registry for network architectures (timm-style).

Architectures register where they are defined, with :func:`register_model` on a constructor in their own module
of :mod:`msnoop.models` (e.g. ``microsnoop_cnn`` and ``test_cnn`` in :mod:`msnoop.models.cnn`). The registry
imports every module of the package on its first lookup, so a new architecture is one new module; each network
it builds is checked against :class:`msnoop.models.protocol.PretrainableNetwork`.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from msnoop.models.protocol import check_network

__all__ = ["create_model", "list_models", "register_model"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_discovered = False


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` (a constructor taking keyword overrides) under its own name; warns when a name is overwritten."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        warnings.warn(
            f"Overwriting architecture {name!r} in the msnoop registry with {fn.__module__}.{name}.", stacklevel=2
        )
    _MODELS[name] = fn
    return fn


def _discover() -> None:
    """Import every module of :mod:`msnoop.models` once, so that their architectures are registered."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    import msnoop.models as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def list_models() -> list[str]:
    """Names of the registered architectures, sorted."""
    _discover()
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture with randomly initialised weights.

    Raises:
        KeyError: ``name`` is not registered; the message lists the valid names.
        TypeError: The network lacks what :class:`~msnoop.models.protocol.PretrainableNetwork` asks for.
    """
    _discover()
    if name not in _MODELS:
        raise KeyError(f"Unknown architecture {name!r}; registered architectures: {', '.join(list_models())}.")
    net = _MODELS[name](**kwargs)
    check_network(net, f"architecture {name!r}")
    return net
