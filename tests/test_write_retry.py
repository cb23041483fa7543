"""A retried write task replaces its parts: write_block names each part by the ids of its rows (local and S3)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from msnoop.core.rundir import RunDir
from msnoop.core import parts, storage
from msnoop.core.parts import ID_COLUMN
from msnoop.embed.cells import output_schemas
from msnoop.embed.source import META, encode_rows
from msnoop.embed.write import write_block


def _blocks(rng, n, block):
    meta = pa.table(
        {
            ID_COLUMN: [f"im{i:04d}" for i in range(n)],
            "Metadata_Path_dna": [f"/d/im{i:04d}.tif" for i in range(n)],
            "Metadata_Well": pa.array(rng.integers(0, 9, n), pa.int64()),
        }
    )
    order = rng.permutation(n)  # blocks hold rows in any order
    out = []
    for start in range(0, n, block):
        rows = order[start : start + block]
        errors = np.where(rng.random(len(rows)) < 0.3, "unreadable", "")
        emb = rng.standard_normal((len(rows), 4)).astype(np.float32)
        out.append({META: encode_rows(meta.take(pa.array(rows))), "error": errors, "embedding": emb})
    return meta, out


def _write_with_retries(rng, folder, n, block, cfg=None):
    meta, blocks = _blocks(rng, n, block)
    schema, _ = output_schemas(meta.schema, 4, False)
    attempts = [b for b in blocks for _ in range(int(rng.integers(1, 4)))]  # 1-3 attempts per block
    for i in rng.permutation(len(attempts)):
        write_block(
            attempts[i], out_dir=str(folder), channels=["dna"], meta_schema=meta.schema, schema=schema, storage=cfg
        )
    n_ok = sum(int((b["error"] == "").sum()) for b in blocks)
    return n_ok, n - n_ok


@pytest.mark.parametrize("seed", range(6))
def test_retried_blocks_write_each_row_once_local(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n, block = int(rng.integers(1, 60)), int(rng.integers(1, 20))
    n_ok, n_err = _write_with_retries(rng, tmp_path, n, block)
    emb, err = storage.join(tmp_path, RunDir.EMBEDDINGS), storage.join(tmp_path, RunDir.ERRORS)
    assert parts.count_rows(emb) == len(parts.read_ids(emb)) == n_ok
    assert parts.count_rows(err) == len(parts.read_ids(err)) == n_err
    assert parts.read_ids(emb) | parts.read_ids(err) == {f"im{i:04d}" for i in range(n)}


def test_retried_blocks_write_each_row_once_s3(s3):
    rng = np.random.default_rng(9)
    base = s3.fresh()
    n_ok, n_err = _write_with_retries(rng, base, 40, 7, s3.config)
    emb = storage.join(base, RunDir.EMBEDDINGS)
    assert parts.count_rows(emb, storage=s3.config) == len(parts.read_ids(emb, storage=s3.config)) == n_ok
    err = storage.join(base, RunDir.ERRORS)
    assert parts.count_rows(err, storage=s3.config) == n_err
