"""Publish a job's Parquet parts as LanceDB tables (the store stage), with a vector index where it pays."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from msnoop.store.index import ensure_index
from msnoop.store.lance import build_frame_table, build_table, open_table

logger = logging.getLogger(__name__)


def publish_embeddings(
    uri: str,
    table: str,
    parts_folder: str | Path,
    *,
    info: dict[str, Any],
    index: str = "auto",
    index_threshold: int = 100_000,
    cells_folder: str | Path | None = None,
    schema: Any = None,
    cells_schema: Any = None,
) -> int:
    """(Re)build LanceDB table ``table`` (and ``<table>_cells``) from Parquet parts; returns the row count.

    Args:
        uri: LanceDB URI (a folder for an embedded database).
        table: Table name.
        parts_folder: Folder of ``part-*.parquet`` files with ``Metadata_*`` and ``emb_*`` columns.
        info: The run's ``run.json`` record (``embed_dim`` is required); stored in the schema metadata.
        index: Vector index kind (see :func:`msnoop.store.index.ensure_index`); ``"none"`` builds none.
        index_threshold: Rows from which ``"auto"`` builds an index.
        cells_folder: Cells-mode parts, published as ``<table>_cells`` (no index).
        schema, cells_schema: The run's Parquet schemas (``pyarrow.Schema``): every part is read with them, so
            the table's column types are the manifest's whatever each part holds.

    Raises:
        ValueError: Parts disagree with ``info["embed_dim"]``.
    """
    n_rows = build_table(uri, table, parts_folder, dim=info["embed_dim"], info=info, schema=schema)
    if n_rows and index != "none":
        done = ensure_index(open_table(uri, table), kind=index, threshold_rows=index_threshold)  # type: ignore[arg-type]
        logger.info("vector index: %s", done)
    if cells_folder is not None:
        build_table(uri, f"{table}_cells", cells_folder, dim=info["embed_dim"], info=info, schema=cells_schema)
    return n_rows


#: The tables a profile job writes, in the order they are published (the last is what ``msnoop search OUT`` opens).
PROFILE_LEVELS = ("profiles", "treatments")


def publish_profiles(out: str | Path, record: dict[str, Any]) -> list[str]:
    """LanceDB tables ``profiles`` and ``treatments`` in ``out/lancedb`` from a profile job's Parquet files.

    Reads ``out/profiles.parquet`` and, when present, ``out/treatments.parquet`` (the source of truth), writes
    one table per file with the correction ``record`` in its schema metadata, and ``out/run.json`` naming them.

    Returns:
        The table names written.

    Raises:
        FileNotFoundError: ``out/profiles.parquet`` is missing.
    """
    from msnoop.core.parts import write_run_info
    from msnoop.core.tables import feature_columns, read_table

    out = Path(out)
    uri = str((out / "lancedb").resolve())
    names = []
    for name in PROFILE_LEVELS:
        path = out / f"{name}.parquet"
        if name != "profiles" and not path.is_file():
            continue
        frame = read_table(path)
        build_frame_table(
            uri, name, frame, feature_columns(frame), info={"kind": "profiles", "level": name, "correction": record}
        )
        names.append(name)
    write_run_info(out, {"job": "profile", "lancedb": uri, "table": names[-1], "tables": names})
    return names
