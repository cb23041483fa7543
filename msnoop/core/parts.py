"""Parquet part files: the source of truth for a job's outputs.

A part folder (``<dir>/embeddings``, ``<dir>/errors``, ``<dir>/cells``: see :class:`msnoop.core.rundir.RunDir` for
the layout) holds ``part-<key>.parquet`` files. Parts are written to a hidden temporary name and renamed, so a
killed run leaves only whole parts; a re-run reads the ids already present and skips them.

Every folder may be a local path or a URI (``s3://bucket/run1/embeddings``, ``gs://...``): the
functions go through :mod:`msnoop.core.storage`. On object storage a part is uploaded whole to its
final key (an upload becomes visible atomically; object stores have no rename). Local folders give
:class:`~pathlib.Path` results, URIs give ``str`` URIs. ``storage`` (a
:class:`~msnoop.core.storage.StorageConfig`) defaults to the environment (``AWS_ENDPOINT_URL``...).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from msnoop.core import storage as st
from msnoop.core.storage import StorageConfig

ID_COLUMN = "Metadata_ImageID"
EMB_PREFIX = "emb_"


def emb_columns(dim: int) -> list[str]:
    """Names of the ``dim`` embedding columns: ``emb_0000``, ``emb_0001``, ... (four digits, zero-padded)."""
    return [f"{EMB_PREFIX}{i:04d}" for i in range(dim)]


#: Key of the provenance record in a part file's own Parquet key-value metadata.
PROVENANCE_KEY = b"msnoop"


def block_key(ids: Any) -> str:
    """A part name key derived from the ids a block holds (order-insensitive sha1, 32 hex digits).

    Writing a block's part under this key makes a retried Ray task idempotent: the retry replaces
    the same file/object instead of adding a second copy of the rows.
    """
    digest = hashlib.sha1()
    for i in sorted(str(v) for v in ids):
        digest.update(i.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def write_part(
    table: pa.Table,
    folder: str | Path,
    *,
    provenance: dict[str, Any] | None = None,
    storage: StorageConfig | None = None,
    key: str | None = None,
) -> Path | str:
    """Write ``table`` as part file ``part-<key or uuid>.parquet`` atomically; returns its path or URI.

    ``provenance`` (model, its sha256, preprocessing, channels: JSON-serialisable) is stored in the file's own
    key-value metadata under ``msnoop``, so a part copied elsewhere still says how it was made
    (:func:`read_part_provenance`).

    Local: written to a hidden temporary file beside it, then ``os.replace`` (streams to disk).
    URI: serialised in memory, then one upload of the final key (memory = the part's size).
    ``key`` (e.g. :func:`block_key` of the block's ids) names the part deterministically, so writing
    the same block again (a retried task) replaces it; without it every call adds a new part.
    """
    if provenance is not None:
        meta = dict(table.schema.metadata or {})
        meta[PROVENANCE_KEY] = json.dumps(provenance, default=str).encode()
        table = table.replace_schema_metadata(meta)
    name = f"part-{key or uuid.uuid4().hex}.parquet"
    if st.is_uri(folder):
        final = st.join(folder, name)
        st.write_with(final, lambda out: pq.write_table(table, out), storage)
        return final
    final = st.local_path(folder) / name
    with st.atomic_path(final) as tmp:  # a unique temporary name: two tasks writing one key never share it
        pq.write_table(table, tmp)
    return final


def read_part_provenance(path: str | Path, *, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The provenance record stored in a Parquet file's key-value metadata (empty dict if absent)."""
    with st.open_input(path, storage) as fh:
        meta = pq.read_schema(fh).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def part_files(folder: str | Path, *, storage: StorageConfig | None = None) -> list[Path] | list[str]:
    """Sorted ``part-*.parquet`` files directly in ``folder`` (``[]`` if it does not exist); no hidden temporaries."""
    return st.list_files(folder, "part-*.parquet", storage)  # type: ignore[return-value]


def _dataset(files: list[Any], storage: StorageConfig | None, schema: pa.Schema | None = None) -> pads.Dataset:
    fs, _ = st.resolve(files[0], storage)
    return pads.dataset([st.resolve(f, storage)[1] for f in files], format="parquet", filesystem=fs, schema=schema)


#: Part files read at once by :func:`read_column_per_part` and :func:`count_rows`. On object storage each read is
#: a few requests answered in tens of milliseconds, so a folder of many small parts is bound by requests in
#: flight, not bandwidth (the driver reads every part's ids for the totals check and to resume).
READ_THREADS = 16


def _fragments(folder: str | Path, storage: StorageConfig | None) -> list[pads.ParquetFileFragment]:
    """The folder's parts as Parquet fragments that know their size: opening one asks no HEAD request."""
    fs, infos = st.list_file_infos(folder, "part-*.parquet", storage)
    fmt = pads.ParquetFileFormat()
    return [fmt.make_fragment(i.path, filesystem=fs, file_size=i.size) for i in infos]


def read_column_per_part(
    folder: str | Path, column: str = ID_COLUMN, *, storage: StorageConfig | None = None
) -> list[list[Any]]:
    """``column``'s values in every part of ``folder``, one list per part in :func:`part_files` order.

    Parts are read :data:`READ_THREADS` at a time, one column each, sizes taken from the folder listing (on S3:
    one LIST per 1000 parts, then the footer and the column chunk of each part; no HEAD). ``[]`` for a missing
    or empty folder. Raises ``KeyError``/``pyarrow.ArrowInvalid`` when a part lacks ``column``.
    """
    return map_column_per_part(folder, lambda values: values.to_pylist(), column, storage=storage)


def map_column_per_part(
    folder: str | Path,
    fn: Callable[[pa.ChunkedArray], Any],
    column: str = ID_COLUMN,
    *,
    storage: StorageConfig | None = None,
) -> list[Any]:
    """``fn(column)`` of every part of ``folder``, in :func:`part_files` order, read as :func:`read_column_per_part`
    describes; only ``fn``'s results are kept, e.g. 16-byte id hashes instead of the id strings."""
    frags = _fragments(folder, storage)
    if not frags:
        return []

    def read(frag: pads.ParquetFileFragment) -> Any:
        return fn(frag.to_table(columns=[column]).column(column))

    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(frags))) as pool:
        return list(pool.map(read, frags))


