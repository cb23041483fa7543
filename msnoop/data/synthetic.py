"""Synthetic multi-channel single-cell images with known classes (for the demo and tests).

Each image holds one cell with two channels: ``dna`` (a nucleus) and ``protein`` (a tagged protein).
The class decides the cell's shape and the protein's pattern:

* ``nuclear``: round cell, protein fills the nucleus;
* ``cytoplasmic``: elongated cell, protein diffuse in the cytoplasm;
* ``punctate``: round cell, protein in bright cytoplasmic spots;
* ``membrane``: large cell, protein on the cell outline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

CLASSES = ("nuclear", "cytoplasmic", "punctate", "membrane")
CHANNELS = ("dna", "protein")


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    y, x = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    return (u / rx) ** 2 + (v / ry) ** 2


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(img, sigma)


def make_cell(label: str, *, size: int = 64, rng: np.random.Generator) -> np.ndarray:
    """One ``[2, size, size]`` float32 cell (dna, protein) of class ``label``, values in ~[0, 1]."""
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    shape = (size, size)
    cy, cx = size / 2 + rng.normal(0, 2, 2)
    angle = rng.uniform(0, np.pi)
    scale = size / 64
    if label == "cytoplasmic":
        ry, rx = rng.uniform(9, 12) * scale, rng.uniform(20, 26) * scale
    elif label == "membrane":
        ry, rx = (rng.uniform(20, 25) * scale,) * 2
    else:
        ry, rx = (rng.uniform(14, 18) * scale,) * 2
    cell = _ellipse(shape, cy, cx, ry, rx, angle)
    nucleus = _ellipse(shape, cy, cx, ry * 0.45, ry * 0.45 * rng.uniform(0.9, 1.2), angle)
    inside = cell <= 1.0
    dna = (nucleus <= 1.0).astype(np.float32) * rng.uniform(0.6, 1.0)
    dna = _blur(dna, 1.0) * (1 + 0.15 * rng.standard_normal(shape))
    if label == "nuclear":
        protein = (nucleus <= 1.0).astype(np.float32)
    elif label == "cytoplasmic":
        protein = inside.astype(np.float32) * 0.6 * (1 + 0.3 * _blur(rng.standard_normal(shape), 2))
    elif label == "punctate":
        protein = np.zeros(shape, np.float32)
        ys, xs = np.nonzero(inside & (nucleus > 1.5))
        pick = rng.choice(len(ys), size=min(len(ys), int(rng.integers(8, 16))), replace=False)
        protein[ys[pick], xs[pick]] = 6.0
        protein = _blur(protein, 1.2)
    else:  # membrane
        protein = ((cell > 0.75) & (cell <= 1.05)).astype(np.float32)
    protein = _blur(protein.astype(np.float32), 0.8) * rng.uniform(0.5, 1.0)
    img = np.stack([dna, protein]) + rng.normal(0.02, 0.01, (2, *shape))
    return np.clip(img, 0, None).astype(np.float32)


def write_dataset(
    out_dir: str | Path,
    *,
    n_per_class: int = 25,
    size: int = 64,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
    fields: int = 2,
) -> Path:
    """Write a synthetic dataset as 16-bit TIFFs plus ``manifest.csv``; returns the manifest path.

    The manifest has one path column per channel (``dna``, ``protein``) and ``Metadata_Class``,
    ``Metadata_Field`` and ``Metadata_Cell`` columns.
    """
    import tifffile

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for label in classes:
        for i in range(n_per_class):
            img = make_cell(label, size=size, rng=rng)
            row = {"Metadata_Class": label, "Metadata_Field": i % fields + 1, "Metadata_Cell": i}
            for c, ch in enumerate(CHANNELS):
                rel = f"images/{label}_{i:04d}_{ch}.tif"
                tifffile.imwrite(out / rel, (np.clip(img[c], 0, 4) * 16000).astype(np.uint16))
                row[ch] = rel
            rows.append(row)
    manifest = out / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest
