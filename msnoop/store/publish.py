"""Publish a job's Parquet parts as LanceDB tables (the store stage), with a vector index where it pays."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from msnoop.core import storage as st
from msnoop.core.partindex import PartIndex
from msnoop.core.parts import emb_columns, iter_batches
from msnoop.core.rundir import RunDir
from msnoop.store.index import ensure_index
from msnoop.store.lance import build_frame_table, build_table, open_table
from msnoop.vectors.postprocess import DEFAULT_POSTPROCESS, POSTPROCESS_CHOICES, create_postprocessor

logger = logging.getLogger(__name__)


def publish_embeddings(
    run: RunDir,
    uri: str,
    table: str,
    *,
    info: dict[str, Any],
    index: str = "auto",
    index_threshold: int = 100_000,
    cells: bool = False,
    schema: Any = None,
    cells_schema: Any = None,
    postprocess: str = DEFAULT_POSTPROCESS,
    ray_remote_args: dict[str, Any] | None = None,
) -> int:
    """(Re)build LanceDB table ``table`` (and ``<table>_cells``) from Parquet parts; returns the row count.

    When the database or the parts are on object storage (``s3://...``), the tables are written by Ray tasks
    (:func:`msnoop.store.lance_ray.build_table_ray`: needs a Ray session) so rows never pass through the driver;
    the parts' row counts come from the run's part index (:class:`msnoop.core.partindex.PartIndex`), not from
    their footers. Local ones are streamed by the driver (:func:`msnoop.store.lance.build_table`).

    Args:
        run: The output folder whose parts (``embeddings/``, and ``cells/`` with ``cells``) are published; its
            storage settings are used for the parts and ``uri``.
        uri: LanceDB URI (a folder for an embedded database).
        table: Table name.
        info: The run's ``run.json`` record (``embed_dim`` is required); stored in the schema metadata.
        index: Vector index kind (see :func:`msnoop.store.index.ensure_index`); ``"none"`` builds none.
        index_threshold: Rows from which ``"auto"`` builds an index.
        cells: Also publish the cells-mode parts as ``<table>_cells`` (no index).
        schema, cells_schema: The run's Parquet schemas (``pyarrow.Schema``): every part is read with them, so
            the table's column types are the manifest's whatever each part holds.
        ray_remote_args: Options of the Ray write tasks (e.g. ``runtime_env``) on object storage.
        postprocess: A label-free method of :mod:`msnoop.vectors.postprocess`, fitted on all rows of the parts
            and applied to every stored vector; the fitted record goes into the table's metadata as
            ``info["postprocess"]``, so a new query image is transformed alike. ``"standardize"`` z-scores each
            dimension; ``"raw"`` stores Microsnoop's readout as it is. The Parquet parts always hold the raw readout.

    Raises:
        ValueError: Parts disagree with ``info["embed_dim"]``, or an unknown post-processing.
    """
    remote = st.is_uri(uri) or run.is_uri
    stamp = None if remote else _parts_stamp(run, uri, table, info, postprocess, index, index_threshold, cells)
    if stamp is not None:
        built = _published(run)
        if built.get("stamp") == stamp and (Path(uri) / f"{table}.lance").is_dir():
            logger.debug("LanceDB table %r is up to date with the parts in %s: not rebuilt", table, run)
            return int(built.get("rows", 0))

    part_index = PartIndex.load(run) if remote else None

    def build(name: str, folder: str | Path, **kw: Any) -> int:
        if remote:
            from msnoop.store.lance_ray import build_table_ray

            assert part_index is not None
            scan = part_index.scan(RunDir.CELLS if folder == run.cells else RunDir.EMBEDDINGS)
            return build_table_ray(
                uri,
                name,
                folder,
                storage=run.storage,
                ray_remote_args=ray_remote_args,
                known=(scan.files, scan.rows),
                **kw,
            )
        return build_table(uri, name, folder, **kw)

    info_table, transform = fit_postprocessing(run.embeddings, info, postprocess, run)
    n_rows = build(table, run.embeddings, dim=info["embed_dim"], info=info_table, schema=schema, transform=transform)
    if n_rows and index != "none":
        tbl = open_table(uri, table, storage_options=st.storage_options(uri, run.storage) or None)
        done = ensure_index(tbl, kind=index, threshold_rows=index_threshold)  # type: ignore[arg-type]
        logger.info("vector index: %s", done)
    if cells:
        cells_info, cells_transform = fit_postprocessing(run.cells, info, postprocess, run)
        build(
            f"{table}_cells",
            run.cells,
            dim=info["embed_dim"],
            info=cells_info,
            schema=cells_schema,
            transform=cells_transform,
        )
    if stamp is not None:
        st.write_text(run.published_file, json.dumps({"stamp": stamp, "table": table, "rows": n_rows}), run.storage)
    return n_rows


#: The keys of a run's record that shape its tables: a change to any of them rebuilds them.
_STAMP_KEYS = ("model", "model_sha256", "preprocess", "channels", "embed_dim", "cells")


def _published(run: RunDir) -> dict[str, Any]:
    """The record of the last local build (``published.json``), or ``{}``."""
    try:
        return dict(json.loads(st.read_text(run.published_file, run.storage)))
    except (OSError, ValueError):
        return {}


def _parts_stamp(
    run: RunDir,
    uri: str,
    table: str,
    info: dict[str, Any],
    postprocess: str,
    index: str,
    index_threshold: int,
    cells: bool,
) -> str:
    """A digest of what a local build reads and how: every part file (name, size, modification time), the
    table, the post-processing and index settings, the run's model, preprocessing and channels, msnoop's version.

    Equal digests mean a rebuild would write the same tables.
    """
    from msnoop import __version__

    files = []
    for folder in (run.embeddings, *([run.cells] if cells else [])):
        for path in sorted(Path(folder).glob("part-*.parquet")):
            stat = path.stat()
            files.append((folder == run.cells, path.name, stat.st_size, stat.st_mtime_ns))
    what = {
        "parts": files,
        "uri": str(Path(uri).resolve()),
        "table": table,
        "postprocess": postprocess,
        "index": [index, index_threshold],
        "cells": cells,
        "run": {k: info.get(k) for k in _STAMP_KEYS},
        "msnoop": __version__,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def fit_postprocessing(
    parts_folder: str | Path, info: dict[str, Any], method: str, run: RunDir
) -> tuple[dict[str, Any], Any]:
    """``(info with its "postprocess" record, the batch transform or None)`` for the parts in ``parts_folder``.

    The transform is fitted in one streamed pass over the parts
    (:meth:`~msnoop.vectors.postprocess.PostProcessor.fit_batches`; standardisation keeps float64 sums, memory
    ``O(D)``). Parts without rows, and ``"raw"``, give ``{"method": "raw"}`` and no transform.

    Raises:
        ValueError: ``method`` is not a label-free post-processing.
    """
    if method not in POSTPROCESS_CHOICES:
        raise ValueError(f"unknown post-processing {method!r}; expected one of {', '.join(POSTPROCESS_CHOICES)}")
    if method == "raw":
        return {**info, "postprocess": {"method": "raw"}}, None
    columns = emb_columns(int(info["embed_dim"]))
    blocks = (
        np.column_stack([c.to_numpy(zero_copy_only=False) for c in batch.columns]).astype(np.float64)
        for batch in iter_batches(parts_folder, columns=columns, storage=run.storage)
    )
    proc = create_postprocessor(method).fit_batches(blocks)
    if proc.n == 0:
        return {**info, "postprocess": {"method": "raw"}}, None
    return {**info, "postprocess": proc.to_dict()}, proc.transform


#: The tables a profile job writes, in the order they are published (the last is what ``msnoop search OUT`` opens).
PROFILE_LEVELS = ("profiles", "treatments")


def publish_profiles(run: RunDir, record: dict[str, Any]) -> list[str]:
    """LanceDB tables ``profiles`` and ``treatments`` in the run's database from a profile job's Parquet files.

    Reads the run's ``profiles.parquet`` and, when present, ``treatments.parquet`` (the source of truth), writes
    one table per file with the correction ``record`` in its schema metadata, and adds the database and the
    tables to the run's record (``run.json``).

    Returns:
        The table names written.

    Raises:
        FileNotFoundError: ``profiles.parquet`` is missing.
    """
    from msnoop.core.tables import feature_columns, read_table

    uri = str(Path(run.lancedb_uri()).resolve())
    names = []
    for name, path in zip(PROFILE_LEVELS, (run.profiles, run.treatments), strict=True):
        if name != "profiles" and not path.is_file():
            continue
        frame = read_table(path)
        build_frame_table(
            uri, name, frame, feature_columns(frame), info={"kind": "profiles", "level": name, "correction": record}
        )
        names.append(name)
    info = run.read_info() if run.exists() else {"job": "profile"}
    run.write_info({**info, "lancedb": uri, "table": names[-1], "tables": names})
    return names
