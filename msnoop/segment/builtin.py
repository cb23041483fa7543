"""Built-in nucleus segmentation with numpy / scipy / scikit-image (no weights, no GPU).

Input is one ``[H, W]`` nucleus channel (Hoechst / DAPI) of any numeric dtype; output is an int32 label
image (0 = background, instances ``1..N``). Every length below is a fraction of one number, the expected
nucleus diameter ``d`` in pixels, so the same defaults work on 100-px nuclei (Coelho 2009, 1349x1030) and
on 15-px nuclei (BBBC013, 640x640). With ``diameter=None`` (the default) ``d`` is estimated per image.

Pipeline (:func:`segment_nuclei`):

1. **Diameter** (only when ``diameter is None``): on a copy downsampled to at most ~512 px, subtract a
   coarse background, threshold (step 4), and take the median equivalent diameter of the connected
   components (:func:`estimate_diameter`).
2. **Working scale**: block-mean downsampling by ``f = max(1, floor(d / work_diameter))`` so nuclei are
   about ``work_diameter`` px wide; all later steps run there (speed), labels are upsampled at the end
   (nearest neighbour, i.e. boundaries are quantised to ``f`` px).
3. **Smoothing and background**: Gaussian ``sigma = smooth * d``; background = grey opening with a square
   of side ``background * d`` (then smoothed), subtracted (removes haze and uneven illumination).
4. **Threshold**: Otsu on the square root of the background-corrected image (clipped to its
   0.1-99.9 percentiles), kept between ``median + noise_floor * noise`` and ``median + noise_k * noise``
   (robust noise from the median absolute deviation of the darker half). The cap keeps dim nuclei when a
   few very bright objects would pull Otsu above them (Otsu on the square root is already less dragged by
   bright outliers than plain Otsu); the floor stops pure noise from being split in two.
5. **Holes and debris**: fill holes; drop foreground components smaller than ``min_area``.
6. **Declumping**: seeded watershed on the score ``smoothed intensity x distance to background``
   (intensity smoothed with ``sigma = seed_sigma * d``). Seeds are the score's maxima whose dynamic
   (height above the saddle to a higher maximum) is at least ``seed_h`` times the score's 99th percentile:
   basins of the full watershed are merged across shallow saddles in order of decreasing saddle height,
   i.e. an h-maxima transform, computed on the basin graph (fast) instead of by grey reconstruction.
7. **Per-object boundary**: inside each instance keep pixels above ``max(global threshold,
   refine * p95 of the instance)``, fill holes, keep the largest piece. Trims glow around bright
   nuclei and halos of merged debris.
8. **Filters**: drop instances with area outside ``[min_area, max_area]`` pixels; interior instances
   smaller than ``min_rel_area`` x the median interior instance area (debris, fragments); instances
   touching the border smaller than ``min_rel_area_border`` x that median (cut nuclei are kept);
   instances with solidity (area / convex-hull area) below ``min_solidity``; optionally instances whose
   mean corrected intensity exceeds ``max_rel_intensity`` x the median (off by default: bright mitotic or
   apoptotic nuclei are real cells for profiling).

Defaults were chosen on every other image of the Coelho 2009 sets (gnf, ic100) and checked on the other
half and visually on BBBC013's DNA channel; see ``jobs/bench_segmentation.py`` for measured AP.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from skimage.filters import threshold_otsu
from skimage.measure import label as measure_label
from skimage.segmentation import watershed

logger = logging.getLogger(__name__)

__all__ = ["estimate_diameter", "segment_nuclei"]

_ESTIMATE_MAX_SIDE = 512
_STRUCT8 = np.ones((3, 3), dtype=bool)


def _as_float_image(image: np.ndarray) -> np.ndarray:
    """Validate one ``[H, W]`` channel and return it as float32."""
    image = np.asarray(image)
    if image.ndim != 2:
        hint = ""
        if image.ndim == 3:
            hint = " Fix: pass one channel, e.g. image[c] for [C, H, W] or image[..., c] for [H, W, C]."
        raise ValueError(f"segment_nuclei expects one channel [H, W]; found shape {image.shape}.{hint}")
    if image.size == 0:
        raise ValueError(f"segment_nuclei expects a non-empty image; found shape {image.shape}")
    if image.dtype == bool or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(
            f"segment_nuclei expects an integer or float intensity image; found dtype {image.dtype}. "
            "Fix: convert, e.g. image.astype(np.float32)."
        )
    out = image.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError("segment_nuclei found NaN or inf pixels; fix: np.nan_to_num(image) before segmenting")
    return out


def _downsample(img: np.ndarray, f: int) -> np.ndarray:
    """Block-mean downsampling ``[H, W] -> [ceil(H/f), ceil(W/f)]`` (edge-padded to a multiple of f)."""
    if f <= 1:
        return img
    h, w = img.shape
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw)), mode="edge")
    return img.reshape(img.shape[0] // f, f, img.shape[1] // f, f).mean(axis=(1, 3), dtype=np.float32)


def _upsample_labels(small: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour inverse of :func:`_downsample` (pixel ``(r, c)`` takes block ``(r // f, c // f)``)."""
    if f <= 1:
        return small
    rows = np.arange(shape[0]) // f
    cols = np.arange(shape[1]) // f
    return small[rows[:, None], cols[None, :]]


