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

Metadata types map to what h5ad stores and reads back (:func:`obs_column`): text -> strings (categoricals where
some are blank: blanks stay missing), booleans and integers -> pandas' nullable ``boolean`` / ``Int64``... (blanks stay missing
instead of turning the column into objects or floats), floats -> floats (blanks NaN), dictionary columns ->
categoricals. Any other type (dates, times, lists, structs, binary, decimals) is refused in one line naming the
column, before anything is written. The ``.h5ad`` file is written to a temporary name and renamed: it is
complete or absent.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from msnoop.core import parts
from msnoop.core import storage as st
from msnoop.core.rundir import RunDir
from msnoop.core.tables import metadata_columns, read_table, resolve_table, split_table
from msnoop.vectors.postprocess import postprocess, table_postprocess

logger = logging.getLogger(__name__)

#: Key of the provenance record in ``adata.uns``.
UNS_KEY = "msnoop"

_NULLABLE_INTS = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.uint8(): pd.UInt8Dtype(),
    pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(),
    pa.uint64(): pd.UInt64Dtype(),
}

#: Key of the post-processed vectors in ``adata.obsm`` (``scanpy.pp.neighbors(adata, use_rep=OBSM_KEY)``).
OBSM_KEY = "X_msnoop"


def _provenance(table: str | Path) -> dict[str, Any]:
    source = resolve_table(table)
    if source.kind == "parts" and source.run is not None:
        return source.run.read_info()
    if source.kind == "parts":
        files = parts.part_files(source.location)
        return parts.read_part_provenance(files[0]) if files else {}
    if not st.is_uri(source.location) and Path(source.location).suffix in (".parquet", ".pq"):
        return parts.read_part_provenance(source.location)
    return {}


def _obs_index(meta: pd.DataFrame, table: str | Path, is_run: bool) -> pd.Index:
    """Row names: the image (and cell) ids; row numbers for tables without unique ids, said in the log.

    Raises:
        ValueError: An embed output folder holds an id twice (it would need repairing, never renaming).
    """
    if "Metadata_ImageID" in meta.columns:
        ids = meta["Metadata_ImageID"].astype(str)
        if "Metadata_CellID" in meta.columns:
            ids = ids + "/cell" + meta["Metadata_CellID"].astype(str)
        if ids.is_unique:
            return pd.Index(ids.to_numpy(), name="obs_id")
        repeated = ids[ids.duplicated()]
        if is_run:
            raise ValueError(
                f"{table} holds {len(repeated)} repeated image id(s) (e.g. {repeated.iloc[0]!r}); re-run its "
                "`msnoop embed` job to repair the folder (one row per id is kept) before exporting"
            )
        logger.warning(
            "%s: Metadata_ImageID repeats (e.g. %r): obs rows are named by row number", table, repeated.iloc[0]
        )
    return pd.Index([str(i) for i in range(len(meta))], name="obs_id")


def obs_column(name: str, values: pa.Array | pa.ChunkedArray, source: str | Path = "the table") -> Any:
    """One metadata column as the pandas array AnnData writes to ``.h5ad`` and reads back with the same values.

    Args:
        name: The column's name (messages).
        values: Its values with their Arrow type.
        source: The table (messages).

    Returns:
        A pandas extension array (strings, nullable booleans/integers, categoricals) or a float NumPy array.

    Raises:
        ValueError: The type has no ``.h5ad`` form (dates, times, lists, structs, binary, decimals); one line
            naming the column, its type and what to do.
    """
    typ = values.type
    if pa.types.is_dictionary(typ) and (pa.types.is_string(typ.value_type) or pa.types.is_large_string(typ.value_type)):
        return pd.Categorical(values.to_pylist())
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ):
        text = values.to_pylist()
        if any(v is None for v in text):  # h5ad stores missing text in categoricals (and repeated text anyway)
            return pd.Categorical(text)
        return np.array(text, dtype=object)
    if pa.types.is_boolean(typ):
        return pd.array(values.to_pylist(), dtype=pd.BooleanDtype())
    if typ in _NULLABLE_INTS:
        return pd.array(values.to_pylist(), dtype=_NULLABLE_INTS[typ])
    if pa.types.is_floating(typ):
        return values.to_numpy(zero_copy_only=False)
    raise ValueError(
        f"{source}: metadata column {name!r} has type {typ}, which an .h5ad file cannot store; "
        "cast it to text or a number in the table first"
    )


