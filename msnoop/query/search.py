"""Similarity search over an embedding table: by image id or by a new image.

A *table reference* is a job output folder (with ``run.json`` and its embedded LanceDB), or a LanceDB
URI together with a table name. Vectors are compared by cosine distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msnoop.core import storage as st
from msnoop.core.filters import table_filter_error
from msnoop.core.parts import ID_COLUMN
from msnoop.core.rundir import RunDir
from msnoop.core.storage import StorageConfig
from msnoop.io.readers import check_image, read_image
from msnoop.models.loading import load_recorded
from msnoop.store.lance import VECTOR, open_table, table_info
from msnoop.vectors.postprocess import load_postprocessor


@dataclass
class TableRef:
    """An open LanceDB table with what it records about itself.

    Attributes:
        table: The LanceDB table.
        info: Its ``msnoop`` schema metadata (model, preprocessing, channels, post-processing).
        uri: The LanceDB database.
        name: The table's name.
    """

    table: Any
    info: dict[str, Any]
    uri: str
    name: str


def open_results(
    target: str | Path, table: str | None = None, *, storage: StorageConfig | None = None, complete: bool = True
) -> TableRef:
    """Open the LanceDB table of a job output folder, or ``table`` in the LanceDB at ``target``.

    ``target`` may be a local folder or an object storage URI (``s3://bucket/run1``): ``run.json`` is read
    through :mod:`msnoop.core.storage` and LanceDB is connected with the same endpoint settings (``storage``,
    default the environment: ``AWS_ENDPOINT_URL``...; credentials from the environment). With ``complete``
    (default) an output folder that is being written or was left unfinished is refused
    (:meth:`msnoop.core.rundir.RunDir.check_complete`) instead of searched as a partial snapshot.

    Raises:
        ValueError: ``target`` is not an output folder and no ``table`` is given, or its table is not written yet.
        RunStateError: The folder is being written by another process or was left unfinished (``complete``).
        KeyError: The LanceDB has no such table.
    """
    run = RunDir(target, storage)
    try:
        is_run = run.exists()
    except st.StorageError:  # a LanceDB-only scheme (db://, LanceDB Cloud): not a folder msnoop reads itself
        is_run = False
    if not is_run:
        inside = _inside_output(target, table)
        if inside is None and table is None:
            raise ValueError(
                f"{target} is not an msnoop output folder (no {RunDir.RUN_FILE}) nor a LanceDB table (.lance); give "
                "an output folder, or a LanceDB URI with --table NAME"
            )
        if inside is not None and complete and RunDir(Path(target).parent).exists():
            RunDir(Path(target).parent).check_complete("search")  # a folder inside an output folder
        uri, name = inside or (str(target), str(table))
        try:
            tbl = open_table(uri, name, storage_options=st.storage_options(uri, storage) or None)
        except KeyError:
            raise ValueError(f"{target}: LanceDB {uri} has no table {name!r}") from None
        return TableRef(table=tbl, info=table_info(tbl), uri=uri, name=name)
    if complete:
        run.check_complete("search")
    info = run.read_info()
    uri, name = run.recorded_lancedb_uri(info), table or info.get("table")
    try:
        if name is None:
            raise KeyError(name)
        tbl = open_table(uri, name, storage_options=st.storage_options(uri, storage) or None)
    except KeyError:
        verb = info.get("job") or "embed"
        raise ValueError(
            f"{target}: the LanceDB table {name!r} has not been written yet (the {verb} run that writes it did "
            f"not finish, or ran with output.write_lance: false). Re-run `msnoop {verb} {run.config_file}` to finish "
            "it" + (": images already embedded are kept and skipped" if verb == "embed" else "")
        ) from None
    return TableRef(table=tbl, info=table_info(tbl), uri=uri, name=name)


def _inside_output(target: str | Path, table: str | None) -> tuple[str, str] | None:
    """``(LanceDB URI, table name)`` of a local folder that stands for a LanceDB table: a ``.lance`` folder, or a
    folder inside an output folder: ``embeddings/`` (the run's table), ``cells/`` (``<table>_cells``),
    ``lancedb/`` (the run's table). None otherwise."""
    if st.is_uri(target):
        return None
    path = st.local_path(target)
    if path.suffix == ".lance" and path.is_dir():
        return str(path.parent), table or path.stem
    parent = RunDir(path.parent)
    if path.name not in (RunDir.EMBEDDINGS, RunDir.CELLS, RunDir.LANCEDB) or not parent.exists():
        return None
    info = parent.read_info()
    name = table or info.get("table")
    if not name:
        return None
    if path.name == RunDir.CELLS and table is None:
        name = f"{name}_cells"
    return parent.recorded_lancedb_uri(info), str(name)


def _vector_of(ref: TableRef, image_id: str) -> np.ndarray:
    quoted = image_id.replace("'", "''")
    rows = ref.table.search().where(f"{ID_COLUMN} = '{quoted}'").select([VECTOR]).limit(1).to_arrow()
    if rows.num_rows == 0:
        raise KeyError(f"no image with {ID_COLUMN} = {image_id!r} in table {ref.name!r} ({ref.uri})")
    return np.asarray(rows.column(VECTOR)[0].as_py(), dtype=np.float32)


def search_by_id(
    ref: TableRef, image_id: str, *, k: int = 10, where: str | None = None, exact: bool | None = None
) -> pd.DataFrame:
    """Nearest neighbours of an image already in the table (the image itself excluded).

    Large tables with a vector index are searched through it (see :mod:`msnoop.store.index`); small
    tables, and filters that match few rows, are searched exactly. ``exact`` forces either way.
    """
    from msnoop.query.ann import search_vector_ann

    return search_vector_ann(ref, _vector_of(ref, image_id), k=k, where=where, exclude_id=image_id, exact=exact)


def search_by_match(
    ref: TableRef, match: str, *, k: int = 10, where: str | None = None, exact: bool | None = None
) -> pd.DataFrame:
    """Nearest rows to the mean vector of the rows that ``match`` selects, those rows left out.

    The query for a treatment (``"Metadata_Compound = 'taxol'"``) in a profiles table, for a well in an
    image table, or for any group. ``df.attrs["query_rows"]`` is the number of rows averaged.

    Raises:
        KeyError: ``match`` selects no row.
        ValueError: ``match`` is not a valid filter.
    """
    from msnoop.query.ann import search_vector_ann

    try:
        rows = ref.table.search().where(match).select([VECTOR]).limit(None).to_arrow()
    except Exception as exc:  # LanceDB raises several types for a bad SQL filter
        raise table_filter_error(match, ref.table.schema, exc, what="--match") from None
    if rows.num_rows == 0:
        raise KeyError(f"no row of table {ref.name!r} ({ref.uri}) matches {match!r}")
    query = np.asarray(rows.column(VECTOR).to_pylist(), dtype=np.float32).mean(axis=0)
    rest = f"NOT ({match})" + (f" AND ({where})" if where else "")
    hits = search_vector_ann(ref, query, k=k, where=rest, exact=exact)
    hits.attrs["query_rows"] = rows.num_rows
    return hits


def embed_query(ref: TableRef, paths: list[str | Path]) -> np.ndarray:
    """Embed a new image (one file per channel, in the table's channel order) with the table's model.

    The vector gets the table's post-processing (``info["postprocess"]``, e.g. the stored standardisation).

    Raises:
        ValueError: Wrong number of channel files.
        CheckpointError: The table's checkpoint is gone or has changed since the table was built.
    """
    from msnoop.embed.embedder import Embedder

    info = ref.info
    channels = info.get("channels", [])
    if len(paths) != len(channels):
        raise ValueError(
            f"table {ref.name!r} has channels {channels}: give one --image per channel in that order, found {len(paths)}"
        )
    model = load_recorded(info, what=f"table {ref.name!r}")
    images = []
    for p in paths:
        img = read_image(p)
        check_image(img, p)
        images.append(img)
    vector = Embedder(model).embed_images([images])[0]
    # the table stores post-processed vectors (its fitted transform is in its metadata): transform the query alike
    return load_postprocessor(info.get("postprocess")).transform(vector[None])[0]


def search_image(
    ref: TableRef, paths: list[str | Path], *, k: int = 10, where: str | None = None, exact: bool | None = None
) -> pd.DataFrame:
    """Nearest neighbours of a new image embedded with the table's model (see :func:`embed_query`)."""
    from msnoop.query.ann import search_vector_ann

    return search_vector_ann(ref, embed_query(ref, paths), k=k, where=where, exact=exact)
