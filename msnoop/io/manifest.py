"""Build the image table of a job: one row per image, one path column per channel, ``Metadata_*``.

The result always has ``Metadata_ImageID`` (unique), one ``Metadata_Path_<channel>`` column per channel
(absolute paths or URIs, in config channel order) and every other manifest column as ``Metadata_<name>``.

Rules that keep every row and its metadata as the user wrote them:

* CSV cells are read as text (``'0001'`` stays ``'0001'``; ``NA``/``null`` are names), blank cells are
  nulls; ``input.dtypes`` converts named columns; Parquet manifests keep their own types.
* Every path is resolved once (:func:`resolve_path`) against the manifest's folder or ``input.root``.
* An id depends on its own row only (:func:`image_id`), so adding rows never changes existing ids.
* Two source columns that would become the same ``Metadata_*`` column are an error naming both.
* :func:`table_schema` fixes one Arrow schema for the whole run from the whole table.
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from msnoop.core import storage as st
from msnoop.core.config import ConfigError
from msnoop.io.config import ID_COLUMN, PATH_PREFIX, InputConfig, path_column
from msnoop.io.readers import COMPOUND_SUFFIXES

logger = logging.getLogger(__name__)


def _read_table(path: Path | str, dtypes: dict[str, str] | None = None, storage: Any = None) -> pd.DataFrame:
    """Read a manifest as written: CSV cells are text (``'0001'`` stays ``'0001'``), blank cells are nulls.

    ``dtypes`` (``input.dtypes``) converts named CSV columns to ``str``/``int``/``float``/``bool`` (pandas
    nullable types, so blanks stay nulls). Parquet manifests keep their own column types.

    Raises:
        ConfigError: Missing file, unknown format, or a value that does not convert to its declared type.
    """
    source: Any = path
    if st.is_uri(path):  # fetched whole (a manifest is small) through the storage layer
        try:
            source = io.BytesIO(st.read_bytes(path, storage))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"manifest {path} cannot be read: {exc}") from None
        path = Path(str(path).rsplit("/", 1)[-1])  # only its suffixes are used below
    elif not path.is_file():
        raise ConfigError(f"manifest {path} does not exist")
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith(".parquet"):
        if dtypes:
            raise ConfigError(
                f"input.dtypes applies to CSV manifests; {path} is Parquet and keeps its own column types"
            )
        return pd.read_parquet(source)
    if not suffixes.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
        raise ConfigError(f"manifest {path}: expected a .csv, .csv.gz or .parquet file, found {path.suffix!r}")
    # keep_default_na=False: 'NA', 'null', 'None' are gene/compound names in real screens; only blanks are missing
    df = pd.read_csv(
        source, dtype=str, keep_default_na=False, na_values=[""], sep="\t" if suffixes.endswith(".tsv") else ","
    )
    df = df.astype(object).where(df.notna(), None)
    for col, kind in (dtypes or {}).items():
        found = (
            col
            if col in df.columns
            else col.removeprefix("Metadata_")
            if col.removeprefix("Metadata_") in df.columns
            else None
        )
        if found is None:
            raise ConfigError(f"input.dtypes names column {col!r}, which manifest {path} does not have")
        try:
            df[found] = _convert(df[found], kind)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"manifest {path}: column {found!r} declared {kind} in input.dtypes: {exc}") from None
    return df


def _convert(values: pd.Series, kind: str) -> pd.Series:
    if kind == "str":
        return values
    if kind == "float":
        return pd.to_numeric(values, errors="raise").astype("Float64")
    if kind == "int":
        num = pd.to_numeric(values, errors="raise")
        if (num.dropna() % 1 != 0).any():
            raise ValueError(f"non-integer value {num.dropna()[num.dropna() % 1 != 0].iloc[0]!r}")
        return num.astype("Int64")
    truth = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    bad = [v for v in values.dropna() if str(v).strip().lower() not in truth]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a boolean (true/false, 1/0, yes/no)")
    return values.map(lambda v: None if v is None else truth[str(v).strip().lower()]).astype("boolean")


def _metadata_name(col: str) -> str:
    return col if col.startswith("Metadata_") else f"Metadata_{col}"


_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def resolve_path(p: object, root: Path | str) -> str | None:
    """One manifest path, resolved once: absolute local path, or a URI kept as written.

    Relative paths are relative to ``root`` (the manifest's folder or ``input.root``); ``~`` is expanded;
    ``file://`` URLs are decoded to local paths; other URLs (``s3://``, ``https://``) are kept as given.
    Empty values give None.
    """
    if p is None or (isinstance(p, float) and np.isnan(p)):
        return None
    s = str(p).strip()
    if not s:
        return None
    if s.lower().startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        u = urlparse(s)
        s = url2pathname(u.path)
        if u.netloc and u.netloc != "localhost":
            s = f"//{u.netloc}{s}"
    elif _URI.match(s):
        return s
    elif st.is_uri(root) and not os.path.isabs(s):  # relative to a manifest on object storage
        return str(st.join(root, s))
    q = Path(s).expanduser()
    return os.path.normpath(q if q.is_absolute() else root.absolute() / q)


def _collisions(columns: list[str], source: str | Path) -> None:
    seen: dict[str, str] = {}
    for col in columns:
        name = _metadata_name(col)
        if name in seen:
            raise ConfigError(
                f"manifest {source}: columns {seen[name]!r} and {col!r} would both become {name!r}; "
                "rename or drop one of them"
            )
        seen[name] = col


def channel_path_columns(cfg: InputConfig, columns: list[str], location: str) -> dict[str, str]:
    """The manifest column holding each channel's path: ``input.channel_columns``, else the first of the usual names.

    Used by the whole-table loader and by the streaming planner (:mod:`msnoop.io.table_stream`) alike.

    Raises:
        ConfigError: A declared column is missing, or no usual name is present for a channel.
    """
    mapping = dict(cfg.channel_columns or {})
    for ch in cfg.channels:
        if ch in mapping:
            if mapping[ch] not in columns:
                raise ConfigError(
                    f"manifest {location}: column {mapping[ch]!r} for channel {ch!r} not found; columns: {columns}"
                )
            continue
        candidates = [ch, f"{ch}_path", f"path_{ch}", f"Path_{ch}", path_column(ch), f"FileName_{ch}"]
        if cfg.channel_index is not None or cfg.channel_names:  # one file holds all channels
            candidates += ["path", "Path", "file", "FileName", "Metadata_Path"]
        found = next((c for c in candidates if c in columns), None)
        if found is None:
            raise ConfigError(
                f"manifest {location}: no path column for channel {ch!r}; expected one of {candidates} "
                f"(or set input.channel_columns); found columns {columns}"
            )
        mapping[ch] = found
    return mapping


def _from_manifest(cfg: InputConfig, storage: Any = None) -> pd.DataFrame:
    assert cfg.manifest is not None
    df = _read_table(cfg.manifest, cfg.dtypes, storage)
    root = source_root(cfg)
    mapping = channel_path_columns(cfg, list(df.columns), str(cfg.manifest))
    used = set(mapping.values())
    meta_cols = [c for c in df.columns if c not in used]
    _collisions(meta_cols + [path_column(ch) for ch in cfg.channels], cfg.manifest)
    out = pd.DataFrame({_metadata_name(c): df[c] for c in meta_cols}, index=df.index)
    for ch in cfg.channels:
        out[path_column(ch)] = [resolve_path(p, root) for p in df[mapping[ch]]]
    return out


def _loaddata_path(name: object, folder: object, url: object, root: Path) -> str | None:
    """One LoadData location: ``URL_<Ch>``, else ``FileName_<Ch>`` (a URL stands alone), joined to ``PathName_<Ch>``.

    An empty ``PathName`` means the ``FileName`` stands alone (relative to ``root``).
    """

    def text(v: object) -> str:
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip()

    name, folder, url = text(name), text(folder), text(url)
    if url:
        return resolve_path(url, root)
    if not name:
        return None
    if _URI.match(name) or name.lower().startswith("file:") or not folder:
        return resolve_path(name, root)
    if _URI.match(folder) or folder.lower().startswith("file:"):
        return resolve_path(folder.rstrip("/") + "/" + name, root)
    return resolve_path(str(Path(folder) / name), root)


def _from_loaddata(cfg: InputConfig, storage: Any = None) -> pd.DataFrame:
    assert cfg.loaddata is not None
    df = _read_table(cfg.loaddata, cfg.dtypes, storage)
    root = source_root(cfg)
    used: set[str] = set()
    paths = {}
    for ch in cfg.channels:
        key = next((k for k in (ch, f"Orig{ch}") if f"FileName_{k}" in df.columns or f"URL_{k}" in df.columns), None)
        if key is None:
            have = sorted({c.split("_", 1)[1] for c in df.columns if c.startswith(("FileName_", "URL_"))})
            raise ConfigError(
                f"LoadData file {cfg.loaddata}: no FileName_{ch} column; channels present: {have} (no URL_{ch} either)"
            )
        cols = [f"FileName_{key}", f"PathName_{key}", f"URL_{key}"]
        used.update(cols)
        none = [None] * len(df)
        fname, pname, url = (df[c] if c in df.columns else none for c in cols)
        paths[ch] = [_loaddata_path(f, d, u, root) for f, d, u in zip(fname, pname, url, strict=True)]
    meta_cols = [c for c in df.columns if c not in used and not c.startswith(("FileName_", "PathName_", "URL_"))]
    _collisions(meta_cols + [path_column(ch) for ch in cfg.channels], cfg.loaddata)
    out = pd.DataFrame({_metadata_name(c): df[c] for c in meta_cols}, index=df.index)
    for ch in cfg.channels:
        out[path_column(ch)] = paths[ch]
    return out


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Turn ``"{Metadata_Well}_{channel}.tif"`` into a regex with named groups (repeats must agree)."""
    seen: set[str] = set()
    parts = re.split(r"(\{[A-Za-z_][A-Za-z0-9_]*\})", pattern)
    rx = ""
    for part in parts:
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            rx += f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)"
            seen.add(name)
        else:
            rx += re.escape(part)
    if "channel" not in seen:
        raise ConfigError(f"input.pattern {pattern!r} must contain a {{channel}} field")
    return re.compile(rx + r"\Z")


