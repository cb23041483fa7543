"""Foundations every stage builds on: the output folder (:class:`RunDir`), Parquet parts, feature tables,
storage (local or object storage), config base, SQL filters, id sets, the part index (what each part holds), the
Ray runtime, plotting, progress bars.

Public names are imported on first use (:mod:`msnoop.core.lazy`).
"""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "ConfigError": "config",
    "FilterError": "filters",
    "ID_COLUMN": "parts",
    "IdSet": "idset",
    "Location": "storage",
    "OutputMismatchError": "rundir",
    "PartIndex": "partindex",
    "RunDir": "rundir",
    "StorageConfig": "storage",
    "StorageError": "storage",
    "StrictModel": "config",
    "TableSource": "tables",
    "check_finite": "tables",
    "config_hash": "config",
    "count_rows": "parts",
    "feature_columns": "tables",
    "filter_mask": "filters",
    "init_ray": "runtime",
    "iter_batches": "parts",
    "lazy_exports": "lazy",
    "metadata_columns": "tables",
    "part_files": "parts",
    "progress_bar": "progress",
    "provenance": "runtime",
    "read_frame": "parts",
    "read_table": "tables",
    "resolve_table": "tables",
    "save_resolved": "config",
    "select_rows": "filters",
    "shutdown_ray": "runtime",
    "split_table": "tables",
    "validate_config": "config",
    "write_part": "parts",
    "write_table": "tables",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
