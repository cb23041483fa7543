"""Publish a job's Parquet parts as LanceDB tables (the store stage), with a vector index where it pays."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from msnoop.core import storage as st
from msnoop.core.parts import emb_columns, iter_batches
from msnoop.core.storage import StorageConfig
from msnoop.correct.normalize import DEFAULT_POSTPROCESS, POSTPROCESS_CHOICES, Standardizer
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
    postprocess: str = DEFAULT_POSTPROCESS,
    storage: StorageConfig | None = None,
    ray_remote_args: dict[str, Any] | None = None,
) -> int:
    """(Re)build LanceDB table ``table`` (and ``<table>_cells``) from Parquet parts; returns the row count.

    When the database or the parts are on object storage (``s3://...``), the tables are written by Ray tasks
    (:func:`msnoop.store.lance_ray.build_table_ray`: needs a Ray session) so rows never pass through the driver;
    local ones are streamed by the driver (:func:`msnoop.store.lance.build_table`).

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
        storage: Object storage settings of ``uri`` and the parts (default: the environment).
        ray_remote_args: Options of the Ray write tasks (e.g. ``runtime_env``) on object storage.
        postprocess: ``"standardize"`` stores each vector z-scored per dimension over all rows of the parts
            (fitted without labels, :class:`msnoop.correct.normalize.Standardizer`; its mean and scale go into the
            table's metadata as ``info["postprocess"]`` so a new query image is transformed alike); ``"raw"``
            stores Microsnoop's readout as it is. The Parquet parts always hold the raw readout.

    Raises:
        ValueError: Parts disagree with ``info["embed_dim"]``.
    """
    remote = st.is_uri(uri) or st.is_uri(parts_folder)

    def build(name: str, folder: str | Path, **kw: Any) -> int:
        if remote:
            from msnoop.store.lance_ray import build_table_ray

            return build_table_ray(uri, name, folder, storage=storage, ray_remote_args=ray_remote_args, **kw)
        return build_table(uri, name, folder, **kw)

    info, transform = _postprocessing(parts_folder, info, postprocess, storage)
    n_rows = build(table, parts_folder, dim=info["embed_dim"], info=info, schema=schema, transform=transform)
    if n_rows and index != "none":
        tbl = open_table(uri, table, storage_options=st.storage_options(uri, storage) or None)
        done = ensure_index(tbl, kind=index, threshold_rows=index_threshold)  # type: ignore[arg-type]
        logger.info("vector index: %s", done)
    if cells_folder is not None:
        cells_info, cells_transform = _postprocessing(cells_folder, info, postprocess, storage)
        build(
            f"{table}_cells",
            cells_folder,
            dim=info["embed_dim"],
            info=cells_info,
            schema=cells_schema,
            transform=cells_transform,
        )
    return n_rows


def _postprocessing(
    parts_folder: str | Path, info: dict[str, Any], method: str, storage: StorageConfig | None = None
) -> tuple[dict[str, Any], Any]:
    """``(info with its "postprocess" record, the batch transform or None)`` for the parts in ``parts_folder``.

    Standardisation is fitted in one streamed pass over the parts (float64 sums: memory is ``O(D)``).
    """
    if method == "raw":
        return {**info, "postprocess": {"method": "raw"}}, None
    if method != "standardize":
        raise ValueError(f"unknown post-processing {method!r}; expected one of {', '.join(POSTPROCESS_CHOICES)}")
    n, total, total_sq = 0, None, None
    for batch in iter_batches(parts_folder, columns=emb_columns(int(info["embed_dim"])), storage=storage):
        X = np.column_stack([c.to_numpy(zero_copy_only=False) for c in batch.columns]).astype(np.float64)
        total = X.sum(axis=0) if total is None else total + X.sum(axis=0)
        total_sq = (X**2).sum(axis=0) if total_sq is None else total_sq + (X**2).sum(axis=0)
        n += len(X)
    if n == 0:
        return {**info, "postprocess": {"method": "raw"}}, None
    std = Standardizer.from_moments(n, total, total_sq)
    return {**info, "postprocess": std.to_dict()}, std.transform


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
