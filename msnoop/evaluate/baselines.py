"""Baseline features computed from the same images and reader as the embeddings.

* ``pixels_pca``: each channel normalised to its 1st/99th percentiles, zero-padded (centred) to a
  common size, flattened, concatenated over channels, reduced with PCA (fitted on all images, no
  labels); the data README's "GFP pixels PCA32" floor is ``channels=["gfp"]``, 32 components.
* ``intensity``: per-channel intensity statistics (mean, std, percentiles, skewness, kurtosis,
  foreground fraction and mean above an Otsu threshold), z-scored.

The randomly initialised network baseline is an embedding job with ``model: random:microsnoop_cnn:0``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from msnoop.io.manifest import PATH_PREFIX
from msnoop.io.readers import read_image
from msnoop.preprocess.geometry import pad_center
from msnoop.preprocess.normalize import normalize99


def _load(table: pd.DataFrame, channels: list[str]) -> list[list[np.ndarray]]:
    return [[read_image(row[f"{PATH_PREFIX}{ch}"]) for ch in channels] for _, row in table.iterrows()]


def pixels_pca(table: pd.DataFrame, channels: list[str], *, n_components: int = 32, seed: int = 0) -> np.ndarray:
    """``[N, n_components]`` PCA of normalised, padded raw pixels (see module docstring)."""
    from sklearn.decomposition import PCA

    images = _load(table, channels)
    side = max(max(ch.shape) for img in images for ch in img)
    flat = np.stack([np.concatenate([pad_center(normalize99(ch), side).ravel() for ch in img]) for img in images])
    n = min(n_components, flat.shape[0], flat.shape[1])
    return PCA(n_components=n, random_state=seed).fit_transform(flat).astype(np.float32)


def _stats(ch: np.ndarray) -> list[float]:
    from scipy.stats import kurtosis, skew
    from skimage.filters import threshold_otsu

    x = ch.ravel().astype(np.float64)
    pct = np.percentile(x, [1, 5, 25, 50, 75, 95, 99])
    try:
        t = threshold_otsu(x)
    except ValueError:
        t = x.max()
    fg = x > t
    return [x.mean(), x.std(), *pct, float(skew(x)), float(kurtosis(x)), fg.mean(), x[fg].mean() if fg.any() else 0.0]


def intensity_features(table: pd.DataFrame, channels: list[str]) -> np.ndarray:
    """``[N, 13 * C]`` z-scored per-channel intensity statistics."""
    feats = np.array([[v for ch in img for v in _stats(ch)] for img in _load(table, channels)], dtype=np.float64)
    std = feats.std(0)
    std[std == 0] = 1.0
    return ((feats - feats.mean(0)) / std).astype(np.float32)
