"""Cell-region crops around segmented instances (Microsnoop's full-field pipeline).

A port of ``microsnoop/preprocess/crop.py::crop_inst`` with ``rsc_crop=True`` and ``mode='bbox'``
in microsnoop-publish, which is how Microsnoop crops BBBC021 (``rsc_crop_ratio=2``) and TissueNet / LIVECell
(ratio 1). For every instance, in increasing label order:

* bounding box ``min_row, min_col, max_row, max_col`` (**inclusive** maxima, as ``find_inst_bbox``);
* instances touching the image border are skipped (``skip_border=True``);
* centre ``(min_row + (max_row - min_row) // 2, min_col + (max_col - min_col) // 2)``;
* half-size ``max(max_row - min_row, max_col - min_col) * ratio`` (the extents are the reference's
  ``bbox[2] - bbox[0]``, i.e. one less than the box's pixel height/width); with ``oversize="drop"`` it is
  capped at ``size // 2``;
* window rows ``[max(int(cy - half), 0), min(int(cy + half), H))``, columns likewise (clipped to the
  image, ``int`` truncates toward zero as in Python);
* every channel is cut with the same window; the neighbouring cells inside the window are kept (``'bbox'``
  mode, no masking);
* the crop is zero-padded, centred (extra row/column at the bottom/right), to ``size x size``. A crop larger
  than ``size`` is dropped with ``oversize="drop"`` (never happens: the capped window is at most
  ``2 * (size // 2) <= size`` wide); with ``oversize="resize"`` (the reference's ``oversize_to_sta``: no
  cap) it is resized down to fit, keeping its aspect ratio (bilinear, half-pixel centres, no
  anti-aliasing, like ``cv2.resize(..., INTER_LINEAR)``), then padded.

Deviation from the reference: it tests the border with ``max_row == H`` although ``max_row`` is inclusive,
so it only ever skips instances touching the top or left border; here all four borders are tested, as the
reference intends ("instances touching the image border are skipped").

Crops keep raw intensities (cast to float32); Microsnoop normalises (1st/99th percentile) each crop
later, after padding, in the embedding step.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

__all__ = ["CROP_TABLE_COLUMNS", "check_label_image", "crop_cells", "crop_windows"]

CROP_TABLE_COLUMNS = ["cell_id", "centroid_y", "centroid_x", "area", "bbox", "window", "resized"]
_MAX_DIRECT_LABEL = 1 << 22  # larger label values are compacted with np.unique before find_objects


def check_label_image(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """Validate an instance label image ``[H, W]`` (0 = background, > 0 = instance id).

    Boolean masks are accepted as one instance.

    Raises:
        ValueError: Not 2-D, not an integer dtype, or negative values; the message names ``name``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be a 2-D label image [H, W]; found shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.int32)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name} must have an integer dtype (0 = background, >0 = instance id); found {labels.dtype}. "
            "Fix: labels.astype(np.int32) if the values are whole numbers."
        )
    if labels.size and labels.min() < 0:
        raise ValueError(
            f"{name} has negative values (min {labels.min()}); expected >= 0 (0 = background, >0 = instance ids)"
        )
    return labels


