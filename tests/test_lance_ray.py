"""LanceDB tables written by Ray tasks from Parquet parts (local and S3 on 127.0.0.1) and committed once."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet
import pytest

from msnoop.core.rundir import RunDir
from msnoop.core import parts, storage

pytest.importorskip("lance", reason="pylance is needed for Lance fragments written by Ray tasks")
pytestmark = pytest.mark.ray


def _write_parts(folder, rng, sizes, dim, storage_cfg=None):
    start, frames = 0, []
    for k, n in enumerate(sizes):
        meta = pd.DataFrame(
            {
                "Metadata_ImageID": [f"img{start + i:06d}" for i in range(n)],
                "Metadata_Plate": f"P{k % 3}",
                # all-null in some parts (null type in that part's Parquet schema), strings in others
                "Metadata_Note": [None] * n if k % 2 else [f"n{i}" for i in range(n)],
            }
        )
        emb = rng.standard_normal((n, dim)).astype(np.float32)
        parts.write_part(parts.embeddings_frame(meta, emb), folder, storage=storage_cfg)
        frames.append(meta.assign(vector=list(emb)))
        start += n
    return pd.concat(frames, ignore_index=True)


def _check_table(db_uri, name, expected, dim, storage_cfg=None):
    import lancedb

    from msnoop.store.lance import table_info

    opts = storage.storage_options(db_uri, storage_cfg) or None
    table = lancedb.connect(str(db_uri), storage_options=opts).open_table(name)
    assert table.count_rows() == len(expected)
    assert table_info(table) == {"model": "test", "embed_dim": dim}
    assert table.schema.field("vector").type == pa.list_(pa.float32(), dim)
    got = table.to_arrow().to_pandas().sort_values("Metadata_ImageID", ignore_index=True)
    assert got["Metadata_ImageID"].tolist() == expected["Metadata_ImageID"].tolist()  # each row once
    assert got["Metadata_Plate"].tolist() == expected["Metadata_Plate"].tolist()
    assert got["Metadata_Note"].tolist() == expected["Metadata_Note"].tolist()
    np.testing.assert_array_equal(np.stack(got["vector"]), np.stack(expected["vector"]))
    # searchable: a row's own vector is its nearest neighbour
    probe = expected.iloc[len(expected) // 2]
    hit = table.search(np.asarray(probe["vector"])).limit(1).to_pandas()
    assert hit["Metadata_ImageID"].tolist() == [probe["Metadata_ImageID"]]


@pytest.mark.parametrize("seed", [0, 1])
def test_build_table_ray_local(ray_cluster, tmp_path, seed):
    from msnoop.store.lance_ray import build_table_ray

    rng = np.random.default_rng(seed)
    dim = int(rng.integers(2, 17))
    sizes = rng.integers(1, 300, size=rng.integers(1, 7))
    expected = _write_parts(tmp_path / "emb", rng, sizes, dim).sort_values("Metadata_ImageID", ignore_index=True)
    info = {"model": "test", "embed_dim": dim}
    for _ in range(2):  # a rebuild overwrites, never appends
        n = build_table_ray(tmp_path / "db", "images", tmp_path / "emb", dim=dim, info=info)
        assert n == len(expected)
    _check_table(tmp_path / "db", "images", expected, dim)


def test_build_table_ray_s3(ray_cluster, s3):
    """Parts on S3 -> Lance table on S3 (s3:// LanceDB URI), written by Ray tasks, opened with lancedb."""
    from msnoop.store.lance_ray import build_table_ray

    rng = np.random.default_rng(3)
    base, cfg = s3.fresh(), s3.config
    emb = storage.join(base, RunDir.EMBEDDINGS)
    expected = _write_parts(emb, rng, [50, 1, 120], 8, cfg).sort_values("Metadata_ImageID", ignore_index=True)
    db = storage.join(base, "lancedb")
    # the workers find credentials in their own environment, as on a cluster (here: the test's dummy keys)
    remote = {"runtime_env": {"env_vars": s3.env}}
    n = build_table_ray(
        db, "images", emb, dim=8, info={"model": "test", "embed_dim": 8}, storage=cfg, ray_remote_args=remote
    )
    assert n == len(expected)
    assert storage.exists(storage.join(db, "images.lance"), cfg)
    _check_table(db, "images", expected, 8, cfg)


def test_build_table_ray_wrong_dim(ray_cluster, tmp_path):
    from msnoop.store.lance_ray import build_table_ray

    _write_parts(tmp_path / "emb", np.random.default_rng(0), [5], 4)
    with pytest.raises(ValueError, match=r"have 4 embedding columns, expected 8"):
        build_table_ray(tmp_path / "db", "images", tmp_path / "emb", dim=8, info={})
    assert not (tmp_path / "db" / "images.lance").exists()


@pytest.mark.parametrize("seed", range(5))
def test_group_parts_covers_every_part_once_in_order(seed):
    from msnoop.store.lance_ray import group_parts

    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 1000, size=rng.integers(1, 60)).tolist()
    target = int(rng.integers(1, 3000))
    groups = group_parts(rows, target)
    assert [i for g in groups for i in g] == list(range(len(rows)))
    assert all(sum(rows[i] for i in g) >= target for g in groups[:-1])
    # a group only grows past the target by its last part
    assert all(sum(rows[i] for i in g[:-1]) < target for g in groups)