#: Names of files and folders that operating systems and tools leave beside data (never images):
#: macOS (``.DS_Store``, ``._*`` AppleDouble files, ``__MACOSX`` in zip archives, ``Icon\r``), Windows
#: (``Thumbs.db``, ``desktop.ini``, ``$RECYCLE.BIN``, ``System Volume Information``), Office lock files (``~$*``).
SYSTEM_NAMES = frozenset(
    {
        "__MACOSX",
        "Thumbs.db",
        "ehthumbs.db",
        "desktop.ini",
        "Desktop.ini",
        "$RECYCLE.BIN",
        "System Volume Information",
        "Icon\r",
    }
)


def is_hidden_or_system(relpath: str) -> bool:
    """Whether a path (``/``-separated, relative to an input folder) is, or lies in, a hidden or system entry:
    a name starting with ``.`` (``.DS_Store``, macOS ``._*`` files, ``.ipynb_checkpoints``), ``~$``, or one of
    :data:`SYSTEM_NAMES`."""
    return any(p.startswith((".", "~$")) or p in SYSTEM_NAMES for p in relpath.split("/") if p)


def list_folder(folder: str | Path, storage: Any = None) -> tuple[list[str], list[str]]:
    """``(files, ignored)``: the files below an input folder (a path or a URI prefix), relative and
    ``/``-separated, and the hidden or system files left out (:func:`is_hidden_or_system`).

    Raises:
        ConfigError: ``folder`` is not a folder (or, on object storage, no object has that prefix).
    """
    if st.is_uri(folder):
        files = st.walk_files(folder, storage)
        if not files:
            raise ConfigError(f"input.folder {folder}: no object under this prefix")
    else:
        root = Path(folder)
        if not root.is_dir():
            raise ConfigError(f"input.folder {folder} is not a folder")
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    keep, ignored = [], []
    for rel in files:
        (ignored if is_hidden_or_system(rel) else keep).append(rel)
    return keep, ignored


