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
    <dir>/profiles.parquet                 profile job: sphered rows
    <dir>/treatments.parquet               profile job: sphered rows aggregated per treatment
    <dir>/correction.json                  profile job: what was fitted on how many controls
    <dir>/wells.parquet                    screen job: one row per well with its readout
    <dir>/screen.json, screen.png          screen job: Z', dose response, the classifier; their plot
    <dir>/embeddings/<model>/              bench job: one embedding run per model (:meth:`RunDir.sub`)

(``<key>``: :func:`msnoop.core.parts.block_key` of the part's image ids.) A folder is a local path or an
object storage URI (``s3://bucket/run1``); a :class:`RunDir` carries the storage settings with it, so stages
hand over one object instead of a folder and its settings.

The *identity* of an embedding run is what a resume must not mix in one table: whole-image vs cells mode,
the model (a checkpoint by its sha256, a random network by its name), the preprocessing, the channels and
the metadata types. :meth:`RunDir.check_resumable` and :meth:`RunDir.resumed_schema` compare a new run's
record with the folder's ``run.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from msnoop.core import storage as st
from msnoop.core.parts import schema_from_json
from msnoop.core.storage import StorageConfig

__all__ = ["OutputMismatchError", "RunDir"]


class OutputMismatchError(ValueError):
    """An output folder holds embeddings made by another model, preprocessing, channel list, mode or schema."""


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
    PROFILES: ClassVar[str] = "profiles.parquet"
    TREATMENTS: ClassVar[str] = "treatments.parquet"
    CORRECTION: ClassVar[str] = "correction.json"
    WELLS: ClassVar[str] = "wells.parquet"
    SCREEN: ClassVar[str] = "screen.json"
    SCREEN_PLOT: ClassVar[str] = "screen.png"
    #: Sub-folders of an embedding run that hold its rows (removed together by :meth:`remove_rows`).
    ROW_FOLDERS: ClassVar[tuple[str, ...]] = (EMBEDDINGS, ERRORS, CELLS, MASKS)

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
        """Whether any embeddings or errors part has been written (a run to resume, not a fresh folder)."""
        return bool(st.list_files(self.embeddings, "part-*.parquet", self.storage)) or bool(
            st.list_files(self.errors, "part-*.parquet", self.storage)
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
        """Remove every row of an embedding run (embeddings, errors, cells, masks); ``run.json`` stays."""
        for sub in self.ROW_FOLDERS:
            st.remove(self.path(sub), self.storage)

    # --- identity: what a resume must not mix -------------------------------------------------------------------

    def check_resumable(self, info: dict[str, Any]) -> None:
        """Refuse to resume into a folder whose embeddings were made differently (one table would mix them).

        ``info`` is the new run's record (see :func:`msnoop.embed.pipeline.run_info`); it is compared with the
        folder's ``run.json``: whole-image vs cells mode (a ``cells`` entry), the model (by sha256 for a
        checkpoint, by name for a random network), the preprocessing and the channels. A folder without
        embeddings, or without ``run.json``, accepts any run.

        Raises:
            OutputMismatchError: Naming every difference and the ways out.
        """
        if not st.list_files(self.embeddings, "part-*.parquet", self.storage):
            return
        try:
            before = self.read_info()
        except FileNotFoundError:
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
        for key in ("preprocess", "channels"):
            if key in before and before[key] != info[key]:
                diffs.append(f"{key} {before[key]} there, {info[key]} now")
        if diffs:
            raise OutputMismatchError(
                f"{self.location} holds embeddings made differently ({'; '.join(diffs)}): resuming would mix them "
                "in one table. Use another output.dir, remove the old outputs, or set output.on_mismatch: replace"
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
        diffs = [
            f"{f.name}: {f.type} there, {new.field(f.name).type} now"
            for f in before
            if f.name in new.names and new.field(f.name).type != f.type
        ]
        if diffs:
            raise OutputMismatchError(
                f"{self.location} holds rows whose metadata types differ from this manifest's ({'; '.join(diffs)}): "
                "one table cannot hold both. Declare the old types in input.dtypes, use another output.dir, or set "
                "output.on_mismatch: replace"
            )
        return pa.schema([*before, *[f for f in new if f.name not in before.names]])

    def __str__(self) -> str:
        return str(self.location)
