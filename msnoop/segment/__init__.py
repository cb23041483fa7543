"""Nucleus segmentation: one ``[H, W]`` channel in, an int32 label image out.

Backends:

* ``"builtin"`` (default): :func:`msnoop.segment.builtin.segment_nuclei`, scikit-image, no weights, CPU.
* ``"cellpose"``: :func:`msnoop.segment.cellpose_backend.segment_cellpose`, cellpose 3.1.x with a local
  weights file (``pip install 'msnoop[cellpose]'``); cellpose is imported only when this backend runs.
* ``"mask"``: no segmentation: each image's existing label mask is read from the manifest column
  ``column`` (an integer label image of the image's shape, 0 = background), e.g. CellProfiler or cellpose
  outputs the user already has.

Example:
    >>> from msnoop.segment import segment
    >>> labels = segment(dna_channel)                               # doctest: +SKIP
    >>> labels = segment(dna_channel, backend="cellpose", model="~/models/nuclei_cp3")  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any, get_args

from msnoop.segment.config import Backend

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "SegmentationConfig", "estimate_diameter", "segment", "segment_nuclei"]

# scikit-image and scipy load with the builtin backend; the package stays light until a backend is used.
_LAZY = {
    "estimate_diameter": "msnoop.segment.builtin",
    "segment_nuclei": "msnoop.segment.builtin",
    "SegmentationConfig": "msnoop.segment.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


BACKENDS: tuple[str, ...] = get_args(Backend)


def _backend_fn(backend: str):
    if backend == "builtin":
        from msnoop.segment.builtin import segment_nuclei

        return segment_nuclei
    if backend == "cellpose":
        from msnoop.segment.cellpose_backend import segment_cellpose  # light: cellpose itself is imported lazily

        return segment_cellpose
    raise ValueError(f"unknown segmentation backend {backend!r}; expected one of {BACKENDS}")


def _keyword_params(backend: str) -> set[str]:
    if backend == "mask":
        return set()
    sig = inspect.signature(_backend_fn(backend))
    return {name for name, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def segment(image: np.ndarray, *, backend: Backend = "builtin", **params: Any) -> np.ndarray:
    """Segment nuclei in one channel with the chosen backend.

    Args:
        image: ``[H, W]`` nucleus channel (any integer or float dtype).
        backend: ``"builtin"`` or ``"cellpose"``.
        **params: Keyword options of the backend (:func:`~msnoop.segment.builtin.segment_nuclei` or
            :func:`~msnoop.segment.cellpose_backend.segment_cellpose`), e.g. ``diameter=30``.

    Returns:
        ``[H, W]`` int32 label image, 0 = background, instances ``1..N``.

    Raises:
        ValueError: Unknown backend or option, or invalid input (see the backend).
        ImportError: ``backend="cellpose"`` without cellpose installed.
        FileNotFoundError: ``backend="cellpose"`` with weights that are not on this machine.
    """
    fn = _backend_fn(backend)
    unknown = set(params) - _keyword_params(backend)
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for the {backend!r} segmentation backend; "
            f"expected some of {sorted(_keyword_params(backend))}"
        )
    return fn(image, **params)
