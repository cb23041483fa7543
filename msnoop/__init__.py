"""msnoop: microscopy image embeddings at scale (a Ray implementation of Microsnoop).

The Python API (:mod:`msnoop.api`) is available at the top level and imported on first use::

    import msnoop
    X = msnoop.embed_images(images, channel_axis=1)   # (N, C * 256) float32
    hits = msnoop.search("results/yeast", image_id="images/AAC1/AAC1_1_rfp_10_gfp")   # a DataFrame
"""

from msnoop.core.lazy import lazy_exports

__version__ = "0.1.0"

_API = ("embed_images", "info", "knn", "load_model", "run", "search", "to_anndata")
__all__ = ["__version__", *_API]

__getattr__, _ = lazy_exports(__name__, dict.fromkeys(_API, "api"))


def __dir__() -> list[str]:
    """The public API (``dir(msnoop)``): the functions of :mod:`msnoop.api` and ``__version__``."""
    return sorted(__all__)