def _from_folder(cfg: InputConfig, storage: Any = None) -> pd.DataFrame:
    """The image table of a folder input; ``.attrs["ignored_files"]`` counts the hidden/system files left out."""
    assert cfg.folder is not None and cfg.pattern is not None
    folder = cfg.folder
    files, ignored = list_folder(folder, storage)
    if ignored:
        logger.warning(
            "input.folder %s: ignored %d hidden or system file(s) (e.g. %s)",
            folder,
            len(ignored),
            ", ".join(repr(f) for f in ignored[:3]),
        )
    rx = pattern_regex(cfg.pattern)
    values = {ch: (cfg.channel_values or {}).get(ch, ch) for ch in cfg.channels}
    by_value = {v: ch for ch, v in values.items()}
    base = str(folder).rstrip("/") if st.is_uri(folder) else os.path.normpath(Path(folder).absolute())
    groups: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
    for rel in files:
        m = rx.match(rel)
        if not m or m.group("channel") not in by_value:
            continue
        fields = tuple(sorted((k, v) for k, v in m.groupdict().items() if k != "channel"))
        groups.setdefault(fields, {})[by_value[m.group("channel")]] = f"{base}/{rel}"
    if not groups:
        raise ConfigError(
            f"input.folder {folder}: no file matches pattern {cfg.pattern!r} with channel values {sorted(by_value)}"
        )
    rows = []
    for fields, chans in groups.items():
        row = {_metadata_name(k): v for k, v in fields}
        for ch in cfg.channels:
            row[path_column(ch)] = chans.get(ch, "")
        rows.append(row)
    df = pd.DataFrame(rows)
    df.attrs["ignored_files"] = len(ignored)
    return df


