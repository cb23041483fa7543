"""Benchmark: the Ray Data embedding pipeline vs a bare single-process PyTorch loop, and peak memory.

Both sides embed the same synthetic 2-channel TIFF images with the same model and batch size and write
Parquet. The Ray side is timed after ``ray.init`` (cluster start-up is reported separately). Peak memory
is the sampled peak of the summed RSS of this process and all its children (Ray's raylet, workers and
object store), measured in a fresh process for N and 10*N images.

    python jobs/bench_embed.py --n 256 --repeats 3 --arch microsnoop_cnn --mem-n 256 --mem-arch test_cnn

The throughput runs alternate bare, Ray, bare, Ray, ... and the medians are compared, over the whole job and
from the first Parquet part written to the last (the rate once both sides are running; see ``steady_rate``).
``--amp auto`` runs both sides under bf16 autocast on a CPU with native bf16 (AVX512-BF16 or AMX):

    python jobs/bench_embed.py --n 256 --repeats 3 --amp auto --only throughput --out results/bench_embed_bf16.json

Writes results/bench_embed.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from harness import PeakRSS, write_results
from headline import RAY_OVER_BARE_GOAL


def make_data(root: Path, n: int) -> Path:
    from msnoop.data.synthetic import write_dataset

    per_class = max(1, n // 4)
    manifest = root / f"data_{n}" / "manifest.csv"
    if not manifest.exists():
        write_dataset(manifest.parent, n_per_class=per_class, size=64, seed=0)
    return manifest


def bare_loop(manifest: Path, arch: str, batch_size: int, out: Path, amp: str = "cuda") -> dict:
    """Single process: read -> preprocess -> embed in batches -> write Parquet parts."""
    import torch

    from msnoop.core import parts
    from msnoop.embed.dataset import load_image
    from msnoop.embed.embedder import Embedder, combine_tiles
    from msnoop.io.config import InputConfig
    from msnoop.io.manifest import load_image_table
    from msnoop.models.checkpoint import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    # The clock starts where the Ray side's does (before the job reads its manifest and builds its model): the
    # whole job on both sides, imports and Ray's cluster start-up left out of both.
    t0 = time.perf_counter()
    table = load_image_table(InputConfig(manifest=manifest, channels=["dna", "protein"]))
    embedder = Embedder(resolve_model(f"random:{arch}:0"), batch_size=batch_size, device="auto", amp=amp)
    setup = time.perf_counter() - t0
    block = 64
    for start in range(0, len(table), block):
        rows = table.iloc[start : start + block]
        prepared = [embedder.prepare(load_image(r, ["dna", "protein"])) for _, r in rows.iterrows()]
        emb = combine_tiles(embedder.embed_tiles(np.concatenate([t for t, _ in prepared])), [c for _, c in prepared])
        parts.write_part(parts.embeddings_frame(rows.reset_index(drop=True), emb), out / "embeddings")
    seconds = time.perf_counter() - t0
    return {"images": len(table), "seconds": seconds, "images_per_s": len(table) / seconds, "setup_s": setup}


def ray_pipeline(
    manifest: Path,
    arch: str,
    batch_size: int,
    out: Path,
    num_cpus: int | None,
    amp: str = "cuda",
    on_ray: bool = True,
) -> dict:
    """The whole ``msnoop embed`` job: on a local Ray cluster, or (``on_ray=False``) in this process, the path
    ``runtime.ray_min_images`` picks for small jobs on a CPU."""
    from msnoop.core.runtime import init_ray, shutdown_ray
    from msnoop.job_kinds import build_config
    from msnoop.job_kinds import run_embed_job as run_embed

    t0 = time.perf_counter()
    if on_ray:
        init_ray(None, num_cpus=num_cpus, quiet=True)
    startup = time.perf_counter() - t0
    cfg = build_config(
        {
            "job": "embed",
            "name": "bench",
            "input": {"manifest": str(manifest), "channels": ["dna", "protein"]},
            "model": f"random:{arch}:0",
            "output": {"dir": str(out), "write_lance": False},
            "runtime": {
                "batch_size": batch_size,
                "images_per_block": 64,
                "progress": False,
                "amp": amp,
                # the Ray side runs on Ray whatever the job's size; the in-process side never does
                "ray_min_images": 0 if on_ray else 10**9,
            },
        }
    )
    t1 = time.perf_counter()
    result = run_embed(cfg)
    seconds = time.perf_counter() - t1
    if on_ray:
        shutdown_ray()
    return {
        "images": result.n_embedded,
        "seconds": seconds,
        "images_per_s": result.n_embedded / seconds,
        "ray_startup_s": startup,
    }


def steady_rate(folder: Path) -> dict | None:
    """Images/s between the first and the last Parquet part written (their modification times).

    This leaves out what happens before the first block is out (start-up of actors, model load, the first
    block's read) on both sides alike, so it is the rate a long job runs at; ``None`` with fewer than 2 parts
    or when they carry the same time (nothing to divide by).
    """
    import pyarrow.parquet as pq

    files = sorted(folder.glob("part-*.parquet"), key=lambda f: f.stat().st_mtime)
    if len(files) < 2:
        return None
    rows = [pq.read_metadata(f).num_rows for f in files]
    seconds = files[-1].stat().st_mtime - files[0].stat().st_mtime
    if seconds <= 0:
        return None
    images = sum(rows[1:])
    return {"parts": len(files), "images": images, "seconds": seconds, "images_per_s": images / seconds}


def child(args: argparse.Namespace) -> None:
    """One measurement in this fresh process; prints a JSON line."""
    out = Path(args.work) / f"out_{args.mode}_{args.n}_{time.time_ns()}"
    manifest = make_data(Path(args.work), args.n)
    with PeakRSS() as mem:
        if args.mode == "bare":
            res = bare_loop(manifest, args.arch, args.batch_size, out, args.amp)
        else:
            on_ray = args.mode == "ray"
            res = ray_pipeline(manifest, args.arch, args.batch_size, out, args.num_cpus, args.amp, on_ray=on_ray)
    res["peak_rss_mb"] = mem.peak / 2**20
    res["steady"] = steady_rate(out / "embeddings")
    print("RESULT " + json.dumps(res))


def run_child(mode: str, n: int, arch: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--mode",
        mode,
        "--n",
        str(n),
        "--arch",
        arch,
        "--batch-size",
        str(args.batch_size),
        "--work",
        args.work,
        "--amp",
        args.amp,
    ]
    if args.num_cpus:
        cmd += ["--num-cpus", str(args.num_cpus)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=False,
        # both sides with the OpenMP wait policy that msnoop's CPU actors use (sleeping, not spinning, threads)
        env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{mode} n={n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(line[len("RESULT ") :])
    logging.info("%s n=%d %s: %s", mode, n, arch, res)
    return res


def _bf16_used(amp: str) -> bool:
    import torch

    from msnoop.core.runtime import uses_bf16

    return uses_bf16(amp, torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="images for the throughput comparison")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side (alternating); medians are reported")
    ap.add_argument("--arch", default="microsnoop_cnn")
    ap.add_argument("--mem-n", type=int, default=300, help="N for the memory test (10*N is the large run)")
    ap.add_argument("--mem-arch", default="test_cnn", help="a small network keeps the 10*N run short")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument(
        "--amp",
        choices=["cuda", "auto", "off"],
        default="cuda",
        help="bf16 autocast on both sides (runtime.amp): 'auto' also on CPUs with native bf16",
    )
    ap.add_argument("--work", default="/tmp/msnoop_bench_embed")
    ap.add_argument("--out", default="results/bench_embed.json")
    ap.add_argument("--only", choices=["throughput", "memory"], help="re-measure one part, keep the other from --out")
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="also time the whole job in this process (the path small CPU jobs take), against the same bare loop",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="ray", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from msnoop.core.runtime import provenance

    prov = provenance()
    previous = json.loads(Path(args.out).read_text()) if args.only and Path(args.out).is_file() else {}
    result = {"device": ", ".join(prov["gpus"]) or f"cpu ({os.cpu_count()} cores)", "git": prov["git"]}
    if args.only != "memory":
        # alternate the two sides so that a slow spell of the machine hits both; report medians
        modes = ("bare", "ray", "in_process") if args.in_process else ("bare", "ray")
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.repeats):
            for mode in modes:
                runs[mode].append(run_child(mode, args.n, args.arch, args))
        bare_rate = float(np.median([r["images_per_s"] for r in runs["bare"]]))
        ray_rate = float(np.median([r["images_per_s"] for r in runs["ray"]]))
        steady = {mode: [r["steady"]["images_per_s"] for r in rs if r.get("steady")] for mode, rs in runs.items()}
        result["throughput"] = {
            "arch": args.arch,
            "images": runs["ray"][0]["images"],
            "channels": 2,
            "input": "64x64 padded to 224",
            "batch_size": args.batch_size,
            "amp": args.amp,
            "bf16": _bf16_used(args.amp),
            "repeats": args.repeats,
            "bare_images_per_s": bare_rate,
            "ray_images_per_s": ray_rate,
            "ratio_ray_over_bare": ray_rate / bare_rate,
            "bare_images_per_s_runs": [round(r["images_per_s"], 3) for r in runs["bare"]],
            "bare_setup_s": float(np.median([r["setup_s"] for r in runs["bare"]])),  # manifest and model, in the clock
            "ray_images_per_s_runs": [round(r["images_per_s"], 3) for r in runs["ray"]],
            "ray_startup_s": float(np.median([r["ray_startup_s"] for r in runs["ray"]])),
            # from the first Parquet part to the last: the rate once both sides have started (steady_rate)
            "steady_images": runs["ray"][0]["steady"]["images"] if runs["ray"][0].get("steady") else None,
            "bare_steady_images_per_s_runs": [round(x, 3) for x in steady["bare"]],
            "ray_steady_images_per_s_runs": [round(x, 3) for x in steady["ray"]],
            "ratio_ray_over_bare_steady": (
                float(np.median(steady["ray"]) / np.median(steady["bare"]))
                if steady["bare"] and steady["ray"]
                else None
            ),
            **(
                {
                    "in_process_images_per_s_runs": [round(r["images_per_s"], 3) for r in runs["in_process"]],
                    "ratio_in_process_over_bare": float(np.median([r["images_per_s"] for r in runs["in_process"]]))
                    / bare_rate,
                }
                if args.in_process
                else {}
            ),
            "bare_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["bare"]),
            "ray_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["ray"]),
            "git": prov["git"],
        }
    else:
        result["throughput"] = previous["throughput"]
    if args.only != "throughput":
        mem_small = run_child("ray", args.mem_n, args.mem_arch, args)
        mem_large = run_child("ray", args.mem_n * 10, args.mem_arch, args)
        result["memory"] = {
            "arch": args.mem_arch,
            "n_small": args.mem_n,
            "n_large": args.mem_n * 10,
            "peak_rss_mb_small": mem_small["peak_rss_mb"],
            "peak_rss_mb_large": mem_large["peak_rss_mb"],
            "ratio_large_over_small": mem_large["peak_rss_mb"] / mem_small["peak_rss_mb"],
            "images_per_s_small": mem_small["images_per_s"],
            "images_per_s_large": mem_large["images_per_s"],
            "git": prov["git"],
        }
    else:
        result["memory"] = previous.get("memory")  # absent when --out is a new file
    write_results(args.out, result)
    t, m = result["throughput"], result["memory"]
    print("\n| measure | value |\n|---|---|")
    reps = f"median of {t['repeats']}" if "repeats" in t else "one run"
    reps += ", bf16 autocast" if t.get("bf16") else ", float32"
    print(
        f"| bare PyTorch loop ({t['arch']}, {t['images']} images x 2 ch, {reps}) | {t['bare_images_per_s']:.2f} images/s |"
    )
    print(f"| Ray Data pipeline, same work ({reps}) | {t['ray_images_per_s']:.2f} images/s |")
    print(f"| ratio Ray / bare (goal >= {RAY_OVER_BARE_GOAL}) | {t['ratio_ray_over_bare']:.2f} |")
    if t.get("ratio_ray_over_bare_steady") is not None:
        print(
            f"| ratio Ray / bare from the first part written to the last ({t['steady_images']} images) "
            f"| {t['ratio_ray_over_bare_steady']:.2f} |"
        )
    if t.get("ratio_in_process_over_bare") is not None:
        print(f"| ratio msnoop in process / bare (whole job) | {t['ratio_in_process_over_bare']:.2f} |")
    print(f"| Ray start-up (not in the ratio) | {t['ray_startup_s']:.1f} s |")
    if m:
        print(f"| peak RSS, {m['n_small']} images ({m['arch']}) | {m['peak_rss_mb_small']:.0f} MB |")
        print(f"| peak RSS, {m['n_large']} images | {m['peak_rss_mb_large']:.0f} MB |")
        print(f"| ratio (goal <= 1.3) | {m['ratio_large_over_small']:.2f} |")
    print(f"\nwritten to {args.out} (device: {result['device']})")


if __name__ == "__main__":
    main()
