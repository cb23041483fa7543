"""The end-of-run checks of an embedding run: every input id is in its output folder exactly once.

Whether a folder may be resumed at all (same model, preprocessing, channels, metadata types) is the folder's
own check, :meth:`msnoop.core.rundir.RunDir.check_resumable`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from msnoop.core import parts
from msnoop.core import storage as st
from msnoop.core.idset import HASH_DTYPE, IdSet, hash_ids
from msnoop.core.partindex import PartIndex
from msnoop.core.parts import ID_COLUMN
from msnoop.core.rundir import RunDir

logger = logging.getLogger(__name__)


class TotalsError(RuntimeError):
    """The outputs do not account for every row of the manifest exactly once (a bug, never a user error)."""


def repair_repeats(run: RunDir, *, cells: bool = False, index: PartIndex | None = None) -> int:
    """Keep one row per image (and per cell) in an output folder; returns rows removed.

    Two writers of one image (a Ray task retried with other block boundaries, a writer that lost its lock) leave
    the same image in two parts, with the same values: the later copy goes (:func:`msnoop.core.parts.drop_repeats`),
    and error rows of an image that a part embedded go too. Run before :func:`check_totals`, so every id is in the
    folder once whatever the block sizes, order, retries and interruptions of the runs that wrote it.

    With ``index`` (the folder's :class:`~msnoop.core.partindex.PartIndex`) the ids of ``embeddings/`` and
    ``errors/`` come from it, and only the parts it does not describe and those that change are read; the index
    forgets the parts rewritten or removed.
    """
    if index is None:
        n = parts.drop_repeats(run.embeddings, storage=run.storage)
        embedded = IdSet.from_parts(run.embeddings, ID_COLUMN, storage=run.storage)
        n += parts.drop_repeats(run.errors, also_in=embedded, storage=run.storage)
    else:
        n = 0
        scan = index.scan(run.EMBEDDINGS)
        changed: list[Any] = []
        n += parts.drop_repeats(run.embeddings, storage=run.storage, known=(scan.files, scan.ids), changed=changed)
        index.forget(run.EMBEDDINGS, changed)
        embedded = (index.scan(run.EMBEDDINGS) if changed else scan).id_set()
        scan = index.scan(run.ERRORS)
        changed = []
        n += parts.drop_repeats(
            run.errors, also_in=embedded, storage=run.storage, known=(scan.files, scan.ids), changed=changed
        )
        index.forget(run.ERRORS, changed)
    if cells:
        rewritten: list[Any] = []
        if index is None:
            n += parts.drop_repeats(run.cells, parts.CELL_KEY, storage=run.storage, changed=rewritten)
        else:
            scan = index.scan(run.CELLS)
            assert scan.keys is not None
            known = (scan.files, scan.keys)
            n += parts.drop_repeats(run.cells, parts.CELL_KEY, storage=run.storage, known=known, changed=rewritten)
            index.forget(run.CELLS, rewritten)
    if n:
        logger.warning("%s: removed %d repeated row(s) (the same image written twice)", run, n)
    return n


def check_totals(
    run: RunDir,
    ids: IdSet | Iterable[Any],
    *,
    names: Callable[[np.ndarray], list[str]] | None = None,
    index: PartIndex | None = None,
) -> tuple[int, int]:
    """Check that every id of this run's table is in ``embeddings/`` or ``errors/``, exactly once.

    Args:
        run: The output folder.
        ids: The run's ids: an :class:`~msnoop.core.idset.IdSet`, or the ids themselves.
        names: For messages: the ids (strings) of some of the given hashes (default: looked up in ``ids`` when
            they are strings; with an ``IdSet``, examples of missing ids are then left out).
        index: The folder's :class:`~msnoop.core.partindex.PartIndex`: the parts' ids come from it (only parts it
            does not describe are read); default: read from every part.

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
    found: list[np.ndarray] = []
    for folder, name in ((run.embeddings, run.EMBEDDINGS), (run.errors, run.ERRORS)):
        chunks = [np.zeros(0, dtype=HASH_DTYPE)]
        per_part = (
            parts.map_column_per_part(folder, hash_ids, ID_COLUMN, storage=run.storage)
            if index is None
            else [np.concatenate([np.zeros(0, dtype=HASH_DTYPE), *index.scan(name).ids])]  # one lookup, not one a part
        )
        for h in per_part:
            chunks.append(h[wanted.contains(h)])
        found.append(np.concatenate(chunks))
    n_emb, n_err = len(found[0]), len(found[1])
    emb_set, err_set = IdSet(found.pop(0), copy=False), IdSet(found.pop(0), copy=False)
    problems = []
    missing = wanted.hashes[~(emb_set | err_set).contains(wanted.hashes)]
    if len(missing):
        example = _example(names, missing, run, None)
        problems.append(f"{len(missing)} id(s) have no output row" + (f" (e.g. {example!r})" if example else ""))
    both = emb_set.hashes[err_set.contains(emb_set.hashes)]
    if len(both):
        example = _example(names, both, run, run.errors)
        problems.append(
            f"{len(both)} id(s) are both embedded and in errors" + (f" (e.g. {example!r})" if example else "")
        )
    for name, rows, unique in ((run.EMBEDDINGS, n_emb, emb_set), (run.ERRORS, n_err, err_set)):
        if rows != len(unique):
            problems.append(f"{rows - len(unique)} repeated row(s) in {name}/")
    if problems or n_emb + n_err != len(wanted):
        raise TotalsError(
            f"{run}: {n_emb} embedded + {n_err} errors != {len(wanted)} input images: " + "; ".join(problems)
        )
    return n_emb, n_err


def _example(
    names: Callable[[np.ndarray], list[str]] | None,
    hashes: np.ndarray,
    run: RunDir,
    folder: Any,
) -> str | None:
    """The smallest id among a few of ``hashes``, from ``names`` or else from the parts of ``folder`` (of ``run``)."""
    found = names(hashes[:1000]) if names is not None else []
    if not found and folder is not None:
        wanted = IdSet(hashes)
        for f in parts.part_files(folder, storage=run.storage):
            fs, path = st.resolve(f, run.storage)
            col = pq.read_table(path, columns=[ID_COLUMN], filesystem=fs).column(ID_COLUMN).to_pylist()
            found += [i for i, hit in zip(col, wanted.contains_ids(col), strict=True) if hit]
    return min(found) if found else None


def error_preview(run: RunDir, ids: IdSet, *, n: int = 5) -> list[tuple[str, str]]:
    """The first ``n`` ``(id, reason)`` rows of ``errors/`` whose id is one of ``ids`` (parts in name order)."""
    out: list[tuple[str, str]] = []
    for f in parts.part_files(run.errors, storage=run.storage):
        fs, path = st.resolve(f, run.storage)
        t = pq.read_table(path, columns=[ID_COLUMN, "reason"], filesystem=fs)
        keep = ids.contains(hash_ids(t.column(ID_COLUMN)))
        out += list(
            zip(*(np.asarray(t.column(c).to_pylist(), dtype=object)[keep] for c in (ID_COLUMN, "reason")), strict=True)
        )
        if len(out) >= n:
            break
    return [(str(i), str(r)) for i, r in out[:n]]
