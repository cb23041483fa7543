"""Resume checks: a re-run skips ids already written, and refuses a folder whose embeddings were made differently."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msnoop.core import parts
from msnoop.core import storage as st
from msnoop.core.idset import HASH_DTYPE, IdSet, hash_ids
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
    checkpoint, by name for a random network), the preprocessing, the channels and the precision the ``amp``
    setting gives on CPUs and on GPUs (:func:`amp_precision`; bf16 vectors differ from float32 ones by rounding).
    Two ``amp`` settings that give the same precision here (``cuda`` and ``auto`` on a CPU without native bf16)
    are the same run.
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
    if "amp" in before:
        was = amp_precision(before["amp"], before.get("backend", "torch"))
        now = amp_precision(info["amp"], info.get("backend", "torch"))
        if was != now:
            diffs.append(
                f"amp {before['amp']} there ({was['cpu']} on this CPU, {was['gpu']} on GPUs), "
                f"{info['amp']} now ({now['cpu']} on this CPU, {now['gpu']} on GPUs)"
            )
    if diffs:
        raise OutputMismatchError(
            f"{out_dir} holds embeddings made differently ({'; '.join(diffs)}): resuming would mix them in "
            "one table. Use another output.dir, remove the old outputs, or set output.on_mismatch: replace"
        )


def amp_precision(amp: str, backend: str = "torch") -> dict[str, str]:
    """The precision (``bf16`` or ``float32``) an ``amp`` setting gives the network on this machine's CPU and on GPUs.

    ``backend="onnxruntime"`` runs float32 on CPUs whatever ``amp`` says. The CPU is the one this process runs on
    (:func:`msnoop.core.runtime.cpu_has_native_bf16`): on a cluster whose nodes differ from the driver's, the record
    can be wrong for them.
    """
    import torch

    from msnoop.core.runtime import uses_bf16

    cpu = uses_bf16(amp, torch.device("cpu")) and backend == "torch"
    return {"cpu": "bf16" if cpu else "float32", "gpu": "bf16" if uses_bf16(amp, torch.device("cuda")) else "float32"}


class TotalsError(RuntimeError):
    """The outputs do not account for every row of the manifest exactly once (a bug, never a user error)."""


def check_totals(
    out_dir: Path | str,
    ids: IdSet | Iterable[Any],
    *,
    storage: StorageConfig | None = None,
    names: Callable[[np.ndarray], list[str]] | None = None,
) -> tuple[int, int]:
    """Check that every id of this run's table is in ``embeddings/`` or ``errors/``, exactly once.

    Args:
        ids: The run's ids: an :class:`~msnoop.core.idset.IdSet`, or the ids themselves.
        names: For messages: the ids (strings) of some of the given hashes (default: looked up in ``ids`` when
            they are strings; with an ``IdSet``, examples of missing ids are then left out).

    Memory: 16 bytes per id of the table and per row of the parts that belong to it (hashes, one part file in
    memory at a time), not the ids themselves.

    Returns:
        ``(embedded, errors)``: rows of this table's ids in each folder; they add up to ``len(ids)``.

    Raises:
        TotalsError: An id is missing, in both folders, or repeated; the message gives counts and examples.
    """
    if not isinstance(ids, IdSet):
        given = [str(i) for i in ids]
        wanted = IdSet.of(given)
        if names is None:
            by_hash = dict(zip(hash_ids(given).tolist(), given, strict=True))
            names = lambda hashes: [by_hash[h] for h in hashes.tolist() if h in by_hash]
    else:
        wanted = ids
    found: dict[str, np.ndarray] = {}
    for folder in (parts.EMBEDDINGS, parts.ERRORS):
        chunks = [np.zeros(0, dtype=HASH_DTYPE)]
        for h in parts.map_column_per_part(st.join(out_dir, folder), hash_ids, ID_COLUMN, storage=storage):
            chunks.append(h[wanted.contains(h)])
        found[folder] = np.concatenate(chunks)
    n_emb, n_err = len(found[parts.EMBEDDINGS]), len(found[parts.ERRORS])
    emb_set, err_set = IdSet(found.pop(parts.EMBEDDINGS), copy=False), IdSet(found.pop(parts.ERRORS), copy=False)
    problems = []
    missing = wanted.hashes[~(emb_set | err_set).contains(wanted.hashes)]
    if len(missing):
        example = _example(names, missing, out_dir, None, storage)
        problems.append(f"{len(missing)} id(s) have no output row" + (f" (e.g. {example!r})" if example else ""))
    both = emb_set.hashes[err_set.contains(emb_set.hashes)]
    if len(both):
        example = _example(names, both, out_dir, parts.ERRORS, storage)
        problems.append(
            f"{len(both)} id(s) are both embedded and in errors" + (f" (e.g. {example!r})" if example else "")
        )
    for name, rows, unique in (("embeddings", n_emb, emb_set), ("errors", n_err, err_set)):
        if rows != len(unique):
            problems.append(f"{rows - len(unique)} repeated row(s) in {name}/")
    if problems or n_emb + n_err != len(wanted):
        raise TotalsError(
            f"{out_dir}: {n_emb} embedded + {n_err} errors != {len(wanted)} input images: " + "; ".join(problems)
        )
    return n_emb, n_err


def _example(
    names: Callable[[np.ndarray], list[str]] | None,
    hashes: np.ndarray,
    out_dir: Path | str,
    folder: str | None,
    storage: StorageConfig | None,
) -> str | None:
    """The smallest id among a few of ``hashes``, from ``names`` or else from the parts of ``folder``."""
    found = names(hashes[:1000]) if names is not None else []
    if not found and folder is not None:
        wanted = IdSet(hashes)
        for f in parts.part_files(st.join(out_dir, folder), storage=storage):
            fs, path = st.resolve(f, storage)
            col = pq.read_table(path, columns=[ID_COLUMN], filesystem=fs).column(ID_COLUMN).to_pylist()
            found += [i for i, hit in zip(col, wanted.contains_ids(col), strict=True) if hit]
    return min(found) if found else None


def error_preview(
    out_dir: Path | str, ids: IdSet, *, storage: StorageConfig | None = None, n: int = 5
) -> list[tuple[str, str]]:
    """The first ``n`` ``(id, reason)`` rows of ``errors/`` whose id is one of ``ids`` (parts in name order)."""
    out: list[tuple[str, str]] = []
    for f in parts.part_files(st.join(out_dir, parts.ERRORS), storage=storage):
        fs, path = st.resolve(f, storage)
        t = pq.read_table(path, columns=[ID_COLUMN, "reason"], filesystem=fs)
        keep = ids.contains(hash_ids(t.column(ID_COLUMN)))
        out += list(
            zip(*(np.asarray(t.column(c).to_pylist(), dtype=object)[keep] for c in (ID_COLUMN, "reason")), strict=True)
        )
        if len(out) >= n:
            break
    return [(str(i), str(r)) for i, r in out[:n]]


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
