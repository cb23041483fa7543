"""Re-estimate a checkpoint's BatchNorm statistics at its inference size on a pretraining config's data.

    python jobs/recalibrate_bn.py configs/pretrain_default.yaml runs/pretrain_default/model.pt \\
        --out msnoop/weights/msnoop_default.pt

New runs of ``msnoop pretrain`` do this in their final step when ``data.crop_size`` differs from
``output.input_size`` (``output.bn_recalibration_batches``); this script applies it to a checkpoint that was
saved before. See :mod:`msnoop.train.recalibrate`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import harness  # noqa: F401  (puts the checkout's msnoop first on sys.path)

from msnoop.models.checkpoint import file_sha256
from msnoop.cli.training import load_pretrain_job
from msnoop.train.recalibrate import recalibrate_checkpoint


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", type=Path, help="the pretraining config (its data section is the pool)")
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", type=int, default=None, help="default: output.bn_recalibration_batches")
    args = ap.parse_args()
    rec = recalibrate_checkpoint(args.checkpoint, args.out, load_pretrain_job(args.config), batches=args.batches)
    print(json.dumps({"out": str(args.out), "sha256": file_sha256(args.out), "bn_recalibration": rec}, indent=2))


if __name__ == "__main__":
    main()