def read_ids(folder: str | Path, column: str = ID_COLUMN, *, storage: StorageConfig | None = None) -> set[str]:
    """Ids present in a part folder (reads one column only; see :func:`read_column_per_part`)."""
    ids: set[str] = set()
    for values in read_column_per_part(folder, column, storage=storage):
        ids.update(values)
    return ids


def embeddings_frame(meta: pd.DataFrame, embeddings: np.ndarray) -> pa.Table:
    """Metadata columns + one float32 column per embedding dimension."""
    cols: dict[str, Any] = {c: meta[c].to_numpy() for c in meta.columns}
    for i, name in enumerate(emb_columns(embeddings.shape[1])):
        cols[name] = embeddings[:, i].astype(np.float32, copy=False)
    return pa.Table.from_pydict(cols)


def iter_batches(
    folder: str | Path,
    *,
    batch_size: int = 4096,
    columns: list[str] | None = None,
    schema: pa.Schema | None = None,
    storage: StorageConfig | None = None,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches of all parts (bounded memory).

    With ``schema`` (the run's schema, see :func:`schema_to_json`) every part is read as that schema:
    parts of earlier runs lacking a later column give nulls in it.
    """
    files = part_files(folder, storage=storage)
    if not files:
        return iter(())
    return _dataset(files, storage, schema).to_batches(columns=columns, batch_size=batch_size)


ERRORS_SCHEMA = pa.schema([(ID_COLUMN, pa.string()), ("path", pa.string()), ("reason", pa.string())])


def schema_to_json(schema: pa.Schema) -> dict[str, Any]:
    """A schema for ``run.json``: readable field types plus the exact Arrow IPC bytes (base64)."""
    import base64

    return {
        "fields": {f.name: str(f.type) for f in schema},
        "arrow_ipc_base64": base64.b64encode(schema.serialize().to_pybytes()).decode(),
    }


def schema_from_json(data: dict[str, Any]) -> pa.Schema:
    """Inverse of :func:`schema_to_json`."""
    import base64

    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(data["arrow_ipc_base64"])))


def drop_ids(
    folder: str | Path,
    ids: set[str] | Callable[[list[Any]], np.ndarray],
    column: str = ID_COLUMN,
    *,
    storage: StorageConfig | None = None,
    files: list[Any] | None = None,
) -> int:
    """Remove the rows whose id is in ``ids`` from every part of ``folder``; returns rows removed.

    ``ids`` is a set of ids, or a function from a part's ids (a list) to a bool array, True where a row is to
    go (e.g. :meth:`msnoop.core.idset.IdSet.contains_ids`, which holds a million ids in 16 MB).

    Each affected part is rewritten to a temporary name and renamed over itself (atomic per part; on
    object storage the part is uploaded whole over its key), so a killed run leaves every part either
    as it was or without those rows; a part left empty is deleted. ``files`` limits the parts looked at (those
    known to hold some of ``ids``, e.g. from :class:`msnoop.core.partindex.PartIndex`); default every part.
    """
    removed = 0
    if not callable(ids) and not ids:
        return 0
    for f in part_files(folder, storage=storage) if files is None else files:
        fs, path = st.resolve(f, storage)
        table = pq.read_table(path, filesystem=fs)
        values = table.column(column).to_pylist()
        if callable(ids):
            keep = ~np.asarray(ids(values), dtype=bool)
        else:
            keep = ~np.isin(np.asarray(values, dtype=object), list(ids))
        n_drop = int((~keep).sum())
        if not n_drop:
            continue
        removed += n_drop
        if not keep.any():
            st.remove(f, storage)
        elif st.is_uri(f):
            kept = table.filter(pa.array(keep))
            st.write_with(f, lambda out, kept=kept: pq.write_table(kept, out), storage)
        else:
            with st.atomic_path(f) as tmp:
                pq.write_table(table.filter(pa.array(keep)), tmp)
    return removed


#: The columns that key a cells part's rows (one row per cell of an image).
CELL_KEY = [ID_COLUMN, "Metadata_CellID"]


def key_hashes(table: pa.Table, columns: list[str]) -> np.ndarray:
    """``[rows]`` dtype ``S16``: the hash (:func:`msnoop.core.idset.hash_ids`) of each row's key, its ``columns``
    joined by NUL; for the image id alone the same as the id's hash."""
    from msnoop.core.idset import hash_ids

    values = [table.column(c).to_pylist() for c in columns]
    return hash_ids(["\0".join(str(v) for v in row) for row in zip(*values, strict=True)])


def _row_keys(folder: str | Path, columns: list[str], storage: StorageConfig | None) -> list[np.ndarray]:
    """Per part (in :func:`part_files` order), the 16-byte hash of each row's key (``columns`` joined)."""

    def key(table: pa.Table) -> np.ndarray:
        return key_hashes(table, columns)

    frags = _fragments(folder, storage)
    if not frags:
        return []
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(frags))) as pool:
        return list(pool.map(lambda frag: key(frag.to_table(columns=columns)), frags))


