"""Feature tables: one row per profile, ``Metadata_*`` columns plus numeric feature columns.

This is the table convention used everywhere in msnoop. Metadata columns start with ``Metadata_``;
every other numeric column is a feature (msnoop embeddings are ``emb_0000``, ``emb_0001``, ...;
CellProfiler profiles have names such as ``Cells_AreaShape_Area``). Boolean columns are not features.

``read_table`` loads Parquet and CSV, an ``msnoop embed`` output folder and a LanceDB table folder. Other formats (LanceDB tables) are added by registering a loader
in :data:`TABLE_READERS`; any other suffix raises a ``ValueError`` that lists what is supported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

METADATA_PREFIX = "Metadata_"
#: Column of a LanceDB table that holds the feature vector (fixed-size list of float32).
VECTOR = "vector"


def _read_parquet(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path)


#: Suffix (lower case, as ``"".join(path.suffixes[-n:])``) -> loader. Longest suffix wins.
#: Hook for other backends: ``TABLE_READERS[".lance"] = my_loader``.
TABLE_READERS: dict[str, Callable[[Path], pd.DataFrame]] = {
    ".parquet": _read_parquet,
    ".pq": _read_parquet,
    ".csv": _read_csv,
    ".csv.gz": _read_csv,
}


def _read_msnoop_output(path: str | Path) -> pd.DataFrame:
    """An ``msnoop embed`` output folder (a path or a URI): its Parquet parts (the source of truth)."""
    from msnoop.core import parts
    from msnoop.core.rundir import RunDir

    run = RunDir(path)
    run.check_complete("read")  # never a partial snapshot of a folder being written or left unfinished
    folder = run.embeddings
    df = parts.read_frame(folder)
    if df.empty:
        raise ValueError(f"msnoop output folder {path} has no embeddings yet (no parts in {folder})")
    return df


def _read_lance(path: Path) -> pd.DataFrame:
    """A LanceDB table folder ``<uri>/<name>.lance``: the ``vector`` column is expanded to ``emb_*``."""
    import lancedb

    db = lancedb.connect(str(path.parent))
    try:
        table = db.open_table(path.stem).to_arrow()
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"cannot open LanceDB table {path.stem!r} in {path.parent}: {exc}") from None
    meta = table.drop_columns([VECTOR]).to_pandas()
    vectors = np.asarray(table.column(VECTOR).combine_chunks().flatten()).reshape(table.num_rows, -1)
    emb = pd.DataFrame(vectors, columns=[f"emb_{i:04d}" for i in range(vectors.shape[1])])
    return pd.concat([meta, emb], axis=1)


def _read_uri_table(uri: str, key: str) -> pd.DataFrame:
    """A Parquet or CSV table on object storage (endpoint and credentials from the environment)."""
    import io

    from msnoop.core import storage

    if not storage.exists(uri):
        raise FileNotFoundError(f"table {uri} does not exist")
    if key in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        fs, path = storage.resolve(uri)
        return pq.read_table(path, filesystem=fs).to_pandas()
    return pd.read_csv(io.BytesIO(storage.read_bytes(uri)), compression="gzip" if key.endswith(".gz") else None)


def metadata_columns(df: pd.DataFrame) -> list[str]:
    """Columns whose name starts with ``Metadata_``, in table order."""
    return [str(c) for c in df.columns if str(c).startswith(METADATA_PREFIX)]


def feature_columns(df: pd.DataFrame) -> list[str]:
    """Feature columns: numeric (not boolean) columns that do not start with ``Metadata_``.

    Non-numeric columns without the ``Metadata_`` prefix are not features; they are listed in a
    logged warning because they usually mean a metadata column was misnamed.

    Args:
        df: A feature table.

    Returns:
        Feature column names in table order.
    """
    features: list[str] = []
    ignored: list[str] = []
    for col in df.columns:
        name = str(col)
        if name.startswith(METADATA_PREFIX):
            continue
        dtype = df[col].dtype
        if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
            features.append(name)
        else:
            ignored.append(name)
    if ignored:
        logger.warning(
            "ignoring %d non-numeric column(s) without the %r prefix (not features): %s",
            len(ignored),
            METADATA_PREFIX,
            ", ".join(ignored[:10]) + (" ..." if len(ignored) > 10 else ""),
        )
    return features


def split_table(df: pd.DataFrame, features: Sequence[str] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Split a feature table into its metadata and its feature matrix.

    Args:
        df: A feature table with ``N`` rows.
        features: Feature columns to use; default :func:`feature_columns`.

    Returns:
        ``(meta, X)``: ``meta`` holds every non-feature column (same index as ``df``), ``X`` is a
        ``[N, D]`` float32 array of the features in the given order.

    Raises:
        ValueError: If the table has no feature columns or a named feature is missing.
    """
    cols = list(features) if features is not None else feature_columns(df)
    if not cols:
        raise ValueError(
            f"expected numeric feature columns (names not starting with {METADATA_PREFIX!r}), found none "
            f"among {list(map(str, df.columns))[:20]}; rename metadata columns with the {METADATA_PREFIX!r} prefix "
            "and make sure features are numeric"
        )
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"feature columns {missing[:10]} are not in the table; available: {list(df.columns)[:20]}")
    X = df[cols].to_numpy(dtype=np.float32)
    meta = df.drop(columns=cols)
    return meta, X


