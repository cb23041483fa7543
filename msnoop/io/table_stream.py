"""The image table of a job as a stream of Arrow batches with one schema, in bounded memory.

:func:`plan_image_table` reads only the manifest's header (CSV) or footer (Parquet) and fixes, before any
work, which columns become which image-table columns and the table's one Arrow schema:

* ``Metadata_ImageID`` and every ``Metadata_Path_<channel>`` are ``string``;
* CSV metadata columns are ``string`` (text exactly as written, blanks are nulls) unless ``input.dtypes``
  declares ``int`` (``int64``), ``float`` (``double``) or ``bool``;
* Parquet metadata columns keep the file's own Arrow types (a column of Arrow's ``null`` type is ``string``).

:meth:`ImageTableSource.batches` then streams the file (``pyarrow.csv.open_csv`` or
``pyarrow.parquet.ParquetFile.iter_batches``, through :mod:`msnoop.core.storage`, so a manifest may be a URI)
and turns each batch into image-table rows with exactly that schema, by the rules of
:mod:`msnoop.io.manifest` (paths resolved once, ids from each row alone, declared types converted): the result
does not depend on where batches start. Nothing holds more than one batch, so a manifest of millions of rows
plans in the memory of one batch plus 16 bytes per row for the id checks of :func:`scan_ids`
(:class:`msnoop.core.idset.IdSet`). LoadData CSVs stream the same way; folder and OME-Zarr sources are listed
into one in-memory table first (:func:`msnoop.io.manifest.load_image_table`) and streamed from it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd  # noqa: F401  (never used to read a manifest; the streaming tests patch its readers to prove it)
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from msnoop.core import storage as st
from msnoop.core.config import ConfigError
from msnoop.core.idset import HASH_DTYPE, IdSet, hash_ids
from msnoop.io.config import ID_COLUMN, InputConfig, path_column
from msnoop.io.manifest import (
    _URI,
    _collisions,
    _convert,
    _loaddata_path,
    _metadata_name,
    channel_path_columns,
    image_id,
    load_image_table,
    metadata_arrow,
    resolve_path,
    source_root,
    table_schema,
)
from msnoop.io.readers import COMPOUND_SUFFIXES

#: Rows per batch read from a manifest (the unit of work and of memory while streaming).
BATCH_ROWS = 16_384

#: Bytes per CSV block: the CSV reader reads ahead a number of blocks, so this bounds its buffers. With
#: pyarrow 26 a 10^6-row manifest (150 MB) peaked at 41 MB of Arrow memory with 1 MB blocks and at 21 MB with
#: 256 KB blocks, read in the same time (0.9 s). A row (the header too) must fit in one block: a file with a
#: longer one is read again with blocks 4x larger (:func:`_is_block_error`), up to :data:`CSV_MAX_BLOCK_BYTES`.
CSV_BLOCK_BYTES = 256 << 10

#: The largest CSV block tried: a manifest row (or header) longer than this is refused, naming the file.
CSV_MAX_BLOCK_BYTES = 1 << 30


def _is_block_error(exc: BaseException) -> bool:
    """Whether pyarrow's CSV reader failed because a row (or the header) is longer than its block."""
    text = str(exc)
    return "straddl" in text or "Empty CSV file or block" in text


#: Bytes a Parquet manifest is read in (pages are streamed; without it a row group is buffered whole).
PARQUET_BUFFER_BYTES = 1 << 20

_ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


