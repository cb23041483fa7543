"""Profile: where the CPU goes during one Ray Data embedding run (CPU seconds per process of the tree).

Embeds the synthetic images of ``jobs/bench_embed.py`` once through ``run_embed`` on a local cluster and sums
user + system CPU time per process of this process tree (the driver, raylet, GCS, Ray's helper actors, the
embedding actor) over the run, against the capacity ``wall x CPUs``; what no process used was idle.

    python jobs/profile_embed.py --n 256 --amp auto

Writes results/profile_embed.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from harness import write_results


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """``pid -> (command, user + system seconds)`` for this process and all its descendants."""
    import psutil

    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (" ".join(p.cmdline()[:2])[:80] or p.name(), t.user + t.system)
        except psutil.Error:  # a worker that ended between listing and reading
            continue
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256, help="synthetic 2-channel images")
    ap.add_argument("--arch", default="microsnoop_cnn")
    ap.add_argument("--amp", choices=["cuda", "auto", "off"], default="cuda", help="runtime.amp")
    ap.add_argument("--work", default="/tmp/msnoop_bench_embed")
    ap.add_argument("--out", default="results/profile_embed.json")
    args = ap.parse_args()

    from bench_embed import make_data

    from msnoop.job_kinds import build_config
    from msnoop.job_kinds import run_embed_job as run_embed
    from msnoop.core.runtime import init_ray, provenance, shutdown_ray

    manifest = make_data(Path(args.work), args.n)
    init_ray(None, quiet=True)
    cfg = build_config(
        {
            "job": "embed",
            "name": "profile",
            "input": {"manifest": str(manifest), "channels": ["dna", "protein"]},
            "model": f"random:{args.arch}:0",
            "output": {"dir": str(Path(args.work) / f"profile_{time.time_ns()}"), "write_lance": False},
            "runtime": {"batch_size": 64, "images_per_block": 64, "progress": False, "amp": args.amp},
        }
    )
    before, t0 = cpu_seconds(), time.perf_counter()
    result = run_embed(cfg)
    wall, after = time.perf_counter() - t0, cpu_seconds()
    shutdown_ray()

    used = sorted(
        ((t - before.get(pid, (cmd, 0.0))[1], cmd) for pid, (cmd, t) in after.items()),
        reverse=True,
    )
    capacity = wall * (os.cpu_count() or 1)
    busy = sum(s for s, _ in used)
    rec = {
        "images": result.n_embedded,
        "amp": args.amp,
        "wall_s": round(wall, 2),
        "images_per_s": round(result.n_embedded / wall, 3),
        "capacity_cpu_s": round(capacity, 1),
        "busy_cpu_s": round(busy, 1),
        "idle_cpu_s": round(capacity - busy, 1),
        "processes": [{"command": cmd, "cpu_s": round(s, 2)} for s, cmd in used if s >= 0.1],
        "git": provenance()["git"],
    }
    write_results(args.out, rec)
    print(f"\n{rec['images']} images in {wall:.1f} s ({rec['images_per_s']} images/s), amp {args.amp}\n")
    print("| process | CPU s |\n|---|---|")
    for p in rec["processes"]:
        print(f"| `{p['command']}` | {p['cpu_s']:.1f} |")
    print(f"| idle (capacity {capacity:.0f} s = wall x {os.cpu_count()} CPUs) | {rec['idle_cpu_s']:.1f} |")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
