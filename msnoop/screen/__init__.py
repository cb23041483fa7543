"""Plate screens (``job: screen``): every well read out from its cells by a classifier trained on the control
wells; Z' and dose response.
"""

from msnoop.core.lazy import lazy_exports

_EXPORTS = {
    "ScreenJob": "plate",
    "cell_classifier_readout": "readout",
    "dose_response": "readout",
    "read_cells_table": "plate",
    "run_screen": "plate",
    "z_prime": "readout",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
