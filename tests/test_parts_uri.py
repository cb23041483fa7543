"""Parquet parts on any location: the same functions on a local folder and on S3 (moto on 127.0.0.1)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from msnoop.core.rundir import RunDir
from msnoop.core import parts, storage


def _location(where, tmp_path, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        return s3.fresh(), s3.config
    return tmp_path / "out", None


def _frame(ids: list[str], dim: int, rng: np.random.Generator) -> pa.Table:
    meta = pd.DataFrame(
        {"Metadata_ImageID": ids, "Metadata_Well": [f"A{i % 12:02d}" for i in range(len(ids))], "Metadata_n": 7}
    )
    return parts.embeddings_frame(meta, rng.standard_normal((len(ids), dim)).astype(np.float32))


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_parts_roundtrip_any_location(where, seed, tmp_path, request):
    """Every row written in blocks of random sizes comes back once, values and dtypes unchanged."""
    base, cfg = _location(where, tmp_path, request)
    rng = np.random.default_rng(seed)
    emb = storage.join(base, RunDir.EMBEDDINGS)
    assert parts.part_files(emb, storage=cfg) == []
    assert parts.read_ids(emb, storage=cfg) == set()
    assert parts.count_rows(emb, storage=cfg) == 0
    assert parts.read_frame(emb, storage=cfg).empty
    sizes = rng.integers(1, 40, size=rng.integers(2, 6))
    start, written = 0, []
    for n in sizes:
        ids = [f"img{start + i:05d}" for i in range(n)]
        start += n
        table = _frame(ids, 8, rng)
        written.append(table)
        out = parts.write_part(table, emb, storage=cfg)
        assert str(out).startswith(str(emb)) and str(out).endswith(".parquet")
    files = parts.part_files(emb, storage=cfg)
    assert len(files) == len(sizes)
    assert all(isinstance(f, str if where == "s3" else type(tmp_path)) for f in files)
    assert parts.count_rows(emb, storage=cfg) == start
    assert parts.read_ids(emb, storage=cfg) == {f"img{i:05d}" for i in range(start)}
    expected = pa.concat_tables(written).to_pandas().sort_values("Metadata_ImageID", ignore_index=True)
    got = parts.read_frame(emb, storage=cfg).sort_values("Metadata_ImageID", ignore_index=True)
    pd.testing.assert_frame_equal(got, expected)
    n = sum(b.num_rows for b in parts.iter_batches(emb, batch_size=7, columns=["emb_0000"], storage=cfg))
    assert n == start

    info = {"model": "m", "embed_dim": 8}
    RunDir(base, cfg).write_info(info)
    assert RunDir(base, cfg).read_info() == info
    # nothing but whole parts and run.json: no temporaries or probes left behind
    names = sorted(str(p).rsplit("/", 1)[-1] for p in storage.list_files(emb, "*", cfg))
    assert len(names) == len(sizes) and all(n.startswith("part-") for n in names)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_read_run_info_missing(where, tmp_path, request):
    base, cfg = _location(where, tmp_path, request)
    with pytest.raises(FileNotFoundError, match="is not an msnoop output folder"):
        RunDir(base, cfg).read_info()


def test_local_folder_keeps_path_results(tmp_path):
    out = parts.write_part(pa.table({"Metadata_ImageID": ["a"]}), tmp_path / "e")
    assert out.parent == tmp_path / "e" and out.exists()
    assert parts.part_files(str(tmp_path / "e")) == [out]
    assert RunDir(tmp_path).write_info({"a": 1}) == tmp_path / "run.json"


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keyed_parts_make_retries_idempotent(where, seed, tmp_path, request):
    """A block written again (a retried task, rows possibly reordered) replaces its part: no duplicate rows."""
    base, cfg = _location(where, tmp_path, request)
    rng = np.random.default_rng(seed)
    emb = storage.join(base, RunDir.EMBEDDINGS)
    blocks = [[f"img{seed}-{b}-{i}" for i in range(rng.integers(1, 20))] for b in range(rng.integers(2, 6))]
    for ids in blocks:
        parts.write_part(_frame(ids, 4, rng), emb, storage=cfg, key=parts.block_key(ids))
    for ids in blocks[::2]:  # retries, rows in another order
        shuffled = list(rng.permutation(ids))
        parts.write_part(_frame(shuffled, 4, rng), emb, storage=cfg, key=parts.block_key(shuffled))
    assert len(parts.part_files(emb, storage=cfg)) == len(blocks)
    assert parts.count_rows(emb, storage=cfg) == sum(map(len, blocks))
    assert parts.block_key(["a", "b"]) != parts.block_key(["a", "b", "c"])
    assert parts.block_key(["ab"]) != parts.block_key(["a", "b"])
