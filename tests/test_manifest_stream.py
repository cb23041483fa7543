"""The manifest is streamed, never materialised on the driver: same rows and types as the whole-table loader.

Properties over generated manifests (CSV, gzip CSV, TSV, Parquet; blanks, declared types, default ids or an id
column, input.limit, shuffled rows, any batch and block size): the streamed image table equals what
:func:`msnoop.io.manifest.load_image_table` gives for the same file; the read task's blocks carry every row not
yet done exactly once with the run's schema; the planning path never calls a whole-table reader; planning and
checking the ids of 2*10^5 rows stays within a few MB of Python memory.
"""

from __future__ import annotations

import datetime as dt
import decimal
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hostile_inputs import sparse_text_manifest

from msnoop.core.rundir import RunDir
from msnoop.core import parts
from msnoop.core.config import ConfigError
from msnoop.core.idset import IdSet, hash_ids
from msnoop.embed.dataset import ROW
from msnoop.embed.totals import TotalsError, check_totals, error_preview
from msnoop.embed.source import META, conform, decode_rows, encode_rows, read_blocks
from msnoop.io.config import ID_COLUMN, InputConfig
from msnoop.io.manifest import image_id, load_image_table, metadata_arrow, resolve_path, table_schema
from msnoop.io.table_stream import ids_of, image_ids, plan_image_table, resolve_paths, scan_ids


def _manifest(tmp_path: Path, rng: np.random.Generator, fmt: str) -> tuple[Path, dict]:
    """A hostile manifest in ``fmt`` and the input options to read it (id column or not, dtypes, limit)."""
    n = int(rng.integers(1, 60))
    df = sparse_text_manifest(tmp_path, n, rng, images=False)
    df["gfp"] = [p.replace("img", "gfp") if k % 5 else "" for k, p in enumerate(df["dna"])]  # some blank paths
    df["Metadata_Compound"] = rng.choice(["NA", "null", "", "TP53", "1e5", "a,b", 'say "hi"', "two\nlines"], n)
    df["key"] = [f"k{v:05d}" for v in rng.permutation(10 * n)[:n]]
    df = df.sample(frac=1, random_state=int(rng.integers(1 << 30))).reset_index(drop=True)
    opts: dict = {"channels": ["dna", "gfp"]}
    if rng.random() < 0.5:
        opts["id_column"] = "key"
    if rng.random() < 0.3:
        opts["limit"] = int(rng.integers(1, n + 1))
    path = tmp_path / f"m.{fmt}"
    if fmt == "parquet":
        df = df.replace("", None).assign(Metadata_Dose=lambda d: d["Metadata_Dose"].astype(float))
        df["Metadata_Count"] = pd.array([None if k % 4 == 0 else k for k in range(n)], dtype="Int64")
        df.to_parquet(path, row_group_size=int(rng.integers(1, 20)))
    else:
        if rng.random() < 0.5:
            opts["dtypes"] = {"Metadata_Dose": "float", "Metadata_Site": "int"}
        df.to_csv(path, index=False, sep="\t" if fmt == "tsv" else ",")
    return path, opts


FORMATS = ["csv", "csv.gz", "tsv", "parquet"]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_table_equals_the_whole_table_loader_whatever_the_batch_size(tmp_path, seed, fmt):
    rng = np.random.default_rng(seed)
    path, opts = _manifest(tmp_path, rng, fmt)
    cfg = InputConfig(manifest=path, **opts)
    whole = load_image_table(cfg)
    source = plan_image_table(cfg)
    expected = metadata_arrow(whole, source.schema)  # the whole-table loader's rows, with the run's schema
    if fmt != "parquet":
        assert source.schema == table_schema(whole)  # CSV: the same schema too (text unless declared)
    else:
        assert source.schema.field("Metadata_Count").type == pa.int64()  # the file's own types
        assert source.schema.field("Metadata_Dose").type == pa.float64()
    for rows in (1, int(rng.integers(2, 9)), 4096):
        got = pa.concat_tables([b for _, b in source.batches(rows)])
        assert got.schema == source.schema
        assert got.equals(expected)
    ids, n = scan_ids(source, rows=int(rng.integers(1, 9)))
    assert n == len(whole) and len(ids) == n
    assert ids.contains(hash_ids(whole[ID_COLUMN])).all()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("fmt", FORMATS)