def _smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndi.gaussian_filter(x, sigma=sigma, mode="nearest") if sigma > 0 else x


def _subtract_background(x: np.ndarray, side: float) -> np.ndarray:
    """``x`` minus its grey opening by a ``side`` x ``side`` square, smoothed with ``sigma = side / 2``.

    The background is smooth, so it is computed on a block-mean copy downsampled by ``side // 8`` and
    interpolated back (bilinear). ``side <= 0`` subtracts the median instead.
    """
    if side <= 0:
        return x - np.float32(np.median(x))
    g = max(1, int(side // 8))
    xs = _downsample(x, g)
    s = max(3, int(round(side / g)) | 1)
    bg = _smooth(ndi.grey_opening(xs, size=(s, s), mode="nearest"), s / 2.0)
    if g > 1:
        # Block centres of the downsampled grid sit at (i + 0.5) * g - 0.5 in full-resolution coordinates.
        rows = np.clip((np.arange(x.shape[0]) + 0.5) / g - 0.5, 0, bg.shape[0] - 1)
        cols = np.clip((np.arange(x.shape[1]) + 0.5) / g - 0.5, 0, bg.shape[1] - 1)
        bg = ndi.map_coordinates(bg, np.meshgrid(rows, cols, indexing="ij"), order=1, mode="nearest")
    return x - bg.astype(np.float32, copy=False)


def _threshold(x: np.ndarray, noise_k: float, noise_floor: float) -> float:
    """Otsu on sqrt of the clipped positive part, kept within ``median + [noise_floor, noise_k] * noise``."""
    lo, hi = (float(v) for v in np.percentile(x, (0.1, 99.9)))
    c = np.clip(x, max(lo, 0.0), max(hi, 0.0))
    if float(c.max()) <= float(c.min()):
        return math.inf
    thr = float(threshold_otsu(np.sqrt(c))) ** 2
    if noise_k > 0:
        med = float(np.median(x))
        noise = 1.4826 * float(np.median(np.abs(x[x <= med] - med)))
        if noise > 0:
            thr = min(thr, med + noise_k * noise)
            thr = max(thr, med + noise_floor * noise)
    return thr


def estimate_diameter(foreground: np.ndarray, *, min_pixels: int = 4) -> float | None:
    """Typical object diameter (pixels) of a binary foreground.

    The median equivalent diameter ``sqrt(4 * area / pi)`` of the connected components (8-connected,
    holes filled) with at least ``min_pixels`` pixels. Clumps of touching nuclei inflate single components;
    the median is robust to a minority of them.

    Args:
        foreground: ``[H, W]`` boolean foreground.
        min_pixels: Components smaller than this (noise) are ignored.

    Returns:
        The diameter in pixels, or ``None`` when there is no component.
    """
    lab, n = ndi.label(ndi.binary_fill_holes(foreground), structure=_STRUCT8)
    if n == 0:
        return None
    areas = np.bincount(lab.ravel())[1:]
    areas = areas[areas >= min_pixels]
    if areas.size == 0:
        return None
    return float(math.sqrt(4.0 * float(np.median(areas)) / math.pi))


def _estimate_image_diameter(img: np.ndarray, noise_k: float, noise_floor: float) -> float | None:
    """Step 1 of the pipeline: diameter from a coarse, scale-free first pass."""
    f0 = max(1, int(math.ceil(max(img.shape) / _ESTIMATE_MAX_SIDE)))
    x0 = _smooth(_downsample(img, f0), 1.0)
    x0 = _subtract_background(x0, max(x0.shape) / 8.0)
    thr = _threshold(x0, noise_k, noise_floor)
    if not math.isfinite(thr):
        return None
    est = estimate_diameter(x0 > thr)
    return None if est is None else est * f0


def _merge_shallow_basins(score: np.ndarray, mask: np.ndarray, h: float) -> np.ndarray:
    """Watershed of ``-score`` in ``mask`` from all regional maxima, then merge basins across saddles lower
    than ``h`` below the lower of the two peaks (processed by decreasing saddle height = h-maxima seeds).

    Returns:
        ``[H, W]`` int32 labels (0 outside ``mask``), not necessarily consecutive.
    """
    is_max = (score >= ndi.maximum_filter(score, size=3, mode="nearest")) & mask
    markers, n = ndi.label(is_max, structure=_STRUCT8)
    if n == 0:
        return np.zeros(score.shape, dtype=np.int32)
    basins = watershed(-score, markers, mask=mask).astype(np.int32)
    if n == 1 or h <= 0:
        return basins
    peak = np.full(n + 1, -np.inf)
    inside = basins > 0
    np.maximum.at(peak, basins[inside], score[inside])
    # Saddle between two touching basins = highest min(score) over adjacent pixel pairs across the border.
    keys, vals = [], []
    for a_sl, b_sl in (
        ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
        ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
        ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),
        ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))),
    ):
        a, b = basins[a_sl], basins[b_sl]
        sel = (a != b) & (a > 0) & (b > 0)
        if not sel.any():
            continue
        la, lb = a[sel].astype(np.int64), b[sel].astype(np.int64)
        keys.append(np.minimum(la, lb) * (n + 1) + np.maximum(la, lb))
        vals.append(np.minimum(score[a_sl][sel], score[b_sl][sel]))
    if not keys:
        return basins
    k = np.concatenate(keys)
    v = np.concatenate(vals)
    uk, inv = np.unique(k, return_inverse=True)
    saddle = np.full(uk.size, -np.inf)
    np.maximum.at(saddle, inv, v)
    parent = np.arange(n + 1)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for idx in np.argsort(-saddle, kind="stable"):
        ra, rb = find(int(uk[idx] // (n + 1))), find(int(uk[idx] % (n + 1)))
        if ra == rb:
            continue
        if min(peak[ra], peak[rb]) - saddle[idx] < h:
            if peak[ra] < peak[rb]:
                ra, rb = rb, ra
            parent[rb] = ra  # the higher peak survives
    roots = np.array([find(i) for i in range(n + 1)], dtype=np.int32)
    roots[0] = 0
    return roots[basins]


def _refine_objects(labels: np.ndarray, x: np.ndarray, thr: float, refine: float) -> np.ndarray:
    """Step 7: per-object threshold ``max(thr, refine * p95)``, fill holes, keep the largest piece."""
    inside = labels > 0
    lab = labels[inside]
    vals = x[inside]
    order = np.lexsort((vals, lab))  # by label, then value
    lab_sorted, vals_sorted = lab[order], vals[order]
    ids, start, count = np.unique(lab_sorted, return_index=True, return_counts=True)
    p95 = vals_sorted[start + np.floor(0.95 * (count - 1)).astype(np.int64)]
    t = np.full(int(labels.max()) + 1, np.inf, dtype=np.float64)
    t[ids] = np.maximum(thr, refine * p95)
    kept = np.where(inside & (x > t[labels]), labels, 0)
    # Keep the largest 4-connected piece of each object.
    pieces = measure_label(kept, background=0, connectivity=1)
    sizes = np.bincount(pieces.ravel())
    owner = np.zeros(sizes.size, dtype=np.int64)
    owner[pieces.ravel()] = kept.ravel()
    best = np.zeros(t.size, dtype=np.int64)
    piece_ids = np.arange(1, sizes.size)
    # For each owner label, the piece with the largest size (ties: lowest piece id).
    o = np.lexsort((piece_ids, -sizes[1:], owner[1:]))
    first = np.ones(o.size, dtype=bool)
    first[1:] = owner[1:][o][1:] != owner[1:][o][:-1]
    best[owner[1:][o][first]] = piece_ids[o][first]
    keep_piece = np.zeros(sizes.size, dtype=bool)
    keep_piece[best[best > 0]] = True
    kept = np.where(keep_piece[pieces], kept, 0)
    # Fill holes: a background pixel enclosed by one object joins it (its watershed label).
    holes = ndi.binary_fill_holes(kept > 0) & (kept == 0) & inside
    kept[holes] = labels[holes]
    return kept.astype(np.int32, copy=False)


def _solidity(mask: np.ndarray) -> float:
    """Pixel area / area of the convex hull of the pixel squares (1 for convex shapes)."""
    area = int(mask.sum())
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    rr, cc = np.nonzero(mask & ~inner)  # boundary pixels carry the hull
    if rr.size < 3:
        return 1.0
    corners = np.concatenate([np.stack([rr + dr, cc + dc], axis=1) for dr in (0, 1) for dc in (0, 1)], axis=0).astype(
        np.float64
    )
    try:
        hull_area = ConvexHull(corners).volume
    except QhullError:  # degenerate (a line of pixels)
        return 1.0
    return float(min(1.0, area / hull_area)) if hull_area > 0 else 1.0


def segment_nuclei(
    image: np.ndarray,
    *,
    diameter: float | None = None,
    work_diameter: float = 24.0,
    smooth: float = 0.06,
    background: float = 1.5,
    noise_k: float = 15.0,
    noise_floor: float = 2.0,
    seed_sigma: float = 0.15,
    seed_h: float = 0.02,
    refine: float = 0.3,
    min_area: float | None = None,
    max_area: float | None = None,
    min_rel_area: float = 0.25,
    min_rel_area_border: float = 0.05,
    min_solidity: float = 0.8,
    max_rel_intensity: float | None = None,
) -> np.ndarray:
    """Segment nuclei in one fluorescence channel (see the module docstring for the pipeline).

    Args:
        image: ``[H, W]`` nucleus channel, any integer or float dtype.
        diameter: Expected nucleus diameter in pixels; ``None`` estimates it per image.
        work_diameter: Nuclei are downsampled to about this many pixels across before processing
            (speed); ``diameter <= 2 * work_diameter`` runs at full resolution.
        smooth: Gaussian sigma, as a fraction of the diameter.
        background: Side of the square used to estimate the background by grey opening, in diameters;
            ``0`` subtracts only the median.
        noise_k: The threshold is capped at ``median + noise_k * noise``; ``0`` disables the cap.
        noise_floor: The threshold is at least ``median + noise_floor * noise`` (pure noise gives no nuclei).
        seed_sigma: Smoothing of the intensity used for seeds, as a fraction of the diameter.
        seed_h: Minimum dynamic of a seed, as a fraction of the seed score's 99th percentile. Larger
            merges more (fewer splits of touching nuclei).
        refine: Per-object boundary at this fraction of the object's 95th-percentile intensity
            (``0`` disables).
        min_area: Smallest instance in pixels (full resolution); default ``0.1 * pi/4 * diameter**2``.
        max_area: Largest instance in pixels; default ``8 * pi/4 * diameter**2``.
        min_rel_area: Interior instances smaller than this fraction of the median interior area are dropped.
        min_rel_area_border: Same for instances touching the image border (cut nuclei are small).
        min_solidity: Instances less convex than this are dropped (``0`` disables).
        max_rel_intensity: If set, instances brighter than this multiple of the median instance are dropped.

    Returns:
        ``[H, W]`` int32 label image, 0 = background, instances numbered ``1..N``.

    Raises:
        ValueError: The image is not a non-empty finite 2-D numeric array, or a parameter is out of range.

    Example:
        >>> yy, xx = np.mgrid[:64, :64]
        >>> discs = ((yy - 32) ** 2 + (xx - 20) ** 2 < 100) | ((yy - 32) ** 2 + (xx - 46) ** 2 < 100)
        >>> int(segment_nuclei(100.0 * discs, diameter=20).max())
        2
    """
    img = _as_float_image(image)
    if diameter is not None and not (math.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be a positive number of pixels, or None to estimate it; found {diameter!r}")
    if not work_diameter > 0:
        raise ValueError(f"work_diameter must be > 0 pixels; found {work_diameter!r}")
    for name, val in (
        ("smooth", smooth),
        ("background", background),
        ("noise_k", noise_k),
        ("noise_floor", noise_floor),
        ("seed_sigma", seed_sigma),
        ("seed_h", seed_h),
        ("refine", refine),
        ("min_rel_area", min_rel_area),
        ("min_rel_area_border", min_rel_area_border),
        ("min_solidity", min_solidity),
    ):
        if not (math.isfinite(val) and val >= 0):
            raise ValueError(f"{name} must be a finite number >= 0; found {val!r}")
    for name, opt in (("min_area", min_area), ("max_area", max_area), ("max_rel_intensity", max_rel_intensity)):
        if opt is not None and not (math.isfinite(opt) and opt > 0):
            raise ValueError(f"{name} must be None or a finite number > 0; found {opt!r}")
    shape = img.shape
    empty = np.zeros(shape, dtype=np.int32)
    if float(img.max()) <= float(img.min()):
        logger.debug("constant image: no nuclei")
        return empty

    if diameter is None:
        est = _estimate_image_diameter(img, noise_k, noise_floor)
        if est is None:
            logger.debug("no foreground found while estimating the diameter: no nuclei")
            return empty
        diam = est
        logger.debug("estimated nucleus diameter: %.1f px", diam)
    else:
        diam = float(diameter)

    full_area = math.pi / 4.0 * diam**2
    amin_full = 0.1 * full_area if min_area is None else float(min_area)
    amax_full = 8.0 * full_area if max_area is None else float(max_area)

    f = max(1, int(diam // work_diameter))
    d = diam / f
    x = _smooth(_downsample(img, f), max(0.5, smooth * d))
    x = _subtract_background(x, background * d)
    thr = _threshold(x, noise_k, noise_floor)
    if not math.isfinite(thr):
        return empty
    fg = ndi.binary_fill_holes(x > thr)
    comp, n = ndi.label(fg)
    if n == 0:
        return empty
    px = float(f * f)  # full-resolution pixels per working pixel
    comp_area = np.bincount(comp.ravel()) * px
    keep = comp_area >= amin_full
    keep[0] = False
    fg = keep[comp]
    if not fg.any():
        return empty

    # Step 6: declumping.
    dist = _smooth(ndi.distance_transform_edt(fg), max(0.5, 0.05 * d))
    xs = _smooth(x, max(0.5, seed_sigma * d)) / max(thr, 1e-12)
    score = np.where(fg, np.clip(xs, 0, None) * dist / d, 0.0)
    h = seed_h * float(np.percentile(score[fg], 99))
    labels = _merge_shallow_basins(score, fg, h)

    # Step 7: per-object boundaries.
    if refine > 0:
        labels = _refine_objects(labels, x, thr, refine)

    # Step 8: filters.
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if ids.size == 0:
        return empty
    areas = np.bincount(labels.ravel(), minlength=int(ids[-1]) + 1)[ids].astype(np.float64) * px
    slices = ndi.find_objects(labels)
    hs, ws = labels.shape
    border = np.array(
        [
            slices[i - 1][0].start == 0
            or slices[i - 1][1].start == 0
            or slices[i - 1][0].stop == hs
            or slices[i - 1][1].stop == ws
            for i in ids
        ]
    )
    ok = (areas >= amin_full) & (areas <= amax_full)
    interior = ok & ~border
    ref_area = float(np.median(areas[interior])) if interior.sum() >= 5 else full_area
    ok &= np.where(border, areas >= min_rel_area_border * ref_area, areas >= min_rel_area * ref_area)
    if max_rel_intensity is not None:
        means = ndi.mean(x, labels, index=ids)
        ref_i = float(np.median(means[interior])) if interior.sum() >= 5 else float(np.median(means))
        ok &= means <= max_rel_intensity * ref_i
    if min_solidity > 0:
        for j in np.flatnonzero(ok):
            sl = slices[ids[j] - 1]
            if _solidity(labels[sl] == ids[j]) < min_solidity:
                ok[j] = False
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int32)
    kept = ids[ok]
    lut[kept] = np.arange(1, kept.size + 1, dtype=np.int32)
    small = lut[labels]
    logger.debug(
        "segment_nuclei: diameter %.1f px, working factor %d, threshold %.4g, %d of %d instances kept",
        diam,
        f,
        thr,
        kept.size,
        ids.size,
    )
    return _upsample_labels(small, f, shape).astype(np.int32, copy=False)
