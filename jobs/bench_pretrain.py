"""Benchmark: training samples/s of the Ray Train loop vs the bare PyTorch loop (same model, batch, data).

Both runs execute :func:`msnoop.train.loop.train_steps` on the same crop stream (seed, rank 0) with the same
number of torch threads; the Ray run is one ``TorchTrainer`` worker, bracketed by two bare runs (their mean is
the reference) so that load drifts of a shared machine cancel. Throughput is measured in the steady
state (the first ``--warmup`` steps are excluded) from the per-interval records both loops log; end-to-end
wall times (Ray start-up, pool loading, outputs) are reported separately.

    python jobs/bench_pretrain.py                      # real data if ../shared/data exists, else synthetic
    python jobs/bench_pretrain.py --arch test_cnn --steps 40 --crop 64

Writes ``results/bench_pretrain.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import write_results

REPO = Path(__file__).resolve().parents[1]


def _synthetic_manifest(root: Path) -> Path:
    import numpy as np
    import pandas as pd
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    rows = []
    for i in range(8):
        img = np.full((256, 256), 5.0)
        for _ in range(40):
            cy, cx, r = rng.uniform(0, 256, 2).tolist() + [rng.uniform(3, 9)]
            img += rng.uniform(50, 200) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        tifffile.imwrite(root / f"s{i}.tif", img.astype(np.uint16))
        rows.append({"img_path": f"s{i}.tif"})
    pd.DataFrame(rows).to_csv(root / "synthetic.csv", index=False)
    return root / "synthetic.csv"


def _sources(tmp: Path) -> tuple[list[dict[str, Any]], str]:
    shared = REPO.parent / "shared" / "data"
    if (shared / "hpa_toy" / "hpa_labels.csv").is_file() and (shared / "bbbc013" / "images").is_dir():
        return [
            {
                "name": "hpa_toy",
                "input": {
                    "manifest": str(shared / "hpa_toy" / "hpa_labels.csv"),
                    "channels": ["green", "blue", "red"],
                    "channel_columns": {"green": "green_path", "blue": "blue_path", "red": "red_path"},
                },
            },
            {
                "name": "bbbc013",
                "input": {
                    "folder": str(shared / "bbbc013"),
                    "channels": ["gfp", "dna"],
                    "pattern": "images/Channel{channel}-{Metadata_Index}-{Metadata_Row}-{Metadata_Column}.tif",
                    "channel_values": {"gfp": "1", "dna": "2"},
                },
            },
        ], "shared: hpa_toy + bbbc013"
    return [
        {"name": "synthetic", "input": {"manifest": str(_synthetic_manifest(tmp)), "channels": ["img"]}}
    ], "synthetic blobs"


def _steady(records: list[dict[str, float]], warmup: int, batch: int) -> float:
    """Samples/s over the log intervals that start after ``warmup`` steps (time-weighted)."""
    samples = secs = 0.0
    prev = None
    for r in records:
        if prev is not None and prev >= warmup:
            n = (r["step"] - prev) * batch
            samples += n
            secs += n / r["samples_per_s"]
        prev = r["step"]
    return samples / secs if secs else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="microsnoop_cnn")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps excluded from the steady-state rate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both loops (= CPUs of the Ray worker)")
    parser.add_argument("--no-bracket", action="store_true", help="skip the second bare run after the Ray run")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench_pretrain.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from msnoop.job_kinds import build_config
    from msnoop.core.runtime import init_ray, provenance, shutdown_ray
    from msnoop.train.config import PretrainJob
    from msnoop.train.data import ChannelPool
    from msnoop.train.loop import build_state, train_steps
    from msnoop.train.pretrain import run_pretrain

    tmp = Path(tempfile.mkdtemp(prefix="msnoop_bench_"))
    sources, data_desc = _sources(tmp)
    job = build_config(
        {
            "job": "pretrain",
            "name": "bench",
            "data": {"crop_size": args.crop, "sources": sources},
            "model": {"arch": args.arch},
            "train": {"steps": args.steps, "batch_size": args.batch, "log_every": 1, "checkpoint_every": 10**9},
            "output": {"dir": str(tmp / "ray_out"), "figure_images": 1},
            "runtime": {"num_workers": 1, "cpus_per_worker": args.threads, "use_gpu": "no", "max_failures": 0},
        }
    )
    assert isinstance(job, PretrainJob)

    load_start = os.getloadavg()[0]
    # bare PyTorch loop
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    pool = ChannelPool.from_config(job.data)
    state = build_state(job)
    bare_log: list[dict[str, float]] = []
    train_steps(state, pool, job, until=args.steps, on_log=bare_log.append)
    bare_wall = time.perf_counter() - t0
    bare = _steady(bare_log, args.warmup, args.batch)

    # Ray Train: one TorchTrainer worker with the same thread count
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    t0 = time.perf_counter()
    init_ray(num_cpus=max(2, args.threads), object_store_memory=500 * 2**20, quiet=True)
    t_init = time.perf_counter() - t0
    res = run_pretrain(job)
    ray_wall = time.perf_counter() - t0
    shutdown_ray()
    ray_log = [json.loads(line) for line in (tmp / "ray_out" / "train_log.jsonl").read_text().splitlines()]
    ray_rate = _steady(ray_log, args.warmup, args.batch)

    # bare loop again after the Ray run: brackets it, so slow drifts of a shared machine's load cancel
    bare_after: float | None = None
    if not args.no_bracket:
        state = build_state(job)
        log2: list[dict[str, float]] = []
        train_steps(state, pool, job, until=args.steps, on_log=log2.append)
        bare_after = _steady(log2, args.warmup, args.batch)
    bare_runs = [bare] + ([bare_after] if bare_after is not None else [])
    bare = sum(bare_runs) / len(bare_runs)

    result = {
        "benchmark": "pretrain samples/s, Ray Train (1 worker) vs bare PyTorch loop",
        "arch": args.arch,
        "crop_size": args.crop,
        "batch_size": args.batch,
        "steps": args.steps,
        "warmup_steps_excluded": args.warmup,
        "torch_threads": args.threads,
        "data": data_desc,
        "bare_samples_per_s": round(bare, 2),
        "bare_runs_samples_per_s": [round(b, 2) for b in bare_runs],
        "ray_samples_per_s": round(ray_rate, 2),
        "ratio_ray_over_bare": round(ray_rate / bare, 3),
        "goal_ratio": 0.9,
        "bare_wall_s": round(bare_wall, 1),
        "ray_wall_s": round(ray_wall, 1),
        "ray_init_s": round(t_init, 1),
        "ray_final_loss": res.final_loss,
        "bare_final_loss": bare_log[-1]["loss"],
        "same_final_loss": res.final_loss == bare_log[-1]["loss"],
        "load_average_1min_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "provenance": provenance(),
        "note": "bare, Ray, bare on a shared machine; steady-state rates exclude start-up, wall times include it",
    }
    write_results(args.out, result)
    shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("bare_samples_per_s", "ray_samples_per_s", "ratio_ray_over_bare", "bare_wall_s", "ray_wall_s")
            }
        )
    )
    print(f"Wrote {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
