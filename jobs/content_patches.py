"""How much of each training crop is image content: patches that ``mask.select: content`` may mask, per source.

Draws crops from a pretraining config's pool exactly as training does (augmentation included) and counts, per
crop, the patches that are not constant (``msnoop.train.masking.content_patches``), against the ``L`` patches of
the crop; with ``mask.select: all`` (Microsnoop) the masks fall on all ``L`` alike.

    python jobs/content_patches.py configs/pretrain_default_stage5.yaml --crops 300

Writes results/content_patches.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse

import numpy as np

from harness import write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a pretraining YAML (job: pretrain)")
    ap.add_argument("--crops", type=int, default=300, help="crops to draw (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/content_patches.json")
    args = ap.parse_args()

    import torch

    import msnoop.train.config  # noqa: F401  (registers job: pretrain)
    from msnoop.job_kinds import load_config
    from msnoop.core.runtime import provenance
    from msnoop.train.data import ChannelPool
    from msnoop.train.masking import content_patches, n_masked, patchify

    job = load_config(args.config)
    pool = ChannelPool.from_config(job.data)
    rng = np.random.default_rng(args.seed)
    p, ratio = job.mask.patch_size, job.mask.ratio
    length = (job.data.crop_size // p) ** 2
    counts: dict[str, list[int]] = {}
    for _ in range(args.crops):
        crop, s = pool.crop(rng)
        e = int(content_patches(patchify(torch.from_numpy(crop)[None, None], p)).sum())
        counts.setdefault(pool.stats[s].name, []).append(e)
    rows = []
    for name, c in counts.items():
        med = float(np.median(c))
        rows.append(
            {
                "source": name,
                "crops": len(c),
                "content_patches_median": med,
                "content_patches_min": min(c),
                "content_patches_max": max(c),
                "patches": length,
                # Microsnoop's masks are spread over all L patches: the expected share that lands on content
                "microsnoop_masks_on_canvas_median": round(n_masked(length, ratio) * (1 - med / length), 1),
                "content_masks_median": n_masked(int(med), ratio),
            }
        )
    rec = {"config": args.config, "crops": args.crops, "seed": args.seed, "rows": rows, "git": provenance()["git"]}
    write_results(args.out, rec)
    print(
        f"| source | crops | content patches (median, min-max) of {length} | Microsnoop masks on canvas "
        "| content masks |"
    )
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['source']} | {r['crops']} | {r['content_patches_median']:g} ({r['content_patches_min']}-"
            f"{r['content_patches_max']}) | {r['microsnoop_masks_on_canvas_median']:g} of {n_masked(length, ratio)} | "
            f"{r['content_masks_median']} |"
        )
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
