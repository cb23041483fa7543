"""The ``segmentation:`` section of a cells-mode job: backend, nucleus channel, options.

Light on purpose (pydantic only): job configs import it, and ``msnoop --help`` must not load scikit-image.
The backend's own options are checked against its signature only when some are given.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import numpy as np


#: Segmentation backends: scikit-image's pipeline, cellpose 3.1 with local weights, or existing label masks.
Backend = Literal["builtin", "cellpose", "mask"]


class SegmentationConfig(BaseModel):
    """How to segment nuclei before cell-region cropping (a section of a job config).

    ``params`` holds the backend's other keyword options (checked against the backend's signature), e.g.
    ``{"min_solidity": 0.7}`` for ``builtin`` or ``{"flow_threshold": 0.4}`` for ``cellpose``.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Backend = "builtin"
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
        if not self.params:
            return self
        from msnoop.segment import _keyword_params

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
        from msnoop.segment import segment

        if self.backend == "mask":
            raise ValueError("segmentation backend 'mask' reads each image's mask file; it does not segment")
        return segment(image, **self.kwargs())

    @property
    def mask_column(self) -> str | None:
        """The image-table column holding mask paths (``Metadata_<column>``), or None."""
        if self.backend != "mask" or not self.column:
            return None
        return self.column if self.column.startswith("Metadata_") else f"Metadata_{self.column}"
