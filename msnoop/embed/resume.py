"""Resume checks: a re-run skips ids already written, and refuses a folder whose embeddings were made differently."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa

from msnoop.core import parts
from msnoop.core import storage as st
from msnoop.core.parts import ID_COLUMN
from msnoop.core.storage import StorageConfig

if TYPE_CHECKING:
    from msnoop.embed.config import EmbedJob


class OutputMismatchError(ValueError):
    """An output folder holds embeddings made by another model, preprocessing, channel list or mode."""


def _model_label(run: dict[str, Any]) -> str:
    sha = run.get("model_sha256")
    return f"{run.get('model_source')}" + (f" (sha256 {sha[:12]})" if sha else "")


def check_resumable(
    cfg: EmbedJob, out_dir: Path | str, info: dict[str, Any], *, storage: StorageConfig | None = None
) -> None:
    """Refuse to resume into a folder whose embeddings were made differently (one table would mix them).

    Compared with the folder's ``run.json``: whole-image vs cells mode, the model (by sha256 for a
    checkpoint, by name for a random network), the preprocessing and the channels.
    """
    if not parts.part_files(st.join(out_dir, parts.EMBEDDINGS), storage=storage):
        return
    try:
        before = parts.read_run_info(out_dir, storage=storage)
    except FileNotFoundError:
        return
    diffs = []
    was_cells, is_cells = "cells" in before, cfg.cells is not None
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
            f"{out_dir} holds embeddings made differently ({'; '.join(diffs)}): resuming would mix them in "
            "one table. Use another output.dir, remove the old outputs, or set output.on_mismatch: replace"
        )


class TotalsError(RuntimeError):
    """The outputs do not account for every row of the manifest exactly once (a bug, never a user error)."""


def check_totals(out_dir: Path | str, ids: pd.Series, *, storage: StorageConfig | None = None) -> tuple[int, int]:
    """Check that every id of this run's table is in ``embeddings/`` or ``errors/``, exactly once.

    Returns:
        ``(embedded, errors)``: rows of this table's ids in each folder; they add up to ``len(ids)``.

    Raises:
        TotalsError: An id is missing, in both folders, or repeated; the message gives counts and examples.
    """
    wanted = set(ids.astype(str))
    found: dict[str, list[str]] = {}
    for folder in (parts.EMBEDDINGS, parts.ERRORS):
        found[folder] = []
        for col in parts.read_column_per_part(st.join(out_dir, folder), ID_COLUMN, storage=storage):
            found[folder].extend(i for i in col if i in wanted)
    emb, err = found[parts.EMBEDDINGS], found[parts.ERRORS]
    problems = []
    missing = wanted - set(emb) - set(err)
    if missing:
        problems.append(f"{len(missing)} id(s) have no output row (e.g. {min(missing)!r})")
    both = set(emb) & set(err)
    if both:
        problems.append(f"{len(both)} id(s) are both embedded and in errors (e.g. {min(both)!r})")
    for name, rows in (("embeddings", emb), ("errors", err)):
        if len(rows) != len(set(rows)):
            problems.append(f"{len(rows) - len(set(rows))} repeated row(s) in {name}/")
    if problems or len(emb) + len(err) != len(wanted):
        raise TotalsError(
            f"{out_dir}: {len(emb)} embedded + {len(err)} errors != {len(wanted)} input images: " + "; ".join(problems)
        )
    return len(emb), len(err)


def resumed_schema(out_dir: Path | str, new: pa.Schema, *, storage: StorageConfig | None = None) -> pa.Schema:
    """The run's schema when resuming: the stored one plus columns new to this manifest.

    Raises:
        OutputMismatchError: A column's type differs from the stored run's (one table cannot hold both).
    """
    if not parts.part_files(st.join(out_dir, parts.EMBEDDINGS), storage=storage) and not parts.part_files(
        st.join(out_dir, parts.ERRORS), storage=storage
    ):
        return new
    try:
        stored = parts.read_run_info(out_dir, storage=storage).get("metadata_schema")
    except FileNotFoundError:
        return new
    if not stored:
        return new
    before = parts.schema_from_json(stored)
    diffs = [
        f"{f.name}: {f.type} there, {new.field(f.name).type} now"
        for f in before
        if f.name in new.names and new.field(f.name).type != f.type
    ]
    if diffs:
        raise OutputMismatchError(
            f"{out_dir} holds rows whose metadata types differ from this manifest's ({'; '.join(diffs)}): one "
            "table cannot hold both. Declare the old types in input.dtypes, use another output.dir, or set "
            "output.on_mismatch: replace"
        )
    return pa.schema([*before, *[f for f in new if f.name not in before.names]])
