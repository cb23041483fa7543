"""Intensity normalisation of one-channel images."""

from __future__ import annotations

import numpy as np


def normalize99(image: np.ndarray, *, lower: float = 1.0, upper: float = 99.0, clip: bool = False) -> np.ndarray:
    """Percentile normalisation: ``(x - p_lower) / (p_upper - p_lower)``.

    This is Microsnoop's ``normalize_img``/``normalize99`` rule: a constant image (peak-to-peak 0) is
    returned unchanged, and ``1e-6`` is added to the denominator when the two percentiles coincide.
    The ``cytoimagenet`` preset uses ``lower=0.1, upper=99.9, clip=True``.

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
    if denom == 0:
        denom = 1e-6
    out = (x - lo) / np.float32(denom)
    if clip:
        np.clip(out, 0.0, 1.0, out=out)
    return out.astype(np.float32, copy=False)