def test_fragments_of_a_lost_attempt_are_never_committed(tmp_path):
    """A write task that wrote its fragments but died before returning is retried: the first attempt's
    files stay on storage unreferenced, the commit lists only the fragments the driver received."""
    import pickle

    import lance
    import pyarrow.fs as pafs

    from msnoop.store.lance_ray import table_uri, target_schema, write_fragments

    rng = np.random.default_rng(7)
    expected = _write_parts(tmp_path / "emb", rng, [40, 25], 4)
    files = [str(f) for f in parts.part_files(tmp_path / "emb")]
    schema = target_schema([pa.parquet.read_schema(f) for f in files], 4, {"model": "test", "embed_dim": 4}, "emb")
    dest = table_uri(tmp_path / "db", "images")
    kw = {"dest": dest, "schema": schema, "storage_options": None}
    write_fragments(files, pafs.LocalFileSystem(), **kw)  # attempt 1: its result never reaches the driver
    retry = [pickle.loads(b) for b in write_fragments(files, pafs.LocalFileSystem(), **kw)]
    lance.LanceDataset.commit(dest, lance.LanceOperation.Overwrite(schema, retry))
    data_files = list((tmp_path / "db" / "images.lance" / "data").iterdir())
    assert len(data_files) == 2 * len(retry)  # both attempts' files exist ...
    _check_table(
        tmp_path / "db", "images", expected.sort_values("Metadata_ImageID", ignore_index=True), 4
    )  # ... rows once


def test_transform_and_run_schema_applied_in_tasks(ray_cluster, tmp_path):
    """``transform`` maps vectors in the tasks (as build_table's post-processing); ``schema`` fixes column types."""
    import functools

    import lancedb

    from msnoop.store.lance_ray import build_table_ray

    rng = np.random.default_rng(11)
    expected = _write_parts(tmp_path / "emb", rng, [30, 12], 3).sort_values("Metadata_ImageID", ignore_index=True)
    run_schema = pa.schema(  # the run's Parquet schema: metadata + emb_* columns
        [("Metadata_ImageID", pa.string()), ("Metadata_Plate", pa.large_string()), ("Metadata_Note", pa.string())]
        + [(c, pa.float32()) for c in parts.emb_columns(3)]
    )
    double = functools.partial(np.multiply, 2.0)  # picklable, importable on every worker
    n = build_table_ray(tmp_path / "db", "t", tmp_path / "emb", dim=3, info={}, schema=run_schema, transform=double)
    assert n == len(expected)
    table = lancedb.connect(str(tmp_path / "db")).open_table("t")
    assert table.schema.field("Metadata_Plate").type == pa.large_string()
    got = table.to_arrow().to_pandas().sort_values("Metadata_ImageID", ignore_index=True)
    np.testing.assert_allclose(np.stack(got["vector"]), 2.0 * np.stack(expected["vector"]), rtol=1e-6)
