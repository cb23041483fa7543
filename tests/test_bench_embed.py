"""jobs/bench_embed.py's steady-state rate: images after the first part over the time from first to last part."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def bench(job_script):
    return job_script("bench_embed")


def _part(folder: Path, name: str, rows: int, mtime: float) -> None:
    path = folder / f"part-{name}.parquet"
    pd.DataFrame({"Metadata_ImageID": [f"{name}{i}" for i in range(rows)]}).to_parquet(path)
    os.utime(path, (mtime, mtime))


def test_steady_rate_counts_images_after_the_first_part(bench, tmp_path):
    # written in the order c (t=100), a (t=104), b (t=110): names do not decide the order, times do
    _part(tmp_path, "a", 64, 104.0)
    _part(tmp_path, "b", 32, 110.0)
    _part(tmp_path, "c", 64, 100.0)
    res = bench.steady_rate(tmp_path)
    assert res["parts"] == 3 and res["images"] == 96 and res["seconds"] == pytest.approx(10.0)
    assert res["images_per_s"] == pytest.approx(9.6)


def test_steady_rate_needs_two_parts_at_two_times(bench, tmp_path):
    assert bench.steady_rate(tmp_path) is None
    _part(tmp_path, "a", 64, 100.0)
    assert bench.steady_rate(tmp_path) is None
    _part(tmp_path, "b", 64, 100.0)  # two parts with one time: no interval to divide by
    assert bench.steady_rate(tmp_path) is None


def test_the_in_process_arm_embeds_every_image_without_starting_ray(bench, tmp_path):
    """The in-process arm is the path a small CPU job takes: the same job config as the Ray arm, no Ray cluster."""
    import ray

    manifest = bench.make_data(tmp_path / "work", 8)
    ray_before = ray.is_initialized()  # another test of the session may hold a cluster; this arm must not start one
    res = bench.ray_pipeline(manifest, "test_cnn", 4, tmp_path / "out", num_cpus=1, amp="off", on_ray=False)
    assert ray.is_initialized() == ray_before
    rows = len(pd.read_csv(manifest))
    assert res["images"] == rows and res["ray_startup_s"] < 1.0
    embedded = pd.concat(pd.read_parquet(p) for p in (tmp_path / "out" / "embeddings").glob("*.parquet"))
    assert sorted(embedded["Metadata_Cell"]) == sorted(pd.read_csv(manifest, dtype=str)["Metadata_Cell"])
