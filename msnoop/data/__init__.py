"""Synthetic data for the demo and the tests: two-channel cells of four localisation classes."""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "CHANNELS": "synthetic",
    "make_cell": "synthetic",
    "write_dataset": "synthetic",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
