"""Distances between feature rows: one home for the cosine and Euclidean arithmetic of every evaluation and search.

kNN (:mod:`msnoop.evaluate.knn`), NSC/NSCB (:mod:`msnoop.evaluate.nsc`), mAP (:mod:`msnoop.evaluate.map`), the
report's map and galleries (:mod:`msnoop.evaluate.report`) and the exact path of the vector search
(:mod:`msnoop.query.ann`) compare rows with the functions below, after the table's post-processing
(:mod:`msnoop.vectors.postprocess`).

Conventions: a cosine similarity is computed on L2-normalised rows, where a zero row stays zero (similarity 0
to everything); :func:`distances` follows LanceDB's definitions so that an exact ranking done here agrees with
LanceDB's own: cosine ``1 - cos``, ``l2`` squared Euclidean, ``dot`` ``1 - x.q``.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

import numpy as np

logger = logging.getLogger(__name__)

#: Distances of the evaluations (kNN, report, bench tasks).
Metric = Literal["cosine", "l2"]
#: Distances of a LanceDB vector search (and its index).
SearchMetric = Literal["cosine", "l2", "dot"]
METRICS: tuple[str, ...] = get_args(Metric)
SEARCH_METRICS: tuple[str, ...] = get_args(SearchMetric)
#: Vector index of a LanceDB table (``output.index``): ``auto`` builds one from a size on, ``none`` never.
IndexKind = Literal["auto", "none", "ivf_pq", "ivf_sq", "hnsw"]
#: The approximate index kinds among them (built and tuned by :mod:`msnoop.store.index`).
ANN_KINDS: tuple[str, ...] = tuple(k for k in get_args(IndexKind) if k not in ("auto", "none"))


def check_metric(metric: str, allowed: tuple[str, ...] = METRICS) -> None:
    """Raise unless ``metric`` is one of ``allowed``.

    Raises:
        ValueError: Naming the metric found and the allowed ones.
    """
    if metric not in allowed:
        names = [repr(m) for m in allowed]
        listed = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        raise ValueError(f"expected metric {listed}, found {metric!r}")


def normalize_rows(X: np.ndarray, *, warn_zero: bool = False) -> np.ndarray:
    """``X`` with every row divided by its L2 norm; zero rows stay zero.

    Args:
        X: ``[N, D]`` float array; the result has its dtype (float32 stays float32).
        warn_zero: Log a warning naming how many rows are zero (their cosine similarity is 0 to every row).

    Returns:
        ``[N, D]`` array, a new one (``X`` is not modified).
    """
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if warn_zero and zero.any():
        logger.warning("%d zero vector(s): cosine similarity 0 to every other vector", int(zero.sum()))
    norms[zero] = 1.0
    return X / norms


def cosine_similarity(A: np.ndarray, B: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarities ``[N, M]`` between the rows of ``A`` ``[N, D]`` and of ``B`` ``[M, D]`` (default ``A``).

    Computed in the dtype of the inputs (float64 stays float64); a zero row has similarity 0 to every row.
    """
    An = normalize_rows(A)
    Bn = An if B is None else normalize_rows(B)
    return An @ Bn.T


def distances(X: np.ndarray, q: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """LanceDB's distances of every row of ``X`` ``[N, D]`` to one query ``q`` ``[D]``, as ``[N]`` float32.

    ``cosine``: ``1 - cos`` (0 for a zero row or query); ``l2``: squared Euclidean; ``dot``: ``1 - x.q``.

    Raises:
        ValueError: ``metric`` is none of these.
    """
    check_metric(metric, SEARCH_METRICS)
    if metric == "cosine":
        norms = np.linalg.norm(X, axis=1) * float(np.linalg.norm(q))
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(norms > 0, X @ q / norms, 0.0)
        return (1.0 - cos).astype(np.float32)
    if metric == "l2":
        return ((X - q) ** 2).sum(axis=1).astype(np.float32)
    return (1.0 - X @ q).astype(np.float32)


def similarity_to_distance(score: np.ndarray | float, metric: str) -> np.ndarray | float:
    """A kNN score as a distance: ``1 - similarity`` for cosine; squared Euclidean scores are distances already."""
    return 1.0 - score if metric == "cosine" else score


__all__ = [
    "ANN_KINDS",
    "METRICS",
    "SEARCH_METRICS",
    "IndexKind",
    "Metric",
    "SearchMetric",
    "check_metric",
    "cosine_similarity",
    "distances",
    "normalize_rows",
    "similarity_to_distance",
]
