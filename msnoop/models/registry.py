"""Name -> constructor registry for network architectures (timm-style)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from msnoop.models.cnn import MicrosnoopCNN

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its own name; warns loudly when a name is overwritten."""
    name = fn.__name__
    if name in _MODELS:
        warnings.warn(
            f"Overwriting architecture {name!r} in the msnoop registry with {fn.__module__}.{name}.", stacklevel=2
        )
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of the registered architectures."""
    return sorted(_MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered architecture with randomly initialised weights.

    Raises:
        KeyError: ``name`` is not registered; the message lists the valid names.
    """
    if name not in _MODELS:
        raise KeyError(f"Unknown architecture {name!r}; registered architectures: {', '.join(list_models())}.")
    return _MODELS[name](**kwargs)


@register_model
def microsnoop_cnn(**kwargs: Any) -> MicrosnoopCNN:
    """The Microsnoop CNN: depths 32/64/128/256, one input channel, 256-d embedding (~6.6 M params)."""
    return MicrosnoopCNN(**{"in_channels": 1, "out_channels": 1, "depths": (32, 64, 128, 256), **kwargs})


@register_model
def test_cnn(**kwargs: Any) -> MicrosnoopCNN:
    """A tiny variant (depths 4/8/16/32) for tests: same code path, milliseconds per batch."""
    return MicrosnoopCNN(**{"in_channels": 1, "out_channels": 1, "depths": (4, 8, 16, 32), **kwargs})
