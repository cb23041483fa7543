"""The write stage: each block's embeddings, cells and errors become new Parquet parts; only counts return."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from msnoop.core import parts
from msnoop.core.parts import ID_COLUMN
from msnoop.embed.cells import CELLS, cells_table
from msnoop.io.manifest import PATH_PREFIX


def write_block(
    batch: dict[str, Any],
    *,
    out_dir: str,
    channels: list[str],
    cells: bool = False,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stage 3: write the block's embeddings and errors as Parquet parts; return counts only.

    ``provenance`` (see :func:`provenance_record`) goes into every embeddings and cells part's own metadata.

    In cells mode the block's cells are written first (``<out>/cells/``), then the image means, so a
    finished image always has its cells on disk (see :func:`msnoop.embed.cells.drop_orphan_cells` for the other case).
    """
    error = batch["error"]
    ok = np.array([e == "" for e in error], dtype=bool)
    meta_cols = [c for c in batch if c.startswith("Metadata_")]
    meta = pd.DataFrame({c: batch[c] for c in meta_cols})
    n_cells = 0
    if cells and ok.any():
        cell_table = cells_table(meta, batch, ok)
        if cell_table is not None:
            parts.write_part(cell_table, Path(out_dir) / CELLS, provenance=provenance)
            n_cells = cell_table.num_rows
    if ok.any():
        table = parts.embeddings_frame(meta[ok].reset_index(drop=True), batch["embedding"][ok])
        parts.write_part(table, Path(out_dir) / parts.EMBEDDINGS, provenance=provenance)
    if (~ok).any():
        bad = meta[~ok]
        paths = [";".join(str(bad[f"{PATH_PREFIX}{ch}"].iloc[i]) for ch in channels) for i in range(len(bad))]
        err = pa.Table.from_pydict(
            {ID_COLUMN: bad[ID_COLUMN].astype(str).tolist(), "path": paths, "reason": [str(e) for e in error[~ok]]}
        )
        parts.write_part(err, Path(out_dir) / parts.ERRORS)
    return {"n_ok": np.array([int(ok.sum())]), "n_err": np.array([int((~ok).sum())]), "n_cells": np.array([n_cells])}


#: Keys of ``run.json`` that travel in every part file (what a copied part needs to say how it was made).
PROVENANCE_KEYS = (
    "model",
    "model_source",
    "model_sha256",
    "arch",
    "preprocess",
    "amp",
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
