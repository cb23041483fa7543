"""Nearest-neighbour search over an embedding table: exact for small tables and selective filters, else its index.

The index itself (kinds, partitions, probes) is built by :mod:`msnoop.store.index`; see its docstring for the
measurements behind the choices.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from msnoop.core.filters import table_filter_error
from msnoop.core.parts import ID_COLUMN
from msnoop.store.index import (
    DISTANCE,
    EXACT_FILTER_ROWS,
    _table,
    default_partitions,
    search_params,
    vector_index,
)
from msnoop.store.lance import VECTOR
from msnoop.vectors.distance import ANN_KINDS, distances

logger = logging.getLogger(__name__)


def _exact_filtered(tbl: Any, vector: np.ndarray, where: str, limit: int, metric: str) -> pd.DataFrame:
    """Read the rows matching ``where`` and rank them exactly (late-materialised read of few rows)."""
    rows = tbl.search().where(where).limit(None).to_arrow()
    col = rows.column(VECTOR).combine_chunks()
    X = np.asarray(col.flatten(), dtype=np.float32).reshape(rows.num_rows, -1)
    dist = distances(X, np.asarray(vector, dtype=np.float32).ravel(), metric)
    order = np.argsort(dist, kind="stable")[:limit]
    df = rows.take(pa.array(order)).to_pandas()
    df[DISTANCE] = dist[order]
    return df


def search_vector_ann(
    ref: Any,
    vector: np.ndarray,
    *,
    k: int = 10,
    where: str | None = None,
    exact: bool | None = None,
    exclude_id: str | None = None,
    index: dict[str, Any] | None = None,
    metric: str = "cosine",
    exact_filter_rows: int = EXACT_FILTER_ROWS,
) -> pd.DataFrame:
    """The ``k`` nearest rows to ``vector``, through the vector index when that is safe.

    Result: ``Metadata_ImageID``, ``_distance``, then the other columns, without the vector column.
    ``df.attrs["search"]`` records how the search was done (``exact``, ``nprobes``, ``refine_factor``, ``ef``, ``matches``).

    Args:
        ref: :class:`~msnoop.query.search.TableRef` or LanceDB table.
        vector: ``[D]`` query vector.
        k: Neighbours.
        where: SQL filter on metadata columns, applied before ranking (the result holds only
            matching rows).
        exact: ``True``: exact search (the matching rows ranked in NumPy when ``where`` matches at most
            ``exact_filter_rows`` rows, else LanceDB's flat scan); ``False``: use the index (error if
            there is none); ``None``
            (default): exact when the table has no index or ``where`` matches at most
            ``exact_filter_rows`` rows, else ANN.
        exclude_id: Leave out the row with this ``Metadata_ImageID`` (the query itself).
        index: What :func:`ensure_index` returned (its ``num_partitions``); default: read the index
            from the table and assume default partitions.
        metric: Distance; must be the one the index was built for.
        exact_filter_rows: Filter size up to which a filtered search is exact.

    Raises:
        ValueError: ``exact=False`` on a table without a vector index.
        FilterError: ``where`` is not a filter this table can use (the message says how to write it).
    """
    tbl = _table(ref)
    info = vector_index(tbl)
    limit = k + (1 if exclude_id is not None else 0)
    n_rows = info["num_indexed_rows"] + info["num_unindexed_rows"] if info else None
    matches = None
    if where:
        try:
            matches = int(tbl.count_rows(where))
        except Exception as exc:  # LanceDB raises several types for a filter it cannot use
            raise table_filter_error(where, tbl.schema, exc, what="--where") from None
    if exact is False and info is None:
        raise ValueError("exact=False but the table has no vector index; build one with ensure_index()")
    if exact is None:
        exact = (
            info is None
            or info["kind"] not in ANN_KINDS
            or info["metric"] not in (None, metric)
            or (matches is not None and matches <= exact_filter_rows)
        )
    q = tbl.search(np.asarray(vector, dtype=np.float32), vector_column_name=VECTOR).distance_type(metric).limit(limit)
    params: dict[str, Any] = {
        "exact": bool(exact),
        "nprobes": None,
        "refine_factor": None,
        "ef": None,
        "matches": matches,
    }
    if exact:
        q = q.bypass_vector_index()
    else:
        assert info is not None and n_rows is not None
        p = (index or {}).get("num_partitions") or default_partitions(n_rows, info["kind"])
        sp = search_params(n_rows, info["kind"], num_partitions=p, k=k)
        nprobes = sp["nprobes"]
        if matches:
            # keep about as many matching rows in the probed partitions as an unfiltered search sees
            nprobes = int(min(p, math.ceil(nprobes * n_rows / matches)))
        q = q.nprobes(nprobes)
        if sp["refine_factor"]:
            q = q.refine_factor(sp["refine_factor"])
        if sp["ef"]:
            q = q.ef(sp["ef"])
        params.update(sp | {"nprobes": nprobes})
    if where:
        q = q.where(where, prefilter=True)
    if limit <= 0 or matches == 0:
        df = pd.DataFrame(columns=[ID_COLUMN, DISTANCE])
    elif exact and where and matches is not None and matches <= exact_filter_rows:
        df = _exact_filtered(tbl, vector, where, limit, metric)
    else:  # the vector column is not fetched
        df = q.select([c for c in tbl.schema.names if c != VECTOR] + [DISTANCE]).to_arrow().to_pandas()
    if exclude_id is not None and ID_COLUMN in df.columns:
        df = df[df[ID_COLUMN] != exclude_id]
    df = df.drop(columns=[VECTOR], errors="ignore").head(k).reset_index(drop=True)
    first = [c for c in (ID_COLUMN, DISTANCE) if c in df.columns]
    df = df[first + [c for c in df.columns if c not in first]]
    df.attrs["search"] = params
    return df


__all__ = ["search_vector_ann"]
