"""Benchmark: built-in nucleus segmentation on the Coelho 2009 hand-segmented nuclei (AP at IoU 0.5).

Input (``../shared/data/coelho2009_nuclei``, or ``--data``/``MSNOOP_SHARED_DATA``): ``images/<set>/dna-N.png``
(Hoechst, 8-bit) and ``masks/<set>/dna-N.png`` (hand-drawn instance labels, 0 = background) for the sets
``gnf`` (U2OS) and ``ic100`` (NIH3T3). Images without a mask are skipped (and counted).

For every image: :func:`msnoop.segment.builtin.segment_nuclei` with its defaults (diameter estimated per
image, no per-set tuning), then AP = TP / (TP + FP + FN) at IoU 0.5 (and 0.75, 0.9) with optimal one-to-one
matching (:mod:`msnoop.segment.metrics`). Reported per set and overall: mean of per-image AP, pooled AP
(sum of counts), and milliseconds per image (wall and CPU time of the segmentation call only).

The defaults were chosen by looking at the even positions of each set (lexicographic file order); the JSON
also reports the two halves ("dev" = even, "holdout" = odd) so the choice can be judged.

Writes ``results/bench_segmentation.json`` and prints a table.

Usage:
    python jobs/bench_segmentation.py [--data DIR] [--out results/bench_segmentation.json] [--limit N]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import RESULTS, data_dir, write_results

from msnoop.core.progress import progress_bar
from msnoop.segment.metrics import match_instances, read_pair, summarize_ap
from msnoop.segment.builtin import segment_nuclei

logger = logging.getLogger("bench_segmentation")

SETS = ("gnf", "ic100")
THRESHOLDS = (0.5, 0.75, 0.9)


def run_set(folder: Path, name: str, limit: int | None) -> dict[str, Any]:
    """Segment and score every image of one set that has a mask."""
    images = sorted((folder / "images" / name).glob("*.png"))
    with_mask = [p for p in images if (folder / "masks" / name / p.name).exists()]
    if limit is not None:
        with_mask = with_mask[:limit]
    rows = []
    for pos, path in enumerate(progress_bar(with_mask, f"segmentation ({name})", unit="img")):
        img, gt = read_pair(path, folder / "masks" / name / path.name)
        w0, c0 = time.perf_counter(), time.process_time()
        pred = segment_nuclei(img)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        r = match_instances(gt, pred, THRESHOLDS)
        rows.append(
            {
                "image": f"{name}/{path.name}",
                "split": "dev" if pos % 2 == 0 else "holdout",
                "shape": list(img.shape),
                "n_true": r.n_true,
                "n_pred": r.n_pred,
                "tp": r.tp.tolist(),
                "fp": r.fp.tolist(),
                "fn": r.fn.tolist(),
                "ap": [round(float(a), 4) for a in r.ap],
                "ms_wall": round(1000 * wall, 1),
                "ms_cpu": round(1000 * cpu, 1),
            }
        )
        logger.debug(
            "%s: AP@0.5 %.3f (tp %d fp %d fn %d) %.0f ms",
            rows[-1]["image"],
            r.ap[0],
            r.tp[0],
            r.fp[0],
            r.fn[0],
            1000 * wall,
        )
    return {
        "n_images": len(rows),
        "n_without_mask": len(images) - len(with_mask) if limit is None else None,
        "images": rows,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean per-image AP, pooled AP and counts (:func:`summarize_ap`), plus timing, of per-image rows."""
    out = summarize_ap(rows, THRESHOLDS)
    if rows:
        out["ms_per_image_wall"] = round(float(np.mean([r["ms_wall"] for r in rows])), 1)
        out["ms_per_image_wall_median"] = round(float(np.median([r["ms_wall"] for r in rows])), 1)
        out["ms_per_image_cpu"] = round(float(np.mean([r["ms_cpu"] for r in rows])), 1)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run both sets, write the JSON, print the table; returns the exit code (2: data absent)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="coelho2009_nuclei folder (default ../shared/data/coelho2009_nuclei)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_segmentation.json")
    parser.add_argument("--limit", type=int, default=None, help="first N images per set (smoke runs)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every image")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    folder = args.data or data_dir("coelho2009_nuclei")
    missing = [folder / sub / s for sub in ("images", "masks") for s in SETS if not (folder / sub / s).is_dir()]
    if missing:
        print(
            f"error: Coelho 2009 nuclei not found: expected folders {', '.join(str(m) for m in missing)}; "
            "pass --data DIR or set MSNOOP_SHARED_DATA to the folder holding coelho2009_nuclei/",
            file=sys.stderr,
        )
        return 2

    t0 = time.perf_counter()
    per_set = {name: run_set(folder, name, args.limit) for name in SETS}
    all_rows = [r for s in per_set.values() for r in s["images"]]
    results: dict[str, Any] = {
        "data": str(folder),
        "method": "msnoop.segment.builtin.segment_nuclei, default parameters (diameter estimated per image)",
        "metric": "AP = TP / (TP + FP + FN) per image, optimal one-to-one matching at IoU >= threshold; "
        "mean = mean over images, pooled = from summed counts",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1min_at_end": None},
        "sets": {name: summarize(s["images"]) for name, s in per_set.items()},
        "overall": summarize(all_rows),
        "splits": {sp: summarize([r for r in all_rows if r["split"] == sp]) for sp in ("dev", "holdout")},
        "split_sets": {
            f"{name}/{sp}": summarize([r for r in s["images"] if r["split"] == sp])
            for name, s in per_set.items()
            for sp in ("dev", "holdout")
        },
        "images_without_mask": {name: s["n_without_mask"] for name, s in per_set.items()},
        "images": all_rows,
    }
    if hasattr(os, "getloadavg"):
        results["machine"]["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    write_results(args.out, results)

    header = (
        f"{'set':<16} {'images':>6} {'AP@0.5':>7} {'pooled':>7} {'AP@0.75':>8} {'min AP':>7}"
        f" {'ms/img':>7} {'cpu ms':>7}"
    )
    print("Built-in nucleus segmentation on Coelho 2009 (hand-drawn masks)")
    print(header)
    print("-" * len(header))
    table = {
        **results["sets"],
        "overall": results["overall"],
        **{f"  {k}": v for k, v in results["split_sets"].items()},
    }
    for name, s in table.items():
        if not s.get("n_images"):
            continue
        print(
            f"{name:<16} {s['n_images']:>6} {s['mean_ap@0.5']:>7.3f} {s['pooled_ap@0.5']:>7.3f}"
            f" {s['mean_ap@0.75']:>8.3f} {s['min_ap@0.5']:>7.3f} {s['ms_per_image_wall']:>7.1f}"
            f" {s['ms_per_image_cpu']:>7.1f}"
        )
    print(
        f"(dev = even positions used to choose the defaults, holdout = odd; load average at end "
        f"{results['machine']['load_avg_1min_at_end']} on {os.cpu_count()} CPUs)"
    )
    print(f"wrote {args.out} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