def image_id(path: str | None, root: Path | str) -> str | None:
    """The default id of an image: its first channel's path relative to ``root``, without suffix.

    The id depends on that one path only (adding rows never changes other rows' ids). A path outside
    ``root`` gives its absolute path without suffix; a URI is its own id (without suffix), except under a URI
    ``root`` (a manifest on object storage), where it is relative to it like a local path.
    """
    if not path:
        return None
    prefix = str(root).rstrip("/") + "/"
    if _URI.match(path) and st.is_uri(root) and path.startswith(prefix):
        p = Path(path[len(prefix) :])  # relative to the manifest's URI folder, as local paths are to theirs
    elif _URI.match(path):
        return re.sub(r"\.[A-Za-z0-9]{1,5}$", "", path)
    else:
        base = os.path.normpath(Path(root).absolute())
        rel = os.path.relpath(path, base)
        p = Path(path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel)
    name = p.name
    for suffix in COMPOUND_SUFFIXES:
        if name.lower().endswith(suffix):
            return p.with_name(name[: -len(suffix)]).as_posix()
    return p.with_suffix("").as_posix() if p.suffix else p.as_posix()


def source_root(cfg: InputConfig) -> Path | str:
    """Base of relative paths and ids: ``input.root``, else the manifest's folder (a URI for a manifest URI)."""
    if cfg.root is not None:
        return cfg.root
    if cfg.folder is not None:
        return cfg.folder
    src = cfg.manifest or cfg.loaddata or cfg.ome_zarr
    assert src is not None
    if st.is_uri(src):
        return str(src).rstrip("/").rsplit("/", 1)[0]
    return Path(src).parent


