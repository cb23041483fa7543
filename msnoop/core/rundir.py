"""A job's output folder as one object: its layout, its record (``run.json``), its resolved config, its identity.

Every stage that writes or reads an output folder goes through :class:`RunDir`; no other module spells out
the names below. The layout::

    <dir>/embeddings/part-<key>.parquet    one row per image: Metadata_* + emb_0000 ... emb_<D-1>
    <dir>/errors/part-<key>.parquet        one row per image that could not be embedded: Metadata_ImageID, path, reason
    <dir>/cells/part-<key>.parquet         cells mode: one row per cell
    <dir>/masks/<image id>.tif             cells mode with cells.save_masks: each image's label mask
    <dir>/run.json                         the run's record: model, preprocessing, channels, embed dim, provenance
    <dir>/resolved_config.yaml             the validated job config
    <dir>/lancedb/                         the embedded LanceDB database built from the parts (unless output.lancedb)
    <dir>/published.json                   what the LanceDB tables were last built from (a re-run with nothing new
                                           skips rebuilding them)
    <dir>/part-index/<n>.parquet           what each part of embeddings/, errors/, cells/ holds (its ids, size and
                                           modification time), so the driver's checks read a few index files
                                           instead of every part (:mod:`msnoop.core.partindex`)
    <dir>/profiles.parquet                 profile job: sphered rows
    <dir>/treatments.parquet               profile job: sphered rows aggregated per treatment
    <dir>/correction.json                  profile job: what was fitted on how many controls
    <dir>/wells.parquet                    screen job: one row per well with its readout
    <dir>/screen.json, screen.png          screen job: Z', dose response, the classifier; their plot
    <dir>/embeddings/<model>/              bench job: one embedding run per model (:meth:`RunDir.sub`)
    <dir>/.msnoop-lock/                    the writer lock: one claim (and heartbeat) per writer (see below)

(``<key>``: :func:`msnoop.core.parts.block_key` of the part's image ids.) A folder is a local path or an
object storage URI (``s3://bucket/run1``); a :class:`RunDir` carries the storage settings with it, so stages
hand over one object instead of a folder and its settings.

The *identity* of an embedding run is what a resume must not mix in one table: every setting that can change a
stored vector or row (:func:`msnoop.embed.identity.run_identity`: the model by its sha256, the preprocessing,
the channels and how they are picked, the z policy, the cells settings, the post-processing, ...), saved in
``run.json`` before any work. :meth:`RunDir.check_resumable` compares a new run's identity with the folder's and
:meth:`RunDir.resumed_schema` its metadata types.

*One writer at a time*: :meth:`RunDir.writer_lock` claims the folder for the process that writes it, on a local
disk and on object storage alike (no rename or conditional write is needed). Each writer uploads its own claim
object ``.msnoop-lock/claim-<token>.json`` (who: host, process, user, command; since when), written twice so that
its modification time is never earlier than the moment it became visible, then lists the claims: the earliest live
claim, by the storage's own clock, holds the folder; a later claimant withdraws and is refused naming the holder;
claims of the same instant both withdraw and try again. The holder keeps a heartbeat object beside its claim fresh
(every :data:`LOCK_HEARTBEAT_S`). A claim is stale, and removed by the next claimant, when its process is gone
(same host) or its heartbeat is older than :data:`LOCK_STALE_S`; a holder whose claim was removed finds out at its
next heartbeat and fails before it marks its run complete. ``run.json`` says ``status: running`` while an
embedding run writes and ``complete`` after it; a reader (:meth:`RunDir.check_complete`) says when a folder is
being written, or was left unfinished by a run that stopped, instead of reading a partial snapshot.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import logging
import os
import posixpath
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.fs as pafs

from msnoop.core import storage as st
from msnoop.core.parts import schema_from_json
from msnoop.core.storage import StorageConfig

__all__ = ["LOCK_STALE_S", "FolderBusyError", "OutputMismatchError", "RunDir", "RunStateError", "WriterLock"]

logger = logging.getLogger(__name__)

#: Seconds between a writer's heartbeats.
LOCK_HEARTBEAT_S = 30.0
#: Times two claimants that wrote their claims at the same instant withdraw and try again.
_LOCK_TIE_TRIES = 5
#: Seconds without a heartbeat after which another host's claim is stale (a claim of this host is stale as soon as
#: its process is gone).
LOCK_STALE_S = 300.0


class OutputMismatchError(ValueError):
    """An output folder holds rows made with other settings (its identity differs) or other metadata types."""


class RunStateError(ValueError):
    """An output folder is being written by another process, or was left unfinished: a read would be partial."""


class FolderBusyError(RunStateError):
    """Another live process holds an output folder's writer lock (the message names it and since when)."""


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).astimezone().isoformat(timespec="seconds")


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


