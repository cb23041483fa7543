"""The ``preprocess:`` section of a job config: overrides of a checkpoint's preprocessing."""

from __future__ import annotations

from pydantic import Field

from msnoop.core.config import StrictModel as _Strict
from msnoop.preprocess.presets import Mode, Preprocessing, Preset


class PreprocessConfig(_Strict):
    """Overrides of the checkpoint's preprocessing; ``None`` keeps the checkpoint's value."""

    preset: Preset | None = None
    mode: Mode = Field(
        "native",
        description="native: zero-pad to the input size (tile images larger than it); tight: zero-pad to the "
        "smallest multiple of 16 px (at least 64) that holds the image, about 12x fewer FLOPs for a 64 px cell "
        "than in a 224 canvas, other vectors than native; rescale: pad to a square and resize; tile: always tile",
    )
    input_size: int | None = Field(None, ge=16)
    tile_overlap: float = Field(0.1, ge=0.05, le=0.5)

    def resolve(self, stored: Preprocessing | None = None) -> Preprocessing:
        """The preprocessing to use: these overrides on top of ``stored`` (a checkpoint's), else the defaults."""
        base = stored or Preprocessing()
        return Preprocessing(
            preset=self.preset or base.preset,
            mode=self.mode,
            input_size=self.input_size or base.input_size,
            tile_overlap=self.tile_overlap,
        )