def _check_inputs(image: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3:
        raise ValueError(f"image must be [C, H, W] (or one channel [H, W]); found shape {image.shape}")
    if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image must have an integer or float dtype; found {image.dtype}")
    labels = check_label_image(labels)
    if labels.shape != image.shape[1:]:
        raise ValueError(
            f"labels shape {labels.shape} does not match the image's spatial shape {image.shape[1:]} "
            f"(image shape {image.shape}, expected [C, H, W]). Fix: segment the same field of view, and pass "
            "channel-last images as np.moveaxis(image, -1, 0)."
        )
    return image, labels


def crop_windows(
    labels: np.ndarray,
    *,
    ratio: float = 2.0,
    size: int = 224,
    skip_border: bool = True,
    oversize: Literal["drop", "resize"] = "drop",
) -> pd.DataFrame:
    """Crop windows of every instance, without cutting pixels (the geometry of :func:`crop_cells`).

    Args:
        labels: ``[H, W]`` integer label image, 0 = background.
        ratio: Half-size of the window in units of the instance's larger bbox extent.
        size: Output crop side; the half-size is capped at ``size // 2`` unless ``oversize="resize"``.
        skip_border: Skip instances touching any image border.
        oversize: ``"drop"`` caps the window (reference default); ``"resize"`` leaves it uncapped and
            marks crops larger than ``size`` for resizing.

    Returns:
        One row per kept instance with ``cell_id`` (label value), ``centroid_y``, ``centroid_x`` (mean pixel
        coordinates), ``area`` (pixels), ``bbox`` ``(min_row, min_col, max_row + 1, max_col + 1)`` (exclusive
        ends, skimage convention), ``window`` ``(r0, c0, r1, c1)`` (exclusive ends) and ``resized`` (the
        window is larger than ``size`` and will be resized down). Empty (with these columns) when no
        instance qualifies.

    Raises:
        ValueError: Bad ``labels``, ``ratio <= 0``, ``size < 1`` or an unknown ``oversize``.
    """
    labels = check_label_image(labels)
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0; found {ratio!r}")
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer; found {size!r}")
    if oversize not in ("drop", "resize"):
        raise ValueError(f"oversize must be 'drop' or 'resize'; found {oversize!r}")
    size = int(size)
    h, w = labels.shape
    empty = pd.DataFrame(
        {
            c: pd.Series(dtype=t)
            for c, t in zip(CROP_TABLE_COLUMNS, ["int64", "float64", "float64", "int64", "object", "object", "bool"])
        }
    )
    if labels.size == 0 or labels.max() == 0:
        return empty

    max_label = int(labels.max())
    if max_label <= _MAX_DIRECT_LABEL:
        compact = labels.astype(np.intp, copy=False)
        ids = np.arange(max_label + 1)
    else:  # huge label values: map to 0..n first so find_objects stays small
        ids, inv = np.unique(labels, return_inverse=True)
        if ids[0] != 0:
            ids = np.concatenate([[0], ids])
            inv = inv + 1
        compact = inv.reshape(labels.shape).astype(np.intp)
    flat = compact.ravel()
    n = ids.size
    area = np.bincount(flat, minlength=n)
    rows, cols = np.indices(labels.shape)
    sum_r = np.bincount(flat, weights=rows.ravel(), minlength=n)
    sum_c = np.bincount(flat, weights=cols.ravel(), minlength=n)
    slices = ndi.find_objects(compact)

    records = []
    cap = size // 2
    for k, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        r_min, r_max = sl[0].start, sl[0].stop - 1  # inclusive maxima, as the reference
        c_min, c_max = sl[1].start, sl[1].stop - 1
        if skip_border and (r_min == 0 or c_min == 0 or r_max == h - 1 or c_max == w - 1):
            continue
        extent = max(r_max - r_min, c_max - c_min)
        cy = r_min + (r_max - r_min) // 2
        cx = c_min + (c_max - c_min) // 2
        half = extent * ratio
        if oversize == "drop" and half > cap:
            half = cap
        r0, c0 = max(int(cy - half), 0), max(int(cx - half), 0)
        r1, c1 = min(int(cy + half), h), min(int(cx + half), w)
        if r1 <= r0 or c1 <= c0:  # single-pixel instance with a tiny ratio: nothing to cut
            continue
        too_big = (r1 - r0) > size or (c1 - c0) > size
        if too_big and oversize == "drop":
            continue
        records.append(
            {
                "cell_id": int(ids[k]),
                "centroid_y": float(sum_r[k] / area[k]),
                "centroid_x": float(sum_c[k] / area[k]),
                "area": int(area[k]),
                "bbox": (int(r_min), int(c_min), int(r_max + 1), int(c_max + 1)),
                "window": (int(r0), int(c0), int(r1), int(c1)),
                "resized": bool(too_big),
            }
        )
    if not records:
        return empty
    return pd.DataFrame.from_records(records, columns=CROP_TABLE_COLUMNS)


def _resize_bilinear(crop: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``[C, h, w] -> [C, out_h, out_w]`` bilinear with half-pixel centres and edge replication (cv2-like)."""
    _, h, w = crop.shape
    ry = np.clip((np.arange(out_h) + 0.5) * (h / out_h) - 0.5, 0, h - 1)
    rx = np.clip((np.arange(out_w) + 0.5) * (w / out_w) - 0.5, 0, w - 1)
    coords = np.meshgrid(ry, rx, indexing="ij")
    return np.stack([ndi.map_coordinates(ch, coords, order=1, mode="nearest") for ch in crop]).astype(np.float32)


def crop_cells(
    image: np.ndarray,
    labels: np.ndarray,
    *,
    ratio: float = 2.0,
    size: int = 224,
    skip_border: bool = True,
    oversize: Literal["drop", "resize"] = "drop",
) -> tuple[np.ndarray, pd.DataFrame]:
    """Cut one zero-padded ``size x size`` crop per instance, all channels with the same window.

    Args:
        image: ``[C, H, W]`` image, any integer or float dtype (``[H, W]`` is taken as one channel).
        labels: ``[H, W]`` integer label image, 0 = background (e.g. nuclei from :mod:`msnoop.segment`).
        ratio: Half-size of the window in units of the instance's larger bbox extent (Microsnoop: 2 for
            nucleus masks on BBBC021, 1 for whole-cell masks).
        size: Output side (the model input, 224).
        skip_border: Skip instances touching any image border.
        oversize: ``"drop"``: half-size capped at ``size // 2`` (reference default). ``"resize"``: no cap;
            windows larger than ``size`` are resized down to fit (aspect kept), then padded.

    Returns:
        ``(crops, table)``: ``crops`` is ``[N, C, size, size]`` float32 (raw intensities, zero padding);
        ``table`` has one row per crop, in the same order, with the columns of :func:`crop_windows`.
        With no qualifying instance, ``crops`` is ``[0, C, size, size]`` and ``table`` is empty; the caller
        decides what an image without cells means (Microsnoop gives it a zero embedding).

    Raises:
        ValueError: ``image`` is not ``[C, H, W]``, ``labels`` is not an integer ``[H, W]`` image of the same
            height and width, or a parameter is out of range.

    Example:
        >>> lab = np.zeros((40, 40), np.int32); lab[10:14, 20:26] = 7
        >>> crops, table = crop_cells(np.ones((2, 40, 40), np.uint16), lab, ratio=2.0, size=32)
        >>> crops.shape, table.loc[0, "window"]
        ((1, 2, 32, 32), (1, 12, 21, 32))
    """
    image, labels = _check_inputs(image, labels)
    table = crop_windows(labels, ratio=ratio, size=size, skip_border=skip_border, oversize=oversize)
    size = int(size)
    n_chan = image.shape[0]
    crops = np.zeros((len(table), n_chan, size, size), dtype=np.float32)
    for i, ((r0, c0, r1, c1), resized) in enumerate(zip(table["window"], table["resized"])):
        crop = image[:, r0:r1, c0:c1].astype(np.float32)
        ch, cw = crop.shape[1:]
        if resized:
            scale = size / max(ch, cw)
            ch, cw = min(int(scale * ch), size), min(int(scale * cw), size)
            crop = _resize_bilinear(crop, ch, cw)
        top, left = (size - ch) // 2, (size - cw) // 2
        crops[i, :, top : top + ch, left : left + cw] = crop
    if len(table) == 0:
        logger.debug("crop_cells: no instance to crop (labels max %s)", labels.max() if labels.size else None)
    return crops, table
