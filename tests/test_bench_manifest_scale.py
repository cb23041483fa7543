"""jobs/bench_manifest_scale.py: its manifests are valid job inputs (real files, unique ids) and its ratios are right."""

from __future__ import annotations

import pytest

from msnoop.io.config import InputConfig
from msnoop.io.table_stream import plan_image_table, scan_ids


@pytest.fixture(scope="module")
def bench(job_script):
    return job_script("bench_manifest_scale")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifests_repeat_real_files_under_unique_ids(bench, shared_data, tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(bench, "DATA", shared_data("yeast").parent)
    path = bench.make_manifest(tmp_path, 40, fmt, n_files=6)
    source = plan_image_table(InputConfig(manifest=path, channels=["gfp", "rfp"], id_column="key"))
    ids, n = scan_ids(source)
    assert n == len(ids) == 40
    rows = next(source.batches())[1]
    paths = set(rows.column("Metadata_Path_gfp").to_pylist())
    assert len(paths) == 6 and all(shared_data("yeast").joinpath(p).is_file() for p in paths)
    assert set(rows.column("Metadata_plate").to_pylist()) == {"0001"}  # text stays text


def test_ratio_is_largest_over_smallest_manifest(bench):
    runs = [
        {"format": "csv", "rows": 10, "ru_maxrss_mb": 400.0, "peak_rss_sampled_mb": 390.0},
        {"format": "csv", "rows": 100, "ru_maxrss_mb": 480.0, "peak_rss_sampled_mb": 468.0},
        {"format": "parquet", "rows": 10, "ru_maxrss_mb": 300.0, "peak_rss_sampled_mb": 300.0},
    ]
    assert bench.ratios(runs) == {"csv": {"rows": [10, 100], "ru_maxrss": 1.2, "sampled": 1.2}}