def check_finite(X: np.ndarray, columns: Sequence[str], *, what: str = "features") -> None:
    """Raise if any value of ``X`` is NaN or infinite, naming the offending columns.

    Args:
        X: ``[N, D]`` array.
        columns: ``D`` column names used in the message.
        what: What the matrix holds, for the message.

    Raises:
        ValueError: Listing the columns that hold non-finite values and how many rows are affected.
    """
    bad = ~np.isfinite(X)
    if bad.any():
        col_idx = np.flatnonzero(bad.any(axis=0))
        names = [str(columns[i]) for i in col_idx]
        n_rows = int(bad.any(axis=1).sum())
        raise ValueError(
            f"expected finite {what}, found NaN/inf in {len(names)} column(s) ({n_rows} row(s)): "
            f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}; drop or impute these columns first "
            "(e.g. df.dropna(axis=1))"
        )


def _suffix_key(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    for n in range(len(suffixes), 0, -1):
        key = "".join(suffixes[-n:])
        if key in TABLE_READERS:
            return key
    return None


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a feature table from ``.parquet``/``.pq``, ``.csv`` or ``.csv.gz``.

    Args:
        path: Table file (a Parquet dataset folder ending in ``.parquet`` also works), or an ``msnoop embed``
            output folder: a local path or an object storage URI (``s3://bucket/run1``,
            ``s3://bucket/profiles.parquet``; endpoint and credentials from the environment, see
            :mod:`msnoop.core.storage`).

    Returns:
        The table as a DataFrame.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the suffix has no registered loader.
    """
    from msnoop.core import storage
    from msnoop.core.rundir import RunDir

    if storage.is_uri(path):
        if RunDir(path).exists():
            return _read_msnoop_output(str(path))
        key = _suffix_key(Path(str(path).rstrip("/").rsplit("/", 1)[-1]))
        if key is None:
            raise FileNotFoundError(
                f"{path} is not an msnoop output folder (no {RunDir.RUN_FILE} there) nor a table file "
                f"(expected one of the suffixes {sorted(TABLE_READERS)})"
            )
        return _read_uri_table(str(path), key)
    path = storage.local_path(path)
    if not path.exists():
        raise FileNotFoundError(f"table {path} does not exist")
    if path.is_dir() and RunDir(path).exists():
        return _read_msnoop_output(path)
    if path.is_dir() and path.suffix == ".lance":
        return _read_lance(path)
    key = _suffix_key(path)
    if key is None:
        raise ValueError(
            f"cannot read table {path}: expected one of the suffixes {sorted(TABLE_READERS)}, found "
            f"{''.join(path.suffixes) or 'no suffix'}; convert the table to Parquet or CSV"
        )
    df = TABLE_READERS[key](path).copy()  # consolidate: pandas 3 CSV tables have one block per column
    logger.info("read %s: %d rows x %d columns", path, len(df), df.shape[1])
    return df


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as Parquet (``.parquet``) or CSV (``.csv``/``.csv.gz``), creating parent folders; the file is
    complete or absent (written to a temporary name and renamed).

    Args:
        df: Table to write; the index is not written.
        path: Output file.

    Returns:
        The path written.

    Raises:
        ValueError: If the suffix is neither Parquet nor CSV.
    """
    from msnoop.core import storage

    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".parquet", ".pq", ".csv", ".csv.gz")):
        raise ValueError(f"cannot write {path}: expected a .parquet, .csv or .csv.gz suffix")
    with storage.atomic_path(path) as tmp:  # complete or absent
        if name.endswith((".parquet", ".pq")):
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    return path