@dataclass
class ImageTableSource:
    """How to stream one job's image table (picklable: it travels to the Ray task that reads the manifest).

    Built by :func:`plan_image_table`. ``schema`` is the image table's Arrow schema: ``Metadata_ImageID``,
    the metadata columns in manifest order, then one ``Metadata_Path_<channel>`` per channel.
    """

    kind: str  # "csv" | "parquet" | "loaddata" | "table"
    location: str  # the manifest / LoadData file as given (path or URI); "" for kind "table"
    root: Path | str  # base of relative paths and ids
    channels: list[str]
    schema: pa.Schema
    #: per channel: the source column holding its path (manifest), or its FileName/PathName/URL columns (LoadData)
    paths: dict[str, Any] = field(default_factory=dict)
    #: (source column, image-table column) of every metadata column, in manifest order
    meta: list[tuple[str, str]] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)  # source column -> declared kind (CSV)
    id_column: str | None = None  # image-table column holding the ids (input.id_column or Metadata_ImageID)
    id_declared: bool = False  # the id column is input.id_column (blank values are an error)
    id_name: str | None = None  # input.id_column as written (for messages)
    mask_column: str | None = None  # image-table column of mask paths, resolved like image paths
    limit: int | None = None  # input.limit: only the first rows are the run's
    storage: Any = None  # StorageConfig of a manifest URI
    csv_names: list[str] = field(default_factory=list)  # column names of a CSV (pandas' names for repeats/blanks)
    delimiter: str = ","
    table: pa.Table | None = None  # kind "table": the whole image table
    ignored_files: int = 0  # folder inputs: hidden and system files left out of the listing

    # ------------------------------------------------------------------------------------------- reading

    def batches(self, rows: int = BATCH_ROWS, *, limit: bool = True) -> Iterator[tuple[int, pa.Table]]:
        """``(first_row, batch)`` pairs: image-table rows with :attr:`schema`, in manifest order.

        ``first_row`` is the manifest row number of the batch's first row. With ``limit`` (default) only the
        first ``input.limit`` rows come. Memory: one raw batch of about ``rows`` rows and its image-table rows.

        Raises:
            ConfigError: The file cannot be read or parsed, or a value does not convert to its declared type
                (the message names the file, the column and the value).
        """
        stop = self.limit if limit and self.limit is not None else None
        first = 0
        for raw in self._raw_batches(rows):
            if stop is not None and first >= stop:
                return
            if stop is not None and first + raw.num_rows > stop:
                raw = raw.slice(0, stop - first)
            if raw.num_rows:
                yield first, self._image_rows(raw, first)
            first += raw.num_rows

    def _raw_batches(self, rows: int) -> Iterator[pa.Table]:
        if self.kind == "table":
            assert self.table is not None
            for start in range(0, self.table.num_rows, rows):
                yield self.table.slice(start, rows)
            return
        try:
            if self.kind == "parquet":
                with _open(self.location, self.storage, seekable=True) as fh:
                    pf = pq.ParquetFile(fh, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)
                    for b in pf.iter_batches(batch_size=rows, columns=self._used_columns()):
                        yield pa.Table.from_batches([b])
                return
            yield from self._csv_batches(rows)
        except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"manifest {self.location} cannot be read: {_short(exc)}") from None

    def _csv_batches(self, rows: int) -> Iterator[pa.Table]:
        """The CSV's rows in tables of ``rows``; a row longer than the block makes the file be read again with
        larger blocks, from the first row not yet yielded (the result does not depend on the block size)."""
        block, sent = CSV_BLOCK_BYTES, 0
        while True:
            seen = 0
            try:
                for table in self._csv_pass(rows, block):
                    end = seen + table.num_rows
                    if end > sent:  # rows a pass with smaller blocks yielded already are skipped
                        yield table.slice(max(sent - seen, 0))
                        sent = end
                    seen = end
                return
            except pa.ArrowInvalid as exc:
                if not _is_block_error(exc) or block >= CSV_MAX_BLOCK_BYTES:
                    raise
                block *= 4

    def _csv_pass(self, rows: int, block: int) -> Iterator[pa.Table]:
        with _open(self.location, self.storage) as fh:
            reader = pacsv.open_csv(
                fh,
                read_options=pacsv.ReadOptions(column_names=self.csv_names, skip_rows=1, block_size=block),
                parse_options=_parse_options(self.delimiter),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(self.csv_names, pa.string()),
                    null_values=[""],
                    strings_can_be_null=True,
                    quoted_strings_can_be_null=True,
                ),
            )
            pending: list[pa.RecordBatch] = []
            n = 0
            for b in reader:
                pending.append(b)
                n += b.num_rows
                while n >= rows:
                    table = pa.Table.from_batches(pending)
                    yield table.slice(0, rows)
                    rest = table.slice(rows)
                    pending, n = rest.to_batches(), rest.num_rows
            if n:
                yield pa.Table.from_batches(pending)

    def _used_columns(self) -> list[str]:
        used = [src for src, _ in self.meta]
        for cols in self.paths.values():
            used += [c for c in (cols if isinstance(cols, tuple) else (cols,)) if c and c not in used]
        return used

    # ------------------------------------------------------------------------------------------- transforming

    def _image_rows(self, raw: pa.Table, first: int, *, ids_only: bool = False) -> pa.Table:
        """Raw manifest rows ``first, first + 1, ...`` as image-table rows with :attr:`schema`.

        With ``ids_only``, only what the ids need (and every declared type conversion, which may fail) is
        computed, and the result has only ``Metadata_ImageID`` (and ``id_source``: the ``input.id_column``
        values it came from).
        """
        if self.kind == "table":
            return raw.select([ID_COLUMN]) if ids_only else raw
        arrays: dict[str, pa.Array | pa.ChunkedArray] = {}
        for src, name in self.meta:
            if ids_only and src not in self.dtypes and name != self.id_column:
                continue
            values = raw.column(src)
            if src in self.dtypes:
                try:
                    converted = _convert(values.to_pandas(), self.dtypes[src])  # text (object: str or None) -> kind
                except (ValueError, TypeError) as exc:
                    raise ConfigError(
                        f"manifest {self.location}: column {src!r} declared {self.dtypes[src]} in input.dtypes: {exc}"
                    ) from None
                values = pa.array(converted, type=self.schema.field(name).type, from_pandas=True)
            elif name == self.mask_column:
                values = pa.array(resolve_paths(values.to_pylist(), self.root), pa.string())
            arrays[name] = values
        need_paths = not ids_only or self.id_column is None or self.id_column not in arrays
        for ch, cols in self.paths.items() if need_paths else ():
            if self.kind == "loaddata":
                fname, pname, url = (raw.column(c).to_pylist() if c else [None] * raw.num_rows for c in cols)
                resolved = [_loaddata_path(f, d, u, self.root) for f, d, u in zip(fname, pname, url, strict=True)]
            else:
                resolved = resolve_paths(raw.column(cols).to_pylist(), self.root)
            arrays[path_column(ch)] = pa.array(resolved, pa.string())
        id_source = arrays.get(self.id_column) if self.id_column is not None else None
        if id_source is not None:  # as the whole-table loader does (an id column may hold numbers)
            arrays[ID_COLUMN] = pa.array(id_source.to_pandas().astype(str), pa.string())
        else:
            firsts = [arrays[path_column(ch)].to_pylist() for ch in self.channels]
            first_path = [next((p for p in row if p), None) for row in zip(*firsts, strict=True)]
            arrays[ID_COLUMN] = pa.array(
                [i or f"row{first + k}" for k, i in enumerate(image_ids(first_path, self.root))], pa.string()
            )
        if ids_only:
            return pa.table({ID_COLUMN: arrays[ID_COLUMN], **({"id_source": id_source} if self.id_declared else {})})
        return pa.Table.from_arrays(
            [arrays[f.name].cast(f.type) if arrays[f.name].type != f.type else arrays[f.name] for f in self.schema],
            schema=self.schema,
        )


