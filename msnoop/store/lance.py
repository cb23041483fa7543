"""LanceDB tables built from Parquet parts: a ``vector`` column (fixed-size list of float32) + metadata."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from msnoop.core.parts import EMB_PREFIX, iter_batches, part_files
from msnoop.core.tables import VECTOR

logger = logging.getLogger(__name__)
META_KEY = b"msnoop"

os.environ.setdefault("LANCEDB_LOG", "error")


def _vector_batches(
    folder: Path,
    dim: int,
    batch_size: int,
    schema: pa.Schema | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> Iterator[pa.RecordBatch]:
    for batch in iter_batches(folder, batch_size=batch_size, schema=schema):
        names = batch.schema.names
        emb = [n for n in names if n.startswith(EMB_PREFIX)]
        if len(emb) != dim:
            raise ValueError(f"parts in {folder} have {len(emb)} embedding columns, expected {dim}")
        values = np.column_stack([batch.column(n).to_numpy(zero_copy_only=False) for n in emb]).astype(np.float32)
        if transform is not None:
            values = np.ascontiguousarray(transform(values), dtype=np.float32)
        vec = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), dim)
        meta_cols = [n for n in names if not n.startswith(EMB_PREFIX)]
        arrays = [batch.column(n) for n in meta_cols] + [vec]
        yield pa.RecordBatch.from_arrays(arrays, names=[*meta_cols, VECTOR])


def build_table(
    uri: str,
    name: str,
    parts_folder: str | Path,
    *,
    dim: int,
    info: dict[str, Any],
    batch_size: int = 2048,
    schema: pa.Schema | None = None,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> int:
    """(Re)build LanceDB table ``name`` from all parts, streaming; returns the row count.

    ``schema`` (the run's Parquet schema) makes every part read with the same column types. ``transform`` maps
    each batch's ``[n, dim]`` float32 vectors before they are stored (post-processing, e.g. standardisation).

    The table's schema metadata carries ``info`` (model, preprocessing, channels) under the key ``msnoop``.
    """
    import lancedb

    parts_folder = Path(parts_folder)
    files = part_files(parts_folder)
    db = lancedb.connect(uri)
    if not files:
        logger.warning("no embeddings in %s; LanceDB table %s not written", parts_folder, name)
        return 0
    batches = _vector_batches(parts_folder, dim, batch_size, schema, transform)
    first = next(batches)
    schema = first.schema.with_metadata({META_KEY: json.dumps(info, default=str).encode()})

    def gen() -> Iterator[pa.RecordBatch]:
        yield first.cast(schema) if first.schema != schema else first
        for b in batches:
            yield pa.RecordBatch.from_arrays(b.columns, schema=schema)

    reader = pa.RecordBatchReader.from_batches(schema, gen())
    table = db.create_table(name, data=reader, mode="overwrite")
    n = table.count_rows()
    logger.info("LanceDB table %s at %s: %d rows", name, uri, n)
    return n


def build_frame_table(uri: str, name: str, frame: Any, features: list[str], *, info: dict[str, Any]) -> int:
    """(Re)build LanceDB table ``name`` from a feature frame (profiles): ``features`` -> ``vector``.

    For aggregated tables (wells, treatments) that fit in memory; image-level embeddings stream from
    their parts with :func:`build_table`. Every non-feature column is kept as metadata; ``info`` (plus
    the feature names) goes into the schema metadata.

    Raises:
        ValueError: No features, or non-finite feature values.
    """
    import lancedb

    if not features:
        raise ValueError(f"table {name!r}: expected feature columns, found none")
    values = frame[features].to_numpy(dtype=np.float32)
    if not np.isfinite(values).all():
        bad = [f for f, ok in zip(features, np.isfinite(values).all(axis=0), strict=True) if not ok]
        raise ValueError(f"table {name!r}: features with NaN/inf values cannot be indexed: {bad[:5]}")
    meta = frame[[c for c in frame.columns if c not in set(features)]].reset_index(drop=True)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), len(features))
    table = pa.Table.from_pandas(meta, preserve_index=False).append_column(VECTOR, vec)
    table = table.replace_schema_metadata({META_KEY: json.dumps(info | {"features": features}, default=str).encode()})
    tbl = lancedb.connect(uri).create_table(name, data=table, mode="overwrite")
    logger.info("LanceDB table %s at %s: %d rows x %d features", name, uri, len(meta), len(features))
    return int(tbl.count_rows())


def table_names(db: Any) -> list[str]:
    """Names of all tables in a LanceDB connection (follows pagination)."""
    names: list[str] = []
    token = None
    while True:
        resp = db.list_tables(page_token=token) if token else db.list_tables()
        names.extend(resp.tables)
        token = getattr(resp, "page_token", None)
        if not token:
            return names


def open_table(uri: str, name: str, *, storage_options: dict[str, str] | None = None) -> Any:
    """Table ``name`` of the LanceDB at ``uri`` (``storage_options``: see :func:`msnoop.core.storage.storage_options`).

    Raises:
        KeyError: No such table (the message lists the tables there).
    """
    import lancedb

    db = lancedb.connect(uri, storage_options=storage_options)
    names = table_names(db)
    if name not in names:
        raise KeyError(f"LanceDB at {uri} has no table {name!r}; tables: {sorted(names)}")
    return db.open_table(name)


def table_info(table: Any) -> dict[str, Any]:
    """The ``msnoop`` metadata stored in a table's schema (empty dict if absent)."""
    meta = table.schema.metadata or {}
    raw = meta.get(META_KEY)
    return json.loads(raw) if raw else {}


def where_ids(ids: list[str], column: str = "Metadata_ImageID") -> str:
    """A SQL filter selecting the rows whose ``column`` is one of ``ids`` (quotes in ids escaped)."""
    quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
    return f"{column} IN ({quoted})"


__all__ = ["VECTOR", "build_frame_table", "build_table", "open_table", "table_info", "where_ids"]
