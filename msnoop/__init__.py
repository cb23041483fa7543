"""msnoop: microscopy image embeddings at scale (a Ray implementation of Microsnoop).

The Python API (:mod:`msnoop.api`) is available at the top level and imported on first use::

    import msnoop
    X = msnoop.embed_images(images, channel_axis=1)   # (N, C * 256) float32
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("embed_images", "load_model", "run", "to_anndata")


def __getattr__(name: str) -> Any:
    if name in _API:
        from msnoop import api

        return getattr(api, name)
    raise AttributeError(f"module 'msnoop' has no attribute {name!r}")


__all__ = ["__version__", *_API]
