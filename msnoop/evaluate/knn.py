"""k-nearest-neighbour classification of profiles with FAISS, using Microsnoop's voting rule.

Search: exact FAISS flat indexes. ``metric="cosine"`` L2-normalises copies of the vectors and uses
``IndexFlatIP`` (Microsnoop's own cosine path normalised a temporary and indexed raw vectors; this
does not); ``metric="l2"`` uses ``IndexFlatL2``. A GPU index is used when ``faiss.get_num_gpus() > 0``.

Vote (Microsnoop ``eval.knn_classify``): if any label occurs more than once among the ``k`` neighbours,
predict the most common label; a tie between most common labels goes to the **smallest label**
(Microsnoop used ``scipy.stats.mode``, which returns the smallest value; labels are ordered as by
``numpy.unique``, i.e. numerically or lexicographically). If all ``k`` labels differ, predict the label of
the nearest neighbour. For ``k=1`` this is plain 1-NN. Unlike scikit-learn's majority vote, e.g. for
neighbour labels ``[b, c, a]`` (all distinct) the prediction is ``b`` (nearest), not ``a``.

Protocols (``cv``):

* ``"loo"``: leave-one-out on the whole set; ``k + 1`` neighbours are searched and the query's own
  index is removed (not simply the first hit, so exact duplicates are handled), as in Microsnoop.
* ``"kfold:<n>"``: stratified ``n``-fold cross-validation (shuffled with ``seed``).
* ``"group:<column>"``: leave-one-group-out: a row's neighbours never share its group (field, plate,
  compound...).

Equidistant neighbours are ordered by FAISS; results can depend on that order only through exact ties.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

Metric = Literal["cosine", "l2"]


@lru_cache(maxsize=1)
def _gpu_resources() -> Any:
    import faiss

    return faiss.StandardGpuResources()


def _use_gpu() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _prepare(X: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous copy; rows L2-normalised for cosine (zero rows stay zero)."""
    if metric not in ("cosine", "l2"):
        raise ValueError(f"expected metric 'cosine' or 'l2', found {metric!r}")
    X = np.array(X, dtype=np.float32, order="C", copy=True)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D [N, D] array, found shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("expected finite vectors, found NaN/inf; clean the features before kNN")
    if metric == "cosine":
        norms = np.linalg.norm(X, axis=1, keepdims=True)
        zero = norms[:, 0] == 0
        if zero.any():
            logger.warning("%d zero vector(s): cosine similarity 0 to every other vector", int(zero.sum()))
        norms[zero] = 1.0
        X /= norms
    return X


