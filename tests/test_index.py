"""ANN search: index creation by size, recall against brute force, filters, exact fallbacks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from msnoop.store.index import (
    AUTO_KIND,
    default_partitions,
    default_sub_vectors,
    ensure_index,
    search_params,
    vector_index,
)
from msnoop.query.ann import search_vector_ann
from msnoop.store.lance import VECTOR
from msnoop.core.parts import ID_COLUMN

N, DIM = 3000, 32


def _vectors(n: int = N, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def _make_table(tmp_path, X: np.ndarray, name: str = "emb"):
    import lancedb

    n, dim = X.shape
    data = pa.table(
        {
            ID_COLUMN: [f"img{i:05d}" for i in range(n)],
            "Metadata_Group": (np.arange(n) % 20).astype(np.int32),
            VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), dim),
        }
    )
    return lancedb.connect(str(tmp_path / "db")).create_table(name, data=data)


def _exact_topk(X: np.ndarray, q: np.ndarray, k: int, rows: np.ndarray | None = None) -> np.ndarray:
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    rows = np.arange(len(X)) if rows is None else rows
    sims = Xn[rows] @ (q / np.linalg.norm(q))
    return rows[np.argsort(-sims, kind="stable")[:k]]


def _ids(df) -> np.ndarray:
    return np.array([int(s[3:]) for s in df[ID_COLUMN]])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    X = _vectors()
    tbl = _make_table(tmp_path_factory.mktemp("ann"), X)
    info = ensure_index(tbl, threshold_rows=1000)
    return X, tbl, info


def test_index_is_created_above_threshold(indexed):
    _, tbl, info = indexed
    assert info["action"] == "created" and info["kind"] == AUTO_KIND == "ivf_sq"
    assert info["n_rows"] == N and info["dim"] == DIM
    assert info["num_partitions"] == default_partitions(N)
    assert info["search"]["refine_factor"] >= 1
    assert vector_index(tbl)["kind"] == "ivf_sq"
    # a second call keeps it
    assert ensure_index(tbl, threshold_rows=1000)["action"] == "kept"


def test_ann_recall_at_10(indexed):
    X, tbl, info = indexed
    rng = np.random.default_rng(1)
    recalls = []
    for qi in rng.choice(N, 50, replace=False):
        q = X[qi] + 0.1 * rng.standard_normal(DIM).astype(np.float32)
        df = search_vector_ann(tbl, q, k=10, index=info)
        assert df.attrs["search"]["exact"] is False
        assert list(df.columns[:2]) == [ID_COLUMN, "_distance"] and VECTOR not in df.columns
        assert df["_distance"].is_monotonic_increasing
        recalls.append(len(set(_ids(df)) & set(_exact_topk(X, q, 10))) / 10)
    assert np.mean(recalls) >= 0.95


def test_where_filter_returns_matching_rows_exactly(indexed):
    X, tbl, _ = indexed
    rows = np.flatnonzero(np.arange(N) % 20 == 3)
    q = X[7]
    df = search_vector_ann(tbl, q, k=10, where="Metadata_Group = 3")
    assert df.attrs["search"]["exact"] is True and df.attrs["search"]["matches"] == len(rows)
    assert (df["Metadata_Group"] == 3).all()
    np.testing.assert_array_equal(_ids(df), _exact_topk(X, q, 10, rows))
    # a broad filter goes through the index with widened nprobes and still only returns matches
    df = search_vector_ann(tbl, q, k=10, where="Metadata_Group < 15", exact_filter_rows=100)
    assert df.attrs["search"]["exact"] is False
    assert (df["Metadata_Group"] < 15).all() and len(df) == 10
    # no match: empty frame
    assert search_vector_ann(tbl, q, k=10, where="Metadata_Group = 99").empty


def test_exclude_id_and_forced_exact(indexed):
    X, tbl, _ = indexed
    df = search_vector_ann(tbl, X[5], k=5, exclude_id="img00005", exact=True)
    assert df.attrs["search"]["exact"] is True and len(df) == 5
    assert "img00005" not in set(df[ID_COLUMN])
    np.testing.assert_array_equal(_ids(df), _exact_topk(X, X[5], 6)[1:])


def test_below_threshold_no_index(tmp_path):
    X = _vectors(500, 16)
    tbl = _make_table(tmp_path, X)
    info = ensure_index(tbl, threshold_rows=1000)
    assert info["action"] == "skipped" and info["kind"] == "none"
    assert vector_index(tbl) is None
    df = search_vector_ann(tbl, X[0], k=10)
    assert df.attrs["search"]["exact"] is True
    np.testing.assert_array_equal(_ids(df), _exact_topk(X, X[0], 10))
    with pytest.raises(ValueError, match="no vector index"):
        search_vector_ann(tbl, X[0], k=10, exact=False)


@pytest.mark.parametrize("kind", ["ivf_pq", "hnsw"])
def test_other_index_kinds(tmp_path, kind):
    X = _vectors(2000, DIM, seed=3)
    tbl = _make_table(tmp_path, X)
    info = ensure_index(tbl, kind=kind)
    assert info["action"] == "created" and vector_index(tbl)["kind"] == kind
    if kind == "ivf_pq":
        assert DIM % info["num_sub_vectors"] == 0 and info["search"]["refine_factor"] == 10
    rng = np.random.default_rng(2)
    recalls = [
        len(set(_ids(search_vector_ann(tbl, X[i], k=10, index=info))) & set(_exact_topk(X, X[i], 10))) / 10
        for i in rng.choice(2000, 20, replace=False)
    ]
    assert np.mean(recalls) >= 0.95


def test_params_helpers():
    assert default_sub_vectors(768) == 48 and default_sub_vectors(256) == 32 and default_sub_vectors(32) == 8
    assert default_sub_vectors(100) == 25 and default_sub_vectors(7) == 1
    assert default_partitions(1_000_000) == 1000 and default_partitions(3000) == 11
    p = search_params(1_000_000, "ivf_pq")
    assert p["nprobes"] == 120 and p["refine_factor"] == 10
    assert search_params(10, "none") == {"nprobes": None, "refine_factor": None, "ef": None}
    with pytest.raises(ValueError):
        search_params(10, "flat")


def test_metric_mismatch_rebuilds_and_searches_exactly(tmp_path):
    X = _vectors(1000, DIM, seed=4)
    tbl = _make_table(tmp_path, X)
    assert ensure_index(tbl, kind="ivf_sq")["action"] == "created"
    assert vector_index(tbl)["metric"] == "cosine"
    info = ensure_index(tbl, kind="ivf_sq", metric="l2")
    assert info["action"] == "created" and "replaced" in info["reason"]
    assert vector_index(tbl)["metric"] == "l2"
    df = search_vector_ann(tbl, X[3], k=10)  # cosine query, l2 index: exact
    assert df.attrs["search"]["exact"] is True
    np.testing.assert_array_equal(_ids(df), _exact_topk(X, X[3], 10))
