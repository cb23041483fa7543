"""The write stage: each block's embeddings, cells and errors become new Parquet parts; counts and a description of
each part (for the driver's part index) return."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from msnoop.core import parts
from msnoop.core.partindex import PartEntry, describe_part, encode_entries
from msnoop.core.parts import ID_COLUMN, block_key
from msnoop.core.rundir import RunDir
from msnoop.core.storage import StorageConfig
from msnoop.embed.cells import CELL_COUNT, CELLS_FOUND, cells_table, with_embeddings
from msnoop.embed.source import META, decode_rows
from msnoop.io.manifest import PATH_PREFIX

#: Key of the part descriptions in :func:`write_block`'s result.
PARTS = "parts"


def write_block(
    batch: dict[str, Any],
    *,
    out_dir: str,
    channels: list[str],
    cells: bool = False,
    meta_schema: pa.Schema,
    schema: pa.Schema,
    cells_schema: pa.Schema | None = None,
    provenance: dict[str, Any] | None = None,
    storage: StorageConfig | None = None,
) -> dict[str, Any]:
    """Stage 3: write the block's embeddings and errors as Parquet parts; return counts and what each part holds.

    Returns ``{"n_ok": [1], "n_err": [1], "n_cells": [1]}`` int64 counts and ``{PARTS: [1]}``, the
    :func:`msnoop.core.partindex.encode_entries` bytes describing every part written (name, size, modification
    time, id hashes: 16 bytes per row), which the driver adds to the folder's part index.

    Metadata comes from each row's :data:`~msnoop.embed.source.META` bytes, decoded with ``meta_schema`` (the
    run's metadata schema; :func:`~msnoop.embed.source.decode_rows`): values and types are the manifest's,
    whatever Ray made of the block. Every part is written with ``schema`` / ``cells_schema`` (:func:`output_schemas`)
    and errors with :data:`msnoop.core.parts.ERRORS_SCHEMA`. ``provenance`` (:func:`provenance_record`) goes
    into every embeddings and cells part's own key-value metadata.

    In cells mode the block's cells are written first (``<out>/cells/``), then the image means, so a
    finished image always has its cells on disk (see :func:`msnoop.embed.cells.drop_orphan_cells` for the other case).

    ``out_dir`` is a local folder or a URI (``storage``: its :class:`~msnoop.core.storage.StorageConfig`; credentials
    come from the task's environment). Each part is named by :func:`msnoop.core.parts.block_key` of the image ids
    it holds, so a retried task replaces its parts instead of adding a second copy of the rows.
    """
    run = RunDir(out_dir, storage)
    meta = decode_rows(batch[META], meta_schema)
    error = batch["error"]
    ok = np.array([e == "" for e in error], dtype=bool)
    rows = np.arange(meta.num_rows, dtype=np.int64)  # positions in ``meta``
    n_cells = 0
    written: list[PartEntry] = []  # described after each part exists: the driver's index never runs ahead
    if cells and ok.any():
        assert cells_schema is not None
        cell_table = cells_table(meta, rows, batch, ok, cells_schema)
        if cell_table is not None:
            ids = cell_table.column(ID_COLUMN).to_pylist()
            path = parts.write_part(cell_table, run.cells, provenance=provenance, storage=storage, key=block_key(ids))
            keys = parts.key_hashes(cell_table, parts.CELL_KEY)
            written.append(describe_part(path, run.CELLS, ids, storage, keys=keys))
            n_cells = cell_table.num_rows
    if ok.any():
        extra = {c: np.asarray(batch[c], dtype=np.int64)[ok] for c in (CELL_COUNT, CELLS_FOUND)} if cells else {}
        table = with_embeddings(meta.take(pa.array(rows[ok])), extra, np.asarray(batch["embedding"])[ok], schema)
        ids = table.column(ID_COLUMN).to_pylist()
        path = parts.write_part(table, run.embeddings, provenance=provenance, storage=storage, key=block_key(ids))
        written.append(describe_part(path, run.EMBEDDINGS, ids, storage))
    if (~ok).any():
        bad = meta.take(pa.array(rows[~ok])).to_pydict()
        paths = [
            ";".join(
                "" if bad[f"{PATH_PREFIX}{ch}"][i] is None else str(bad[f"{PATH_PREFIX}{ch}"][i]) for ch in channels
            )
            for i in range(int((~ok).sum()))
        ]
        err = pa.Table.from_pydict(
            {ID_COLUMN: [str(v) for v in bad[ID_COLUMN]], "path": paths, "reason": [str(e) for e in error[~ok]]},
            schema=parts.ERRORS_SCHEMA,
        )
        ids = err.column(ID_COLUMN).to_pylist()
        path = parts.write_part(err, run.errors, storage=storage, key=block_key(ids))
        written.append(describe_part(path, run.ERRORS, ids, storage))
    return {
        "n_ok": np.array([int(ok.sum())]),
        "n_err": np.array([int((~ok).sum())]),
        "n_cells": np.array([n_cells]),
        PARTS: np.array([encode_entries(written)], dtype=object),
    }


#: Keys of ``run.json`` that travel in every part file (what a copied part needs to say how it was made).
PROVENANCE_KEYS = (
    "model",
    "model_source",
    "model_sha256",
    "arch",
    "preprocess",
    "amp",
    "backend",
    "channels",
    "embed_dim_per_channel",
    "embed_dim",
    "config_hash",
    "cells",
)


def provenance_record(info: dict[str, Any]) -> dict[str, Any]:
    """The part-level provenance: :data:`PROVENANCE_KEYS` of a run's ``run.json`` record, plus the msnoop version."""
    out = {k: info[k] for k in PROVENANCE_KEYS if k in info}
    out["msnoop"] = (info.get("provenance") or {}).get("msnoop")
    return out