def _is_run(table: str | Path) -> bool:
    try:
        return RunDir(table).exists()
    except (OSError, ValueError):
        return False


def _metadata_arrow(table: str | Path, df: pd.DataFrame, columns: list[str]) -> pa.Table:
    """The metadata columns with their stored Arrow types (Parquet parts and files), in ``df``'s row order."""
    source = resolve_table(table)
    if source.kind == "parts":
        files = parts.part_files(source.location)
        if files:
            fs, _ = st.resolve(files[0])
            import pyarrow.dataset as pads

            return pads.dataset([st.resolve(f)[1] for f in files], format="parquet", filesystem=fs).to_table(
                columns=columns
            )
    name = str(source.location).lower().rstrip("/")
    if source.kind == "file" and name.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        fs, path = st.resolve(source.location)
        return pq.read_table(path, filesystem=fs, columns=columns)
    arrays = {}
    for c in columns:
        try:
            arrays[c] = pa.array(df[c], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"{table}: metadata column {c!r} mixes values of several types ({' '.join(str(exc).split())[:120]}); "
                "an .h5ad file stores one type per column"
            ) from None
    return pa.table(arrays) if arrays else pa.table({"_": pa.nulls(len(df))}).drop_columns(["_"])


def to_anndata(table: str | Path, path: str | Path | None = None) -> Any:
    """Read an embedding/profile table into an ``anndata.AnnData``; write it as ``.h5ad`` when ``path`` is given.

    Args:
        table: An ``msnoop embed`` output folder, a ``profile`` output's Parquet file, any Parquet/CSV table with
            ``Metadata_*`` columns, or a LanceDB ``<name>.lance`` folder; a local path or an object storage URI.
        path: Where to write the ``.h5ad`` file (a local path or a URI; folders are created); None writes
            nothing. The file is complete or absent.

    Returns:
        ``AnnData`` with ``X`` ``(N, D)`` float32 (the features as stored), ``obsm["X_msnoop"]`` ``(N, D)`` float32
        (after the table's post-processing), ``obs`` (``N`` rows: the metadata), ``var`` (``D`` feature names) and
        ``uns["msnoop"]`` (provenance and the post-processing record; see the module docstring); ``obs`` types as
        in :func:`obs_column`.

    Raises:
        FileNotFoundError: ``table`` does not exist.
        ValueError: The table has no numeric feature columns, has non-finite values where the post-processing
            needs finite ones, a metadata column's type has no ``.h5ad`` form, ``path`` does not end in ``.h5ad``,
            or the output folder is unfinished or being written (:meth:`msnoop.core.rundir.RunDir.check_complete`).
    """
    import anndata as ad

    if path is not None and not str(path).endswith(".h5ad"):
        suffix = Path(str(path)).suffix
        raise ValueError(f"AnnData export {path}: expected a .h5ad file name, found {suffix or 'no suffix'!r}")
    df = read_table(table)
    meta, X = split_table(df)
    names = metadata_columns(meta)
    arrow = _metadata_arrow(table, df, names)
    obs = pd.DataFrame({c: obs_column(c, arrow.column(c), table) for c in names})
    obs.index = _obs_index(obs, table, _is_run(table))
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
        "source": str(table) if st.is_uri(table) else str(Path(table).resolve()),
    }
    if path is not None:
        with st.atomic_path(path) as tmp:
            adata.write_h5ad(tmp)
    return adata


__all__ = ["OBSM_KEY", "UNS_KEY", "obs_column", "to_anndata"]