# ---------------------------------------------------------------------------------------------- paths and ids


def resolve_paths(values: list[Any], root: Path | str) -> list[str | None]:
    """:func:`msnoop.io.manifest.resolve_path` of every value: the same results, about 5x faster.

    Plain relative and absolute local paths (no ``~``, no URL) take a string fast path
    (``os.path.normpath`` of the path joined to the absolute root, which is what ``resolve_path`` computes
    through ``pathlib``); everything else goes through ``resolve_path`` itself. ``resolve_path`` took about
    40 us per value on the 2-core development machine (``pathlib`` parsing), which made planning a manifest
    of 10^6 two-channel rows take over a minute.
    """
    if st.is_uri(root):
        return [resolve_path(p, root) for p in values]
    base = str(Path(root).absolute()).rstrip("/")  # "/" -> "": a relative path joins as "/<path>"
    out: list[str | None] = []
    for p in values:
        s = p.strip() if isinstance(p, str) else ""
        if not s or s[0] == "~" or s[:5].lower() == "file:" or _URI.match(s):
            out.append(resolve_path(p, root))
        else:
            out.append(os.path.normpath(s if s[0] == "/" else f"{base}/{s}"))
    return out


def image_ids(paths: list[str | None], root: Path | str) -> list[str | None]:
    """:func:`msnoop.io.manifest.image_id` of every path: the same results, without ``pathlib`` for normalised
    local paths under ``root`` (the common case; see :func:`resolve_paths` for why)."""
    if st.is_uri(root):
        return [image_id(p, root) for p in paths]
    base = os.path.normpath(Path(root).absolute())
    prefix = base if base.endswith("/") else base + "/"
    out: list[str | None] = []
    for p in paths:
        plain = p and len(p) > len(prefix) and p.startswith(prefix) and not p.startswith("//")
        if not plain or _URI.match(p) or os.path.normpath(p) != p:
            out.append(image_id(p, root))
            continue
        rel = p[len(prefix) :]
        name = rel.rsplit("/", 1)[-1]
        low = name.lower()
        ome = next((s for s in COMPOUND_SUFFIXES if low.endswith(s)), None)
        if ome is not None:
            out.append(rel[: -len(ome)])
            continue
        dot = name.rfind(".")  # pathlib's suffix: a dot that is neither the first nor the last character
        out.append(rel[: len(rel) - (len(name) - dot)] if 0 < dot < len(name) - 1 else rel)
    return out