def test_read_blocks_carry_every_row_not_done_once_with_the_run_schema(tmp_path, seed, fmt):
    rng = np.random.default_rng(100 + seed)
    path, opts = _manifest(tmp_path, rng, fmt)
    source = plan_image_table(InputConfig(manifest=path, **opts))
    whole = pa.concat_tables([b for _, b in source.batches()])
    ids = whole.column(ID_COLUMN).to_pylist()
    done = {i for i in ids if rng.random() < 0.3} | {"not-in-this-manifest"}
    # a resumed run's schema: an earlier run's column first, this manifest's after
    run_schema = pa.schema([pa.field("Metadata_Old", pa.int64()), *source.schema])
    block = int(rng.integers(1, 12))
    blocks = list(read_blocks(source, schema=run_schema, done=IdSet.of(done), block_rows=block))
    assert all(0 < b.num_rows <= block for b in blocks)
    decoded = [decode_rows(b.column(META).to_pylist(), run_schema) for b in blocks]
    assert all(d.schema == run_schema for d in decoded)
    got = pa.concat_tables(decoded) if decoded else run_schema.empty_table()
    keep = pa.array([i not in done for i in ids])
    assert got.equals(conform(whole.filter(keep), run_schema))
    assert got.column("Metadata_Old").null_count == got.num_rows
    rows = np.concatenate([b.column(ROW).to_numpy() for b in blocks]) if blocks else np.zeros(0, int)
    assert rows.tolist() == np.flatnonzero(keep.to_numpy(zero_copy_only=False)).tolist()  # manifest row numbers
    for b, d in zip(blocks, decoded, strict=True):  # the plain columns are the decoded metadata's
        assert b.column(ID_COLUMN).equals(d.column(ID_COLUMN))
        assert b.column("Metadata_Path_dna").equals(d.column("Metadata_Path_dna"))


def test_metadata_bytes_keep_every_arrow_type():
    n = 7
    table = pa.table(
        {
            "s": pa.array(["0001", None, "", "NA", "a\nb", "é", "x"]),
            "i": pa.array([1, None, -(2**63), 2**63 - 1, 0, 5, None], pa.int64()),
            "f": pa.array([0.1, None, 5e-324, float("inf"), -0.0, 1e300, 2.5]),
            "b": pa.array([True, False, None, True, True, False, None]),
            "t": pa.array([dt.datetime(2020, 1, 1, tzinfo=dt.UTC)] * n, pa.timestamp("ns", tz="UTC")),
            "d": pa.array([decimal.Decimal("1.10")] * (n - 1) + [None], pa.decimal128(5, 2)),
            "c": pa.array(["a", "b", "a", None, "c", "a", "b"]).dictionary_encode(),
            "l": pa.array([[1, 2], [], None, [3], [4, None], [5], [6]], pa.list_(pa.int32())),
            "st": pa.array([{"x": 1, "y": "a"}] * n, pa.struct([("x", pa.int16()), ("y", pa.string())])),
            "n": pa.nulls(n, pa.string()),
        }
    )
    back = decode_rows(encode_rows(table), table.schema)
    assert back.schema == table.schema and back.equals(table)
    part = decode_rows(encode_rows(table.slice(2, 3)), table.schema)  # its own dictionary: values compared
    assert part.schema == table.schema and part.to_pylist() == table.slice(2, 3).to_pylist()
    nan = pa.table({"f": pa.array([float("nan"), None])})
    back = decode_rows(encode_rows(nan), nan.schema).column("f").to_pylist()
    assert np.isnan(back[0]) and back[1] is None  # NaN is not null


