"""Intensity normalisation of one-channel images."""

from __future__ import annotations

import numpy as np

DEGENERATE = 1e-6  # percentile range / full range at or below which min-max scaling replaces percentiles


def normalize99(image: np.ndarray, *, lower: float = 1.0, upper: float = 99.0, clip: bool = False) -> np.ndarray:
    """Percentile normalisation: ``(x - p_lower) / (p_upper - p_lower)``.

    This is Microsnoop's ``normalize_img``/``normalize99`` rule: a constant image (peak-to-peak 0) is
    returned unchanged. The ``cytoimagenet`` preset uses ``lower=0.1, upper=99.9, clip=True``.

    **Degenerate range** (msnoop's rule, where Microsnoop divides by ``1e-6``): when ``p_upper - p_lower``
    is at most ``DEGENERATE * (max - min)`` (e.g. an 8x8 image centred in a 224 canvas, where both
    percentiles fall on the zero padding), the image is min-max scaled instead: ``(x - min) / (max - min)``,
    so values stay in ``[0, 1]`` rather than reaching ~1e9. Images with a non-degenerate range are
    normalised exactly as Microsnoop does.

    Args:
        image: ``[H, W]`` array of any real dtype.
        lower: Lower percentile, mapped to 0.
        upper: Upper percentile, mapped to 1.
        clip: Clip the result to ``[0, 1]``.

    Returns:
        ``[H, W]`` float32 array.
    """
    x = np.asarray(image, dtype=np.float32)
    if np.ptp(x) == 0:
        return x.copy()
    lo, hi = np.percentile(x, [lower, upper])
    denom = hi - lo
    ptp = np.float64(np.ptp(x))
    if denom <= DEGENERATE * ptp:
        lo, denom = np.float64(x.min()), ptp
    out = (x - lo) / np.float32(denom)
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)
