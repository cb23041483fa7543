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
from msnoop.core.parts import ID_COLUMN, RUN_FILE
from msnoop.core.storage import StorageConfig
from msnoop.io.readers import check_image, read_image
from msnoop.models.checkpoint import CheckpointError, resolve_model
from msnoop.preprocess.presets import Preprocessing
from msnoop.store.lance import VECTOR, open_table, table_info


@dataclass
class TableRef:
    table: Any
    info: dict[str, Any]
    uri: str
    name: str


def open_results(target: str | Path, table: str | None = None, *, storage: StorageConfig | None = None) -> TableRef:
    """Open the LanceDB table of a job output folder, or ``table`` in the LanceDB at ``target``.

    ``target`` may be a local folder or an object storage URI (``s3://bucket/run1``): ``run.json`` is read
    through :mod:`msnoop.core.storage` and LanceDB is connected with the same endpoint settings (``storage``,
    default the environment: ``AWS_ENDPOINT_URL``...; credentials from the environment).

    Raises:
        ValueError: ``target`` is not an output folder and no ``table`` is given, or its table is not written yet.
        KeyError: The LanceDB has no such table.
    """
    import json

    run_dir: str | Path | None = None
    run_file = st.join(target, RUN_FILE)
    try:
        is_run = st.exists(run_file, storage)
    except st.StorageError:  # a LanceDB-only scheme (db://, LanceDB Cloud): not a folder msnoop reads itself
        is_run = False
    if is_run:
        run = json.loads(st.read_text(run_file, storage))
        uri, name = run["lancedb"], table or run["table"]
        if not st.is_uri(uri) and not Path(uri).is_absolute() and not Path(uri).exists():
            uri = str(st.join(target, "lancedb"))
        run_dir = target
    else:
        if table is None:
            raise ValueError(
                f"{target} is not an msnoop output folder (no {RUN_FILE}); give a LanceDB URI with --table NAME"
            )
        uri, name = str(target), table
    options = st.storage_options(uri, storage) or None
    if run_dir is not None:
        try:
            tbl = open_table(uri, name, storage_options=options)
        except KeyError:
            raise ValueError(
                f"{target}: the LanceDB table {name!r} has not been written yet (the embed run that writes it did "
                f"not finish, or ran with output.write_lance: false). Re-run `msnoop embed "
                f"{st.join(run_dir, 'resolved_config.yaml')}` to finish it: images already embedded are kept and skipped"
            ) from None
        return TableRef(table=tbl, info=table_info(tbl), uri=uri, name=name)
    tbl = open_table(uri, name, storage_options=options)
    return TableRef(table=tbl, info=table_info(tbl), uri=uri, name=name)


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
        raise ValueError(f"--match {match!r} is not a valid filter on table {ref.name!r}: {exc}") from exc
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
    spec = Preprocessing(**info["preprocess"])
    model = resolve_model(info["model"], preprocess=spec)
    if info.get("model_sha256") and model.sha256 != info["model_sha256"]:
        raise CheckpointError(
            f"the checkpoint {model.source} has changed since table {ref.name!r} was built "
            f"(sha256 {model.sha256[:12] if model.sha256 else None} != {info['model_sha256'][:12]}); re-embed the table"
        )
    model.preprocess = spec
    images = []
    for p in paths:
        img = read_image(p)
        check_image(img, p)
        images.append(img)
    vector = Embedder(model).embed_images([images])[0]
    post = info.get("postprocess") or {"method": "raw"}
    if post.get("method") == "standardize":  # the table stores standardised vectors: transform the query alike
        from msnoop.correct.normalize import Standardizer

        vector = Standardizer.from_dict(post).transform(vector[None])[0]
    return vector


def search_image(
    ref: TableRef, paths: list[str | Path], *, k: int = 10, where: str | None = None, exact: bool | None = None
) -> pd.DataFrame:
    """Nearest neighbours of a new image embedded with the table's model (see :func:`embed_query`)."""
    from msnoop.query.ann import search_vector_ann

    return search_vector_ann(ref, embed_query(ref, paths), k=k, where=where, exact=exact)
