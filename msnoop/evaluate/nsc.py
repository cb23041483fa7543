"""Not-same-compound (NSC) and not-same-compound-or-batch (NSCB) MOA matching (BBBC021 protocol).

Input is a treatment-level table (one row per compound-concentration, e.g. the mean of sphered
image or well profiles) with an MOA column, a compound column and, for NSCB, a batch column.

* **NSC**: each treatment gets the MOA of its nearest treatment (1-NN, cosine) among treatments of
  *other compounds*. Accuracy over all treatments (BBBC021: 103).
* **NSCB**: first drop the MOAs whose treatments all lie in a single batch (BBBC021 at week level:
  "Cholesterol-lowering" and "Kinase inhibitors", leaving 92 treatments); then the nearest treatment must
  also come from *another batch*.

The batch of a treatment is a string such as ``"Week1_22123,Week1_22141"`` (the sorted unique batch ids
of its images/wells joined by commas, see :func:`msnoop.aggregate.profiles.aggregate_profiles` ``join``).
Microsnoop compares these strings for **equality** with plate ids (``batch_match="equal"``, a weak
exclusion); the DeepProfiler notebook uses weeks. ``batch_match="overlap"`` excludes a candidate
sharing any batch id with the query. A coarser batch (the week of each plate) comes from a plate map
(:func:`apply_batch_map`); :func:`nscb` warns when its batch rule excludes no pair that NSC keeps, i.e. NSCB = NSC. Exact similarity ties go to the candidate with the lowest row
position. This reproduces sklearn ``KNeighborsClassifier(n_neighbors=1, algorithm="brute",
metric="cosine")`` fitted on the allowed candidates, as Microsnoop does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd

from msnoop.core.tables import check_finite, feature_columns
from msnoop.vectors.distance import cosine_similarity

logger = logging.getLogger(__name__)

BatchMatch = Literal["equal", "overlap"]
BATCH_MATCHES: tuple[str, ...] = get_args(BatchMatch)

#: The MOAs Microsnoop drops for NSCB (single-batch MOAs of BBBC021).
BBBC021_SINGLE_BATCH_MOAS: tuple[str, ...] = ("Cholesterol-lowering", "Kinase inhibitors")


def week_from_plate(plates: pd.Series, sep: str = ",") -> pd.Series:
    """BBBC021 week of each plate id (``"Week1_22123"`` -> ``"Week1"``).

    Joined plate strings map to their sorted unique weeks (``"Week1_22123,Week2_24121"`` -> ``"Week1,Week2"``).
    """
    return plates.astype(str).map(lambda s: sep.join(sorted({p.split("_")[0] for p in s.split(sep)})))


def single_batch_moas(df: pd.DataFrame, *, moa_column: str, batch_column: str, sep: str = ",") -> list[str]:
    """MOAs whose treatments together span a single batch id.

    Args:
        df: Treatment table.
        moa_column: MOA column.
        batch_column: Batch string column (comma-joined ids allowed).
        sep: Separator of joined batch ids.

    Returns:
        Sorted MOA names.
    """
    _require(df, [moa_column, batch_column])
    out = []
    for moa, s in df.groupby(moa_column, sort=True)[batch_column]:
        ids = {p for v in s.astype(str) for p in v.split(sep)}
        if len(ids) <= 1:
            out.append(str(moa))
    return out


def apply_batch_map(
    df: pd.DataFrame, batch_map: pd.DataFrame, batch_columns: Sequence[str], *, sep: str = ","
) -> pd.DataFrame:
    """``df`` with batch columns taken from a plate map, for the batch columns it lacks.

    A treatment row lists the plates of its wells in one joined string (``"Week1_22123,Week1_22141"``): each id
    is looked up in the plate map and the row gets the sorted unique values joined the same way (``"Week1"``).

    Args:
        df: Treatment table.
        batch_map: A plate map: one key column that ``df`` also has (e.g. ``Metadata_Plate``) and the batch
            columns (e.g. ``Metadata_Week``), one row per key.
        batch_columns: The batch columns wanted; those already in ``df`` are left as they are.
        sep: Separator of joined ids.

    Returns:
        A copy of ``df`` with the missing batch columns added.

    Raises:
        ValueError: The map has no key column in common with ``df`` (or several), lacks a wanted column, repeats a
            key with different values, or misses an id of ``df`` (the message names a few).
    """
    wanted = [c for c in batch_columns if c not in df.columns]
    if not wanted:
        return df
    missing = [c for c in wanted if c not in batch_map.columns]
    if missing:
        raise ValueError(
            f"batch column(s) {missing} are neither in the treatment table nor in the plate map "
            f"(its columns: {list(batch_map.columns)})"
        )
    keys = [c for c in batch_map.columns if c in df.columns and c not in batch_columns]
    if len(keys) != 1:
        raise ValueError(
            f"a plate map needs exactly one column that the treatment table also has (the key, e.g. "
            f"Metadata_Plate), found {keys or 'none'} among {list(batch_map.columns)}"
        )
    key = keys[0]
    table = batch_map[[key, *wanted]].astype(str).drop_duplicates()
    if table[key].duplicated().any():
        dup = table.loc[table[key].duplicated(), key].iloc[0]
        raise ValueError(f"the plate map gives {key} {dup!r} more than one batch")
    out = df.copy()
    for col in wanted:
        lookup = dict(zip(table[key], table[col], strict=True))
        ids = df[key].astype(str).str.split(sep)
        unknown = sorted({i for row in ids for i in row if i not in lookup})
        if unknown:
            raise ValueError(f"the plate map has no row for {key} {unknown[:5]} ({len(unknown)} value(s) in all)")
        out[col] = ids.map(lambda row, lookup=lookup: sep.join(sorted({lookup[i] for i in row})))
    return out


def _same_batch(batches: np.ndarray, batch_match: BatchMatch, sep: str) -> np.ndarray:
    """``[T, T]`` bool: treatments ``i`` and ``j`` share a batch (``equal`` strings, or any ``overlap``ping id)."""
    if batch_match == "equal":
        return batches[:, None] == batches[None, :]
    sets = [frozenset(v.split(sep)) for v in batches]
    return np.array([[not si.isdisjoint(sj) for sj in sets] for si in sets], dtype=bool)


def _require(df: pd.DataFrame, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(
            f"expected columns {missing} in the treatment table, found columns {list(df.columns)[:20]}; "
            "pass the right column names"
        )


def nearest_treatment(
    df: pd.DataFrame,
    *,
    moa_column: str = "Metadata_moa",
    compound_column: str = "Metadata_Compound",
    batch_column: str | None = None,
    batch_match: BatchMatch = "equal",
    features: Sequence[str] | None = None,
    sep: str = ",",
) -> pd.DataFrame:
    """1-NN (cosine) MOA prediction for every treatment, excluding same compound (and same batch).

    Args:
        df: Treatment table, ``T`` rows.
        moa_column: MOA column.
        compound_column: Compound column.
        batch_column: When given, candidates in the query's batch are excluded too.
        batch_match: ``"equal"`` (batch strings equal, Microsnoop) or ``"overlap"`` (any shared id).
        features: Feature columns; default all numeric non-``Metadata_`` columns.
        sep: Separator of joined batch ids (``"overlap"``).

    Returns:
        ``T`` rows (same index): ``moa``, ``predicted`` (None when no candidate is left), ``correct``,
        ``neighbor`` (row position of the nearest allowed treatment, -1 if none), ``similarity``,
        ``n_candidates``.
    """
    _require(df, [moa_column, compound_column] + ([batch_column] if batch_column else []))
    if batch_match not in BATCH_MATCHES:
        raise ValueError(f"expected batch_match 'equal' or 'overlap', found {batch_match!r}")
    feats = list(features) if features is not None else feature_columns(df)
    X = df[feats].to_numpy(dtype=np.float64)
    check_finite(X, feats)
    if df[moa_column].isna().any():
        raise ValueError(f"expected an MOA for every treatment, found {int(df[moa_column].isna().sum())} missing")
    S = cosine_similarity(X)
    comp = df[compound_column].astype(str).to_numpy()
    allowed = comp[:, None] != comp[None, :]
    if batch_column is not None:
        allowed &= ~_same_batch(df[batch_column].astype(str).to_numpy(), batch_match, sep)
    masked = np.where(allowed, S, -np.inf)
    nb = masked.argmax(axis=1)
    n_cand = allowed.sum(axis=1)
    has = n_cand > 0
    moa = df[moa_column].to_numpy()
    pred = np.where(has, moa[nb], None)
    out = pd.DataFrame(
        {
            "moa": moa,
            "predicted": pred,
            "correct": has & (pred == moa),
            "neighbor": np.where(has, nb, -1),
            "similarity": np.where(has, masked[np.arange(len(df)), nb], np.nan),
            "n_candidates": n_cand,
        },
        index=df.index,
    )
    if (~has).any():
        logger.warning("%d treatment(s) have no allowed neighbour and are not scored", int((~has).sum()))
    return out


def _summary(name: str, df: pd.DataFrame, res: pd.DataFrame, compound_column: str) -> dict[str, Any]:
    scored = res[res["neighbor"] >= 0]
    per_moa = scored.groupby("moa", sort=True)["correct"].mean()
    mistakes = [
        {
            "compound": str(df[compound_column].iloc[i]),
            "moa": str(r.moa),
            "predicted": str(r.predicted),
            "neighbor_compound": str(df[compound_column].iloc[int(r.neighbor)]),
        }
        for i, r in enumerate(res.itertuples())
        if r.neighbor >= 0 and not r.correct
    ]
    return {
        "metric": name,
        "accuracy": float(scored["correct"].mean()) if len(scored) else float("nan"),
        "n_correct": int(scored["correct"].sum()),
        "n": len(scored),
        "n_unscored": int(len(res) - len(scored)),
        "per_moa": {str(k): float(v) for k, v in per_moa.items()},
        "mistakes": mistakes,
    }


def nsc(
    df: pd.DataFrame,
    *,
    moa_column: str = "Metadata_moa",
    compound_column: str = "Metadata_Compound",
    features: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Not-same-compound 1-NN cosine MOA accuracy.

    Args:
        df: Treatment table.
        moa_column: MOA column.
        compound_column: Compound column.
        features: Feature columns.

    Returns:
        JSON-serialisable dict: ``metric``, ``accuracy``, ``n_correct``, ``n``, ``n_unscored``, ``per_moa``,
        ``mistakes``.
    """
    res = nearest_treatment(df, moa_column=moa_column, compound_column=compound_column, features=features)
    return _summary("NSC", df, res, compound_column)


