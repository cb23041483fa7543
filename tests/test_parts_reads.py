"""Reading ids and row counts of many parts: same answers as reading each file whole, fewer requests on S3.

The driver reads the id column of every part to resume and for the totals check; on object storage that was
3 HEAD + 3 GET per part, one part after another. Now parts are opened with the size the folder listing gives
(no HEAD) and read several at a time (``parts.READ_THREADS``).
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
from msnoop.embed.totals import TotalsError, check_totals


def _layout(seed: int) -> list[list[str]]:
    """Ids per part for a generated layout: 0-30 parts of 1-300 rows, ids unique across parts, random names."""
    rng = np.random.default_rng(seed)
    n_parts = int(rng.choice([0, 1, 2, 7, 30]))
    sizes = rng.integers(1, 300, size=n_parts)
    ids = [f"plate{rng.integers(9)}/img{i:06d}" for i in rng.permutation(int(sizes.sum()))]
    return [ids[int(a) : int(b)] for a, b in zip(np.r_[0, np.cumsum(sizes)[:-1]], np.cumsum(sizes), strict=True)]


def _write(folder, layout, cfg, dim: int = 4) -> None:
    rng = np.random.default_rng(len(layout))
    for i, ids in enumerate(layout):
        meta = pd.DataFrame({parts.ID_COLUMN: ids, "Metadata_Plate": [x.split("/")[0] for x in ids]})
        emb = rng.standard_normal((len(ids), dim)).astype(np.float32)
        parts.write_part(
            parts.embeddings_frame(meta, emb), folder, storage=cfg, key=parts.block_key(ids) if i else None
        )


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("seed", range(6))
def test_reads_match_whole_file_reads(where, seed, tmp_path, request):
    """Over generated layouts (part counts, sizes, names): per-part ids, id set and row count as read file by file."""
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        folder, cfg = storage.join(s3.fresh(), RunDir.EMBEDDINGS), s3.config
    else:
        folder, cfg = tmp_path / RunDir.EMBEDDINGS, None
    layout = _layout(seed)
    _write(folder, layout, cfg)
    files = parts.part_files(folder, storage=cfg)
    expected = []
    for f in files:
        fs, path = storage.resolve(f, cfg)
        expected.append(pq.read_table(path, filesystem=fs).column(parts.ID_COLUMN).to_pylist())
    assert parts.read_column_per_part(folder, storage=cfg) == expected
    assert sorted(map(sorted, expected)) == sorted(map(sorted, layout))
    assert parts.read_ids(folder, storage=cfg) == {i for ids in layout for i in ids}
    assert parts.count_rows(folder, storage=cfg) == sum(map(len, layout))
    assert parts.read_column_per_part(folder, "Metadata_Plate", storage=cfg) == [
        [x.split("/")[0] for x in ids] for ids in expected
    ]


def test_missing_folder_reads_empty(tmp_path, s3):
    for folder, cfg in ((tmp_path / "nothing", None), (storage.join(s3.fresh(), "nothing"), s3.config)):
        assert parts.read_column_per_part(folder, storage=cfg) == []
        assert parts.read_ids(folder, storage=cfg) == set()
        assert parts.count_rows(folder, storage=cfg) == 0


def test_s3_reads_ask_no_head_per_part(s3):
    cfg, base = s3.config, s3.fresh()
    layout = _layout(3)
    assert len(layout) == 30
    folder = storage.join(base, RunDir.EMBEDDINGS)
    _write(folder, layout, cfg, dim=512)
    with request_log(base.removeprefix("s3://").split("/")[0]) as lines:
        parts.read_ids(folder, storage=cfg)
        parts.count_rows(folder, storage=cfg)
    methods = Counter(line.split()[0] for line in lines)
    assert methods["HEAD"] == 0, lines
    assert methods["GET"] <= 2 + 5 * len(layout), methods  # 2 listings, then footer (1-2) + column chunk per part


def test_totals_check_still_finds_missing_and_repeated_ids(s3):
    out, cfg = s3.fresh(), s3.config
    _write(storage.join(out, RunDir.EMBEDDINGS), [["a", "b"], ["c"]], cfg)
    _write(storage.join(out, RunDir.ERRORS), [], cfg)
    assert check_totals(RunDir(out, cfg), pd.Series(["a", "b", "c"])) == (3, 0)
    with pytest.raises(TotalsError, match="1 id\\(s\\) have no output row"):
        check_totals(RunDir(out, cfg), pd.Series(["a", "b", "c", "d"]))
    _write(storage.join(out, RunDir.EMBEDDINGS), [["x"], ["a"]], cfg)  # "a" a second time, in another part
    with pytest.raises(TotalsError, match="1 repeated row"):
        check_totals(RunDir(out, cfg), pd.Series(["a", "b", "c"]))
