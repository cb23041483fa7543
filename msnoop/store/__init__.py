"""The store stage: LanceDB tables published from Parquet parts (locally or by Ray tasks on object storage),
their vector index, and AnnData export.
"""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "build_frame_table": "lance",
    "build_table": "lance",
    "ensure_index": "index",
    "fit_postprocessing": "publish",
    "open_table": "lance",
    "publish_embeddings": "publish",
    "publish_profiles": "publish",
    "search_params": "index",
    "table_info": "lance",
    "to_anndata": "anndata",
    "vector_index": "index",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
