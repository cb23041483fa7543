"""What every part of an output folder holds, kept in a few index files instead of read from each part.

The driver of an embedding run checks its folder several times: which ids are already there (to resume), which
are written twice (to repair), that every input id is there once (the totals check), how many rows each part has
(to plan the LanceDB build). Read from the parts, each check costs a few requests per part; a screen of 10^5
parts on object storage spends tens of minutes on them. Instead, each write task describes the parts it wrote
(:func:`describe_part`: name, size, modification time, the 16-byte hash of each row's id) and returns that
description with its counts; the driver collects them in a :class:`PartIndex` and writes them as index files
(``<dir>/part-index/``, see :class:`msnoop.core.rundir.RunDir`), a new file every minute or so and one compacted
file at the end of a run.

An index entry is only believed for a part that the folder's listing shows with the same size and modification
time (one listing request per 1000 parts): a part written after the index (by any version of msnoop), rewritten
since, or never indexed (a folder written before indexes existed) is read instead, and its entry is added to the
index; an entry whose part is gone is ignored. Entries are written only after their part exists (the write task
returns after its upload or rename; each index file is written whole, see :mod:`msnoop.core.storage`), so a run
killed at any point leaves an index that claims no row the folder lacks. Checks made from the index and from the
parts agree exactly (``tests/test_partindex.py`` compares them over many random folders).

msnoop's own rewrites of a part (the repair of repeated rows, ``runtime.retry_errors``, orphan cells) drop its
entry. Object storage lists modification times in whole seconds, so a part rewritten to the very same size within
the second of its indexed write by a program that does not know the index would still be taken from its entry.
"""

from __future__ import annotations

import logging
import posixpath
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from msnoop.core import storage as st
from msnoop.core.idset import HASH_DTYPE, IdSet, hash_ids
from msnoop.core.parts import CELL_KEY, ID_COLUMN, READ_THREADS, key_hashes
from msnoop.core.rundir import RunDir
from msnoop.core.storage import StorageConfig

__all__ = ["FolderScan", "PartEntry", "PartIndex", "decode_entries", "describe_part", "encode_entries"]

logger = logging.getLogger(__name__)

#: The index files' schema: one row per part.
INDEX_SCHEMA = pa.schema(
    [
        ("folder", pa.string()),  # RunDir.EMBEDDINGS, ERRORS or CELLS
        ("name", pa.string()),  # part-<key>.parquet
        ("size", pa.int64()),  # bytes
        ("mtime_ns", pa.int64()),  # the storage's modification time, nanoseconds since the epoch
        ("ids", pa.large_binary()),  # the rows' id hashes (hash_ids), 16 bytes each, in row order
        ("keys", pa.large_binary()),  # cells parts: the rows' key hashes (image id and cell id); else null
    ]
)

#: Seconds between the index files a run writes while its parts are being written.
FLUSH_EVERY_S = 60.0


@dataclass(frozen=True)
class PartEntry:
    """What one part holds.

    Attributes:
        folder: The part's folder within the run (``embeddings``, ``errors`` or ``cells``).
        name: Its file name (``part-<key>.parquet``).
        size: Its size in bytes.
        mtime_ns: Its modification time (nanoseconds since the epoch), as the storage reports it.
        ids: ``[rows]`` dtype :data:`~msnoop.core.idset.HASH_DTYPE`: the hash of each row's ``Metadata_ImageID``.
        keys: Cells parts: ``[rows]`` hashes of each row's key (:data:`~msnoop.core.parts.CELL_KEY`, see
            :func:`~msnoop.core.parts.key_hashes`); ``None`` for other folders.
    """

    folder: str
    name: str
    size: int
    mtime_ns: int
    ids: np.ndarray
    keys: np.ndarray | None = None

    def matches(self, info: pafs.FileInfo, remote: bool) -> bool:
        """Whether the listed file ``info`` is the part this entry describes (same size and modification time;
        on object storage, whose listings give whole seconds, the same second)."""
        mtime = _mtime_ns(info)
        if info.size != self.size or mtime is None or (self.folder == RunDir.CELLS and self.keys is None):
            return False
        if remote:
            return mtime // 1_000_000_000 == self.mtime_ns // 1_000_000_000
        return mtime == self.mtime_ns


def _mtime_ns(info: pafs.FileInfo) -> int | None:
    ns = getattr(info, "mtime_ns", None)
    if ns is None and info.mtime is not None:
        ns = int(info.mtime.timestamp() * 1e9)
    return None if ns is None else int(ns)


