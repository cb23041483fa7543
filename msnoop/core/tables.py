"""Feature tables: one row per profile, ``Metadata_*`` columns plus numeric feature columns.

This is the table convention used everywhere in msnoop. Metadata columns start with ``Metadata_``;
every other numeric column is a feature (msnoop embeddings are ``emb_0000``, ``emb_0001``, ...;
CellProfiler profiles have names such as ``Cells_AreaShape_Area``). Boolean columns are not features.

``read_table`` loads Parquet and CSV files and every folder msnoop writes (:func:`resolve_table`): an output folder
(an embed run's image-level parts, a profile run's treatment table, a screen's wells), a parts folder (``embeddings/``,
``cells/``), a LanceDB database (``lancedb/``) or one of its tables (``<name>.lance``). Other file formats are added
by registering a loader in :data:`TABLE_READERS`; any other suffix raises a ``ValueError`` that lists what is
supported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from msnoop.core.rundir import RunDir

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


@dataclass(frozen=True)
class TableSource:
    """What a path given as a table stands for (:func:`resolve_table`).

    Attributes:
        location: What is read: a table file, a folder of Parquet parts, or a LanceDB table folder (``.lance``);
            a local :class:`~pathlib.Path` or an object storage URI.
        kind: ``"file"``, ``"parts"`` or ``"lance"``.
        run: The output folder the table belongs to (its ``run.json`` records how it was made), or None.
    """

    location: str | Path
    kind: Literal["file", "parts", "lance"]
    run: RunDir | None = None

    @property
    def job(self) -> str | None:
        """The ``job`` of :attr:`run`'s record (``embed``, ``profile``, ...), or None."""
        if self.run is None:
            return None
        try:
            return self.run.read_info().get("job") or "embed"
        except (OSError, ValueError):
            return None


def _run_of(folder: Path) -> RunDir | None:
    from msnoop.core.rundir import RunDir

    run = RunDir(folder)
    return run if run.exists() else None


def _database_table(db: Path) -> Path:
    """The table of a LanceDB database folder: the one its run recorded, else its only table."""
    tables = sorted(p for p in db.iterdir() if p.is_dir() and p.suffix == ".lance")
    run = _run_of(db.parent)
    recorded = (run.read_info().get("table") if run is not None else None) or None
    if recorded and (db / f"{recorded}.lance").is_dir():
        return db / f"{recorded}.lance"
    if len(tables) == 1:
        return tables[0]
    names = ", ".join(t.name for t in tables) or "none"
    raise ValueError(f"{db} is a LanceDB database with tables {names}: give one of them, e.g. {db / 'NAME.lance'}")


def resolve_table(path: str | Path) -> TableSource:
    """What a table argument stands for: a file as it is, or the table inside a folder msnoop wrote.

    * an output folder (``run.json``): an embed run's image-level parts (``embeddings/``), a profile run's
      ``treatments.parquet`` (else ``profiles.parquet``);
    * a folder of Parquet parts (``embeddings/``, ``cells/``);
    * a screen's output folder: ``wells.parquet``;
    * a LanceDB database folder (``lancedb/``): the table its run recorded, or its only table;
    * a LanceDB table folder (``<name>.lance``);
    * an object storage URI of an output folder or of a table file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A folder that holds none of these (or several tables: the message lists them).
    """
    from msnoop.core import storage
    from msnoop.core.rundir import RunDir

    if storage.is_uri(path):
        run = RunDir(path)
        if run.exists():
            return TableSource(str(run.embeddings), "parts", run)
        if _suffix_key(Path(str(path).rstrip("/").rsplit("/", 1)[-1])) is None:
            raise FileNotFoundError(
                f"{path} is not an msnoop output folder (no {RunDir.RUN_FILE} there) nor a table file "
                f"(expected one of the suffixes {sorted(TABLE_READERS)})"
            )
        return TableSource(str(path), "file")
    path = storage.local_path(path)
    if not path.exists():
        raise FileNotFoundError(f"table {path} does not exist")
    if path.is_file():
        return TableSource(path, "file", _run_of(path.parent))
    if path.suffix == ".lance":
        return TableSource(path, "lance", _run_of(path.parent.parent))
    run = _run_of(path)
    if run is not None:
        if run.read_info().get("job") == "profile":
            table = run.treatments if run.treatments.is_file() else run.profiles
            if not table.is_file():
                raise ValueError(f"profile output folder {path} has no {RunDir.PROFILES} yet: the run did not finish")
            return TableSource(table, "file", run)
        return TableSource(run.embeddings, "parts", run)
    if any(path.glob("part-*.parquet")):
        return TableSource(path, "parts", _run_of(path.parent))
    if (path / RunDir.WELLS).is_file():
        return TableSource(path / RunDir.WELLS, "file")
    if any(p.suffix == ".lance" for p in path.iterdir()):
        db_table = _database_table(path)
        return TableSource(db_table, "lance", _run_of(path.parent))
    runs = sorted(p.parent.name for p in path.glob(f"{RunDir.EMBEDDINGS}/*/{RunDir.RUN_FILE}"))
    if runs:
        raise ValueError(
            f"{path} holds one embedding run per model ({', '.join(runs)}): give one, e.g. "
            f"{path / RunDir.EMBEDDINGS / runs[0]}"
        )
    raise ValueError(
        f"cannot read a table from folder {path}: expected an msnoop output folder ({RunDir.RUN_FILE}), a folder of "
        "part-*.parquet files, a LanceDB database or table (.lance), or a file with one of the suffixes "
        f"{sorted(TABLE_READERS)}"
    )


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
    """Read a feature table: a ``.parquet``/``.pq``, ``.csv`` or ``.csv.gz`` file, or any folder msnoop writes.

    Args:
        path: A table file (a Parquet dataset folder ending in ``.parquet`` also works), or a folder that
            :func:`resolve_table` understands (an output folder, a parts folder, a LanceDB database or table):
            a local path or an object storage URI of an output folder or a table file (``s3://bucket/run1``,
            ``s3://bucket/profiles.parquet``; endpoint and credentials from the environment, see
            :mod:`msnoop.core.storage`).

    Returns:
        The table as a DataFrame; a LanceDB table's ``vector`` column comes back as ``emb_*`` columns.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the suffix has no registered loader, the folder holds no table, or a parts folder is empty.
    """
    from msnoop.core import parts, storage

    source = resolve_table(path)
    if source.kind == "parts":
        if source.run is not None:
            source.run.check_complete("read")  # never a partial snapshot of a folder being written or unfinished
        df = parts.read_frame(source.location, storage=source.run.storage if source.run is not None else None)
        if df.empty:
            raise ValueError(f"{path} has no embeddings yet (no parts in {source.location})")
        return df
    if source.kind == "lance":
        return _read_lance(Path(source.location))
    if storage.is_uri(source.location):
        return _read_uri_table(str(source.location), str(_suffix_key(Path(str(source.location).rsplit("/", 1)[-1]))))
    path = Path(source.location)
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
