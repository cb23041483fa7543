"""AnnData (``.h5ad``) export of an embedding or profile table, for scanpy and the scverse ecosystem.

``obs`` holds the ``Metadata_*`` columns exactly as stored (values and types; strings stay strings), indexed by
``Metadata_ImageID`` (or ``Metadata_CellID`` per image for cell tables, else the row number); ``X`` is the
``(N, D)`` float32 matrix of the feature columns as stored (``emb_0000 ...`` for msnoop embeddings: Microsnoop's
raw readout), with the feature names as ``var`` index; ``obsm["X_msnoop"]`` is the same ``(N, D)`` matrix after
the post-processing msnoop compares vectors with (the table's own, :func:`msnoop.vectors.postprocess.table_postprocess`:
standardised for an embed output, as stored for sphered profiles), so ``scanpy.pp.neighbors(adata,
use_rep="X_msnoop")`` finds the neighbours ``msnoop knn`` and ``search`` find; ``uns["msnoop"]`` holds the
provenance (model, its sha256, preprocessing, channels) from the output folder's ``run.json`` or the Parquet files'
key-value metadata, as a JSON string (h5ad stores no ``None``) plus the flat fields ``model``, ``model_sha256``,
``channels`` and ``postprocess`` (the JSON record of what ``X_msnoop`` is).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from msnoop.core import parts
from msnoop.core.tables import metadata_columns, read_table, resolve_table, split_table
from msnoop.vectors.postprocess import postprocess, table_postprocess

#: Key of the provenance record in ``adata.uns``.
UNS_KEY = "msnoop"


#: Key of the post-processed vectors in ``adata.obsm`` (``scanpy.pp.neighbors(adata, use_rep=OBSM_KEY)``).
OBSM_KEY = "X_msnoop"


def _provenance(table: Path) -> dict[str, Any]:
    source = resolve_table(table)
    if source.kind == "parts" and source.run is not None:
        return source.run.read_info()
    if source.kind == "parts":
        files = parts.part_files(source.location)
        return parts.read_part_provenance(files[0]) if files else {}
    path = Path(source.location)
    if path.is_file() and path.suffix in (".parquet", ".pq"):
        return parts.read_part_provenance(path)
    return {}


def _obs_index(meta: pd.DataFrame) -> pd.Index:
    if "Metadata_ImageID" in meta.columns:
        ids = meta["Metadata_ImageID"].astype(str)
        if "Metadata_CellID" in meta.columns:
            ids = ids + "/cell" + meta["Metadata_CellID"].astype(str)
        if ids.is_unique:
            return pd.Index(ids.to_numpy(), name="obs_id")
    return pd.Index([str(i) for i in range(len(meta))], name="obs_id")


def to_anndata(table: str | Path, path: str | Path | None = None) -> Any:
    """Read an embedding/profile table into an ``anndata.AnnData``; write it as ``.h5ad`` when ``path`` is given.

    Args:
        table: An ``msnoop embed`` output folder, a ``profile`` output's Parquet file, any Parquet/CSV table with
            ``Metadata_*`` columns, or a LanceDB ``<name>.lance`` folder.
        path: Where to write the ``.h5ad`` file (folders are created); None writes nothing.

    Returns:
        ``AnnData`` with ``X`` ``(N, D)`` float32 (the features as stored), ``obsm["X_msnoop"]`` ``(N, D)`` float32
        (after the table's post-processing), ``obs`` (``N`` rows: the metadata), ``var`` (``D`` feature names) and
        ``uns["msnoop"]`` (provenance and the post-processing record; see the module docstring).

    Raises:
        FileNotFoundError: ``table`` does not exist.
        ValueError: The table has no numeric feature columns, has non-finite values where the post-processing
            needs finite ones, or ``path`` does not end in ``.h5ad``.
    """
    import anndata as ad

    table = Path(table)
    df = read_table(table)
    meta, X = split_table(df)
    obs = meta[metadata_columns(meta)].copy()
    obs.index = _obs_index(obs)
    features = [c for c in df.columns if c not in meta.columns]
    compared, record = postprocess(X, table_postprocess(table))
    adata = ad.AnnData(X=np.ascontiguousarray(X, dtype=np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(features)))
    adata.obsm[OBSM_KEY] = np.ascontiguousarray(compared, dtype=np.float32)
    prov = _provenance(table)
    adata.uns[UNS_KEY] = {
        "json": json.dumps(prov, default=str),
        "model": str(prov.get("model", "")),
        "model_sha256": str(prov.get("model_sha256") or ""),
        "channels": [str(c) for c in prov.get("channels", [])],
        "postprocess": json.dumps(record, default=str),
        "source": str(table.resolve()),
    }
    if path is not None:
        path = Path(path)
        if path.suffix != ".h5ad":
            raise ValueError(f"AnnData export {path}: expected a .h5ad file name, found {path.suffix or 'no suffix'!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(path)
    return adata


__all__ = ["OBSM_KEY", "UNS_KEY", "to_anndata"]