def describe_part(
    path: str | Path,
    folder: str,
    ids: Iterable[Any] | pa.ChunkedArray,
    storage: StorageConfig | None = None,
    *,
    keys: np.ndarray | None = None,
) -> PartEntry:
    """The index entry of a part just written at ``path`` (in run folder ``folder``) holding ``ids`` in row order
    (``keys``: a cells part's row key hashes, :func:`msnoop.core.parts.key_hashes` of its
    :data:`~msnoop.core.parts.CELL_KEY` columns).

    Asks the storage for the file's size and modification time (a ``stat``; one HEAD request on object storage).

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    fs, where = st.resolve(path, storage)
    info = fs.get_file_info(where)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{path}: no such part")
    mtime = int(_mtime_ns(info) or 0)
    return PartEntry(folder, posixpath.basename(where), int(info.size), mtime, hash_ids(ids), keys)


def _table(entries: list[PartEntry]) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "folder": [e.folder for e in entries],
            "name": [e.name for e in entries],
            "size": [e.size for e in entries],
            "mtime_ns": [e.mtime_ns for e in entries],
            "ids": [e.ids.tobytes() for e in entries],
            "keys": [None if e.keys is None else e.keys.tobytes() for e in entries],
        },
        schema=INDEX_SCHEMA,
    )


def _entries(table: pa.Table) -> list[PartEntry]:
    cols = {c: table.column(c).to_pylist() for c in INDEX_SCHEMA.names}
    return [
        PartEntry(
            f,
            n,
            int(s),
            int(m),
            np.frombuffer(i, dtype=HASH_DTYPE),
            None if k is None else np.frombuffer(k, HASH_DTYPE),
        )
        for f, n, s, m, i, k in zip(*(cols[c] for c in INDEX_SCHEMA.names), strict=True)
    ]


def encode_entries(entries: list[PartEntry]) -> bytes:
    """Entries as Arrow IPC bytes (what a write task returns to the driver)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, INDEX_SCHEMA) as writer:
        writer.write_table(_table(entries))
    return sink.getvalue().to_pybytes()


def decode_entries(blob: bytes) -> list[PartEntry]:
    """Inverse of :func:`encode_entries` (empty bytes give ``[]``)."""
    if not blob:
        return []
    return _entries(pa.ipc.open_stream(pa.py_buffer(blob)).read_all())


@dataclass
class FolderScan:
    """One part folder as it is now, with what each part holds (see :meth:`PartIndex.scan`).

    Attributes:
        files: The parts (paths or URIs) in name order, as :func:`msnoop.core.parts.part_files` gives them.
        ids: Per part, ``[rows]`` id hashes (dtype :data:`~msnoop.core.idset.HASH_DTYPE`) in row order.
        n_read: Parts that were read because the index did not describe them.
        keys: ``cells/``: per part, ``[rows]`` row key hashes (:data:`~msnoop.core.parts.CELL_KEY`); else ``None``.
    """

    files: list[Any]
    ids: list[np.ndarray]
    n_read: int = 0
    keys: list[np.ndarray] | None = None

    @property
    def rows(self) -> list[int]:
        """Rows of each part."""
        return [len(h) for h in self.ids]

    def id_set(self) -> IdSet:
        """The ids of all parts as an :class:`~msnoop.core.idset.IdSet`."""
        return IdSet(np.concatenate(self.ids), copy=False) if self.ids else IdSet()


