"""Requests per object write on a real S3 endpoint (moto's server on 127.0.0.1), counted from its request log.

An object smaller than one upload part must go up as one PutObject: pyarrow otherwise opens a multipart upload
for every object (create, upload part, complete: 3 requests), which tripled the requests of every Parquet part
and run.json msnoop writes (see the comment in ``msnoop.core.storage._s3_filesystem``).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from s3_server import request_log

from msnoop.core.rundir import RunDir
from msnoop.core import parts, storage


def _methods(lines: list[str]) -> Counter[str]:
    return Counter(line.split()[0] for line in lines)


def test_small_objects_are_one_put_large_ones_multipart(s3):
    """Over many generated sizes below the part size: exactly one PUT each, and the bytes come back unchanged."""
    cfg, base = s3.config, s3.fresh()
    rng = np.random.default_rng(0)
    sizes = [0, 1, 100, 4096, 100_000, *rng.integers(1, 5_000_000, size=12).tolist()]
    prefix = base.removeprefix("s3://")
    for i, size in enumerate(sizes):
        data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
        uri = storage.join(base, f"obj-{i}.bin")
        with request_log(prefix) as lines:
            storage.write_bytes(uri, data, cfg)
        assert _methods(lines) == Counter({"PUT": 1}), (size, lines)
        assert storage.read_bytes(uri, cfg) == data
    # larger than a part: still one object, written by a completed multipart upload
    big = rng.integers(0, 256, size=12_000_000, dtype=np.uint8).tobytes()
    uri = storage.join(base, "big.bin")
    with request_log(prefix) as lines:
        storage.write_bytes(uri, big, cfg)
    assert _methods(lines)["POST"] == 2 and _methods(lines)["PUT"] >= 2, lines
    assert storage.read_bytes(uri, cfg) == big


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("dim", [8, 512])
def test_parquet_part_and_run_json_are_one_put(s3, rows, dim):
    cfg, base = s3.config, s3.fresh()
    meta = pd.DataFrame({parts.ID_COLUMN: [f"img{i}" for i in range(rows)], "Metadata_Well": "A01"})
    emb = np.random.default_rng(rows).standard_normal((rows, dim)).astype(np.float32)
    table = parts.embeddings_frame(meta, emb)
    with request_log(base.removeprefix("s3://")) as lines:
        path = parts.write_part(table, storage.join(base, RunDir.EMBEDDINGS), storage=cfg, key=f"k{rows}")
        RunDir(base, cfg).write_info({"rows": rows})
    assert _methods(lines) == Counter({"PUT": 2}), lines
    fs, p = storage.resolve(path, cfg)
    assert pq.read_table(p, filesystem=fs).equals(table)


def test_errors_still_surface_from_the_write_call(s3):
    """With the upload deferred to close, a missing bucket still fails the write (and the preflight) at once."""
    with pytest.raises(OSError, match="NO_SUCH_BUCKET"):
        storage.write_bytes("s3://no-such-bucket-msnoop/x.bin", b"abc", s3.config)
    with pytest.raises(storage.StorageError, match="the bucket does not exist"):
        storage.check_writable("s3://no-such-bucket-msnoop/out", s3.config)
