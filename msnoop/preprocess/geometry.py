"""Geometry of Microsnoop inputs: centred zero-padding, tiling and rescaling to the input size."""

from __future__ import annotations

import math

import numpy as np


def pad_center(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad ``[H, W]`` to ``[size, size]`` with the image centred (extra pixel at the end).

    Raises:
        ValueError: A side is larger than ``size`` (use tile or rescale mode for such images).
    """
    h, w = image.shape
    if h > size or w > size:
        raise ValueError(f"image of shape {h}x{w} does not fit into {size}x{size}; tile or rescale it")
    top, left = (size - h) // 2, (size - w) // 2
    out = np.zeros((size, size), dtype=image.dtype)
    out[top : top + h, left : left + w] = image
    return out


def pad_to_square(image: np.ndarray) -> np.ndarray:
    """Zero-pad ``[H, W]`` to a centred square of side ``max(H, W)``."""
    side = max(image.shape)
    return pad_center(image, side)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a square ``[S, S]`` image to ``[size, size]`` (half-pixel centres, like cv2)."""
    import torch  # imported here: read/preprocess workers need no torch unless they rescale
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def tile_starts(length: int, size: int, overlap: float) -> np.ndarray:
    """Start offsets of tiles along one axis, as in cellpose/scellseg ``make_tiles``.

    ``n = 1`` if ``length <= size`` else ``ceil((1 + 2 * overlap) * length / size)``, starts evenly spaced
    over ``[0, length - size]``; ``overlap`` is clamped to ``[0.05, 0.5]``.
    """
    overlap = min(0.5, max(0.05, overlap))
    if length <= size:
        return np.zeros(1, dtype=np.int64)
    n = int(math.ceil((1.0 + 2.0 * overlap) * length / size))
    return np.linspace(0, length - size, n).astype(np.int64)


def make_tiles(image: np.ndarray, size: int, overlap: float = 0.1) -> np.ndarray:
    """Cut ``[H, W]`` into overlapping ``size`` tiles, each zero-padded (centred) to ``size``.

    Returns:
        ``[n_tiles, size, size]`` array, row-major over the tile grid.
    """
    h, w = image.shape
    th, tw = min(size, h), min(size, w)
    tiles = [
        pad_center(image[y : y + th, x : x + tw], size)
        for y in tile_starts(h, size, overlap)
        for x in tile_starts(w, size, overlap)
    ]
    return np.stack(tiles)
