"""Similarity search over an embedding or profile table (by image id, by a new image, by a group of rows), and
what a table holds (:func:`describe`)."""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "TableInfo": "info",
    "TableRef": "search",
    "describe": "info",
    "embed_query": "search",
    "open_results": "search",
    "search_by_id": "search",
    "search_by_match": "search",
    "search_image": "search",
    "search_vector_ann": "ann",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