class PartIndex:
    """The part index of one output folder: entries loaded from its index files, plus those added since.

    Args:
        run: The output folder.
        entries: Entries to start with (later ones replace earlier ones of the same part).
        files: The index files they were read from (replaced by :meth:`compact`).
    """

    def __init__(self, run: RunDir, entries: Iterable[PartEntry] = (), files: Iterable[Any] = ()) -> None:
        self.run = run
        self.entries: dict[tuple[str, str], PartEntry] = {}
        self.files = list(files)
        self._pending: list[PartEntry] = []
        self._last_flush = time.monotonic()
        self._scans: dict[str, FolderScan] = {}  # the last scan of each folder, until the index hears of a change
        for e in entries:
            self.entries[(e.folder, e.name)] = e

    @classmethod
    def load(cls, run: RunDir) -> PartIndex:
        """The folder's index (one listing of ``part-index/`` and one read per index file); empty when it has none
        (a folder written before part indexes, or a new one). An index file that cannot be read is skipped."""
        _, infos = st.list_file_infos(run.part_index, "*.parquet", run.storage)
        files = [st.join(run.part_index, posixpath.basename(i.path)) for i in infos]
        entries: list[PartEntry] = []
        for f in files:
            try:
                fs, path = st.resolve(f, run.storage)
                entries += _entries(pq.read_table(path, filesystem=fs, schema=INDEX_SCHEMA))
            except (OSError, pa.ArrowInvalid, ValueError):
                logger.warning("%s: unreadable part index file, ignored (its parts are read instead)", f)
        return cls(run, entries, files)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, entries: Iterable[PartEntry] | bytes) -> None:
        """Record entries (or a write task's :func:`encode_entries` bytes); written by the next :meth:`flush`."""
        for e in decode_entries(entries) if isinstance(entries, bytes) else entries:
            self.entries[(e.folder, e.name)] = e
            self._pending.append(e)
            self._scans.pop(e.folder, None)

    def forget(self, folder: str, names: Iterable[str]) -> None:
        """Drop the entries of parts that were rewritten or removed (a later :meth:`scan` reads them again)."""
        names = list(names)
        if names:  # nothing changed: the kept scan still holds
            self._scans.pop(folder, None)
        for n in names:
            self.entries.pop((folder, posixpath.basename(str(n))), None)

    def relist(self) -> None:
        """Forget the kept scans: the next :meth:`scan` of each folder lists it again (after other processes, such as
        a run's write tasks, may have written parts the index has not heard of)."""
        self._scans.clear()

    def flush(self, *, every_s: float | None = None) -> Any:
        """Write the entries added since the last flush as one new index file; returns it (None if nothing to do).

        With ``every_s``, only when that many seconds passed since the last flush (call it as blocks arrive).
        """
        if not self._pending or (every_s is not None and time.monotonic() - self._last_flush < every_s):
            return None
        target = self._write(self._pending)
        self.files.append(target)
        self._pending = []
        self._last_flush = time.monotonic()
        return target

    def _write(self, entries: list[PartEntry]) -> Any:
        # Names sort by creation time, so a later file's entry of a part replaces an earlier one's when loading.
        target = st.join(self.run.part_index, f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet")
        table = _table(entries)
        with st.atomic_path(target, self.run.storage) as tmp:
            pq.write_table(table, tmp, compression="zstd")
        return target

    def compact(self) -> None:
        """Replace the index files with one holding the entries of the parts the folder has now (call after a run's
        checks, when :meth:`scan` has seen every part folder). The new file is written before the old ones go."""
        keep = [e for e in self.entries.values()]
        old = list(self.files)
        self._pending = []
        self.files = [self._write(keep)] if keep else []
        for f in old:
            st.remove(f, self.run.storage)
        self._last_flush = time.monotonic()

    def scan(self, folder: str, *, again: bool = False) -> FolderScan:
        """The parts of run folder ``folder`` (``RunDir.EMBEDDINGS``, ``ERRORS`` or ``CELLS``) and their ids.

        One listing of the folder; each part the index describes (same size and modification time) is taken from
        it, every other part is read (its ``Metadata_ImageID`` column, :data:`~msnoop.core.parts.READ_THREADS` at
        a time) and added to the index. Entries of parts that are gone are dropped.

        The result is kept until the index hears of a change to the folder (:meth:`add`, :meth:`forget`): a second
        scan then lists nothing. ``again`` lists the folder anyway (it was changed behind the index's back).

        Raises:
            KeyError: A part that had to be read lacks ``Metadata_ImageID``.
        """
        if not again and folder in self._scans:
            return self._scans[folder]
        location = self.run.path(folder)
        fs, infos = st.list_file_infos(location, "part-*.parquet", self.run.storage)
        remote = self.run.is_uri
        files = [st.join(location, posixpath.basename(i.path)) for i in infos]
        cells = folder == RunDir.CELLS
        ids: list[np.ndarray | None] = []
        keys: list[np.ndarray | None] = []
        todo = []
        for k, info in enumerate(infos):
            e = self.entries.get((folder, posixpath.basename(info.path)))
            if e is not None and e.matches(info, remote):
                ids.append(e.ids)
                keys.append(e.keys)
            else:
                ids.append(None)
                keys.append(None)
                todo.append(k)
        listed = {posixpath.basename(i.path) for i in infos}
        for key in [k for k in self.entries if k[0] == folder and k[1] not in listed]:
            del self.entries[key]
        if todo:
            fmt = pads.ParquetFileFormat()

            def read(k: int) -> tuple[np.ndarray, np.ndarray | None]:
                frag = fmt.make_fragment(infos[k].path, filesystem=fs, file_size=infos[k].size)
                table = frag.to_table(columns=CELL_KEY if cells else [ID_COLUMN])
                return hash_ids(table.column(ID_COLUMN)), key_hashes(table, CELL_KEY) if cells else None

            with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(todo))) as pool:
                for k, (h, key) in zip(todo, pool.map(read, todo), strict=True):
                    ids[k], keys[k] = h, key
                    info = infos[k]
                    name = posixpath.basename(info.path)
                    self.add([PartEntry(folder, name, int(info.size), _mtime_ns(info) or 0, h, key)])
            logger.debug("%s: %d of %d part(s) read (not in the part index)", location, len(todo), len(infos))
        out = FolderScan(
            files,
            [h for h in ids if h is not None],
            n_read=len(todo),
            keys=[h for h in keys if h is not None] if cells else None,
        )
        self._scans[folder] = out
        return out