def drop_repeats(
    folder: str | Path,
    columns: list[str] | None = None,
    *,
    also_in: Any = None,
    storage: StorageConfig | None = None,
    known: tuple[list[Any], list[np.ndarray]] | None = None,
    changed: list[Any] | None = None,
) -> int:
    """Keep one row per key in a part folder: rows whose key an earlier part (by name) already holds are removed.

    A key is the row's ``columns`` (default the image id). Rows with the same key come from writers that each
    wrote the same images (a task retried with other block boundaries, a writer that lost its lock); they hold
    the same values, so which copy stays does not matter. ``also_in`` (an :class:`~msnoop.core.idset.IdSet` of
    keys) removes those keys here altogether (e.g. error rows of images that another part embedded). Parts are
    rewritten atomically (:func:`drop_ids`' way); a part left empty is deleted.

    ``known`` gives the folder's parts (in :func:`part_files` order) and each part's ``[rows]`` key hashes
    (:func:`msnoop.core.idset.hash_ids` of the image ids, for the default ``columns``) when they are already known,
    e.g. from :meth:`msnoop.core.partindex.PartIndex.scan`: then only the parts that change are read. ``changed``
    receives every part rewritten or removed.

    Returns:
        Rows removed.
    """
    columns = columns or [ID_COLUMN]
    keys = _row_keys(folder, columns, storage) if known is None else known[1]
    if not keys:
        return 0
    flat = np.concatenate(keys)
    order = np.argsort(flat, kind="stable")  # stable: the first part (by name) keeps its row
    ordered = flat[order]
    repeat = np.zeros(len(flat), dtype=bool)
    repeat[order[1:][ordered[1:] == ordered[:-1]]] = True
    if also_in is not None:
        repeat |= also_in.contains(flat)
    if not repeat.any():
        return 0
    files = part_files(folder, storage=storage) if known is None else known[0]
    bounds = np.cumsum([0, *[len(k) for k in keys]])
    for f, lo, hi in zip(files, bounds[:-1], bounds[1:], strict=True):
        drop = repeat[lo:hi]
        if not drop.any():
            continue
        if changed is not None:
            changed.append(f)
        if drop.all():
            st.remove(f, storage)
            continue
        fs, path = st.resolve(f, storage)
        table = pq.read_table(path, filesystem=fs)
        kept = table.filter(pa.array(~drop))
        if st.is_uri(f):
            st.write_with(f, lambda out, kept=kept: pq.write_table(kept, out), storage)
        else:
            with st.atomic_path(f) as tmp:
                pq.write_table(kept, tmp)
    return int(repeat.sum())


def count_rows(folder: str | Path, *, storage: StorageConfig | None = None) -> int:
    """Rows in all parts, from the Parquet footers only (:data:`READ_THREADS` at a time, no HEAD request)."""
    frags = _fragments(folder, storage)
    if not frags:
        return 0
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(frags))) as pool:
        return sum(pool.map(lambda frag: frag.metadata.num_rows, frags))


def read_frame(
    folder: str | Path, columns: list[str] | None = None, *, storage: StorageConfig | None = None
) -> pd.DataFrame:
    """All parts as one DataFrame (for analysis of tables that fit in memory)."""
    files = part_files(folder, storage=storage)
    if not files:
        return pd.DataFrame()
    return _dataset(files, storage).to_table(columns=columns).to_pandas()
