"""Images into model inputs: normalisation presets, padding / tiling / rescaling, cell-region crops."""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "Mode": "presets",
    "PRESETS": "presets",
    "PreprocessConfig": "config",
    "Preprocessing": "presets",
    "Preset": "presets",
    "crop_cells": "crop",
    "crop_windows": "crop",
    "normalize99": "normalize",
    "prepare_channel": "presets",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