# ---------------------------------------------------------------------------------------------- planning


def plan_image_table(cfg: InputConfig, *, storage: Any = None, mask_column: str | None = None) -> ImageTableSource:
    """Plan the job's image table from the manifest's header or footer only (no rows are read).

    Args:
        cfg: The ``input:`` section.
        storage: The :class:`~msnoop.core.storage.StorageConfig` of a manifest URI.
        mask_column: Cells mode: the image-table column (``Metadata_<name>``) of mask paths, resolved like
            image paths.

    Returns:
        An :class:`ImageTableSource` whose ``schema`` is the run's image-table schema.

    Raises:
        ConfigError: Missing or unreadable file, unknown format, a channel without a column, a column named in
            ``input.dtypes``/``input.id_column``/``mask_column`` that is not there, two columns that would
            become the same image-table column, ``input.dtypes`` on a Parquet manifest.
    """
    if cfg.manifest is not None:
        src = _plan_manifest(cfg, storage)
    elif cfg.loaddata is not None:
        src = _plan_loaddata(cfg, storage)
    else:  # folder / OME-Zarr sources are listings: built whole (their size is the number of files listed)
        df = load_image_table(cfg, storage=storage)
        if mask_column is not None:
            if mask_column not in df.columns:
                meta = [c for c in df.columns if c.startswith("Metadata_") and not c.startswith("Metadata_Path_")]
                raise ConfigError(
                    f"cells.segmentation.column: no mask column {mask_column!r} in the manifest; columns: {meta}"
                )
            df[mask_column] = [resolve_path(p, source_root(cfg)) for p in df[mask_column]]
        schema = table_schema(df)
        return ImageTableSource(
            kind="table",
            location="",
            root=source_root(cfg),
            channels=list(cfg.channels),
            schema=schema,
            table=metadata_arrow(df, schema),
            ignored_files=int(df.attrs.get("ignored_files", 0)),
        )
    names = [n for _, n in src.meta] + [path_column(ch) for ch in cfg.channels]
    if cfg.id_column:
        col = _metadata_name(cfg.id_column)
        if col not in names:
            raise ConfigError(f"input.id_column {cfg.id_column!r} not found; columns: {[ID_COLUMN, *names]}")
        src.id_column, src.id_declared, src.id_name = col, True, cfg.id_column
    elif ID_COLUMN in names:
        src.id_column = ID_COLUMN
    if mask_column is not None:
        if mask_column not in names or mask_column.startswith("Metadata_Path_"):
            meta = [n for n in names if not n.startswith("Metadata_Path_")]
            raise ConfigError(
                f"cells.segmentation.column: no mask column {mask_column!r} in the manifest; columns: {meta}"
            )
        src.mask_column = mask_column
    fields = {n: t for (_, n), t in zip(src.meta, src.schema.types, strict=True)}
    if src.mask_column is not None:
        fields[src.mask_column] = pa.string()
    meta_fields = [pa.field(n, t) for n, t in fields.items() if n != ID_COLUMN]
    src.schema = pa.schema(
        [
            pa.field(ID_COLUMN, pa.string()),
            *meta_fields,
            *[pa.field(path_column(ch), pa.string()) for ch in cfg.channels],
        ]
    )
    src.limit = cfg.limit
    return src


