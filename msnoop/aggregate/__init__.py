"""Aggregation of profile rows (cells -> wells, wells -> treatments): mean or median per group."""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "aggregate_profiles": "profiles",
    "join_unique": "profiles",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
