"""jobs/bench_s3.py's summary and CPU accounting, and jobs/estimate_screen.py's fragment arithmetic."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(job_script):
    return job_script("bench_s3")


def _run(arm: str, rate: float, warmup: bool = False) -> dict:
    return {
        "arm": arm,
        "warmup": warmup,
        "images_per_s": rate,
        "images_per_cpu_s": rate / 2,
        "seconds": 100 / rate,
        "embed_stage_s": 1.0,
        "lance_stage_s": 0.1,
        "write_tasks_s": 0.2,
        "write_tasks": 2,
        "files": 5,
        "bytes": 100,
        "endpoint_cpu_s": 0.0,
        "job_cpu_s": 200 / rate,
    }


def test_summary_excludes_warmups_and_pairs_adjacent_runs(bench):
    local = [10.0, 8.0, 12.0, 9.0]
    s3 = [9.0, 8.0, 11.0, 9.9]
    runs = [_run("local", 1.0, True), _run("s3", 100.0, True)]  # warm-ups far off: they must not count
    for a, b in zip(local, s3, strict=True):
        runs += [_run("local", a), _run("s3", b)]
    out = bench.summarise(runs, ["local", "s3"])
    r = out["ratio_s3_over_local"]
    assert r["median_ratio"] == pytest.approx(np.median(s3) / np.median(local))
    assert r["pair_ratios"] == [round(b / a, 3) for a, b in zip(local, s3, strict=True)]
    assert r["pair_min"] == pytest.approx(min(b / a for a, b in zip(local, s3, strict=True)))
    lo, hi = r["bootstrap_95"]
    assert lo <= r["median_ratio"] <= hi
    assert out["ratio_per_cpu_s_s3_over_local"]["median_ratio"] == pytest.approx(r["median_ratio"])
    assert out["arms"]["local"]["images_per_s_runs"] == local


def test_tree_cpu_counts_a_child_process(bench):
    """CPU burnt by a child of the watched process is counted (the job's Ray workers are such children)."""
    code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time\\nt=time.process_time()\\nwhile time.process_time()-t<0.6: pass'])"
    proc = subprocess.Popen([sys.executable, "-c", code])
    tree = bench.TreeCPU(proc.pid, interval=0.05)
    proc.wait()
    tree.stop()
    assert tree.total() >= 0.4
    assert tree.self_cpu < tree.total()


@pytest.mark.parametrize(
    ("rows", "per_part", "cpus"),
    [(1_500_000, 8, 1024), (100_000_000, 533, 1024), (50_000, 64, 2), (3_000_000, 1000, 8), (10_000, 7, 4)],
)
def test_fragment_count_follows_the_builder(job_script, rows, per_part, cpus):
    """estimate_screen's fragment count = groups packed by msnoop.store.lance_ray.group_parts, split at 2^20 rows."""
    from msnoop.store.lance_ray import MAX_ROWS_PER_FRAGMENT, MIN_ROWS_PER_FRAGMENT, group_parts

    estimate = job_script("estimate_screen")
    sizes = [per_part] * (rows // per_part) + ([rows % per_part] if rows % per_part else [])
    target = min(MAX_ROWS_PER_FRAGMENT, max(MIN_ROWS_PER_FRAGMENT, -(-rows // cpus)))
    groups = group_parts(sizes, target)
    expected = sum(-(-sum(sizes[i] for i in g) // MAX_ROWS_PER_FRAGMENT) for g in groups)
    assert estimate.lance_fragments(rows, per_part, cpus) == expected
