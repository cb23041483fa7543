"""Preprocessing presets: how one channel of one image becomes model input tiles.

``microsnoop`` follows Microsnoop's ``extract_embeddings`` (microsnoop-publish) exactly:

* ``native`` mode: an image whose sides fit the input size is zero-padded (centred) to it; a larger
  image is cut into input-size tiles with 10 % overlap (tile mode switches on automatically).
* ``rescale`` mode: zero-pad to a centred square, then bilinear resize to the input size.
* ``tile`` mode: always tile (images smaller than a tile give one padded tile).
* Every tile is normalised with ``normalize99`` (1st/99th percentile, no clipping) **after** padding,
  so the zero padding takes part in the percentiles.

* ``tight`` mode (an option, not Microsnoop's): an image whose sides fit the input size is zero-padded
  (centred) to the smallest square canvas that holds it, a multiple of :data:`TIGHT_MULTIPLE` px and at
  least :data:`TIGHT_FLOOR` px (:func:`tight_canvas`), instead of the full input size; a larger image is
  tiled as in ``native`` mode. A 64 x 64 cell costs the network 1.0 GFLOP instead of 12.7 in a 224 canvas.
  The vectors differ from ``native`` ones (less padding takes part in the percentiles and the pooled map),
  so a model is compared with itself only within one mode.

``cytoimagenet`` is the same geometry with 0.1/99.9 percentiles and clipping to ``[0, 1]``.
The embedding of an image channel is the mean of its tile embeddings.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from msnoop.preprocess.geometry import make_tiles, pad_center, pad_to_square, resize
from msnoop.preprocess.normalize import normalize99

#: Normalisation presets: ``microsnoop`` (Microsnoop's ``normalize99``), ``cytoimagenet`` (wider, clipped).
Preset = Literal["microsnoop", "cytoimagenet"]
#: How an image becomes model inputs: pad (tile when larger), pad to square and resize, always tile, or pad to the
#: smallest canvas that holds the image.
Mode = Literal["native", "rescale", "tile", "tight"]

PRESETS: dict[str, dict[str, float | bool]] = {
    "microsnoop": {"lower": 1.0, "upper": 99.0, "clip": False},
    "cytoimagenet": {"lower": 0.1, "upper": 99.9, "clip": True},
}

#: Sides of ``tight`` canvases are multiples of this many pixels (the encoder pools three times: 8 would do;
#: 16 keeps the deepest map's sides even).
TIGHT_MULTIPLE = 16
#: Smallest ``tight`` canvas side: the deepest map stays at least 8 x 8 and an image still sits in some padding.
TIGHT_FLOOR = 64


class Preprocessing(BaseModel):
    """How images are turned into model inputs; recorded with every checkpoint and table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Preset = "microsnoop"
    mode: Mode = Field(
        "native",
        description="native: pad to the input size, tile if larger; rescale: pad to square + resize; tile: always "
        "tile; tight: pad to the smallest multiple of 16 px (at least 64) that holds the image, tile if larger",
    )
    input_size: int = Field(224, ge=16, description="side of the square model input; a multiple of 8")
    tile_overlap: float = Field(0.1, ge=0.05, le=0.5)

    def model_post_init(self, __context: object) -> None:
        """Refuse an input size the U-Net cannot pool (not a multiple of 8) with a ValueError."""
        if self.input_size % 8:
            raise ValueError(
                f"input_size must be a multiple of 8 (the U-Net pools three times), found {self.input_size}"
            )


def tight_canvas(height: int, width: int, *, floor: int = TIGHT_FLOOR, multiple: int = TIGHT_MULTIPLE) -> int:
    """Side of the ``tight`` canvas of an ``height x width`` image: the smallest multiple of ``multiple`` that is
    at least ``max(height, width)`` and at least ``floor``.

    Raises:
        ValueError: ``multiple < 1``.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, found {multiple}")
    side = max(int(height), int(width), int(floor))
    return -(-side // multiple) * multiple


def prepare_channel(image: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """Turn one ``[H, W]`` channel into normalised model inputs ``[n_tiles, S, S]`` float32.

    ``S`` is the input size, except in ``tight`` mode for an image that fits it: then ``S`` is
    ``min(input_size, tight_canvas(H, W))``.
    """
    norm = PRESETS[spec.preset]
    image = np.asarray(image, dtype=np.float32)
    size = spec.input_size
    if spec.mode == "rescale":
        tiles = resize(pad_to_square(image), size)[None]
    elif spec.mode == "tile" or max(image.shape) > size:
        tiles = make_tiles(image, size, spec.tile_overlap)
    elif spec.mode == "tight":
        tiles = pad_center(image, min(size, tight_canvas(*image.shape)))[None]
    else:
        tiles = pad_center(image, size)[None]
    return np.stack([normalize99(t, **norm) for t in tiles]).astype(np.float32, copy=False)  # type: ignore[arg-type]
