"""The rows an evaluation compares: a feature table's features after the post-processing the table asks for.

Every evaluation (``msnoop knn``, ``nsc``, ``map``, ``report``) reads its table through :func:`read_features`, so
all of them compare the same vectors: those of the table's own post-processing (:func:`table_postprocess`)
unless the command is given another one.

* an ``msnoop embed`` output folder: its run's ``output.postprocess`` (recorded in ``run.json``; ``standardize``
  for folders written before it was recorded, the default then as now);
* a profile job's output (its folder, or a Parquet file in it): ``raw``: the rows are sphered on their controls
  and are compared as they are;
* a LanceDB table folder (``.lance``): ``raw``: its vectors were post-processed when the table was built;
* any other table (Parquet, CSV, e.g. CellProfiler profiles): :data:`~msnoop.vectors.postprocess.DEFAULT_POSTPROCESS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msnoop.core.tables import feature_columns, read_table, split_table
from msnoop.vectors.postprocess import postprocess, table_postprocess

__all__ = ["Features", "postprocessed_table", "read_features", "table_features", "table_postprocess"]


@dataclass
class Features:
    """A table's features, post-processed, beside its other columns.

    Attributes:
        meta: ``N`` rows: every column that is not a feature (same index as the table).
        X: ``[N, D]`` float32 features after the post-processing.
        columns: The ``D`` feature columns, in order.
        postprocess: What was done: ``{"method": ..., "n": ...}``.
    """

    meta: pd.DataFrame
    X: np.ndarray
    columns: list[str]
    postprocess: dict[str, Any]


def table_features(df: pd.DataFrame, *, method: str, drop: Sequence[str | None] = ()) -> Features:
    """The features of ``df`` (numeric, non-``Metadata_`` columns other than ``drop``) after ``method``.

    Raises:
        ValueError: No feature columns, non-finite values (``standardize``), or an unknown method.
    """
    feats = [f for f in feature_columns(df) if f not in set(drop)]
    meta, X = split_table(df, feats)
    X, record = postprocess(X, method)
    return Features(meta=meta, X=X, columns=feats, postprocess=record)


def postprocessed_table(df: pd.DataFrame, *, method: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``df`` with its feature columns replaced by their post-processed values, and what was done.

    ``raw`` returns ``df`` itself (its features keep their dtype); other methods give float32 features.

    Raises:
        ValueError: As :func:`table_features`.
    """
    if method == "raw":
        return df, {"method": "raw"}
    f = table_features(df, method=method)
    values = pd.DataFrame(f.X, columns=f.columns, index=df.index)
    out = pd.concat([f.meta, values], axis=1)[list(df.columns)]
    return out, f.postprocess


def read_features(table: str | Path, *, postprocess_method: str | None = None) -> tuple[pd.DataFrame, str]:
    """Read a table for an evaluation: ``(rows, the post-processing to apply)``.

    Args:
        table: Anything :func:`msnoop.core.tables.read_table` reads (an embed output folder, a profile table,
            Parquet, CSV, a ``.lance`` folder; local or a URI).
        postprocess_method: The post-processing asked for; ``None`` takes the table's own
            (:func:`table_postprocess`).

    Raises:
        FileNotFoundError: ``table`` does not exist.
        ValueError: The table cannot be read.
    """
    df = read_table(table)
    return df, postprocess_method or table_postprocess(table)