def _plan_manifest(cfg: InputConfig, storage: Any) -> ImageTableSource:
    assert cfg.manifest is not None
    location = str(cfg.manifest)
    kind, columns, types, delimiter = _read_header(location, cfg.dtypes, storage)
    mapping = channel_path_columns(cfg, list(columns), location)
    used = set(mapping.values())
    meta_cols = [c for c in columns if c not in used]
    return _source(
        cfg,
        kind,
        location,
        columns,
        types,
        meta_cols,
        mapping,
        storage=storage,
        csv_names=columns if kind == "csv" else [],
        delimiter=delimiter,
    )


def _source(
    cfg: InputConfig,
    kind: str,
    location: str,
    columns: list[str],
    types: dict[str, pa.DataType],
    meta_cols: list[str],
    paths: dict[str, Any],
    **rest: Any,
) -> ImageTableSource:
    """The plan of a manifest or LoadData file: metadata names checked, declared types applied, the run's schema."""
    _collisions(meta_cols + [path_column(ch) for ch in cfg.channels], location)
    dtypes = _declared(cfg.dtypes, columns, location)
    meta_types = [_ARROW_TYPES[dtypes[c]] if c in dtypes else types[c] for c in meta_cols]
    return ImageTableSource(
        kind=kind,
        location=location,
        root=source_root(cfg),
        channels=list(cfg.channels),
        schema=pa.schema([pa.field(_metadata_name(c), t) for c, t in zip(meta_cols, meta_types, strict=True)]),
        paths=paths,
        meta=[(c, _metadata_name(c)) for c in meta_cols],
        dtypes=dtypes,
        **rest,
    )


def _plan_loaddata(cfg: InputConfig, storage: Any = None) -> ImageTableSource:
    assert cfg.loaddata is not None
    location = str(cfg.loaddata)
    kind, columns, types, delimiter = _read_header(location, cfg.dtypes, storage)
    if kind != "csv":
        raise ConfigError(f"LoadData file {location}: expected a CSV file")
    paths: dict[str, tuple[str | None, str | None, str | None]] = {}
    for ch in cfg.channels:
        key = next((k for k in (ch, f"Orig{ch}") if f"FileName_{k}" in columns or f"URL_{k}" in columns), None)
        if key is None:
            have = sorted({c.split("_", 1)[1] for c in columns if c.startswith(("FileName_", "URL_"))})
            raise ConfigError(
                f"LoadData file {location}: no FileName_{ch} column; channels present: {have} (no URL_{ch} either)"
            )
        cols = [f"FileName_{key}", f"PathName_{key}", f"URL_{key}"]
        paths[ch] = tuple(c if c in columns else None for c in cols)  # type: ignore[assignment]
    meta_cols = [c for c in columns if not c.startswith(("FileName_", "PathName_", "URL_"))]
    return _source(
        cfg,
        "loaddata",
        location,
        columns,
        types,
        meta_cols,
        paths,
        storage=storage,
        csv_names=columns,
        delimiter=delimiter,
    )


