"""One short call on a GPU machine: embedding throughput, then the distillation recipe at GPU batch sizes.

    python jobs/gpu_check.py --out "$OUT" --train-minutes 5                       # on a lent GPU, ~8 min in all
    python jobs/gpu_check.py --out /tmp/gpu_check --tiny                          # the same path on a CPU, seconds

Needs this checkout with its virtual environment and ``../shared/data/pretrain`` (the ``--tiny`` run uses a
synthetic pool instead). It writes, into ``--out`` (at most one folder down, so that a device call brings the
files back):

* ``gpu_check.json``: the machine (torch, CUDA device), embedding tiles/s of the shipped U-Net encoder and of
  the ImageNet teacher per canvas, batch and precision (median of timed repeats after a warm-up, CUDA
  synchronised), achieved TFLOP/s of the U-Net encoder (12.67 GFLOP per 224 px tile, torch's flop counter),
  and the training run (steps, crops/s, loss at the start and end);
* ``model.pt`` and ``MODEL_CARD.md``: the trained model, loadable with ``msnoop embed --model``;
* ``train_log.jsonl``: the run's log.

The training run is ``jobs/bench_distill.py``'s recipe (``--arm``) with ``--batch`` crops per step, a schedule of
``--steps`` steps and a wall-clock budget of ``--train-minutes``, continued from ``--init`` (default: the shipped
``default``). Budget: a lent machine gives minutes, not hours; the script never runs longer than its budgets
plus the set-up (Ray start, pool loading: about a minute).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GFLOP_224 = 12.67  # microsnoop_cnn encoder, one 224 px tile (torch.utils.flop_counter)


def time_embedding(net, canvas: int, batch: int, amp: bool, device, seconds: float) -> dict[str, Any]:
    """Tiles/s of ``net.embed`` on random ``[batch, 1, canvas, canvas]`` tiles for about ``seconds``."""
    import torch

    x = torch.rand(batch, 1, canvas, canvas, device=device).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rates = []
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
        net.embed(x)  # warm-up (cuDNN autotuning, allocator)
        sync()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end or len(rates) < 3:
            t = time.perf_counter()
            net.embed(x)
            sync()
            rates.append(batch / (time.perf_counter() - t))
    return {"canvas": canvas, "batch": batch, "bf16": amp, "tiles_per_s": float(np.median(rates)), "repeats": len(rates)}


def stage_embed(args: argparse.Namespace, device) -> list[dict[str, Any]]:
    import torch

    from msnoop.models.checkpoint import resolve_model

    torch.backends.cudnn.benchmark = True
    models = {"default": "random:test_cnn:0" if args.tiny else "default", "teacher": "imagenet:efficientnet_lite0"}
    grid = [(64, 8), (224, 4)] if args.tiny else [(64, 1024), (224, 64), (224, 256)]
    rows = []
    for label, ref in models.items():
        net = resolve_model(ref).net.to(device).eval().to(memory_format=torch.channels_last)
        for canvas, batch in grid:
            for amp in (False, True):
                row = {"model": label, **time_embedding(net, canvas, batch, amp, device, args.embed_seconds)}
                if label == "default" and not args.tiny:
                    row["tflop_per_s"] = row["tiles_per_s"] * GFLOP_224 * (canvas / 224) ** 2 / 1000
                rows.append(row)
                print(json.dumps(row), flush=True)
        del net
    return rows


def tiny_pool(root: Path) -> Path:
    """A synthetic one-source pool for the CPU test of this script."""
    from msnoop.data.synthetic import write_dataset

    return write_dataset(root, n_per_class=3, size=48)


def training_job(args: argparse.Namespace, work: Path):
    """``bench_distill``'s recipe for ``--arm`` at ``--batch`` crops per step on the machine's device."""
    import yaml

    from bench_distill import ARMS, CONFIG
    from msnoop.job_kinds import build_config

    raw = yaml.safe_load(CONFIG.read_text())
    for section, values in ARMS[args.arm].items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["name"] = "gpu_check"
    raw["model"]["init"] = args.init
    raw["train"].update(
        steps=args.steps,
        batch_size=args.batch,
        max_minutes=args.train_minutes,
        max_cpu_minutes=None,
        checkpoint_every=max(1, args.steps // 10),
        log_every=max(1, min(10, args.steps // 10)),
    )
    raw["optim"]["warmup_steps"] = max(1, args.steps // 20)
    raw["output"]["dir"] = str(work / "train")
    raw["runtime"] = {"num_workers": 1 if args.gpu else 0, "use_gpu": "yes" if args.gpu else "no"}
    if args.tiny:
        manifest = tiny_pool(work / "pool")
        raw["data"]["sources"] = [{"name": "synthetic", "input": {"manifest": str(manifest), "channels": ["dna", "protein"]}}]
        raw["data"]["crop_size"] = 32
        raw["data"].pop("crop_sizes", None)
        raw["model"] = {"arch": "test_cnn", "init": None}
        raw["output"]["input_size"] = 32
    return build_config(raw, source=str(CONFIG))


def stage_train(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from msnoop.train.pretrain import run_pretrain

    job = training_job(args, args.work)
    t0 = time.perf_counter()
    res = run_pretrain(job)
    log = [json.loads(line) for line in (Path(job.output.dir) / "train_log.jsonl").read_text().splitlines()]
    for name in ("model.pt", "MODEL_CARD.md", "train_log.jsonl"):
        shutil.copy(Path(job.output.dir) / name, out / name)
    return {
        "arm": args.arm,
        "batch": args.batch,
        "steps": res.steps,
        "planned_steps": args.steps,
        "stop_reason": res.stop_reason,
        "wall_s": round(time.perf_counter() - t0, 1),
        "crops_per_s": float(np.median([r["samples_per_s"] for r in log[1:]] or [log[-1]["samples_per_s"]])),
        "loss_first": log[0]["loss"],
        "loss_last": log[-1]["loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="result files (a device call brings them back)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/msnoop_gpu_check"), help="checkpoints and the tiny pool")
    ap.add_argument("--tiny", action="store_true", help="tiny network and synthetic pool: a test of this script on a CPU")
    ap.add_argument("--arm", default="taps", help="a recipe of jobs/bench_distill.py")
    ap.add_argument("--init", default="default", help="initial weights (a checkpoint or 'default')")
    ap.add_argument("--batch", type=int, default=256, help="crops per step")
    ap.add_argument("--steps", type=int, default=3000, help="schedule length (the time budget usually ends it first)")
    ap.add_argument("--train-minutes", type=float, default=5.0)
    ap.add_argument("--embed-seconds", type=float, default=3.0, help="timed seconds per embedding setting")
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()

    import torch

    args.gpu = torch.cuda.is_available()
    device = torch.device("cuda" if args.gpu else "cpu")
    if args.tiny:
        args.batch, args.steps, args.train_minutes, args.embed_seconds = 4, 4, min(args.train_minutes, 1.0), 0.2
    args.out.mkdir(parents=True, exist_ok=True)
    from msnoop.core.runtime import provenance

    record: dict[str, Any] = {
        "command": "python jobs/gpu_check.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if args.gpu else "cpu",
        "provenance": provenance(),
        "embed": stage_embed(args, device),
    }
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    if not args.skip_train:
        record["train"] = stage_train(args, args.out)
        print(json.dumps(record["train"]), flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
