"""Parquet part files: the source of truth for a job's outputs.

Layout of a job's output folder::

    <dir>/embeddings/part-<uuid>.parquet   one row per image: Metadata_* + emb_0000 ... emb_<D-1>
    <dir>/errors/part-<uuid>.parquet       one row per bad image: Metadata_ImageID, path, reason
    <dir>/run.json                         model, preprocessing, channels, embed dim, provenance
    <dir>/resolved_config.yaml             the validated job config
    <dir>/lancedb/                         embedded LanceDB database built from the parts

Parts are written to a hidden temporary name and renamed, so a killed run leaves only whole parts;
a re-run reads the ids already present and skips them.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

ID_COLUMN = "Metadata_ImageID"
EMB_PREFIX = "emb_"
EMBEDDINGS = "embeddings"
ERRORS = "errors"
RUN_FILE = "run.json"


def emb_columns(dim: int) -> list[str]:
    return [f"{EMB_PREFIX}{i:04d}" for i in range(dim)]


#: Key of the provenance record in a part file's own Parquet key-value metadata.
PROVENANCE_KEY = b"msnoop"


def write_part(table: pa.Table, folder: str | Path, *, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``table`` as a new part file atomically; returns its path.

    ``provenance`` (model, its sha256, preprocessing, channels: JSON-serialisable) is stored in the file's own
    key-value metadata under ``msnoop``, so a part copied elsewhere still says how it was made
    (:func:`read_part_provenance`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if provenance is not None:
        meta = dict(table.schema.metadata or {})
        meta[PROVENANCE_KEY] = json.dumps(provenance, default=str).encode()
        table = table.replace_schema_metadata(meta)
    name = f"part-{uuid.uuid4().hex}.parquet"
    tmp = folder / f".{name}.tmp"
    pq.write_table(table, tmp)
    final = folder / name
    os.replace(tmp, final)
    return final


def read_part_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance record stored in a Parquet file's key-value metadata (empty dict if absent)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}


def part_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("part-*.parquet"))


def read_ids(folder: str | Path, column: str = ID_COLUMN) -> set[str]:
    """Ids present in a part folder (reads one column only)."""
    files = part_files(folder)
    if not files:
        return set()
    ids: set[str] = set()
    for f in files:
        ids.update(pq.read_table(f, columns=[column]).column(column).to_pylist())
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
) -> Iterator[pa.RecordBatch]:
    """Stream record batches of all parts (bounded memory).

    With ``schema`` (the run's schema, see :func:`schema_to_json`) every part is read as that schema:
    parts of earlier runs lacking a later column give nulls in it.
    """
    files = part_files(folder)
    if not files:
        return iter(())
    dataset = pads.dataset([str(f) for f in files], format="parquet", schema=schema)
    return dataset.to_batches(columns=columns, batch_size=batch_size)


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


def drop_ids(folder: str | Path, ids: set[str], column: str = ID_COLUMN) -> int:
    """Remove the rows whose id is in ``ids`` from every part of ``folder``; returns rows removed.

    Each affected part is rewritten to a temporary name and renamed over itself (atomic per part), so a
    killed run leaves every part either as it was or without those rows; a part left empty is deleted.
    """
    removed = 0
    if not ids:
        return 0
    for f in part_files(folder):
        table = pq.read_table(f)
        keep = ~np.isin(np.asarray(table.column(column).to_pylist(), dtype=object), list(ids))
        n_drop = int((~keep).sum())
        if not n_drop:
            continue
        removed += n_drop
        if keep.any():
            tmp = f.with_name(f".{f.name}.tmp")
            pq.write_table(table.filter(pa.array(keep)), tmp)
            os.replace(tmp, f)
        else:
            f.unlink()
    return removed


def count_rows(folder: str | Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in part_files(folder))


def read_frame(folder: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """All parts as one DataFrame (for analysis of tables that fit in memory)."""
    files = part_files(folder)
    if not files:
        return pd.DataFrame()
    return pads.dataset([str(f) for f in files], format="parquet").to_table(columns=columns).to_pandas()


def write_run_info(out_dir: str | Path, info: dict[str, Any]) -> Path:
    path = Path(out_dir) / RUN_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_run_info(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out_dir} is not an msnoop output folder (no run.json)")
    return json.loads(path.read_text())