def load_image_table(cfg: InputConfig, *, storage: Any = None) -> pd.DataFrame:
    """Read the job's inputs into the image table (see module docstring).

    Metadata values are kept as written (CSV text stays text, blanks are None; Parquet types kept);
    every path is resolved once against the manifest's folder (or ``input.root``) and stored absolute,
    URIs (``s3://...``) as given. The id of a row depends on that row alone (:func:`image_id`). Every source may
    be on object storage (``storage``: its settings). A folder input leaves hidden and system files out
    (:func:`list_folder`); ``.attrs["ignored_files"]`` of the result counts them.

    Raises:
        ConfigError: The source is missing or malformed, a channel has no column, two columns collide, or
            ids repeat.
    """
    if cfg.manifest is not None:
        df = _from_manifest(cfg, storage)
    elif cfg.loaddata is not None:
        df = _from_loaddata(cfg, storage)
    elif getattr(cfg, "ome_zarr", None) is not None:
        from msnoop.io.omezarr import ome_zarr_table

        df = ome_zarr_table(cfg, storage=storage)
    else:
        df = _from_folder(cfg, storage)
    ignored = df.attrs.get("ignored_files", 0)
    df = df.reset_index(drop=True)
    if cfg.id_column:
        col = _metadata_name(cfg.id_column)
        if col not in df.columns:
            raise ConfigError(f"input.id_column {cfg.id_column!r} not found; columns: {list(df.columns)}")
        blank = df[col].isna()
        if blank.any():
            raise ConfigError(f"input.id_column {cfg.id_column!r} is blank in {int(blank.sum())} row(s)")
        df[ID_COLUMN] = df[col].astype(str)
    elif ID_COLUMN not in df.columns:
        root = source_root(cfg)
        path_cols = [path_column(ch) for ch in cfg.channels]
        ids = []
        for i, row in enumerate(df[path_cols].itertuples(index=False)):
            first = next((p for p in row if p), None)
            ids.append(image_id(first, root) or f"row{i}")  # a row without any path becomes an error row
        df[ID_COLUMN] = ids
    df[ID_COLUMN] = df[ID_COLUMN].astype(str)
    dup = df[ID_COLUMN][df[ID_COLUMN].duplicated()]
    if len(dup):
        raise ConfigError(f"image ids are not unique ({len(dup)} repeats, e.g. {dup.iloc[0]!r}); set input.id_column")
    if cfg.limit is not None:
        df = df.iloc[: cfg.limit].reset_index(drop=True)
    meta = [c for c in df.columns if c != ID_COLUMN and not c.startswith(PATH_PREFIX)]
    out = df[[ID_COLUMN, *meta, *[path_column(ch) for ch in cfg.channels]]]
    out.attrs["ignored_files"] = ignored
    return out


def table_schema(table: pd.DataFrame) -> pa.Schema:
    """The one Arrow schema of a run's metadata, fixed from the whole image table before any work.

    Text columns (every CSV column not declared in ``input.dtypes``, ids, paths) are ``string``; a column
    that is blank in every row is ``string`` too (never Arrow's ``null`` type); other types are Arrow's
    reading of the pandas dtype (Parquet manifests keep theirs). Blanks are nulls in any type.

    Raises:
        ConfigError: A column mixes values Arrow cannot hold in one type (e.g. text and numbers in a Parquet
            object column).
    """
    fields = []
    for col in table.columns:
        values = table[col]
        if values.dtype == object or str(values.dtype) == "string":
            present = values.dropna()
            kinds = {type(v) for v in present}
            if not present.size or kinds <= {str}:
                fields.append(pa.field(col, pa.string()))
                continue
        try:
            typ = pa.Array.from_pandas(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ConfigError(f"metadata column {col!r} mixes types Arrow cannot store in one column: {exc}") from None
        fields.append(pa.field(col, pa.string() if pa.types.is_null(typ) else typ))
    return pa.schema(fields)


def metadata_arrow(table: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """``table`` as Arrow with exactly ``schema`` (blanks -> nulls)."""
    frame = table.reindex(columns=schema.names)  # columns of an earlier run missing here: nulls
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False).replace_schema_metadata(None)