def nscb(
    df: pd.DataFrame,
    *,
    batch_column: str,
    moa_column: str = "Metadata_moa",
    compound_column: str = "Metadata_Compound",
    drop_moas: Sequence[str] | None = None,
    batch_match: BatchMatch = "equal",
    features: Sequence[str] | None = None,
    sep: str = ",",
) -> dict[str, Any]:
    """Not-same-compound-or-batch 1-NN cosine MOA accuracy.

    Args:
        df: Treatment table.
        batch_column: Batch string column (plate list for Microsnoop, week for DeepProfiler).
        moa_column: MOA column.
        compound_column: Compound column.
        drop_moas: MOAs to drop first; default :func:`single_batch_moas` of ``batch_column``. For
            BBBC021 pass the week-level list (:data:`BBBC021_SINGLE_BATCH_MOAS`) to score plate-level
            NSCB on the same 92 treatments as Microsnoop.
        batch_match: ``"equal"`` or ``"overlap"``.
        features: Feature columns.
        sep: Separator of joined batch ids.

    Returns:
        As :func:`nsc`, plus ``batch_column``, ``batch_match`` and ``dropped_moas``.
    """
    _require(df, [batch_column, moa_column])
    if drop_moas is None:
        drop_moas = single_batch_moas(df, moa_column=moa_column, batch_column=batch_column, sep=sep)
    drop_moas = sorted(str(m) for m in drop_moas)
    kept = df[~df[moa_column].astype(str).isin(drop_moas)]
    res = nearest_treatment(
        kept,
        moa_column=moa_column,
        compound_column=compound_column,
        batch_column=batch_column,
        batch_match=batch_match,
        features=features,
        sep=sep,
    )
    out = _summary("NSCB", kept, res, compound_column)
    # pairs of treatments of different compounds that the batch rule excludes: none means NSCB is NSC again
    comp = kept[compound_column].astype(str).to_numpy()
    same = _same_batch(kept[batch_column].astype(str).to_numpy(), batch_match, sep)
    n_pairs = int((same & (comp[:, None] != comp[None, :])).sum())
    out.update(
        {
            "batch_column": batch_column,
            "batch_match": batch_match,
            "dropped_moas": drop_moas,
            "batch_excluded_pairs": n_pairs,
        }
    )
    if n_pairs == 0:
        logger.warning(
            "NSCB by %s excludes nothing that NSC does not: no two treatments of different compounds share a %s "
            "value (batch match %r), so NSCB equals NSC. A treatment table joins the plates of each treatment into "
            "one string, which is unique per treatment; name a coarser batch with a plate map (msnoop nsc "
            "--batch Metadata_Week --batch-map plates.csv) or use --batch-match overlap",
            batch_column,
            batch_column,
            batch_match,
        )
    return out
