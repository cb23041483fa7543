"""Feature vectors before and at a distance: post-processing transforms and the distances themselves.

* :mod:`msnoop.vectors.postprocess`: one fit / transform / save / load interface
  (:class:`~msnoop.vectors.postprocess.PostProcessor`) for standardisation, sphering and future methods, and the
  registry whose names the configs allow (``output.postprocess``, ``sphering.method``, ``--postprocess``);
* :mod:`msnoop.vectors.sphering`: whitening fitted on control rows (:class:`~msnoop.vectors.sphering.Spherize`);
* :mod:`msnoop.vectors.distance`: row normalisation, cosine similarity and LanceDB's distances, used by kNN,
  NSC, mAP, the report and the vector search alike.
"""

from __future__ import annotations

from typing import Any

from msnoop.vectors.distance import (
    METRICS,
    Metric,
    SearchMetric,
    cosine_similarity,
    distances,
    normalize_rows,
)
from msnoop.vectors.postprocess import (
    DEFAULT_POSTPROCESS,
    POSTPROCESS_CHOICES,
    SPHERIZE_METHODS,
    PostProcessor,
    PostprocessMethod,
    Raw,
    SpherizeMethod,
    Standardizer,
    create_postprocessor,
    load_postprocessor,
    postprocess,
)

# sphering loads pandas (through the table checks): imported on first use, so that configs stay light
_LAZY = {"Spherize": "msnoop.vectors.sphering", "knee_regulariser": "msnoop.vectors.sphering"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'msnoop.vectors' has no attribute {name!r}")


__all__ = [
    "DEFAULT_POSTPROCESS",
    "METRICS",
    "POSTPROCESS_CHOICES",
    "SPHERIZE_METHODS",
    "Metric",
    "PostProcessor",
    "PostprocessMethod",
    "Raw",
    "SearchMetric",
    "Spherize",
    "SpherizeMethod",
    "Standardizer",
    "cosine_similarity",
    "create_postprocessor",
    "distances",
    "knee_regulariser",
    "load_postprocessor",
    "normalize_rows",
    "postprocess",
]
