"""Sets of image ids in bounded memory: 16-byte hashes in a sorted NumPy array instead of Python strings.

A run over a manifest of a million images checks ids (unique? already written? written exactly once?)
without holding a million Python strings on the driver: each id is kept as its 128-bit BLAKE2b digest
(16 bytes, ``numpy`` dtype ``S16``), about 16 MB per million ids against roughly 100 MB for a ``set`` of
the same strings (measured with ``jobs/bench_manifest_scale.py``). Two different ids share a digest with
probability about ``n**2 / 2**129`` (below 1e-26 for 10^6 ids), so the checks are exact in practice;
messages that name an id look the string up again from its source.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from msnoop.core import storage as st

#: NumPy dtype of one id hash (fixed-width bytes; sorts and compares bytewise).
HASH_DTYPE = np.dtype("S16")


def hash_ids(ids: Iterable[Any] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``[N]`` array of dtype :data:`HASH_DTYPE`: the 128-bit BLAKE2b digest of ``str(id)`` for each id, in order.

    Nulls hash as the text ``'None'`` (ids are text; the image table never holds a null id).
    """
    if isinstance(ids, pa.ChunkedArray | pa.Array):
        ids = ids.to_pylist()
    digests = b"".join(hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in ids)
    return np.frombuffer(digests, dtype=HASH_DTYPE).copy()


class IdSet:
    """An immutable set of ids held as sorted unique hashes (:func:`hash_ids`): 16 bytes per id.

    Args:
        hashes: ``[N]`` hashes (any order, repeats allowed), dtype :data:`HASH_DTYPE`.
        copy: False to sort ``hashes`` itself (one array of 16 bytes per id less at the peak).
    """

    def __init__(self, hashes: np.ndarray | None = None, *, copy: bool = True) -> None:
        h = np.array(hashes if hashes is not None else [], dtype=HASH_DTYPE, copy=copy)
        h.sort()  # in place (``copy=False``: the caller's fresh array is sorted, not copied)
        if len(h) > 1:
            repeat = h[1:] == h[:-1]
            if repeat.any():
                h = h[np.concatenate(([True], ~repeat))]
        self.hashes = h

    @classmethod
    def from_sorted(cls, hashes: np.ndarray) -> IdSet:
        """The set of ``hashes`` that are already sorted and unique (kept without a copy)."""
        out = cls()
        out.hashes = hashes
        return out

    @classmethod
    def of(cls, ids: Iterable[Any]) -> IdSet:
        """The set of ``ids`` (strings, or values turned into strings)."""
        return cls(hash_ids(ids), copy=False)

    @classmethod
    def from_parts(cls, folder: str | Path, column: str, *, storage: Any = None) -> IdSet:
        """Ids in the ``column`` of every ``part-*.parquet`` of ``folder`` (one part in memory at a time)."""
        from msnoop.core.parts import part_files

        chunks = []
        for f in part_files(folder, storage=storage):
            fs, path = st.resolve(f, storage)
            chunks.append(hash_ids(pq.read_table(path, columns=[column], filesystem=fs).column(column)))
        return cls(np.concatenate(chunks), copy=False) if chunks else cls()

    def __len__(self) -> int:
        return len(self.hashes)

    def __or__(self, other: IdSet) -> IdSet:
        return IdSet(np.concatenate([self.hashes, other.hashes]), copy=False)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """``[N]`` bool: whether each of ``hashes`` (dtype :data:`HASH_DTYPE`) is in the set."""
        hashes = np.asarray(hashes, dtype=HASH_DTYPE)
        if not len(self.hashes) or not len(hashes):
            return np.zeros(len(hashes), dtype=bool)
        pos = np.minimum(np.searchsorted(self.hashes, hashes), len(self.hashes) - 1)
        return self.hashes[pos] == hashes

    def contains_ids(self, ids: Iterable[Any]) -> np.ndarray:
        """``[N]`` bool: whether each id is in the set."""
        return self.contains(hash_ids(ids))