def _declared(dtypes: dict[str, str] | None, columns: list[str], location: str) -> dict[str, str]:
    """``input.dtypes`` by source column (a key may name the column with or without ``Metadata_``)."""
    out = {}
    for col, kind in (dtypes or {}).items():
        found = (
            col
            if col in columns
            else col.removeprefix("Metadata_")
            if col.removeprefix("Metadata_") in columns
            else None
        )
        if found is None:
            raise ConfigError(f"input.dtypes names column {col!r}, which manifest {location} does not have")
        out[found] = kind
    return out


def _read_header(
    location: str, dtypes: dict[str, str] | None, storage: Any
) -> tuple[str, list[str], dict[str, pa.DataType], str]:
    """``(kind, column names, column types, delimiter)`` from a CSV's header line or a Parquet footer."""
    name = location.rsplit("/", 1)[-1].lower()
    suffixes = "".join(Path(name).suffixes)
    if suffixes.endswith(".parquet"):
        if dtypes:
            raise ConfigError(
                f"input.dtypes applies to CSV manifests; {location} is Parquet and keeps its own column types"
            )
        try:
            with _open(location, storage, seekable=True) as fh:
                schema = pq.read_schema(fh)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(f"manifest {location} cannot be read: {_short(exc)}") from None
        index = _pandas_index_columns(schema)
        columns = [n for n in schema.names if n not in index]
        types = {n: pa.string() if pa.types.is_null(schema.field(n).type) else schema.field(n).type for n in columns}
        return "parquet", columns, types, ","
    if not suffixes.endswith((".csv", ".csv.gz", ".tsv", ".txt")):
        raise ConfigError(
            f"manifest {location}: expected a .csv, .csv.gz or .parquet file, found {Path(name).suffix!r}"
        )
    delimiter = "\t" if suffixes.endswith(".tsv") else ","
    block = 1 << 16
    while True:  # a header longer than the block is read again with larger blocks (no width limit)
        try:
            with _open(location, storage) as fh:
                header = pacsv.open_csv(
                    fh,
                    read_options=pacsv.ReadOptions(block_size=block),
                    parse_options=_parse_options(delimiter),
                    convert_options=pacsv.ConvertOptions(include_columns=[]),
                ).schema.names
            break
        except pa.ArrowInvalid as exc:
            if _is_block_error(exc) and block < CSV_MAX_BLOCK_BYTES and _longer_than(location, storage, block):
                block *= 4
                continue
            raise ConfigError(f"manifest {location} cannot be read: {_short(exc)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"manifest {location} cannot be read: {_short(exc)}") from None
    columns = _pandas_names(header)
    return "csv", columns, dict.fromkeys(columns, pa.string()), delimiter


def _longer_than(location: str, storage: Any, size: int) -> bool:
    """Whether the (decompressed) file holds more than ``size`` bytes: a larger block can then still help."""
    with _open(location, storage) as fh:
        return len(fh.read(size + 1)) > size


def _pandas_names(header: list[str]) -> list[str]:
    """Column names as ``pandas.read_csv`` gives them: ``Unnamed: <i>`` for a blank name, ``x.1`` for a repeat."""
    out: list[str] = []
    for i, name in enumerate(header):
        base = name if name.strip() else f"Unnamed: {i}"
        new, k = base, 0
        while new in out:
            k += 1
            new = f"{base}.{k}"
        out.append(new)
    return out


def _pandas_index_columns(schema: pa.Schema) -> set[str]:
    """Columns a pandas-written Parquet file stores its index in (``pandas.read_parquet`` makes them the index)."""
    raw = (schema.metadata or {}).get(b"pandas")
    if not raw:
        return set()
    return {c for c in json.loads(raw).get("index_columns", []) if isinstance(c, str)}


def _parse_options(delimiter: str) -> pacsv.ParseOptions:
    # newlines_in_values: a quoted cell may hold a line break, as pandas.read_csv allows
    return pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True)


