"""Retrieval metrics: average precision per profile, mean AP per group, permutation p-values.

Pair rules follow copairs (``copairs.map.average_precision``, JUMP's mAP): two different rows ``i, j``

* are a **positive** pair when they are equal in every ``pos_sameby`` column and differ in every
  ``pos_diffby`` column;
* are a **negative** pair when they are equal in every ``neg_sameby`` column and differ in every
  ``neg_diffby`` column.

A missing value (NaN/None) never counts as equal nor as different (SQL semantics, as in copairs). For each
row the positives and negatives are ranked by cosine similarity, decreasing; a positive and a negative
with exactly the same similarity are ranked positive first (copairs' stable sort). The average precision is
``AP = (1/M) sum_j j / rank_j`` over the ``M`` positives. Rows without positives get NaN.

Significance (copairs ``mean_average_precision``): the null distribution of AP for a row with ``M``
positives among ``L`` ranked pairs is ``null_size`` random rankings; configurations ``(M, L)`` are
seeded in sorted order from ``numpy.random.default_rng(seed).integers(8096)``, as copairs does on a fresh
cache. A group's null is the element-wise mean of its rows' null samples; ``p = (#{null > mAP} + 1) /
(null_size + 1)``; p-values are corrected with Benjamini-Hochberg across groups. The *fraction retrieved*
is the share of groups with corrected p below the threshold.

What runs where: the per-profile AP is computed here (see the measured reason at
:func:`average_precision`); the normalised AP (``copairs.map.normalization.normalize_ap``), the null
distributions (``copairs.compute.random_ap``) and the mAP with p-values and BH correction
(``copairs.map.mean_average_precision``) are copairs'.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from msnoop.vectors.distance import normalize_rows

logger = logging.getLogger(__name__)


#: Columns of :func:`mean_average_precision`'s table besides the group keys.
MAP_SCORE_COLUMNS = (
    "mean_average_precision",
    "mean_normalized_average_precision",
    "n_profiles",
    "p_value",
    "corrected_p_value",
    "below_p",
    "below_corrected_p",
)


def _codes(meta: pd.DataFrame, cols: Sequence[str]) -> dict[str, np.ndarray]:
    return {c: pd.factorize(meta[c], use_na_sentinel=True)[0].astype(np.int64) for c in cols}


def _pair_mask(
    codes: dict[str, np.ndarray], rows: np.ndarray, sameby: Sequence[str], diffby: Sequence[str], n: int
) -> np.ndarray:
    """``[len(rows), n]`` mask of pairs (row, j) obeying the rules, self excluded."""
    mask = np.ones((len(rows), n), dtype=bool)
    for c in sameby:
        ci = codes[c][rows][:, None]
        cj = codes[c][None, :]
        mask &= (ci == cj) & (ci != -1)
    for c in diffby:
        ci = codes[c][rows][:, None]
        cj = codes[c][None, :]
        mask &= (ci != cj) & (ci != -1) & (cj != -1)
    mask[np.arange(len(rows)), rows] = False
    return mask


def _check_rules(meta: pd.DataFrame, sameby: Sequence[str], diffby: Sequence[str], which: str) -> None:
    if not sameby and not diffby:
        raise ValueError(f"expected at least one {which}_sameby or {which}_diffby column, found none")
    overlap = set(sameby) & set(diffby)
    if overlap:
        raise ValueError(f"{which}_sameby and {which}_diffby must be disjoint, found {sorted(overlap)} in both")
    missing = [c for c in [*sameby, *diffby] if c not in meta.columns]
    if missing:
        raise ValueError(f"pair-rule columns {missing} are not in the metadata; available: {list(meta.columns)[:20]}")


def ranked_average_precision(pos_sims: np.ndarray, neg_sims: np.ndarray) -> float:
    """AP of one ranked list: positives and negatives by similarity, positives first on exact ties.

    Args:
        pos_sims: ``[M]`` similarities of the positives, ``M >= 1``.
        neg_sims: ``[N]`` similarities of the negatives.

    Returns:
        ``(1/M) sum_j j / (j + #negatives strictly more similar than the j-th positive)``.
    """
    ps = np.sort(np.asarray(pos_sims, dtype=np.float64))[::-1]
    ns = np.sort(np.asarray(neg_sims, dtype=np.float64))
    n_above = len(ns) - np.searchsorted(ns, ps, side="right")
    j = np.arange(1, len(ps) + 1)
    return float(np.mean(j / (j + n_above)))


# Kept instead of copairs.map.average_precision (measured 2026-11-30, copairs 0.5.5, 2 loaded cores, both functions
# timed on the same tables): on BBBC021's 189-feature profiles both give the same AP (max difference
# 2.2e-16, same pair counts), but copairs took 111 ms vs 5.4 ms (103 treatments) and 331 ms vs 20 ms (302 wells),
# and on 5,000 profiles x 384 features (12 classes) 980 s vs 1.9 s, because it materialises every pair (12M
# here) and ranks them in float32 (AP differences up to 4.6e-6 there). copairs also rejects missing metadata,
# which this function treats as SQL does (never equal, never different).
def average_precision(
    meta: pd.DataFrame,
    X: np.ndarray,
    *,
    pos_sameby: Sequence[str],
    pos_diffby: Sequence[str] = (),
    neg_sameby: Sequence[str] = (),
    neg_diffby: Sequence[str] = (),
    block_size: int = 1024,
) -> pd.DataFrame:
    """Average precision of every profile (cosine similarity, copairs pair rules).

    Args:
        meta: ``N`` rows of metadata holding the rule columns.
        X: ``[N, D]`` profiles.
        pos_sameby: Positives share these columns (e.g. ``["Metadata_moa"]``).
        pos_diffby: Positives differ in these (e.g. ``["Metadata_Compound"]``).
        neg_sameby: Negatives share these (usually empty, or a plate column).
        neg_diffby: Negatives differ in these (e.g. ``["Metadata_moa"]``).
        block_size: Rows per similarity block (memory ``block_size x N``).

    Returns:
        A copy of ``meta`` with ``average_precision`` (NaN without positives), ``n_pos_pairs``,
        ``n_total_pairs`` (positives + negatives in the row's ranked list) and
        ``normalized_average_precision`` (``(AP - mu0) / (1 - mu0)``, ``mu0`` the expected AP of a random
        ranking; copairs ``normalize_ap``), the columns copairs' ``average_precision`` returns.

    Raises:
        ValueError: On bad rules, shape mismatch, non-finite features, or no positive/negative pair at all.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or len(X) != len(meta):
        raise ValueError(f"expected X of shape [{len(meta)}, D] (one row per metadata row), found {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("expected finite features, found NaN/inf; clean the features first")
    _check_rules(meta, pos_sameby, pos_diffby, "pos")
    _check_rules(meta, neg_sameby, neg_diffby, "neg")
    n = len(meta)
    Xn = normalize_rows(X)
    codes = _codes(meta, sorted({*pos_sameby, *pos_diffby, *neg_sameby, *neg_diffby}))
    ap = np.full(n, np.nan)
    n_pos = np.zeros(n, dtype=np.int64)
    n_neg = np.zeros(n, dtype=np.int64)
    for start in range(0, n, block_size):
        rows = np.arange(start, min(start + block_size, n))
        S = Xn[rows] @ Xn.T
        pos = _pair_mask(codes, rows, pos_sameby, pos_diffby, n)
        neg = _pair_mask(codes, rows, neg_sameby, neg_diffby, n)
        n_pos[rows] = pos.sum(axis=1)
        n_neg[rows] = neg.sum(axis=1)
        for r, i in enumerate(rows):
            if n_pos[i]:
                ap[i] = ranked_average_precision(S[r, pos[r]], S[r, neg[r]])
    if n_pos.sum() == 0:
        raise ValueError(
            f"no positive pairs: no two rows share {list(pos_sameby)} while differing in {list(pos_diffby)}"
        )
    if n_neg.sum() == 0:
        raise ValueError(
            f"no negative pairs: no two rows share {list(neg_sameby)} while differing in {list(neg_diffby)}"
        )
    from copairs.map.normalization import normalize_ap

    out = meta.copy()
    out["average_precision"] = ap
    out["n_pos_pairs"] = n_pos
    out["n_total_pairs"] = n_pos + n_neg
    norm = np.full(n, np.nan)
    has = n_pos > 0
    if has.any():
        norm[has] = normalize_ap(ap[has], n_pos[has], n_neg[has])
    out["normalized_average_precision"] = norm
    return out


def null_distribution(n_pos: int, n_total: int, null_size: int, seed: int) -> np.ndarray:
    """AP of ``null_size`` random rankings with ``n_pos`` positives among ``n_total`` (copairs ``random_ap``).

    Args:
        n_pos: Positives per ranking, ``1 <= n_pos <= n_total``.
        n_total: Ranked items.
        null_size: Random rankings.
        seed: Seed of ``numpy.random.default_rng``.

    Returns:
        ``[null_size]`` float32 AP values.
    """
    from copairs.compute import random_ap

    if not 1 <= n_pos <= n_total:
        raise ValueError(f"expected 1 <= n_pos <= n_total, found n_pos={n_pos}, n_total={n_total}")
    return np.asarray(random_ap(int(null_size), int(n_pos), int(n_total), int(seed)), dtype=np.float32)


def benjamini_hochberg(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (``statsmodels`` ``fdr_bh``).

    Args:
        p_values: ``[G]`` p-values.

    Returns:
        ``[G]`` adjusted p-values, clipped to 1.
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.clip(adj, 0.0, 1.0)
    return out


def mean_average_precision(
    ap: pd.DataFrame,
    *,
    sameby: Sequence[str],
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean AP per group with permutation p-values and BH correction (``copairs.map.mean_average_precision``).

    copairs caches null distributions in ``~/.copairs`` by default, keyed by configuration but generated with
    a seed that depends on the other configurations of the run that first wrote them, so with a warm cache the
    p-values depend on earlier runs. Each call here uses a fresh temporary cache: the same inputs give the same
    p-values, and nothing is written to the home folder. Same results as msnoop's earlier implementation on
    BBBC021 (p-values and BH-corrected p-values identical, mAP within 2.2e-16; 302 wells x 10,000 nulls: 3.4 s
    copairs, 3.2 s before).

    Args:
        ap: Output of :func:`average_precision`.
        sameby: Group columns (e.g. ``["Metadata_moa"]`` or a perturbation id).
        null_size: Random rankings per ``(n_pos, n_total)`` configuration.
        threshold: Significance threshold for ``below_p``/``below_corrected_p``.
        seed: Seed of the null distributions.

    Returns:
        One row per group (sorted): the ``sameby`` columns, ``mean_average_precision``,
        ``mean_normalized_average_precision``, ``n_profiles``, ``p_value``, ``corrected_p_value``,
        ``below_p``, ``below_corrected_p``. Rows with NaN AP or no positives are left out.

    Raises:
        ValueError: ``ap`` lacks the columns of :func:`average_precision`, or no profile has an AP.
    """
    import tempfile

    from copairs.map import mean_average_precision as copairs_map
    from copairs.map.normalization import normalize_ap

    sameby = list(sameby)
    need = ["average_precision", "n_pos_pairs", "n_total_pairs"]
    missing = [c for c in [*sameby, *need] if c not in ap.columns]
    if missing:
        raise ValueError(
            f"expected the output of average_precision with columns {missing}; found {list(ap.columns)[:20]}"
        )
    valid = ap[ap["average_precision"].notna() & (ap["n_pos_pairs"] > 0)].reset_index(drop=True)
    if valid.empty:
        raise ValueError("no profile has an average precision (no positive pairs)")
    if "normalized_average_precision" not in valid.columns:  # tables written before the column existed
        m, total = valid["n_pos_pairs"].to_numpy(), valid["n_total_pairs"].to_numpy()
        valid["normalized_average_precision"] = normalize_ap(valid["average_precision"].to_numpy(), m, total - m)
    need.append("normalized_average_precision")
    with tempfile.TemporaryDirectory(prefix="msnoop-copairs-") as cache:
        res = copairs_map(
            valid[[*sameby, *need]],
            sameby=sameby,
            null_size=int(null_size),
            threshold=float(threshold),
            seed=int(seed),
            progress_bar=False,
            cache_dir=cache,
        )
    res = res.sort_values(sameby, kind="stable").reset_index(drop=True)
    res["n_profiles"] = res["indices"].map(len).astype(np.int64)
    return res[[*sameby, *MAP_SCORE_COLUMNS]]


def fraction_retrieved(map_scores: pd.DataFrame) -> float:
    """Share of groups whose BH-corrected p-value is below the threshold (``below_corrected_p``)."""
    if "below_corrected_p" not in map_scores.columns:
        raise ValueError("expected the output of mean_average_precision (column 'below_corrected_p')")
    return float(map_scores["below_corrected_p"].mean())


def retrieval_summary(ap: pd.DataFrame, map_scores: pd.DataFrame) -> dict[str, Any]:
    """JSON-serialisable summary: mean AP over profiles, mean mAP over groups, fraction retrieved, per group."""
    key_cols = [c for c in map_scores.columns if c not in MAP_SCORE_COLUMNS]
    per_group = {
        ",".join(str(r[c]) for c in key_cols): {
            "mAP": float(r["mean_average_precision"]),
            "n": int(r["n_profiles"]),
            "p": float(r["p_value"]),
            "q": float(r["corrected_p_value"]),
        }
        for _, r in map_scores.iterrows()
    }
    return {
        "mean_ap": float(ap["average_precision"].mean()),
        "n_profiles": int(ap["average_precision"].notna().sum()),
        "mean_map": float(map_scores["mean_average_precision"].mean()),
        "fraction_retrieved": fraction_retrieved(map_scores),
        "n_groups": len(map_scores),
        "per_group": per_group,
    }
