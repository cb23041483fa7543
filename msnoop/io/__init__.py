"""Reading images and image tables: manifests (CSV/Parquet), CellProfiler LoadData, folders with a filename
pattern, OME-Zarr plates; image readers registered per format (:func:`register_reader`).
"""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "ImageReadError": "readers",
    "ImageReader": "readers",
    "ImageTableSource": "table_stream",
    "InputConfig": "config",
    "ZPolicy": "config",
    "check_image": "readers",
    "load_image_table": "manifest",
    "plan_image_table": "table_stream",
    "read_channels": "readers",
    "read_image": "readers",
    "read_labels": "readers",
    "readable_suffixes": "readers",
    "register_reader": "readers",
    "scan_ids": "table_stream",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