@dataclass
class _Claim:
    """One writer's claim as found in the lock folder."""

    token: str
    mtime: float  # the storage's clock: when the claim was written
    beat: float  # the storage's clock: the last heartbeat (the claim's mtime before the first one)
    holder: dict[str, Any]

    def describe(self) -> str:
        h = self.holder
        who = f"`{h.get('command', 'msnoop')}` (process {h.get('pid')} on host {h.get('host')}, user {h.get('user')})"
        return f"{who} since {h.get('since', '?')}"

    def gone(self) -> bool:
        """Whether the claim's process is known to be gone: same host, and no process with its pid and start time."""
        h = self.holder
        if h.get("host") != socket.gethostname() or not isinstance(h.get("pid"), int):
            return False
        started = _process_started(h["pid"])
        return started is None or abs(started - float(h.get("pid_started", started))) > 1.0


@dataclass
class WriterLock:
    """A held writer lock of one output folder (see :meth:`RunDir.writer_lock`); released by :meth:`release`.

    Attributes:
        run: The folder.
        token: This claim's token (``claim-<token>.json`` in ``<dir>/.msnoop-lock/``).
        heartbeat_s: Seconds between heartbeats (a daemon thread refreshes ``beat-<token>``).
    """

    run: RunDir
    token: str
    heartbeat_s: float = LOCK_HEARTBEAT_S
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def claim(self) -> str | Path:
        return self.run.path(RunDir.LOCK, f"claim-{self.token}.json")

    @property
    def beat(self) -> str | Path:
        return self.run.path(RunDir.LOCK, f"beat-{self.token}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"msnoop-lock-{self.token[:8]}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not st.exists(self.claim, self.run.storage):  # another claimant judged it stale and removed it
                    self.lost = True
                    logger.error("%s: this run's writer lock was taken over (its claim is gone)", self.run)
                    return
                st.write_text(self.beat, _now_iso(), self.run.storage)
            except Exception:  # a failed heartbeat is retried at the next one
                logger.debug("heartbeat of %s failed", self.claim, exc_info=True)

    def check(self) -> None:
        """Raise :class:`FolderBusyError` when the claim was taken over (this process looked dead to another)."""
        if self.lost or not st.exists(self.claim, self.run.storage):
            self.lost = True
            raise FolderBusyError(
                f"{self.run}: this run's writer lock was taken over by another process (its claim "
                f"{self.claim} is gone: it looked stale); the folder may hold rows of both: re-run to check it"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove this claim (nothing happens for a claim already removed)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for loc in (self.beat, self.claim):
            with contextlib.suppress(Exception):
                st.remove(loc, self.run.storage)


#: Locks this process holds, by folder: re-entering a folder's lock in the same process is allowed.
_HELD: dict[str, tuple[WriterLock, int]] = {}
_HELD_GUARD = threading.Lock()


def _model_label(run: dict[str, Any]) -> str:
    sha = run.get("model_sha256")
    return f"{run.get('model_source')}" + (f" (sha256 {sha[:12]})" if sha else "")


@dataclass(frozen=True)
class RunDir:
    """One output folder (local path or URI) with the storage settings to reach it.

    Attributes:
        location: The folder: a :class:`~pathlib.Path` for local folders, the URI string as given otherwise.
        storage: Object storage settings (endpoint, region); ``None`` reads them from the environment.
    """

    location: str | Path
    storage: StorageConfig | None = None

    EMBEDDINGS: ClassVar[str] = "embeddings"
    ERRORS: ClassVar[str] = "errors"
    CELLS: ClassVar[str] = "cells"
    MASKS: ClassVar[str] = "masks"
    RUN_FILE: ClassVar[str] = "run.json"
    CONFIG_FILE: ClassVar[str] = "resolved_config.yaml"
    LANCEDB: ClassVar[str] = "lancedb"
    PUBLISHED: ClassVar[str] = "published.json"
    PART_INDEX: ClassVar[str] = "part-index"
    PROFILES: ClassVar[str] = "profiles.parquet"
    TREATMENTS: ClassVar[str] = "treatments.parquet"
    CORRECTION: ClassVar[str] = "correction.json"
    WELLS: ClassVar[str] = "wells.parquet"
    SCREEN: ClassVar[str] = "screen.json"
    SCREEN_PLOT: ClassVar[str] = "screen.png"
    LOCK: ClassVar[str] = ".msnoop-lock"
    #: Sub-folders of an embedding run that hold its rows (removed together by :meth:`remove_rows`).
    ROW_FOLDERS: ClassVar[tuple[str, ...]] = (EMBEDDINGS, ERRORS, CELLS, MASKS)
    #: ``run.json``'s ``status`` while an embedding run writes, and once its rows are complete.
    RUNNING: ClassVar[str] = "running"
    COMPLETE: ClassVar[str] = "complete"

    def __post_init__(self) -> None:
        loc = self.location
        object.__setattr__(self, "location", str(loc) if st.is_uri(loc) else st.local_path(loc))

    # --- where things are ---------------------------------------------------------------------------------------

    @property
    def is_uri(self) -> bool:
        """Whether the folder is on object storage (``s3://...``) rather than a local path."""
        return st.is_uri(self.location)

    def path(self, *names: str) -> str | Path:
        """``location / names``: a :class:`~pathlib.Path` for a local folder, a URI string otherwise."""
        return st.join(self.location, *names)

    def absolute(self) -> str:
        """The folder as a string other processes can use: a local folder made absolute, a URI as it is."""
        return str(self.location) if self.is_uri else str(Path(self.location).resolve())

    def sub(self, *names: str) -> RunDir:
        """A folder below this one, with the same storage settings (e.g. one model's run inside a bench)."""
        return RunDir(self.path(*names), self.storage)

    @property
    def embeddings(self) -> str | Path:
        """Folder of the image-level Parquet parts."""
        return self.path(self.EMBEDDINGS)

    @property
    def errors(self) -> str | Path:
        """Folder of the Parquet parts listing the images that could not be embedded."""
        return self.path(self.ERRORS)

    @property
    def cells(self) -> str | Path:
        """Folder of the per-cell Parquet parts (cells mode)."""
        return self.path(self.CELLS)

    @property
    def masks(self) -> str | Path:
        """Folder of the saved label masks (cells mode with ``cells.save_masks``)."""
        return self.path(self.MASKS)

    @property
    def part_index(self) -> str | Path:
        """Folder of the part index files (:class:`msnoop.core.partindex.PartIndex`)."""
        return self.path(self.PART_INDEX)

    @property
    def run_file(self) -> str | Path:
        """The run's record, ``run.json``."""
        return self.path(self.RUN_FILE)

    @property
    def published_file(self) -> str | Path:
        """What the run's LanceDB tables were last built from (:func:`msnoop.store.publish.publish_embeddings`)."""
        return self.path(self.PUBLISHED)

    @property
    def config_file(self) -> str | Path:
        """The validated job config, ``resolved_config.yaml``."""
        return self.path(self.CONFIG_FILE)

    @property
    def profiles(self) -> Path:
        """Profile job: the sphered rows (a local folder only)."""
        return Path(self.path(self.PROFILES))

    @property
    def treatments(self) -> Path:
        """Profile job: the treatment-level rows (a local folder only)."""
        return Path(self.path(self.TREATMENTS))

    @property
    def correction(self) -> Path:
        """Profile job: the correction record (a local folder only)."""
        return Path(self.path(self.CORRECTION))

    @property
    def wells(self) -> Path:
        """Screen job: one row per well (a local folder only)."""
        return Path(self.path(self.WELLS))

    @property
    def screen(self) -> Path:
        """Screen job: its record (a local folder only)."""
        return Path(self.path(self.SCREEN))

    @property
    def screen_plot(self) -> Path:
        """Screen job: the control wells and dose-response plot (a local folder only)."""
        return Path(self.path(self.SCREEN_PLOT))

    def lancedb_uri(self, override: str | None = None) -> str:
        """The LanceDB database of this run: ``override`` (``output.lancedb``) or ``<dir>/lancedb``."""
        return override or str(self.path(self.LANCEDB))

    def recorded_lancedb_uri(self, info: dict[str, Any]) -> str:
        """The database a finished run recorded in ``run.json`` (``info["lancedb"]``).

        A recorded relative local path that does not exist from here (the folder was moved or the run was made
        in another working directory) falls back to ``<dir>/lancedb``.
        """
        uri = str(info.get("lancedb") or self.lancedb_uri())
        if not st.is_uri(uri) and not Path(uri).is_absolute() and not Path(uri).exists():
            return self.lancedb_uri()
        return uri

    # --- what is there ------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether this is an msnoop output folder (its ``run.json`` exists).

        Raises:
            StorageError: The location's scheme has no filesystem here (e.g. a LanceDB-only ``db://`` URI).
        """
        return st.exists(self.run_file, self.storage)

    def has_rows(self) -> bool:
        """Whether any embeddings, errors or cells part has been written (a run to resume, not a fresh folder)."""
        return any(
            st.list_files(sub, "part-*.parquet", self.storage) for sub in (self.embeddings, self.errors, self.cells)
        )

    def check_writable(self) -> None:
        """Preflight before any work: the folder can be written (local folders are created).

        Raises:
            StorageError: One line naming the location (missing bucket, wrong credentials, unreachable endpoint).
        """
        st.check_writable(self.location, self.storage)

    def makedirs(self) -> None:
        """Create a local folder (parents included); nothing on object storage."""
        st.makedirs(self.location, self.storage)

    # --- the run's record and config ----------------------------------------------------------------------------

    def read_info(self) -> dict[str, Any]:
        """The run's record (``run.json``) as a dict.

        Raises:
            FileNotFoundError: The folder is not an msnoop output folder (no ``run.json``); the message says so.
        """
        try:
            return json.loads(st.read_text(self.run_file, self.storage))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.run_file} not found: {self.location} is not an msnoop output folder (no {self.RUN_FILE})"
            ) from None

    def write_info(self, info: dict[str, Any]) -> Path | str:
        """Write the run's record atomically (readers see the old ``run.json`` or the new one); returns its path."""
        st.write_text(self.run_file, json.dumps(info, indent=2, default=str), self.storage)
        return self.run_file

    def save_config(self, cfg: Any) -> Path | str:
        """Write the validated job config (a pydantic model) as YAML beside the outputs; returns its path."""
        from msnoop.core.config import config_to_yaml

        self.makedirs()
        st.write_text(self.config_file, config_to_yaml(cfg), self.storage)
        return self.config_file

    def remove_rows(self) -> None:
        """Remove every row of an embedding run (embeddings, errors, cells, masks) and the folder's own LanceDB
        database (``<dir>/lancedb``; an ``output.lancedb`` elsewhere is left alone) and the part index;
        ``run.json`` stays."""
        for sub in (*self.ROW_FOLDERS, self.PART_INDEX, self.LANCEDB):
            st.remove(self.path(sub), self.storage)

    # --- identity: what a resume must not mix -------------------------------------------------------------------

    def check_resumable(self, info: dict[str, Any], defaults: dict[str, Any] | None = None) -> None:
        """Refuse to resume into a folder whose rows were made with other settings (one table would mix them).

        ``info`` is the new run's record (see :func:`msnoop.embed.pipeline.run_info`); its ``identity``
        (:func:`msnoop.embed.identity.run_identity`) is compared with the one in the folder's ``run.json``, setting
        by setting. A setting the folder's record does not have (added to msnoop since) counts as its default
        (``defaults``: dotted setting -> default value). A folder written before identities were recorded is
        compared by mode, model, preprocessing, channels and cells settings. A folder without rows (embeddings,
        errors or cells), or without ``run.json``, accepts any run.

        Raises:
            OutputMismatchError: Naming every difference and the ways out.
        """
        if not self.has_rows():
            return
        try:
            before = self.read_info()
        except FileNotFoundError:
            return
        if "identity" in before and "identity" in info:
            self._compare_identities(before["identity"], info["identity"], defaults or {})
            return
        diffs = []
        was_cells, is_cells = "cells" in before, "cells" in info
        if was_cells != is_cells:
            mode = {True: "cells mode", False: "whole-image mode"}
            diffs.append(f"it holds a {mode[was_cells]} run; this job is in {mode[is_cells]}")
        # a checkpoint is known by its sha256 (its path may differ between machines), a random network by its name
        identity = [run.get("model_sha256") or run.get("model_source") for run in (before, info)]
        if identity[0] is not None and identity[0] != identity[1]:
            diffs.append(f"model {_model_label(before)} there, {_model_label(info)} now")
        for key in ("preprocess", "channels", "cells"):
            if key in before and before[key] != info.get(key):
                diffs.append(f"{key} {before[key]} there, {info.get(key)} now")
        self._refuse(diffs)

    def _compare_identities(self, before: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any]) -> None:
        missing = object()
        diffs = []
        for key in sorted(set(before) | set(now)):
            if key not in now:
                continue  # a setting this version no longer has (or no longer counts): nothing to compare
            old = before.get(key, defaults.get(key, missing))
            if old != now[key] and key == "cells":
                mode = {True: "cells mode", False: "whole-image mode"}
                diffs.append(f"it holds a {mode[bool(old)]} run; this job is in {mode[bool(now[key])]}")
            elif old != now[key]:
                shown = "unset" if old is missing else json.dumps(old, default=str)
                diffs.append(f"{key}: {shown} there, {json.dumps(now[key], default=str)} now")
        self._refuse(diffs)

    def _refuse(self, diffs: list[str]) -> None:
        if diffs:
            more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
            raise OutputMismatchError(
                f"{self.location} holds rows made with other settings ({'; '.join(diffs[:6])}{more}): resuming "
                "would mix them in one table. Use another output.dir, remove the old outputs, or set "
                "output.on_mismatch: replace"
            )

    def resumed_schema(self, new: pa.Schema) -> pa.Schema:
        """The run's metadata schema when resuming: the stored one plus the columns new to this manifest.

        Returns ``new`` for a folder without rows or without a stored schema.

        Raises:
            OutputMismatchError: A column's type differs from the stored run's (one table cannot hold both).
        """
        if not self.has_rows():
            return new
        try:
            stored = self.read_info().get("metadata_schema")
        except FileNotFoundError:
            return new
        if not stored:
            return new
        before = schema_from_json(stored)
        new_types = dict(zip(new.names, new.types, strict=True))  # by name once: wide schemas stay linear
        diffs = [
            f"{f.name}: {f.type} there, {new_types[f.name]} now"
            for f in before
            if f.name in new_types and new_types[f.name] != f.type
        ]
        if diffs:
            raise OutputMismatchError(
                f"{self.location} holds rows whose metadata types differ from this manifest's ({'; '.join(diffs)}): "
                "one table cannot hold both. Declare the old types in input.dtypes, use another output.dir, or set "
                "output.on_mismatch: replace"
            )
        old_names = set(before.names)
        return pa.schema([*before, *[f for f in new if f.name not in old_names]])

    # --- one writer at a time ----------------------------------------------------------------------------------

    def _lock_key(self) -> str:
        return self.absolute().rstrip("/")

    def _claims(self) -> list[_Claim]:
        """The claims in the lock folder, with their modification and heartbeat times (the storage's clock)."""
        fs, path = st.resolve(self.path(self.LOCK), self.storage)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        beats = {}
        claims = {}
        for i in infos:
            name = posixpath.basename(i.path)
            stamp = i.mtime.timestamp() if i.mtime is not None else 0.0
            if name.startswith("beat-"):
                beats[name.removeprefix("beat-")] = stamp
            elif name.startswith("claim-") and name.endswith(".json"):
                claims[name.removeprefix("claim-").removesuffix(".json")] = (stamp, i.path)
        out = []
        for token, (stamp, where) in claims.items():
            try:
                with fs.open_input_stream(where) as fh:
                    holder = json.loads(fh.read())
            except (OSError, ValueError):  # removed meanwhile, or a claim being written: judge it by its times
                holder = {}
            out.append(_Claim(token, stamp, max(stamp, beats.get(token, stamp)), holder))
        return sorted(out, key=lambda c: (c.mtime, c.token))

    def lock_holder(self, *, stale_after_s: float = LOCK_STALE_S) -> str | None:
        """Who writes the folder now (a live claim of another process), described in words; None if nobody."""
        with _HELD_GUARD:
            own = _HELD.get(self._lock_key())
        now = self._storage_now()
        for claim in self._claims():
            if own is not None and claim.token == own[0].token:
                continue
            if claim.gone() or now - claim.beat > stale_after_s:
                continue
            return f"{claim.describe()} (last heartbeat {max(0.0, now - claim.beat):.0f} s ago)"
        return None

    @staticmethod
    def _storage_now() -> float:
        """Now, for judging heartbeats found by a reader: this host's clock (a reader writes nothing, so it cannot
        ask the storage for its time; a skew of seconds against minutes of staleness does not matter)."""
        return time.time()

    @contextlib.contextmanager
    def writer_lock(
        self,
        command: str | None = None,
        *,
        stale_after_s: float = LOCK_STALE_S,
        heartbeat_s: float = LOCK_HEARTBEAT_S,
    ) -> Iterator[WriterLock]:
        """Hold the folder's writer lock for the block (re-entrant within one process).

        Args:
            command: What holds it, for the messages of other writers and readers (default: this process's
                command line, shortened).
            stale_after_s: A claim of another host whose heartbeat is older than this is stale (removed).
            heartbeat_s: Seconds between this claim's heartbeats.

        Raises:
            FolderBusyError: Another live process holds the folder (the message names it and since when).
            StorageError: The folder cannot be written.
        """
        key = self._lock_key()
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None:
                _HELD[key] = (held[0], held[1] + 1)
        if held is not None:
            try:
                yield held[0]
            finally:
                with _HELD_GUARD:
                    lock, n = _HELD[key]
                    _HELD[key] = (lock, n - 1)
            return
        lock = self._acquire(command, stale_after_s=stale_after_s, heartbeat_s=heartbeat_s)
        with _HELD_GUARD:
            _HELD[key] = (lock, 1)
        try:
            yield lock
        finally:
            with _HELD_GUARD:
                _HELD.pop(key, None)
            lock.release()

    def _acquire(self, command: str | None, *, stale_after_s: float, heartbeat_s: float) -> WriterLock:
        self.makedirs()
        pid = os.getpid()
        argv0 = "msnoop" if "msnoop" in Path(sys.argv[0]).name else Path(sys.argv[0]).name
        holder = {
            "host": socket.gethostname(),
            "pid": pid,
            "pid_started": _process_started(pid),
            "user": getpass.getuser(),
            "command": command or " ".join([argv0, *sys.argv[1:3]]),
            "since": _now_iso(),
        }
        for attempt in range(_LOCK_TIE_TRIES):
            token = f"{time.time_ns():x}-{uuid.uuid4().hex[:12]}"
            lock = WriterLock(self, token, heartbeat_s=heartbeat_s)
            text = json.dumps({**holder, "token": token})
            # Written twice: a storage may date an object from when its upload (or temporary file) began, which can
            # be before it became visible; the second write starts after the first is visible, so the claim's time
            # is never earlier than its visibility, and two claimants can never both find themselves first.
            st.write_text(lock.claim, text, self.storage)
            st.write_text(lock.claim, text, self.storage)
            try:
                tie = self._contest(lock, stale_after_s)
            except BaseException:
                lock.release()
                raise
            if not tie:
                lock.start()
                return lock
            lock.release()  # claims written at the same instant: both withdraw and try again a moment later
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
        raise FolderBusyError(f"{self}: other processes claimed the folder at the same instant {_LOCK_TIE_TRIES} times")

    def _contest(self, lock: WriterLock, stale_after_s: float) -> bool:
        """Decide whether ``lock``'s claim holds the folder: True for a tie to retry; raises when another holds it."""
        claims = self._claims()
        mine = next((c for c in claims if c.token == lock.token), None)
        if mine is None:
            raise FolderBusyError(f"{self}: the writer lock's claim {lock.claim} vanished as it was written")
        tie = False
        for other in claims:
            if other.token == lock.token:
                continue
            age = mine.mtime - other.beat
            if other.gone() or age > stale_after_s:
                why = "its process is gone" if other.gone() else f"no heartbeat for {age:.0f} s"
                logger.warning("%s: removing a stale writer lock of %s (%s)", self, other.describe(), why)
                for name in (f"claim-{other.token}.json", f"beat-{other.token}"):
                    with contextlib.suppress(Exception):
                        st.remove(self.path(self.LOCK, name), self.storage)
                continue
            if other.mtime == mine.mtime:
                tie = True  # which was first cannot be told: the storage's clock is coarser than the two writes
            elif other.mtime < mine.mtime:
                raise FolderBusyError(
                    f"{self} is being written by {other.describe()}; wait until it finishes or use another "
                    f"output.dir (its lock: {self.path(self.LOCK, f'claim-{other.token}.json')}; a lock whose "
                    f"process is gone is taken over, after {stale_after_s:.0f} s without heartbeat on another host)"
                )
        return tie

    # --- state: is the folder complete? -------------------------------------------------------------------------

    def state(self, *, stale_after_s: float = LOCK_STALE_S) -> str | None:
        """Why a read of this folder would be partial, in words, or None when it is complete.

        ``"being written by ..."`` while another live process holds its writer lock; ``"unfinished ..."`` when its
        last run stopped before the end (``run.json`` says ``running`` and nobody holds the lock). A folder written
        before runs recorded their status, or by another job kind, is complete.
        """
        try:
            if not self.exists():
                return None
        except st.StorageError:
            return None
        holder = self.lock_holder(stale_after_s=stale_after_s)
        if holder is not None:
            return f"being written by {holder}"
        with _HELD_GUARD:
            if self._lock_key() in _HELD:  # this process writes it: its own reads are not partial
                return None
        try:
            status = self.read_info().get("status")
        except (FileNotFoundError, ValueError):
            return None
        if status == self.RUNNING:
            return (
                "unfinished: its last run stopped before the end (run.json says 'running' and no process holds "
                f"the folder); re-run `msnoop embed {self.config_file}` to finish it (done images are kept)"
            )
        return None

    def check_complete(self, what: str = "read") -> None:
        """Refuse to read a folder that is being written or was left unfinished (see :meth:`state`).

        Raises:
            RunStateError: One line: the folder, why a read would be partial, what to do.
        """
        why = self.state()
        if why is not None:
            raise RunStateError(f"cannot {what} {self}: it is {why}")

    def __str__(self) -> str:
        return str(self.location)