def test_paths_and_ids_in_bulk_equal_the_one_row_functions(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    rng = np.random.default_rng(3)
    pieces = ["a", "b.c", ".", "..", "", "d d", "x.ome.tif", "Y.OME.TIFF", "z.ome.zarr", ".hidden", "e.", "f.tar.gz"]
    values: list = [None, "", "  ", float("nan"), 7, "~/h.tif", "file:///data/x.tif", "s3://b/k.tif", "https://h/y"]
    values += [str(tmp_path / "abs.tif"), "/", "//net/share/z.tif", str(tmp_path.parent / "out.tif"), " pad.tif "]
    for _ in range(300):
        parts_ = rng.choice(pieces, int(rng.integers(1, 5)))
        p = "/".join(parts_) + rng.choice(["", "/", ".tif"])
        values.append(p if rng.random() < 0.7 else str(tmp_path) + "/" + p)
    for root in (tmp_path, tmp_path / "sub", Path("/")):
        resolved = resolve_paths(values, root)
        assert resolved == [resolve_path(v, root) for v in values]
        assert image_ids(resolved, root) == [image_id(p, root) for p in resolved]
    uri_root = "s3://bucket/screen"
    assert resolve_paths(["a.tif", "/abs.tif"], uri_root) == [resolve_path(v, uri_root) for v in ["a.tif", "/abs.tif"]]


def _refuse_whole_table_readers(monkeypatch, manifest: Path):
    import msnoop.embed.pipeline
    import msnoop.io.manifest
    import msnoop.io.table_stream

    def refuse(*args, **kwargs):
        raise AssertionError("the manifest was read whole")

    for target in (pd, msnoop.io.manifest.pd, msnoop.io.table_stream.pd):
        monkeypatch.setattr(target, "read_csv", refuse)
        monkeypatch.setattr(target, "read_parquet", refuse)
    monkeypatch.setattr(msnoop.io.manifest, "load_image_table", refuse)
    monkeypatch.setattr(msnoop.io.table_stream, "load_image_table", refuse)
    monkeypatch.setattr(msnoop.embed.pipeline, "load_image_table", refuse, raising=False)
    monkeypatch.setattr(pacsv, "read_csv", refuse)
    monkeypatch.setattr(parts, "read_frame", refuse)  # the error preview streams error parts too
    read_table = pq.read_table

    def parts_only(source, *args, **kwargs):  # part files are read whole (one part at a time), the manifest never
        if Path(str(source)).name == manifest.name:
            refuse()
        return read_table(source, *args, **kwargs)

    monkeypatch.setattr(pq, "read_table", parts_only)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_planning_never_reads_the_whole_manifest_into_pandas(tmp_path, monkeypatch, fmt):
    """The driver's path (plan, id check, read task, totals) must not go through a whole-table reader."""
    rng = np.random.default_rng(5)
    path, opts = _manifest(tmp_path, rng, fmt)
    cfg = InputConfig(manifest=path, **opts)
    expected = metadata_arrow(load_image_table(cfg), plan_image_table(cfg).schema)

    _refuse_whole_table_readers(monkeypatch, path)
    source = plan_image_table(cfg)
    _, n = scan_ids(source)
    blocks = list(read_blocks(source, schema=source.schema, done=IdSet(), block_rows=3))
    got = pa.concat_tables([decode_rows(b.column(META).to_pylist(), source.schema) for b in blocks])
    assert got.equals(expected) and n == expected.num_rows


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_the_embed_driver_never_reads_the_whole_manifest(tmp_path, monkeypatch, fmt):
    """``run_embed`` on a manifest whose rows are all done (no Ray needed): plan, id checks, resume, totals and
    the error preview all stream; a whole-table reader anywhere on the driver fails the test."""
    from msnoop.embed.pipeline import run_embed
    from msnoop.job_kinds import build_config

    rng = np.random.default_rng(8)
    path, opts = _manifest(tmp_path, rng, fmt)
    opts.pop("limit", None)
    ids = load_image_table(InputConfig(manifest=path, **opts))[ID_COLUMN].tolist()
    out = tmp_path / "out"
    for chunk in np.array_split(np.array(ids, dtype=object), 3):
        _part(out / "errors", list(chunk))
    cfg = build_config(
        {
            "job": "embed",
            "input": {"manifest": str(path), **opts},
            "model": "random:test_cnn:0",
            "output": {"dir": str(out), "write_lance": False},
            "runtime": {"progress": False},
        }
    )
    _refuse_whole_table_readers(monkeypatch, path)
    result = run_embed(cfg)
    assert (result.n_input, result.n_skipped, result.n_embedded) == (len(ids), len(ids), 0)
    assert (result.n_rows_total, result.n_errors_total) == (0, len(ids))
    assert len(result.errors_preview) == min(5, len(ids)) and {i for i, _ in result.errors_preview} <= set(ids)


def test_planning_two_hundred_thousand_rows_holds_ids_not_the_table(tmp_path):
    """Python memory while planning and checking 2*10^5 rows: one batch and a few copies of 16 bytes per id.

    Measured with tracemalloc on this manifest: the whole-table loader (``load_image_table``) peaks at 74 MB,
    the streaming path at 17 MB with 8192-row batches (Arrow buffers are not counted by either). The bound sits
    between the two.
    """
    n = 200_000
    table = pa.table(
        {
            "dna": pa.array([f"plate{i // 5000}/w{i % 384:03d}/img{i:06d}_dna.tif" for i in range(n)]),
            "key": pa.array([f"k{i:07d}" for i in range(n)]),
            "Metadata_Plate": pa.array([f"{i // 5000:04d}" for i in range(n)]),
            "Metadata_Gene": pa.array([None if i % 7 else f"G{i % 101}" for i in range(n)]),
            "Metadata_Dose": pa.array([f"{(i % 9) * 0.5:.2f}" for i in range(n)]),
        }
    )
    pacsv.write_csv(table, tmp_path / "m.csv")
    del table
    cfg = InputConfig(manifest=tmp_path / "m.csv", channels=["dna"], id_column="key", dtypes={"Metadata_Dose": "float"})
    tracemalloc.start()
    try:
        source = plan_image_table(cfg)
        ids, count = scan_ids(source, rows=8192)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n and len(ids) == n
    assert ids.hashes.nbytes == 16 * n
    assert peak < 40 * 2**20, f"planning {n} rows peaked at {peak / 2**20:.0f} MB of Python memory"


def test_scan_refuses_repeated_and_blank_ids_naming_the_first(tmp_path):
    rows = ["a.tif", "b.tif", "sub/../a.tif", "c.tif", "b.tif"]
    pd.DataFrame({"dna": rows, "key": ["1", "2", "", "4", "5"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ConfigError, match=r"not unique \(2 repeats, e.g. 'a'\)"):
        scan_ids(plan_image_table(InputConfig(manifest=tmp_path / "m.csv", channels=["dna"])), rows=2)
    with pytest.raises(ConfigError, match=r"input.id_column 'key' is blank in 1 row"):
        scan_ids(plan_image_table(InputConfig(manifest=tmp_path / "m.csv", channels=["dna"], id_column="key")))
    with pytest.raises(ConfigError, match=r"input.id_column 'nope' not found"):
        plan_image_table(InputConfig(manifest=tmp_path / "m.csv", channels=["dna"], id_column="nope"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match="empty.csv cannot be read"):
        plan_image_table(InputConfig(manifest=tmp_path / "empty.csv", channels=["dna"]))
    with pytest.raises(ConfigError, match="does not exist"):
        plan_image_table(InputConfig(manifest=tmp_path / "none.csv", channels=["dna"]))


def _part(folder, ids):
    return parts.write_part(
        pa.Table.from_pydict({ID_COLUMN: ids, "path": ids, "reason": ["r"] * len(ids)}, schema=parts.ERRORS_SCHEMA),
        folder,
    )


@pytest.mark.parametrize("seed", range(5))
def test_id_sets_totals_and_error_rows_agree_with_python_sets(tmp_path, seed):
    rng = np.random.default_rng(seed)
    ids = [f"plate/{k}" for k in rng.permutation(500)[: int(rng.integers(1, 200))]]
    emb = [i for i in ids if rng.random() < 0.6]
    err = [i for i in ids if i not in set(emb)]
    for folder, chosen in (("embeddings", emb + ["foreign/1"]), ("errors", err)):
        for chunk in np.array_split(np.array(chosen, dtype=object), int(rng.integers(1, 4))):
            if len(chunk):
                _part(tmp_path / folder, list(chunk))
    wanted = IdSet.of(ids)
    found = IdSet.from_parts(tmp_path / "embeddings", ID_COLUMN)
    assert len(found) == len(emb) + 1
    assert found.contains_ids(ids).tolist() == [i in set(emb) for i in ids]
    assert (
        check_totals(RunDir(tmp_path), wanted) == check_totals(RunDir(tmp_path), pd.Series(ids)) == (len(emb), len(err))
    )
    preview = error_preview(RunDir(tmp_path), wanted, n=3)
    assert len(preview) == min(3, len(err)) and {i for i, _ in preview} <= set(err)
    with pytest.raises(TotalsError, match=r"1 id\(s\) have no output row \(e.g. 'zz-missing'\)"):
        check_totals(RunDir(tmp_path), pd.Series([*ids, "zz-missing"]))
    if err:
        assert parts.drop_ids(tmp_path / "errors", wanted.contains_ids) == len(err)
        assert not parts.part_files(tmp_path / "errors")


def test_ids_of_finds_the_strings_of_hashes(tmp_path):
    pd.DataFrame({"dna": [f"d/{k}.tif" for k in range(50)]}).to_csv(tmp_path / "m.csv", index=False)
    source = plan_image_table(InputConfig(manifest=tmp_path / "m.csv", channels=["dna"]))
    assert ids_of(source, hash_ids(["d/7", "d/42", "nope"]), rows=8) == ["d/7", "d/42"]


@pytest.mark.ray
def test_blocks_through_ray_keep_values_and_types_and_the_reader_is_its_own_operator(tmp_path, ray_cluster):
    """Ray Data turns the blocks into pandas and NumPy batches between stages; the metadata bytes survive."""
    from msnoop.embed.source import manifest_dataset

    rng = np.random.default_rng(11)
    path, opts = _manifest(tmp_path, rng, "parquet")
    source = plan_image_table(InputConfig(manifest=path, **opts))
    expected = pa.concat_tables([b for _, b in source.batches()])

    def through_pandas(batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(seen=1)

    ds = manifest_dataset(
        source, expected.num_rows, ray_remote_args={"num_cpus": 0}, schema=source.schema, done=IdSet(), block_rows=4
    )
    ds = ds.map_batches(through_pandas, batch_format="pandas", batch_size=None, num_cpus=0.5)
    ds = ds.map_batches(lambda b: b, batch_size=3, num_cpus=0.25)  # NumPy batches of another size
    got = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        got.append(decode_rows(batch[META], source.schema))
    table = pa.concat_tables(got)
    assert table.schema == source.schema
    assert table.sort_by(ID_COLUMN).equals(expected.sort_by(ID_COLUMN))
    stats = ds.stats()
    assert "ReadManifest" in stats and "ReadManifest->MapBatches" not in stats, stats
