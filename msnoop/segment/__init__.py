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
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from msnoop.segment.builtin import estimate_diameter, segment_nuclei

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "SegmentationConfig", "estimate_diameter", "segment", "segment_nuclei"]

BACKENDS = ("builtin", "cellpose", "mask")


def _backend_fn(backend: str):
    if backend == "builtin":
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


def segment(image: np.ndarray, *, backend: Literal["builtin", "cellpose"] = "builtin", **params: Any) -> np.ndarray:
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


class SegmentationConfig(BaseModel):
    """How to segment nuclei before cell-region cropping (a section of a job config).

    ``params`` holds the backend's other keyword options (checked against the backend's signature), e.g.
    ``{"min_solidity": 0.7}`` for ``builtin`` or ``{"flow_threshold": 0.4}`` for ``cellpose``.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["builtin", "cellpose", "mask"] = "builtin"
    column: str | None = Field(
        None, description="mask only: manifest column with each image's label-mask file (relative to the manifest)"
    )
    channel: str | int | None = Field(
        None, description="nucleus channel: a name from input.channels or an index; None = the first channel"
    )
    diameter: float | None = Field(None, gt=0, description="expected nucleus diameter in pixels; None = estimate")
    model: str | Path | None = Field(
        None, description="cellpose only: weights file, or a model name in the cellpose model folder"
    )
    gpu: bool = Field(False, description="cellpose only: run on the GPU")
    params: dict[str, Any] = Field(default_factory=dict, description="other keyword options of the backend")

    @model_validator(mode="after")
    def _check(self) -> SegmentationConfig:
        if self.backend == "mask":
            if not self.column:
                raise ValueError(
                    "segmentation.backend 'mask' needs segmentation.column: the manifest column of mask files"
                )
            given = [k for k in ("diameter", "model") if getattr(self, k) is not None] + (["gpu"] if self.gpu else [])
            if given or self.params:
                raise ValueError(
                    f"segmentation {given + sorted(self.params)} do not apply to backend 'mask'; remove them"
                )
            return self
        if self.column is not None:
            raise ValueError("segmentation.column applies to backend 'mask' only; remove it")
        if self.backend == "cellpose" and self.model is None:
            raise ValueError(
                "segmentation.model is required with backend 'cellpose': a weights file path or a model name "
                "in ~/.cellpose/models (no download happens at run time)"
            )
        if self.backend == "builtin" and (self.model is not None or self.gpu):
            raise ValueError("segmentation.model and segmentation.gpu apply to backend 'cellpose' only; remove them")
        reserved = {"diameter", "model", "gpu"} & set(self.params)
        if reserved:
            raise ValueError(f"set {sorted(reserved)} as segmentation.<key>, not inside segmentation.params")
        allowed = _keyword_params(self.backend)
        unknown = set(self.params) - allowed
        if unknown:
            raise ValueError(
                f"unknown segmentation.params {sorted(unknown)} for backend {self.backend!r}; "
                f"expected some of {sorted(allowed - {'diameter', 'model', 'gpu'})}"
            )
        return self

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`segment` (backend included)."""
        out: dict[str, Any] = {"backend": self.backend, "diameter": self.diameter, **self.params}
        if self.backend == "cellpose":
            out.update(model=str(self.model), gpu=self.gpu)
        return out

    def run(self, image: np.ndarray) -> np.ndarray:
        """Segment one ``[H, W]`` nucleus channel with this configuration.

        Raises:
            ValueError: backend ``mask`` (masks are read per image: :func:`msnoop.io.readers.read_labels`).
        """
        if self.backend == "mask":
            raise ValueError("segmentation backend 'mask' reads each image's mask file; it does not segment")
        return segment(image, **self.kwargs())

    @property
    def mask_column(self) -> str | None:
        """The image-table column holding mask paths (``Metadata_<column>``), or None."""
        if self.backend != "mask" or not self.column:
            return None
        return self.column if self.column.startswith("Metadata_") else f"Metadata_{self.column}"
