"""Aggregation of profiles into groups (cells -> images -> wells -> treatments)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from msnoop.core.tables import METADATA_PREFIX, feature_columns

logger = logging.getLogger(__name__)

COUNT_COLUMN = "Metadata_Count"


def join_unique(values: pd.Series, sep: str = ",") -> str:
    """Sorted unique values joined into one string (Microsnoop's treatment ``Batch`` string).

    Args:
        values: Values of one group; missing values are skipped.
        sep: Separator.

    Returns:
        e.g. ``"Week1_22123,Week1_22141"``.
    """
    return sep.join(sorted({str(v) for v in values.dropna()}))


def aggregate_profiles(
    df: pd.DataFrame,
    by: Sequence[str],
    method: Literal["mean", "median"] = "mean",
    *,
    features: Sequence[str] | None = None,
    join: Sequence[str] = (),
    sep: str = ",",
) -> pd.DataFrame:
    """Aggregate feature rows per group.

    Args:
        df: Feature table, ``N`` rows.
        by: Grouping columns (e.g. ``["Metadata_Compound", "Metadata_Concentration"]``). Missing values
            form their own group.
        method: ``"mean"`` or ``"median"`` of every feature.
        features: Feature columns; default :func:`~msnoop.core.tables.feature_columns`.
        join: Columns collapsed to their sorted unique values joined by ``sep`` (e.g. ``Metadata_Plate``
            -> ``"Week1_22123,Week1_22141"``, the batch string Microsnoop's NSCB compares).
        sep: Separator for ``join``.

    Returns:
        One row per group, sorted by ``by``: the ``by`` columns, every other ``Metadata_*`` column that is
        constant within all groups, the ``join`` columns, ``Metadata_Count`` (rows per group; an existing
        ``Metadata_Count`` column is replaced) and the aggregated features (float, same order as input).
        Metadata columns that vary within some group are dropped (logged at INFO).

    Raises:
        ValueError: On an unknown method, missing ``by``/``join`` columns, or an empty table.
    """
    if method not in ("mean", "median"):
        raise ValueError(f"expected method 'mean' or 'median', found {method!r}")
    by = list(by)
    join = [c for c in join if c not in by]
    if not by:
        raise ValueError("expected at least one grouping column in `by`, found none")
    missing = [c for c in [*by, *join] if c not in df.columns]
    if missing:
        raise ValueError(
            f"grouping/join columns {missing} are not in the table; available metadata: "
            f"{[c for c in df.columns if str(c).startswith(METADATA_PREFIX)][:20]}"
        )
    if len(df) == 0:
        raise ValueError("cannot aggregate an empty table")
    feats = list(features) if features is not None else feature_columns(df)
    feats = [f for f in feats if f not in by and f not in join]
    grouped = df.groupby(by, sort=True, dropna=False, observed=True)

    agg = grouped[feats].agg(method) if feats else grouped.size().to_frame().iloc[:, :0]
    meta_candidates = [
        c
        for c in df.columns
        if str(c).startswith(METADATA_PREFIX) and c not in by and c not in join and c != COUNT_COLUMN
    ]
    meta_candidates = [c for c in meta_candidates if c not in feats]
    kept_meta: list[str] = []
    if meta_candidates:
        nunique = grouped[meta_candidates].nunique(dropna=False)
        kept_meta = [c for c in meta_candidates if int(nunique[c].max()) <= 1]
        dropped = [c for c in meta_candidates if c not in kept_meta]
        if dropped:
            logger.info("aggregate_profiles: dropping metadata that varies within groups: %s", ", ".join(dropped))
    parts = [agg.index.to_frame(index=False)]
    if kept_meta:
        parts.append(grouped[kept_meta].first())
    for c in join:
        parts.append(grouped[c].agg(lambda s: join_unique(s, sep)).rename(c).to_frame())
    parts.append(grouped.size().astype(np.int64).rename(COUNT_COLUMN).to_frame())
    parts.append(agg)
    # concat (not reset_index/insert): wide tables read from CSV have one block per column in pandas 3
    out = pd.concat([p.reset_index(drop=True) for p in parts], axis=1)
    logger.info("aggregated %d rows into %d groups by %s (%s)", len(df), len(out), by, method)
    return out
