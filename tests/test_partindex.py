"""The part index gives the driver exactly what reading every part gives, on local disk and on S3 (moto).

Property-style: many small random folders, each built twice from one seed, one checked through its part index and
one by reading every part. The folders have parts of random sizes, ids shared between parts (repeats, and images
both embedded and in errors), parts written without their description (a run killed between the part and the
index), parts written twice, parts rewritten or removed after they were indexed (by a version without the index).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from msnoop.core import parts
from msnoop.core import storage as st
from msnoop.core.idset import IdSet
from msnoop.core.partindex import PartIndex, decode_entries, describe_part, encode_entries
from msnoop.core.rundir import RunDir
from msnoop.embed.totals import TotalsError, check_totals, repair_repeats


def _write(run: RunDir, folder: str, ids: list[str], key: str | None = None) -> str:
    if folder == RunDir.ERRORS:
        table = pa.Table.from_pydict(
            {"Metadata_ImageID": ids, "path": ["x.tif"] * len(ids), "reason": ["bad"] * len(ids)},
            schema=parts.ERRORS_SCHEMA,
        )
    else:
        meta = pd.DataFrame({"Metadata_ImageID": ids, "Metadata_Well": ["A01"] * len(ids)})
        if folder == RunDir.CELLS:  # one row per cell: its image's id and the cell's number within the image
            meta["Metadata_CellID"] = meta.groupby("Metadata_ImageID").cumcount() + 1
        table = parts.embeddings_frame(meta, np.ones((len(ids), 3), np.float32))
    return parts.write_part(table, run.path(folder), storage=run.storage, key=key or parts.block_key(ids))


def random_folder(run: RunDir, seed: int) -> IdSet:
    """Write a random folder and its index (as write tasks and the driver do); returns the run's input ids."""
    rng = np.random.default_rng(seed)
    pool = [f"plate/img{i:03d}" for i in range(int(rng.integers(4, 30)))]
    index = PartIndex(run)
    for _ in range(int(rng.integers(0, 9))):
        folder = RunDir.EMBEDDINGS if rng.random() < 0.75 else RunDir.ERRORS
        ids = sorted({str(x) for x in rng.choice(pool, size=int(rng.integers(1, 6)))})
        path = _write(run, folder, ids)
        roll = rng.random()
        if roll < 0.2:
            continue  # killed between the part and its description: the index never hears of it
        index.add(decode_entries(encode_entries([describe_part(path, folder, ids, run.storage)])))
        if roll < 0.3:
            _write(run, folder, ids)  # written twice (a retried task): same rows, a newer file
        elif roll < 0.4 and len(ids) > 1:  # rewritten without the index knowing (an older msnoop's repair)
            parts.drop_ids(run.path(folder), {ids[0]}, storage=run.storage)
        elif roll < 0.45:
            st.remove(path, run.storage)  # removed after it was indexed
        if rng.random() < 0.5:
            index.flush()
    index.flush()
    # the run's input: mostly the ids the folder holds (the totals check passes after the repair), else the whole
    # pool, whose ids no part holds fail it alike both ways
    if rng.random() < 0.3:
        return IdSet.of(pool)
    held = [IdSet.from_parts(run.path(name), "Metadata_ImageID", storage=run.storage) for name in run.ROW_FOLDERS[:2]]
    return held[0] | held[1]


def _outcome(fn, run: RunDir):
    try:
        return fn()
    except TotalsError as exc:
        return str(exc).replace(str(run), "RUN")


def check_same(fast: RunDir, slow: RunDir, seed: int) -> None:
    wanted = random_folder(fast, seed)
    assert _ids_equal(random_folder(slow, seed), wanted)  # the same seed writes the same folder
    index = PartIndex.load(fast)
    for name in (RunDir.EMBEDDINGS, RunDir.ERRORS):
        scan = index.scan(name)
        assert _ids_equal(scan.id_set(), IdSet.from_parts(slow.path(name), "Metadata_ImageID", storage=slow.storage))
        assert sum(scan.rows) == parts.count_rows(slow.path(name), storage=slow.storage)
        assert [str(f).rsplit("/", 1)[-1] for f in scan.files] == [
            str(f).rsplit("/", 1)[-1] for f in parts.part_files(slow.path(name), storage=slow.storage)
        ]
    assert repair_repeats(fast, index=index) == repair_repeats(slow)
    assert _outcome(lambda: check_totals(fast, wanted, index=index), fast) == _outcome(
        lambda: check_totals(slow, wanted), slow
    )
    index.compact()
    again = PartIndex.load(fast)
    assert len(again.files) <= 1
    for name in (RunDir.EMBEDDINGS, RunDir.ERRORS):
        scan = again.scan(name)
        assert scan.n_read == 0  # after a run's checks, the index describes every part
        assert _ids_equal(scan.id_set(), IdSet.from_parts(slow.path(name), "Metadata_ImageID", storage=slow.storage))


def _ids_equal(a: IdSet, b: IdSet) -> bool:
    return a.hashes.tobytes() == b.hashes.tobytes()


@pytest.mark.parametrize("seed", range(40))
def test_the_index_gives_what_reading_every_part_gives_on_local_disk(tmp_path, seed):
    check_same(RunDir(tmp_path / "fast"), RunDir(tmp_path / "slow"), seed)


