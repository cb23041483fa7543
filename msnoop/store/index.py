"""The vector index of an embedding table (LanceDB IVF_SQ / IVF_PQ / IVF_HNSW_SQ) and its search parameters.

Searching with it is :func:`msnoop.query.ann.search_vector_ann`.

Below ``threshold_rows`` rows (default 100,000) no index is built and every search is exact (a flat
scan). Above it, :func:`ensure_index` builds an IVF_SQ index (``num_partitions`` about ``sqrt(N)``,
8-bit scalar quantisation; the default), an IVF_PQ index (sub-vectors of 16, 8 or 4 values) or an
IVF_HNSW_SQ index, and :func:`search_vector_ann` queries it with the ``nprobes`` / ``refine_factor``
of :func:`search_params`. Quantised distances are approximate (PQ alone: recall@10 about 0.3 on
200k x 1024 vectors): ``refine_factor`` re-ranks ``refine_factor * k`` candidates with the stored
full vectors, which is what brings recall@10 to >= 0.95.

Filters: an IVF index probes a few partitions, so with a selective ``where`` most matching rows are
never looked at (recall@10 0.5-0.7, measured with ``jobs/bench_search.py``). :func:`search_vector_ann` counts
the matching rows first; when they are few (at most ``exact_filter_rows``, default 20,000) it reads just those rows
and ranks them exactly in NumPy, otherwise it pre-filters the ANN search and widens ``nprobes`` in
proportion to ``N / matches``. (LanceDB's own exact path, ``bypass_vector_index()`` with a prefilter,
decodes the vector column of every row: 2-5 s per query on 200k x 768 for a filter matching 2,000 rows,
against 50-80 ms for reading and ranking the matching rows.)

Index kind: ``auto`` builds IVF_SQ (8-bit scalar quantisation). On 20k x 768 clustered vectors here
IVF_PQ (48 sub-vectors) took 58 s to build, IVF_SQ 4 s and IVF_HNSW_SQ 12 s; at the parameters of
:func:`search_params` all reach recall@10 >= 0.99. IVF_PQ stays available (16x smaller index).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from msnoop.store.lance import VECTOR
from msnoop.vectors.distance import ANN_KINDS, IndexKind, SearchMetric

logger = logging.getLogger(__name__)

#: What ``kind="auto"`` builds (see the module docstring for the measurements behind it).
AUTO_KIND = "ivf_sq"
DISTANCE = "_distance"
#: Rows at which ``kind="auto"`` builds an index (LanceDB's flat scan is fine below).
THRESHOLD_ROWS = 100_000
#: A filtered search matching at most this many rows is done exactly.
EXACT_FILTER_ROWS = 20_000
#: Share of the IVF partitions a query probes. On 200k x 768 clustered vectors (447 partitions, IVF_SQ,
#: 10th neighbour at cosine 0.58) recall@10 was 0.95 / 0.97 / 0.98 / 0.99 at 5 / 8 / 11 / 16 % of the
#: partitions, with the same 5-6 ms per query: the index scan is not what costs.
NPROBE_FRACTION = 0.12
#: LanceDB trains at most one IVF partition per this many rows.
MIN_ROWS_PER_PARTITION = 256
_LANCE_KINDS = {
    "IvfPq": "ivf_pq",
    "IVF_PQ": "ivf_pq",
    "IvfSq": "ivf_sq",
    "IVF_SQ": "ivf_sq",
    "IvfHnswSq": "hnsw",
    "IVF_HNSW_SQ": "hnsw",
}


def _table(ref: Any) -> Any:
    """A LanceDB table from a :class:`msnoop.query.search.TableRef` or a table itself."""
    return getattr(ref, "table", ref)


def default_partitions(n_rows: int, kind: str = "ivf_pq") -> int:
    """IVF partitions: ``sqrt(N)`` for IVF_PQ / IVF_SQ, ``sqrt(N) / 8`` for HNSW (one graph per partition).

    Capped at ``N / 256`` (LanceDB trains no more) and at least 1.
    """
    n = max(int(n_rows), 1)
    target = math.sqrt(n) / 8 if kind == "hnsw" else math.sqrt(n)
    return int(max(1, min(round(target), n // MIN_ROWS_PER_PARTITION)))


def default_sub_vectors(dim: int) -> int:
    """PQ sub-vectors dividing ``dim``: sub-vectors of 16 values from 512 dimensions, of 8 from 128, else of 4.

    Short sub-vectors keep PQ distances of low-dimensional vectors usable (32-d random vectors: recall@10
    0.93 with 8-value sub-vectors, 1.0 with 4-value ones, at ``refine_factor`` 10). A ``dim`` not divisible
    by the length gets the most sub-vectors of at least 4 values (1 if ``dim < 8``).
    """
    if dim <= 0:
        raise ValueError(f"expected a positive vector dimension, found {dim}")
    length = 16 if dim >= 512 else 8 if dim >= 128 else 4
    if dim % length == 0:
        return dim // length
    divisors = [m for m in range(1, dim + 1) if dim % m == 0 and dim // m >= 4]
    return max(divisors) if divisors else 1


def search_params(n_rows: int, kind: str, *, num_partitions: int | None = None, k: int = 10) -> dict[str, Any]:
    """Query parameters for an index over ``n_rows`` rows (calibrated for recall@10 >= 0.95).

    Args:
        n_rows: Rows in the index.
        kind: ``"ivf_pq"``, ``"ivf_sq"``, ``"hnsw"`` or ``"none"``.
        num_partitions: IVF partitions of the index (default :func:`default_partitions`).
        k: Neighbours wanted (``ef`` of HNSW grows with it).

    Returns:
        ``{"nprobes", "refine_factor", "ef"}`` (``None`` where a value does not apply); for
        ``"none"`` all are ``None``.
    """
    if kind in ("none", "auto"):
        return {"nprobes": None, "refine_factor": None, "ef": None}
    p = num_partitions or default_partitions(n_rows, kind)
    # a fixed share of the partitions, at least 20 (all of them for small indexes)
    nprobes = int(min(p, max(20, math.ceil(NPROBE_FRACTION * p))))
    if kind == "ivf_pq":
        # refine_factor 10 re-ranks 10 k PQ candidates with the stored vectors
        return {"nprobes": nprobes, "refine_factor": 10, "ef": None}
    if kind == "ivf_sq":
        # 8-bit scalar quantisation is close to exact; a small refine fixes the order of near ties
        return {"nprobes": nprobes, "refine_factor": 2, "ef": None}
    if kind == "hnsw":
        return {"nprobes": nprobes, "refine_factor": 2, "ef": int(max(100, 10 * k))}
    raise ValueError(f"expected index kind 'ivf_pq', 'ivf_sq', 'hnsw' or 'none', found {kind!r}")


def vector_index(table: Any, column: str = VECTOR) -> dict[str, Any] | None:
    """The vector index on ``column`` of a LanceDB table (``None`` if it has none).

    Returns:
        ``{"name", "kind" ("ivf_pq", "ivf_sq", "hnsw" or LanceDB's type name), "index_type", "metric"
        (lower case, ``None`` if not recorded), "num_indexed_rows", "num_unindexed_rows"}``.
    """
    for ix in _table(table).list_indices():
        if list(ix.columns) == [column] and "Btree" not in ix.index_type and "Bitmap" not in ix.index_type:
            return {
                "name": ix.name,
                "kind": _LANCE_KINDS.get(ix.index_type, ix.index_type),
                "index_type": ix.index_type,
                "metric": str((getattr(ix, "index_details", None) or {}).get("metric_type", "")).lower() or None,
                "num_indexed_rows": int(ix.num_indexed_rows),
                "num_unindexed_rows": int(ix.num_unindexed_rows),
            }
    return None


def _vector_dim(table: Any) -> int:
    field = table.schema.field(VECTOR)
    size = getattr(field.type, "list_size", None)
    if not size or size <= 0:
        raise ValueError(f"column {VECTOR!r} must be a fixed-size list of floats, found {field.type}")
    return int(size)


def ensure_index(
    table: Any,
    *,
    kind: IndexKind = "auto",
    threshold_rows: int = THRESHOLD_ROWS,
    metric: SearchMetric = "cosine",
    num_partitions: int | None = None,
    num_sub_vectors: int | None = None,
    sample_rate: int = 256,
    max_iterations: int = 50,
) -> dict[str, Any]:
    """Make sure a table that needs a vector index has one; returns what was done.

    ``kind="auto"`` builds :data:`AUTO_KIND` (IVF_SQ) when the table has at least ``threshold_rows``
    rows and nothing below; ``"ivf_pq"`` / ``"ivf_sq"`` / ``"hnsw"`` build that index whatever the size
    (LanceDB needs >= 256 rows);
    ``"none"`` builds nothing. An existing index of the wanted kind is kept (new, unindexed rows are
    added with ``optimize()``); one of another kind is replaced.

    Args:
        table: LanceDB table or :class:`~msnoop.query.search.TableRef`.
        kind: ``"auto"``, ``"none"``, ``"ivf_pq"``, ``"ivf_sq"`` or ``"hnsw"`` (LanceDB IVF_HNSW_SQ).
        threshold_rows: Row count from which ``"auto"`` builds an index.
        metric: Distance the index is trained for; searches must use the same.
        num_partitions: IVF partitions (default :func:`default_partitions`).
        num_sub_vectors: PQ sub-vectors, must divide the dimension (default :func:`default_sub_vectors`).
        sample_rate: k-means training rows per partition (LanceDB default 256).
        max_iterations: k-means iterations (LanceDB default 50).

    Returns:
        JSON-serialisable dict: ``action`` (``"created"``, ``"kept"``, ``"updated"``, ``"skipped"``),
        ``kind`` (``"ivf_pq"``, ``"ivf_sq"``, ``"hnsw"`` or ``"none"``), ``reason``, ``n_rows``, ``dim``, ``metric``,
        ``num_partitions``, ``num_sub_vectors``, ``build_s`` and ``search`` (:func:`search_params`).
    """
    from lancedb.index import HnswSq, IvfPq, IvfSq

    tbl = _table(table)
    if kind not in ("auto", "none", *ANN_KINDS):
        raise ValueError(f"expected index kind 'auto', 'none', 'ivf_pq', 'ivf_sq' or 'hnsw', found {kind!r}")
    n = int(tbl.count_rows())
    dim = _vector_dim(tbl)
    out: dict[str, Any] = {"n_rows": n, "dim": dim, "metric": metric, "num_partitions": None, "num_sub_vectors": None}
    existing = vector_index(tbl)
    want = kind
    if kind == "auto":
        if n < threshold_rows and existing is None:
            return out | {
                "action": "skipped",
                "kind": "none",
                "reason": f"{n} rows < threshold {threshold_rows}: exact search",
                "build_s": 0.0,
                "search": search_params(n, "none"),
            }
        want = existing["kind"] if existing and existing["kind"] in ANN_KINDS else AUTO_KIND
    if want == "none":
        return out | {
            "action": "skipped",
            "kind": "none",
            "reason": "no index requested"
            + (f" (existing {existing['index_type']} index left in place)" if existing else ""),
            "build_s": 0.0,
            "search": search_params(n, "none"),
        }
    p = num_partitions or default_partitions(n, want)
    out["num_partitions"] = p
    same_metric = existing is not None and existing["metric"] in (None, metric)
    if (
        existing is not None
        and existing["kind"] == want
        and same_metric
        and num_partitions is None
        and num_sub_vectors is None
    ):
        out["num_sub_vectors"] = default_sub_vectors(dim) if want == "ivf_pq" else None
        if existing["num_unindexed_rows"] == 0:
            return out | {
                "action": "kept",
                "kind": want,
                "reason": f"{existing['index_type']} index exists",
                "build_s": 0.0,
                "search": search_params(n, want, num_partitions=p),
            }
        t0 = time.perf_counter()
        tbl.optimize()
        return out | {
            "action": "updated",
            "kind": want,
            "reason": f"added {existing['num_unindexed_rows']} unindexed rows to the {existing['index_type']} index",
            "build_s": round(time.perf_counter() - t0, 3),
            "search": search_params(n, want, num_partitions=p),
        }
    if n < MIN_ROWS_PER_PARTITION:
        raise ValueError(
            f"a {want} index needs at least {MIN_ROWS_PER_PARTITION} rows, table has {n}; search it exactly"
        )
    if want == "ivf_pq":
        m = num_sub_vectors or default_sub_vectors(dim)
        if dim % m:
            raise ValueError(f"expected num_sub_vectors dividing the dimension {dim}, found {m}")
        out["num_sub_vectors"] = m
        config: Any = IvfPq(
            distance_type=metric,
            num_partitions=p,
            num_sub_vectors=m,
            sample_rate=sample_rate,
            max_iterations=max_iterations,
        )
    elif want == "ivf_sq":
        config = IvfSq(distance_type=metric, num_partitions=p, sample_rate=sample_rate, max_iterations=max_iterations)
    else:
        config = HnswSq(distance_type=metric, num_partitions=p, sample_rate=sample_rate, max_iterations=max_iterations)
    t0 = time.perf_counter()
    tbl.create_index(VECTOR, config=config, replace=True)
    build_s = time.perf_counter() - t0
    reason = f"{n} rows >= threshold {threshold_rows}" if kind == "auto" else f"{want} requested"
    if existing is not None and (existing["kind"] != want or not same_metric):
        reason += f"; replaced the {existing['index_type']} ({existing['metric']}) index"
    logger.info("built %s index on %d x %d vectors (%d partitions) in %.1f s", want, n, dim, p, build_s)
    return out | {
        "action": "created",
        "kind": want,
        "reason": reason,
        "build_s": round(build_s, 3),
        "search": search_params(n, want, num_partitions=p),
    }


__all__ = [
    "ANN_KINDS",
    "AUTO_KIND",
    "EXACT_FILTER_ROWS",
    "THRESHOLD_ROWS",
    "default_partitions",
    "default_sub_vectors",
    "ensure_index",
    "search_params",
    "vector_index",
]
