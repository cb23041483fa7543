"""Evaluations of a feature table: kNN classification, NSC/NSCB, mAP retrieval, HTML report, and the bench job.

Every evaluation reads its rows through :mod:`msnoop.evaluate.features`, so all of them compare the vectors of
the table's post-processing; distances come from :mod:`msnoop.vectors.distance`.
"""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "BenchJob": "bench",
    "average_precision": "map",
    "build_report": "report",
    "classification_metrics": "knn",
    "faiss_build": "knn",
    "intensity_features": "baselines",
    "knn_cross_predict": "knn",
    "knn_evaluate": "knn",
    "knn_search": "knn",
    "map_2d": "report",
    "mean_average_precision": "map",
    "nearest_treatment": "nsc",
    "nsc": "nsc",
    "nscb": "nsc",
    "pixels_pca": "baselines",
    "read_features": "features",
    "retrieval_summary": "map",
    "run_bench": "bench",
    "table_features": "features",
    "table_postprocess": "features",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