@pytest.mark.parametrize("seed", range(6))
def test_the_index_gives_what_reading_every_part_gives_on_s3(s3, seed):
    check_same(RunDir(s3.fresh(), s3.config), RunDir(s3.fresh(), s3.config), 1000 + seed)


def test_an_index_never_claims_a_part_that_is_not_there(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such part"):
        describe_part(run.path(RunDir.EMBEDDINGS, "part-x.parquet"), RunDir.EMBEDDINGS, ["a"])
    path = _write(run, RunDir.EMBEDDINGS, ["a", "b"])
    index = PartIndex(run)
    index.add([describe_part(path, RunDir.EMBEDDINGS, ["a", "b"])])
    index.flush()
    st.remove(path)
    scan = PartIndex.load(run).scan(RunDir.EMBEDDINGS)
    assert (scan.files, scan.ids) == ([], [])


def test_an_unreadable_index_file_is_skipped_and_the_parts_are_read(tmp_path):
    run = RunDir(tmp_path)
    _write(run, RunDir.EMBEDDINGS, ["a", "b", "c"])
    st.write_text(run.path(RunDir.PART_INDEX, "0-broken.parquet"), "not parquet")
    scan = PartIndex.load(run).scan(RunDir.EMBEDDINGS)
    assert scan.n_read == 1 and scan.rows == [3]


def test_an_embedding_run_indexes_its_parts_and_resumes_a_folder_without_an_index(tmp_path):
    import tifffile

    from msnoop.job_kinds import build_config
    from msnoop.job_kinds import run_embed_job as run_embed

    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        tifffile.imwrite(tmp_path / f"img{i}.tif", rng.integers(0, 200, (40, 40)).astype(np.uint16))
        rows.append({"dna": f"img{i}.tif"})
    rows.append({"dna": "missing.tif"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "out"
    cfg = build_config(
        {
            "job": "embed",
            "input": {"manifest": str(tmp_path / "manifest.csv"), "channels": ["dna"]},
            "model": "random:test_cnn:0",
            "output": {"dir": str(out), "write_lance": False},
            "runtime": {"images_per_block": 2, "batch_size": 2, "progress": False},
        }
    )
    first = run_embed(cfg)
    assert (first.n_embedded, first.n_errors) == (6, 1)
    run = RunDir(out)
    index = PartIndex.load(run)
    assert len(index.files) == 1  # compacted at the end of the run
    for name, n in ((RunDir.EMBEDDINGS, 6), (RunDir.ERRORS, 1)):
        scan = index.scan(name)
        assert (scan.n_read, sum(scan.rows)) == (0, n)
    st.remove(run.part_index)  # a folder written before part indexes
    again = run_embed(cfg)
    assert (again.n_skipped, again.n_embedded, again.n_rows_total, again.n_errors_total) == (7, 0, 6, 1)
    assert PartIndex.load(run).scan(RunDir.EMBEDDINGS).n_read == 0  # the re-run indexed the old parts


@pytest.mark.parametrize("seed", range(8))
def test_cells_checks_through_the_index_are_those_made_by_reading(tmp_path, seed):
    from msnoop.embed.cells import drop_orphan_cells

    rng = np.random.default_rng(seed)
    runs = [RunDir(tmp_path / "fast"), RunDir(tmp_path / "slow")]
    index = PartIndex(runs[0])
    for k in range(int(rng.integers(1, 8))):
        images = [f"img{k}_{j}" for j in range(int(rng.integers(1, 4)))]
        ids = [i for i in images for _ in range(int(rng.integers(1, 4)))]  # a few cells per image
        key = f"{k}" if rng.random() < 0.2 else None  # the same cells again under another name: repeated rows
        path = _write(runs[0], RunDir.CELLS, ids, key)
        _write(runs[1], RunDir.CELLS, ids, key)
        if rng.random() < 0.7:  # else written by a run killed before it could index it
            index.add([describe_part(path, RunDir.CELLS, ids, keys=_cell_keys(path))])
        if key is not None:
            _write(runs[0], RunDir.CELLS, ids)
            _write(runs[1], RunDir.CELLS, ids)
    finished = IdSet.of([f"img{k}_{j}" for k in range(8) for j in range(3) if rng.random() < 0.8])
    assert drop_orphan_cells(runs[0], finished, index=index) == drop_orphan_cells(runs[1], finished)
    assert repair_repeats(runs[0], cells=True, index=index) == repair_repeats(runs[1], cells=True)
    scans = [PartIndex(run).scan(RunDir.CELLS) for run in runs]
    assert [len(k) for k in scans[0].keys] == [len(k) for k in scans[1].keys]
    assert np.array_equal(
        np.sort(np.concatenate([np.zeros(0, "S16"), *scans[0].keys])),
        np.sort(np.concatenate([np.zeros(0, "S16"), *scans[1].keys])),
    )
    assert [str(f).rsplit("/", 1)[-1] for f in index.scan(RunDir.CELLS).files] == [
        str(f).rsplit("/", 1)[-1] for f in scans[1].files
    ]


def _cell_keys(path) -> np.ndarray:
    import pyarrow.parquet as pq

    return parts.key_hashes(pq.read_table(path), parts.CELL_KEY)
