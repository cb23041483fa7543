"""Instance-segmentation quality: average precision (AP) at IoU thresholds.

Definition (cellpose ``metrics.average_precision``, stardist ``matching``): predicted and ground-truth
instances are matched one-to-one by intersection over union (IoU); a pair counts as a true positive when
its IoU is ``>= threshold``. Then, per image and threshold::

    AP = TP / (TP + FP + FN)

with ``FP`` = unmatched predictions and ``FN`` = unmatched ground-truth instances. (This "AP" is the
detection-quality score used by the cellpose and stardist papers, not the area under a precision-recall
curve.)

Matching is **optimal**: among the pairs with IoU >= threshold, the assignment that maximises the number of
matches (ties broken towards higher total IoU) is found with ``scipy.optimize.linear_sum_assignment``, as
cellpose does. For thresholds above 0.5 the matching is unique (an instance can overlap at most one other
instance by more than half of their union), so optimal and greedy matching give the same counts there.

Label images use 0 for background; any other non-negative integer is an instance id (ids need not be
consecutive).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from msnoop.preprocess.crop import check_label_image

logger = logging.getLogger(__name__)

__all__ = [
    "MatchResult",
    "average_precision",
    "evaluate_segmentation",
    "iou_matrix",
    "match_instances",
    "read_label_or_image",
    "read_mask",
    "read_pair",
    "summarize_ap",
]


@dataclass(frozen=True)
class MatchResult:
    """Counts of one image at a set of IoU thresholds.

    Attributes:
        thresholds: ``[T]`` IoU thresholds.
        tp: ``[T]`` matched pairs per threshold.
        fp: ``[T]`` unmatched predictions per threshold.
        fn: ``[T]`` unmatched ground-truth instances per threshold.
        n_true: Number of ground-truth instances.
        n_pred: Number of predicted instances.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    n_true: int
    n_pred: int

    @property
    def ap(self) -> np.ndarray:
        """``[T]`` AP = TP / (TP + FP + FN); 1.0 where both masks are empty (nothing to find, nothing found)."""
        denom = self.tp + self.fp + self.fn
        return np.where(denom > 0, self.tp / np.maximum(denom, 1), 1.0)

    @property
    def precision(self) -> np.ndarray:
        """``[T]`` TP / (TP + FP); 1.0 when nothing was predicted."""
        denom = self.tp + self.fp
        return np.where(denom > 0, self.tp / np.maximum(denom, 1), 1.0)

    @property
    def recall(self) -> np.ndarray:
        """``[T]`` TP / (TP + FN); 1.0 when there is nothing to find."""
        denom = self.tp + self.fn
        return np.where(denom > 0, self.tp / np.maximum(denom, 1), 1.0)


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU between every ground-truth and every predicted instance.

    Args:
        true: ``[H, W]`` ground-truth label image (0 = background).
        pred: ``[H, W]`` predicted label image (0 = background).

    Returns:
        ``[n_true, n_pred]`` float64 IoU matrix; rows follow the sorted non-zero ids of ``true``,
        columns those of ``pred``.

    Raises:
        ValueError: The images are not 2-D, have different shapes, a non-integer dtype or negative ids.
    """
    true = check_label_image(true, "true")
    pred = check_label_image(pred, "pred")
    if true.shape != pred.shape:
        raise ValueError(f"true and pred must have the same shape; found {true.shape} and {pred.shape}")
    # Map ids to 0..n (0 = background) so the contingency table stays small whatever the id values.
    t_ids, t_inv = np.unique(true.ravel(), return_inverse=True)
    p_ids, p_inv = np.unique(pred.ravel(), return_inverse=True)
    t_shift = 0 if (t_ids.size and t_ids[0] == 0) else 1  # make index 0 the background
    p_shift = 0 if (p_ids.size and p_ids[0] == 0) else 1
    t_inv = t_inv + t_shift
    p_inv = p_inv + p_shift
    nt = t_ids.size + t_shift
    n_p = p_ids.size + p_shift
    overlap = np.bincount(t_inv * n_p + p_inv, minlength=nt * n_p).reshape(nt, n_p).astype(np.float64)
    area_t = overlap.sum(axis=1, keepdims=True)
    area_p = overlap.sum(axis=0, keepdims=True)
    union = area_t + area_p - overlap
    iou = np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)
    return iou[1:, 1:]


def _n_matches(iou: np.ndarray, threshold: float) -> int:
    """Size of the optimal one-to-one matching among pairs with IoU >= threshold (cellpose's rule)."""
    if iou.size == 0:
        return 0
    n_min = min(iou.shape)
    # Each admissible pair is worth 1 (maximise the count), plus a small IoU bonus (< 1 in total) for ties.
    cost = -(iou >= threshold).astype(np.float64) - iou / (2.0 * n_min)
    rows, cols = linear_sum_assignment(cost)
    return int((iou[rows, cols] >= threshold).sum())


def match_instances(
    true: np.ndarray,
    pred: np.ndarray,
    thresholds: float | Sequence[float] = (0.5,),
) -> MatchResult:
    """Match predicted to ground-truth instances of one image at one or more IoU thresholds.

    Args:
        true: ``[H, W]`` ground-truth label image (0 = background).
        pred: ``[H, W]`` predicted label image (0 = background).
        thresholds: IoU threshold(s) in ``(0, 1]``; a pair with IoU ``>=`` threshold can be matched.

    Returns:
        A :class:`MatchResult` with ``tp``, ``fp``, ``fn`` and ``ap`` per threshold.

    Raises:
        ValueError: Invalid label images (see :func:`iou_matrix`) or a threshold outside ``(0, 1]``.
    """
    ths = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if ths.ndim != 1 or ths.size == 0 or np.any(ths <= 0) or np.any(ths > 1):
        raise ValueError(f"thresholds must be IoU values in (0, 1]; found {thresholds!r}")
    iou = iou_matrix(true, pred)
    n_true, n_pred = iou.shape
    tp = np.array([_n_matches(iou, float(t)) for t in ths], dtype=np.int64)
    return MatchResult(thresholds=ths, tp=tp, fp=n_pred - tp, fn=n_true - tp, n_true=int(n_true), n_pred=int(n_pred))


def average_precision(
    true: np.ndarray,
    pred: np.ndarray,
    thresholds: float | Sequence[float] = (0.5,),
) -> np.ndarray:
    """AP = TP / (TP + FP + FN) of one image at each IoU threshold.

    Args:
        true: ``[H, W]`` ground-truth label image (0 = background).
        pred: ``[H, W]`` predicted label image (0 = background).
        thresholds: IoU threshold(s).

    Returns:
        ``[T]`` float64 AP per threshold (1.0 where both images have no instance).

    Example:
        >>> t = np.zeros((4, 4), int); t[:2, :2] = 1
        >>> float(average_precision(t, t)[0])
        1.0
    """
    return match_instances(true, pred, thresholds).ap


def evaluate_segmentation(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    thresholds: float | Sequence[float] = (0.5,),
) -> dict[str, np.ndarray]:
    """AP over many images: the mean of per-image AP, and AP of the pooled counts.

    Args:
        pairs: ``(true [H, W], pred [H, W])`` label images.
        thresholds: IoU threshold(s).

    Returns:
        ``{"per_image": [N, T], "mean": [T], "pooled": [T], "tp": [T], "fp": [T], "fn": [T]}``;
        ``mean`` averages per-image AP, ``pooled`` is sum(TP) / sum(TP + FP + FN) over all images.

    Raises:
        ValueError: ``pairs`` is empty.
    """
    results = [match_instances(t, p, thresholds) for t, p in pairs]
    if not results:
        raise ValueError("evaluate_segmentation needs at least one (true, pred) pair; found none")
    tp = np.sum([r.tp for r in results], axis=0)
    fp = np.sum([r.fp for r in results], axis=0)
    fn = np.sum([r.fn for r in results], axis=0)
    per_image = np.stack([r.ap for r in results])
    denom = tp + fp + fn
    pooled = np.where(denom > 0, tp / np.maximum(denom, 1), 1.0)
    return {"per_image": per_image, "mean": per_image.mean(axis=0), "pooled": pooled, "tp": tp, "fp": fp, "fn": fn}


def summarize_ap(rows: Sequence[dict[str, Any]], thresholds: Sequence[float]) -> dict[str, Any]:
    """Summary of per-image scores: mean AP per threshold, and pooled AP, the lowest AP and counts when known.

    Args:
        rows: One dict per image with ``image`` (a relative path; its folder groups the images) and ``ap``
            (one value per threshold); ``tp``/``fp``/``fn`` lists and ``n_true``/``n_pred`` where recorded.
        thresholds: The IoU thresholds behind ``ap``, in the same order.

    Returns:
        ``n_images``, ``mean_ap@t`` (and ``pooled_ap@t`` with counts) for every threshold, ``min_ap@t0``,
        ``n_true``/``n_pred`` sums and ``mean_ap@t0_by_folder``, where ``t0`` is the first threshold;
        only ``n_images`` (0) for no rows.
    """
    if not rows:
        return {"n_images": 0}
    ap = np.array([r["ap"] for r in rows], dtype=np.float64)
    if ap.shape[1] != len(thresholds):
        raise ValueError(f"rows have {ap.shape[1]} AP values each; expected one per threshold {tuple(thresholds)}")
    counted = all(k in r for r in rows for k in ("tp", "fp", "fn"))
    if counted:
        tp, fp, fn = (np.sum([r[k] for r in rows], axis=0) for k in ("tp", "fp", "fn"))
        pooled = tp / np.maximum(tp + fp + fn, 1)
    out: dict[str, Any] = {"n_images": len(rows)}
    for i, t in enumerate(thresholds):
        out[f"mean_ap@{t}"] = round(float(ap[:, i].mean()), 4)
        if counted:
            out[f"pooled_ap@{t}"] = round(float(pooled[i]), 4)
    t0 = thresholds[0]
    out[f"min_ap@{t0}"] = round(float(ap[:, 0].min()), 4)
    for key in ("n_true", "n_pred"):
        if all(key in r for r in rows):
            out[key] = int(sum(r[key] for r in rows))
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(str(Path(r["image"]).parent), []).append(r["ap"][0])
    out[f"mean_ap@{t0}_by_folder"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(groups.items())}
    return out


# ------------------------------------------------------------------------------------------------- files


def read_label_or_image(path: Path) -> np.ndarray:
    """``[H, W]`` array of an image or label file (the first plane of an RGB PNG)."""
    from msnoop.io.readers import read_image

    arr = np.asarray(read_image(path))
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] in (3, 4) else arr[0]
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D image, found shape {arr.shape}")
    return arr


def read_mask(path: Path) -> np.ndarray:
    """``[H, W]`` int32 instance labels (0 = background) from an image file.

    Raises:
        ValueError: Negative or fractional values (not a label image); the message names the file.
    """
    arr = read_label_or_image(path)
    if arr.size and (arr.min() < 0 or not np.array_equal(arr, np.round(arr))):
        raise ValueError(
            f"{path}: expected an instance label image (whole numbers >= 0, 0 = background); "
            f"found values in [{arr.min()}, {arr.max()}] with fractions"
        )
    return arr.astype(np.int32)


def read_pair(img_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An image and its int32 instance labels.

    Raises:
        ValueError: Their shapes differ, or the mask is not a label image; the message names both files.
    """
    img, gt = read_label_or_image(img_path), read_mask(mask_path)
    if img.shape != gt.shape:
        raise ValueError(f"{mask_path}: mask shape {gt.shape} differs from image {img_path} shape {img.shape}")
    return img, gt