def knn_search(
    train: np.ndarray, query: np.ndarray, k: int, *, metric: Metric = "cosine"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-nearest-neighbour search with a FAISS flat index.

    Args:
        train: ``[N, D]`` indexed vectors.
        query: ``[M, D]`` query vectors.
        k: Neighbours per query, ``1 <= k <= N``.
        metric: ``"cosine"`` (inner product of L2-normalised copies) or ``"l2"``.

    Returns:
        ``(scores, indices)``, both ``[M, k]``, nearest first: cosine similarities (decreasing) or squared
        Euclidean distances (increasing), and row indices into ``train``.

    Raises:
        ValueError: If ``k`` is out of range or the dimensions differ.
    """
    import faiss

    xb = _prepare(train, metric)
    xq = _prepare(query, metric)
    if xb.shape[1] != xq.shape[1]:
        raise ValueError(f"expected train and query with the same dimension, found {xb.shape[1]} and {xq.shape[1]}")
    if not 1 <= k <= len(xb):
        raise ValueError(f"expected 1 <= k <= {len(xb)} (the number of indexed vectors), found k={k}")
    d = xb.shape[1]
    index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    if _use_gpu():
        index = faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)
    index.add(xb)
    scores, idx = index.search(xq, k)
    return scores, idx.astype(np.int64)


def encode_labels(labels: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for labels, ordered as ``numpy.unique`` orders them.

    Args:
        labels: ``[N]`` labels (numbers or strings; mixed types are compared as strings).

    Returns:
        ``(classes, codes)``: ``[C]`` sorted unique labels and ``[N]`` int64 codes.

    Raises:
        ValueError: If a label is missing (None/NaN).
    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of labels, found shape {arr.shape}")
    if arr.dtype == object:
        if any(v is None or (isinstance(v, float) and np.isnan(v)) for v in arr):
            raise ValueError("expected a label for every row, found missing labels (None/NaN); drop those rows")
        try:
            classes, codes = np.unique(arr, return_inverse=True)
        except TypeError:
            classes, codes = np.unique(arr.astype(str), return_inverse=True)
    else:
        if arr.dtype.kind == "f" and np.isnan(arr).any():
            raise ValueError("expected a label for every row, found NaN labels; drop those rows")
        classes, codes = np.unique(arr, return_inverse=True)
    return classes, codes.astype(np.int64).reshape(-1)


def microsnoop_vote(neighbor_codes: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Microsnoop's vote over neighbour labels (see module docstring).

    Args:
        neighbor_codes: ``[M, k]`` integer label codes of the neighbours, nearest first.
        n_classes: Number of classes (default ``max + 1``).

    Returns:
        ``[M]`` predicted codes: the most common code if any code repeats (ties -> smallest code),
        else the nearest neighbour's code.
    """
    codes = np.asarray(neighbor_codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"expected [M, k] neighbour codes with k >= 1, found shape {codes.shape}")
    m = codes.shape[0]
    c = int(codes.max()) + 1 if n_classes is None else int(n_classes)
    counts = np.bincount((codes + c * np.arange(m)[:, None]).ravel(), minlength=m * c).reshape(m, c)
    mode = counts.argmax(axis=1)  # first maximum = smallest code
    return np.where(counts.max(axis=1) >= 2, mode, codes[:, 0])


def knn_predict(
    train_X: np.ndarray,
    train_codes: np.ndarray,
    query_X: np.ndarray,
    *,
    k: int,
    metric: Metric = "cosine",
    n_classes: int | None = None,
) -> np.ndarray:
    """Predict label codes of queries from a labelled training set.

    Args:
        train_X: ``[N, D]`` training vectors.
        train_codes: ``[N]`` integer label codes.
        query_X: ``[M, D]`` query vectors.
        k: Neighbours.
        metric: ``"cosine"`` or ``"l2"``.
        n_classes: Number of classes.

    Returns:
        ``[M]`` predicted codes.
    """
    _, idx = knn_search(train_X, query_X, k, metric=metric)
    return microsnoop_vote(np.asarray(train_codes)[idx], n_classes)


def _loo_neighbors(X: np.ndarray, k: int, metric: Metric) -> np.ndarray:
    n = len(X)
    if n < k + 1:
        raise ValueError(f"leave-one-out with k={k} needs at least {k + 1} rows, found {n}")
    _, idx = knn_search(X, X, k + 1, metric=metric)
    not_self = idx != np.arange(n)[:, None]
    # keep the first k hits that are not the query itself (if the query was not returned, e.g. among
    # exact duplicates, the (k+1)-th hit is dropped instead)
    order = np.argsort(~not_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, axis=1)


def parse_cv(cv: str) -> tuple[str, int | str | None]:
    """Parse ``"loo"``, ``"kfold[:n]"`` or ``"group[:column]"`` into ``(kind, arg)``."""
    kind, _, arg = cv.partition(":")
    kind = kind.strip().lower()
    if kind == "loo" and not arg:
        return "loo", None
    if kind == "kfold":
        try:
            n = int(arg) if arg else 5
        except ValueError:
            n = -1
        if n < 2:
            raise ValueError(f"expected cv='kfold:<n>' with an integer n >= 2, found {cv!r}")
        return "kfold", n
    if kind == "group":
        return "group", arg or None
    raise ValueError(f"expected cv 'loo', 'kfold:<n>' or 'group:<column>', found {cv!r}")


def knn_cross_predict(
    X: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    k: int = 11,
    cv: str = "loo",
    groups: Sequence[Any] | np.ndarray | None = None,
    metric: Metric = "cosine",
    seed: int = 0,
) -> np.ndarray:
    """Out-of-sample kNN predictions for every row under a cross-validation protocol.

    Args:
        X: ``[N, D]`` profiles.
        labels: ``[N]`` labels.
        k: Neighbours.
        cv: ``"loo"``, ``"kfold:<n>"`` or ``"group:<column>"`` (see module docstring).
        groups: ``[N]`` group of each row, required for ``"group"``.
        metric: ``"cosine"`` or ``"l2"``.
        seed: Shuffling seed for ``kfold``.

    Returns:
        ``[N]`` predicted labels (same values as ``labels``).

    Raises:
        ValueError: On shape mismatches, a bad ``cv``, missing groups, or too few rows for ``k``.
    """
    X = np.asarray(X)
    classes, codes = encode_labels(labels)
    if len(codes) != len(X):
        raise ValueError(f"expected one label per row, found {len(codes)} labels for {len(X)} rows")
    if k < 1:
        raise ValueError(f"expected k >= 1, found {k}")
    n_classes = len(classes)
    kind, arg = parse_cv(cv)
    pred = np.full(len(X), -1, dtype=np.int64)
    if kind == "loo":
        nb = _loo_neighbors(X, k, metric)
        pred = microsnoop_vote(codes[nb], n_classes)
    elif kind == "kfold":
        from sklearn.model_selection import StratifiedKFold

        skf = StratifiedKFold(n_splits=int(arg), shuffle=True, random_state=seed)  # type: ignore[arg-type]
        for train, test in skf.split(X, codes):
            pred[test] = knn_predict(X[train], codes[train], X[test], k=k, metric=metric, n_classes=n_classes)
    else:
        if groups is None:
            raise ValueError(f"cv={cv!r} needs groups (one group value per row, e.g. the column's values)")
        g = np.asarray(groups)
        if len(g) != len(X):
            raise ValueError(f"expected one group per row, found {len(g)} groups for {len(X)} rows")
        _, gcodes = encode_labels(g)
        for gi in np.unique(gcodes):
            test = gcodes == gi
            train = ~test
            if int(train.sum()) < k:
                raise ValueError(
                    f"leave-one-group-out: only {int(train.sum())} rows outside group {g[test][0]!r}, expected >= k={k}"
                )
            pred[test] = knn_predict(X[train], codes[train], X[test], k=k, metric=metric, n_classes=n_classes)
    return classes[pred]


def classification_metrics(y_true: Sequence[Any] | np.ndarray, y_pred: Sequence[Any] | np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, MCC, macro-F1, per-class accuracy and confusion matrix.

    Undefined terms (a class never predicted, a constant prediction) count as 0, without warnings.

    Args:
        y_true: ``[N]`` true labels.
        y_pred: ``[N]`` predicted labels.

    Returns:
        JSON-serialisable dict: ``n``, ``labels`` (str, sorted), ``accuracy``, ``balanced_accuracy``,
        ``mcc``, ``macro_f1``, ``per_class_accuracy`` (recall of each true class),
        ``per_class_f1``, ``confusion_matrix`` (rows true, columns predicted, order of ``labels``).
    """
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        matthews_corrcoef,
    )

    yt = np.asarray(y_true)
    yp = np.asarray(y_pred)
    classes, codes = encode_labels(np.concatenate([yt, yp]))
    t, p = codes[: len(yt)], codes[len(yt) :]
    present = np.unique(t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        cm = confusion_matrix(t, p, labels=np.arange(len(classes)))
        f1 = f1_score(t, p, labels=present, average=None, zero_division=0)
        out = {
            "n": int(len(t)),
            "labels": [str(c) for c in classes],
            "accuracy": float(accuracy_score(t, p)),
            "balanced_accuracy": float(balanced_accuracy_score(t, p)),
            "mcc": float(matthews_corrcoef(t, p)),
            "macro_f1": float(f1_score(t, p, labels=present, average="macro", zero_division=0)),
        }
    row = cm.sum(axis=1)
    out["per_class_accuracy"] = {str(classes[i]): float(cm[i, i] / row[i]) for i in present}
    out["per_class_f1"] = {str(classes[i]): float(v) for i, v in zip(present, f1, strict=True)}
    out["confusion_matrix"] = cm.astype(int).tolist()
    return out


def knn_evaluate(
    X: np.ndarray,
    labels: Sequence[Any] | np.ndarray,
    *,
    k: int = 11,
    cv: str = "loo",
    groups: Sequence[Any] | np.ndarray | None = None,
    metric: Metric = "cosine",
    seed: int = 0,
) -> dict[str, Any]:
    """kNN classification metrics under a cross-validation protocol (Microsnoop vote).

    Args:
        X: ``[N, D]`` profiles.
        labels: ``[N]`` labels.
        k: Neighbours (Microsnoop: 11 for CyCLOPS, 1 for TissueNet/LIVECell/BBBC021).
        cv: ``"loo"``, ``"kfold:<n>"`` or ``"group:<column>"``.
        groups: ``[N]`` group values for ``"group"``.
        metric: ``"cosine"`` or ``"l2"`` (Microsnoop's CyCLOPS/TissueNet runs used Euclidean).
        seed: Shuffling seed for ``kfold``.

    Returns:
        :func:`classification_metrics` plus ``k``, ``cv``, ``metric``, ``seed``, ``n_classes``,
        ``vote`` and ``chance`` (1 / number of classes); JSON-serialisable.
    """
    pred = knn_cross_predict(X, labels, k=k, cv=cv, groups=groups, metric=metric, seed=seed)
    res = classification_metrics(labels, pred)
    n_classes = len(np.unique(np.asarray(labels).astype(str)))
    res.update(
        {
            "k": int(k),
            "cv": cv,
            "metric": metric,
            "seed": int(seed),
            "n_classes": n_classes,
            "chance": 1.0 / n_classes,
            "vote": "microsnoop (mode if any label repeats, ties -> smallest label; else nearest)",
        }
    )
    logger.info(
        "kNN k=%d cv=%s metric=%s: accuracy %.4f, macro-F1 %.4f", k, cv, metric, res["accuracy"], res["macro_f1"]
    )
    return res
