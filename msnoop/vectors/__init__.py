"""Feature vectors before and at a distance: post-processing transforms and the distances themselves.

* :mod:`msnoop.vectors.postprocess`: one fit / transform / save / load interface (:class:`PostProcessor`) for
  standardisation, sphering and future methods, and the registry whose names the configs allow
  (``output.postprocess``, ``sphering.method``, ``--postprocess``);
* :mod:`msnoop.vectors.sphering`: whitening fitted on control rows (:class:`Spherize`);
* :mod:`msnoop.vectors.distance`: row normalisation, cosine similarity and LanceDB's distances, used by kNN,
  NSC, mAP, the report and the vector search alike.
"""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_POSTPROCESS": "postprocess",
    "IndexKind": "distance",
    "METRICS": "distance",
    "Metric": "distance",
    "POSTPROCESS_CHOICES": "postprocess",
    "PostProcessor": "postprocess",
    "PostprocessMethod": "postprocess",
    "Raw": "postprocess",
    "SPHERIZE_METHODS": "postprocess",
    "SearchMetric": "distance",
    "Spherize": "sphering",
    "SpherizeMethod": "postprocess",
    "Standardizer": "postprocess",
    "cosine_similarity": "distance",
    "create_postprocessor": "postprocess",
    "distances": "distance",
    "knee_regulariser": "sphering",
    "load_postprocessor": "postprocess",
    "normalize_rows": "distance",
    "postprocess": "postprocess",
    "table_postprocess": "postprocess",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