class _open:
    """A readable stream of a local path or URI (gzip by suffix); FileNotFoundError -> ConfigError."""

    def __init__(self, location: str, storage: Any, *, seekable: bool = False) -> None:
        self.location, self.storage, self.seekable = location, storage, seekable

    def __enter__(self) -> Any:
        fs, path = st.resolve(self.location, self.storage)
        try:
            if self.seekable:
                self.fh = fs.open_input_file(path)
            else:
                self.fh = fs.open_input_stream(path, compression="detect")
        except FileNotFoundError:
            raise ConfigError(f"manifest {self.location} does not exist") from None
        except OSError as exc:
            if not st.is_uri(self.location) and not os.path.exists(self.location):
                raise ConfigError(f"manifest {self.location} does not exist") from None
            raise ConfigError(f"manifest {self.location} cannot be read: {_short(exc)}") from None
        return self.fh

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# ---------------------------------------------------------------------------------------------- checking


def scan_ids(source: ImageTableSource, rows: int = BATCH_ROWS) -> tuple[IdSet, int]:
    """One pass over the whole source: check its ids and return ``(ids of the run's rows, number of run rows)``.

    Memory: one batch plus 16 bytes per manifest row (:class:`~msnoop.core.idset.IdSet`), not the table.
    Every row is converted exactly as the read tasks will convert it, so a value that does not convert to its
    declared type fails here, before any work.

    Raises:
        ConfigError: A blank ``input.id_column`` value (with the number of such rows), repeated ids (with their
            number and the first repeat), or any error of :meth:`ImageTableSource.batches`.
    """
    chunks: list[np.ndarray] = []
    blank = 0
    first = 0
    for raw in source._raw_batches(rows):
        batch = source._image_rows(raw, first, ids_only=True)
        first += raw.num_rows
        ids = batch.column(ID_COLUMN)
        if source.id_declared:
            values = batch.column("id_source")
            if pa.types.is_floating(values.type):  # NaN is blank too, as pandas' isna() says
                blank += int(np.isnan(values.to_numpy(zero_copy_only=False)).sum())
            else:
                blank += values.null_count
        chunks.append(hash_ids(ids))
    if blank:
        raise ConfigError(f"input.id_column {source.id_name!r} is blank in {blank} row(s)")
    hashes = np.concatenate(chunks) if chunks else np.zeros(0, dtype=HASH_DTYPE)
    del chunks
    n = len(hashes) if source.limit is None else min(source.limit, len(hashes))
    run = hashes[:n].copy() if n < len(hashes) else None  # input.limit: the run's rows are the first n
    hashes.sort()  # in place: the driver holds one copy of the ids' hashes
    repeat = hashes[1:] == hashes[:-1]
    if repeat.any():
        raise ConfigError(
            f"image ids are not unique ({int(repeat.sum())} repeats, e.g. {_first_repeat(source, rows)!r}); "
            "set input.id_column"
        )
    del repeat
    return (IdSet(run, copy=False) if run is not None else IdSet.from_sorted(hashes)), n


def _first_repeat(source: ImageTableSource, rows: int) -> str:
    """The first id (in manifest order) that an earlier row already had (a second pass; error messages only)."""
    hashes = np.concatenate([hash_ids(b.column(ID_COLUMN)) for _, b in source.batches(rows, limit=False)])
    order = np.argsort(hashes, kind="stable")
    ordered = hashes[order]
    first = int(order[1:][ordered[1:] == ordered[:-1]].min())
    return _id_at(source, first, rows)


def _id_at(source: ImageTableSource, row: int, rows: int) -> str:
    for first, batch in source.batches(rows, limit=False):
        if first <= row < first + batch.num_rows:
            return str(batch.column(ID_COLUMN)[row - first].as_py())
    raise IndexError(row)


def ids_of(source: ImageTableSource, hashes: np.ndarray, rows: int = BATCH_ROWS, at_most: int = 5) -> list[str]:
    """The ids (strings) of up to ``at_most`` of ``hashes``, by a pass over the source (for messages)."""
    wanted = IdSet(hashes)
    out: list[str] = []
    for _, batch in source.batches(rows):
        ids = batch.column(ID_COLUMN)
        hit = wanted.contains(hash_ids(ids))
        out += [str(v) for v in np.asarray(ids.to_pylist(), dtype=object)[hit]]
        if len(out) >= at_most:
            break
    return out[:at_most]
