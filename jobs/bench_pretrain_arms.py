"""Pretraining recipes compared at an equal CPU budget on the broad pool, then on every dev set.

    python jobs/bench_pretrain_arms.py --stage train     # each arm: continued pretraining, runs/arms/<arm>/model.pt
    python jobs/bench_pretrain_arms.py --stage probe     # does the deepest map carry the reconstruction?
    python jobs/bench_pretrain_arms.py --stage eval      # dev sets: the arms, the shipped default, baselines
    python jobs/bench_pretrain_arms.py                   # all three

Arms (declared before any result; all start from the shipped ``default`` weights, run
``configs/pretrain_broad.yaml``'s pool and settings, and stop at the same CPU-time budget
``--cpu-minutes`` of the training process, all threads, ``time.process_time``):

* ``today``: the shipped recipe (stage 5: 25 % of the 16 px patches masked on image content, per-image
  loss mean), 224 px crops.
* ``skips``: ``today`` with ``mask.skips: drop_masked``: the skip connections above the deepest map are
  zeroed over masked patches, so masked pixels can only be rebuilt through the deepest map (the one
  that is embedded).
* ``agree``: ``today`` plus a VICReg agreement term between the pooled deepest maps of two views of each
  crop (``agreement.weight`` 0.02 so that the term starts at about the masked loss's size on the
  default model: invariance 0.059 x 25 = 1.5 against a masked loss of 0.02-0.09; covariance
  coefficient 0 because a batch of 8 gives a covariance matrix of rank 7).
* ``crop128``: ``today`` with 128 px crops, three times as many crops per CPU-second (less empty canvas
  around small cells); BatchNorm statistics re-estimated at 224 px after training (as every run).

The schedule's length is set from a short calibration of each arm's CPU seconds per step so that the
cosine schedule ends at the budget (``train.steps``), and ``train.max_cpu_minutes`` is the hard stop.

Probe (``--stage probe``): on a fixed seeded batch of pool crops, the masked-patch loss of each model
intact, with the deepest map swapped between images of the batch (its content then belongs to another
image; the decoder's input and the style vector both come from it), and with every other skip swapped
instead. The increase over intact says how much the reconstruction relies on each.

Evaluation (``--stage eval``): ``jobs/bench_postprocess.py``'s protocol with msnoop's default
post-processing (dataset standardisation, arm ``C``) for every row: yeast (600-cell subset, 11-NN
leave-one-field-out), hpa_toy (5-NN, 5-fold), malaria_nih (300 cells, 11-NN, folds grouped by patient)
and BBBC013 per cell (cells of the 24 control wells, nuclei from msnoop's builtin segmentation of the
DNA channel, cropped as ``configs/bbbc013_cells.yaml``, 16 per well; 11-NN positive vs negative
control, 5 folds grouped by well). Balanced accuracy with a 95 % bootstrap interval over cells and a
paired bootstrap interval of each arm's difference to the shipped default. Writes
``results/bench_pretrain_arms.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
ARMS: dict[str, dict[str, Any]] = {
    "today": {},
    "skips": {"mask": {"skips": "drop_masked"}},
    "agree": {"agreement": {"weight": 0.02, "covariance": 0.0}},
    "crop128": {"data": {"crop_size": 128}},
}
BASELINE_MODELS = ["default", "random:microsnoop_cnn:0"]


def arm_job(arm: str, cpu_minutes: float, steps: int, runs: Path):
    """The validated job of one arm: ``configs/pretrain_broad.yaml`` with the arm's declared overrides."""
    import yaml

    from msnoop.job_kinds import build_config

    raw = yaml.safe_load((REPO / "configs/pretrain_broad.yaml").read_text())
    for section, values in ARMS[arm].items():
        raw[section] = {**raw.get(section, {}), **values}
    raw["name"] = f"arm_{arm}"
    raw["train"].update(steps=steps, max_cpu_minutes=cpu_minutes, checkpoint_every=max(10, steps // 4))
    raw["optim"]["warmup_steps"] = max(1, steps // 20)
    raw["output"]["dir"] = str(runs / arm)
    return build_config(raw, source="configs/pretrain_broad.yaml")


def calibrate(job, n: int = 3) -> float:
    """CPU seconds per optimiser step of ``job`` (median of ``n`` steps after one warm-up step)."""
    from msnoop.train.data import ChannelPool
    from msnoop.train.loop import build_state, make_batch, train_step

    pool = ChannelPool.from_config(job.data.model_copy(update={"preload_mb": 0}))
    state = build_state(job)
    times = []
    for step in range(n + 1):
        crops, gen = make_batch(pool, job, rank=0, step=10_000 + step)
        t = time.process_time()
        train_step(state, crops, job, generator=gen)
        times.append(time.process_time() - t)
    return float(np.median(times[1:]))


def stage_train(args: argparse.Namespace) -> dict[str, Any]:
    from msnoop.train.pretrain import run_pretrain

    record: dict[str, Any] = {}
    for arm in args.arms:
        out = args.runs / arm
        if (out / "model.pt").exists():
            print(f"{arm}: {out / 'model.pt'} exists, skipped", flush=True)
            record[arm] = json.loads((out / "arm.json").read_text()) if (out / "arm.json").exists() else {}
            continue
        probe_job = arm_job(arm, args.cpu_minutes, 100, args.runs)
        per_step = calibrate(probe_job)
        steps = max(10, int(args.cpu_minutes * 60 / per_step))
        print(f"{arm}: {per_step:.1f} CPU-s per step -> {steps} steps in {args.cpu_minutes} CPU-min", flush=True)
        job = arm_job(arm, args.cpu_minutes, steps, args.runs)
        t0, c0 = time.perf_counter(), time.process_time()
        res = run_pretrain(job)
        record[arm] = {
            "overrides": ARMS[arm],
            "calibrated_cpu_s_per_step": per_step,
            "planned_steps": steps,
            "steps": res.steps,
            "stop_reason": res.stop_reason,
            "final_loss": res.final_loss,
            "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(time.process_time() - c0, 1),
            "crops": res.steps * job.train.batch_size,
            "crop_size": job.data.crop_size,
        }
        (out / "arm.json").write_text(json.dumps(record[arm], indent=2) + "\n")
        print(f"{arm}: {record[arm]}", flush=True)
    return record


# ------------------------------------------------------------------------------------------------ probe
def probe_batch(n: int = 16, seed: int = 0):
    """A fixed batch of ``n`` 224 px crops from the broad pool, the masked inputs and the masks."""
    import torch

    from msnoop.job_kinds import load_config
    from msnoop.train.data import ChannelPool, batch_rng
    from msnoop.train.masking import mask_images

    job = load_config(REPO / "configs/pretrain_broad.yaml")
    pool = ChannelPool.from_config(job.data.model_copy(update={"preload_mb": 0}))
    crops, _ = pool.batch(n, batch_rng(seed, 99, 0))
    x = torch.from_numpy(crops)[:, None]
    masked, mask = mask_images(x, 0.25, 16, generator=torch.Generator().manual_seed(seed), select="content")
    return x, masked, mask


def probe_model(model: str, x, masked, mask) -> dict[str, float]:
    """Masked-patch MSE intact, with the deepest map swapped between images, and with the other skips swapped."""
    import torch

    from msnoop.models.checkpoint import resolve_model
    from msnoop.models.cnn import style_vector
    from msnoop.train.loop import reconstruction_loss

    net = resolve_model(model).net.float().eval()
    perm = torch.roll(torch.arange(len(x)), 1)  # every image gets its neighbour's map
    out: dict[str, float] = {}
    with torch.no_grad():
        maps = net.encoder(masked)
        variants = {
            "intact": maps,
            "deepest_swapped": [*maps[:-1], maps[-1][perm]],
            "skips_swapped": [*(m[perm] for m in maps[:-1]), maps[-1]],
        }
        for name, ms in variants.items():
            pred = net.decoder(ms, style_vector(ms[-1]))
            out[name] = float(reconstruction_loss(pred, x, mask, "masked", "image"))
    out["deepest_reliance"] = out["deepest_swapped"] / out["intact"] - 1
    out["skips_reliance"] = out["skips_swapped"] / out["intact"] - 1
    return out


def stage_probe(args: argparse.Namespace) -> dict[str, Any]:
    x, masked, mask = probe_batch()
    models = {"default": "default", "random": "random:microsnoop_cnn:0"}
    models.update({a: str(args.runs / a / "model.pt") for a in args.arms if (args.runs / a / "model.pt").exists()})
    record = {}
    for name, model in models.items():
        record[name] = probe_model(model, x, masked, mask)
        print(f"probe {name}: {record[name]}", flush=True)
    return record


# ------------------------------------------------------------------------------------------------- eval
def bbbc013_cells_table(data: Path, cache: Path, per_well: int = 16, seed: int = 0) -> pd.DataFrame:
    """Cells of the 24 control wells as two-channel TIFF crops under ``cache`` (built once), one row per cell."""
    import tifffile

    from msnoop.preprocess.crop import crop_cells
    from msnoop.segment import segment

    index = cache / "bbbc013_cells.csv"
    if index.exists():
        return pd.read_csv(index, dtype=str)
    md = pd.read_csv(data / "bbbc013" / "1049_Metadata.csv", dtype=str)
    md = md[md["SBS_Controls"].astype(int) != 0]
    rows = []
    folder = cache / "bbbc013_cells"
    folder.mkdir(parents=True, exist_ok=True)
    for _, w in md.iterrows():
        col = f"{int(w['Column']):02d}"
        files = {
            ch: next((data / "bbbc013/images").glob(f"Channel{c}-*-{w['Row'].strip()}-{col}.tif"))
            for ch, c in (("gfp", 1), ("dna", 2))
        }
        img = np.stack([tifffile.imread(files["gfp"]), tifffile.imread(files["dna"])])
        labels = segment(img[1], backend="builtin")
        crops, _ = crop_cells(img, labels, ratio=2.0, size=224, skip_border=True)
        rng = np.random.default_rng([seed, int(w["ImageNumber"])])
        keep = np.sort(rng.choice(len(crops), min(per_well, len(crops)), replace=False))
        well = f"{w['Row'].strip()}{col}"
        for k in keep:
            paths = {}
            for c, ch in enumerate(("gfp", "dna")):
                p = folder / f"{well}_{k}_{ch}.tif"
                tifffile.imwrite(p, crops[k, c].astype(np.float32))
                paths[f"Metadata_Path_{ch}"] = str(p)
            label = "positive" if int(w["SBS_Controls"]) > 0 else "negative"
            rows.append({**paths, "Metadata_Well": well, "Metadata_control": label})
    table = pd.DataFrame(rows)
    table.to_csv(index, index=False)
    return table


def eval_tables(args: argparse.Namespace) -> dict[str, tuple[pd.DataFrame, list[str], dict]]:
    import bench_postprocess as bp

    tables = {
        d: bp.dataset_table(d, args.data, args.malaria_n, args.yeast_n) for d in ("hpa_toy", "yeast", "malaria_nih")
    }
    cells = bbbc013_cells_table(args.data, args.cache)
    tables["bbbc013_cells"] = (
        cells,
        ["gfp", "dna"],
        {"tasks": [("control", "Metadata_control", 11, "sgkfold:5:Metadata_Well")], "pixel_channels": None},
    )
    return tables


def stage_eval(args: argparse.Namespace) -> dict[str, Any]:
    import bench_postprocess as bp
    from sklearn.preprocessing import StandardScaler

    from msnoop.evaluate.baselines import intensity_features, pixels_pca

    tables = eval_tables(args)
    models = {m: m for m in BASELINE_MODELS}
    models.update(
        {f"arm:{a}": str(args.runs / a / "model.pt") for a in args.arms if (args.runs / a / "model.pt").exists()}
    )
    rows = []
    for d, (table, channels, proto) in tables.items():
        feats: dict[str, np.ndarray] = {}
        for label, model in models.items():
            key = f"{d}_{len(table)}_{bp.model_slug(label)}"
            X = bp.embed_cached(model, key, bp.dataset_images(table, channels), args.cache)
            feats[label] = StandardScaler().fit_transform(X.astype(np.float64))  # msnoop's default (arm C)
        pix = pixels_pca(table, proto["pixel_channels"] or channels)
        feats["pixels PCA32"] = StandardScaler().fit_transform(pix)
        feats["intensity statistics"] = StandardScaler().fit_transform(intensity_features(table, channels))
        for tname, col, k, cv in proto["tasks"]:
            y = table[col].astype(str).to_numpy()
            boots = bp.bootstrap_rows(len(y), args.bootstrap, seed=0)
            preds = {name: bp.cross_predict(X.astype(np.float32), y, k, cv, table)[0] for name, X in feats.items()}
            ref = preds["default"]
            for name, p in preds.items():
                ba = bp.balanced_accuracy(y, p)
                bs = np.array([bp.balanced_accuracy(y[b], p[b]) for b in boots])
                diff = np.array([bp.balanced_accuracy(y[b], p[b]) - bp.balanced_accuracy(y[b], ref[b]) for b in boots])
                row = {
                    "dataset": d,
                    "task": tname,
                    "protocol": f"{k}-NN cosine, cv {cv}, n={len(y)}, standardised",
                    "features": name,
                    "balanced_accuracy": ba,
                    "ci95": [float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))],
                    "diff_vs_default": ba - bp.balanced_accuracy(y, ref),
                    "diff_vs_default_ci95": [float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5))],
                }
                rows.append(row)
                print(
                    f"{d:14s} {tname:13s} {name:26s} {ba:.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]", flush=True
                )
    return {"rows": rows, "n": {d: len(t[0]) for d, t in tables.items()}}


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "# Pretraining recipes at an equal CPU budget",
        "",
        f"Every arm continued the shipped `default` for {record['cpu_minutes']} CPU-minutes (training process, all "
        "threads) on the broad pool of `configs/pretrain_broad.yaml` (22 sources). Command: "
        "`python jobs/bench_pretrain_arms.py`.",
        "",
        "| arm | overrides | CPU-s / step | steps | crops | final loss | wall min |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for arm, t in record.get("train", {}).items():
        if t:
            lines.append(
                f"| {arm} | `{json.dumps(t['overrides'])}` | {t['calibrated_cpu_s_per_step']:.1f} | {t['steps']} | "
                f"{t['crops']} | {t['final_loss']:.4f} | {t['wall_s'] / 60:.1f} |"
            )
    lines += [
        "",
        "Does the deepest map carry the reconstruction? Masked-patch MSE on a fixed batch of 16 pool crops; "
        "`swapped` = that map taken from another image of the batch; reliance = swapped / intact - 1.",
        "",
        "| model | intact | deepest swapped | skips swapped | deepest reliance | skips reliance |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m, p in record.get("probe", {}).items():
        lines.append(
            f"| {m} | {p['intact']:.4f} | {p['deepest_swapped']:.4f} | {p['skips_swapped']:.4f} | "
            f"{p['deepest_reliance']:+.3f} | {p['skips_reliance']:+.3f} |"
        )
    lines += [
        "",
        "Dev sets, msnoop's default post-processing (every feature set standardised per dimension, then cosine); "
        "balanced accuracy [95 % bootstrap over cells]; difference to the shipped default with a paired bootstrap "
        "interval.",
        "",
        "| dataset | task | features | bal. acc. [95 % CI] | vs default [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for r in record.get("eval", {}).get("rows", []):
        lo, hi = r["ci95"]
        dlo, dhi = r["diff_vs_default_ci95"]
        vs = "" if r["features"] == "default" else f"{r['diff_vs_default']:+.3f} [{dlo:+.3f}, {dhi:+.3f}]"
        lines.append(
            f"| {r['dataset']} | {r['task']} | {r['features']} | {r['balanced_accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {vs} |"
        )
    lines.append("")
    lines.append(f"Run time {record['seconds']:.0f} s (sum over the invocations merged here).")
    return "\n".join(lines)


def merge(args: argparse.Namespace) -> None:
    """Rows of several result files in one record (a row measured twice, e.g. a baseline, is kept once)."""
    record: dict[str, Any] = {"cpu_minutes": args.cpu_minutes, "train": {}, "probe": {}, "eval": {"rows": [], "n": {}}}
    seen: set[tuple[str, str, str]] = set()
    seconds = 0.0
    for path in args.merge:
        part = json.loads(path.read_text())
        record["probe"].update(part.get("probe", {}))
        record["eval"]["n"].update(part.get("eval", {}).get("n", {}))
        for row in part.get("eval", {}).get("rows", []):
            key = (row["dataset"], row["task"], row["features"])
            if key not in seen:
                seen.add(key)
                record["eval"]["rows"].append(row)
        seconds += part.get("seconds", 0.0)
        record.setdefault("provenance", part.get("provenance"))
    order = {f: i for i, f in enumerate([*BASELINE_MODELS, *(f"arm:{a}" for a in ARMS)])}
    record["eval"]["rows"].sort(key=lambda r: (r["dataset"], r["task"], order.get(r["features"], 99), r["features"]))
    for arm in ARMS:
        f = args.runs / arm / "arm.json"
        if f.exists():
            record["train"][arm] = json.loads(f.read_text())
    record["seconds"] = seconds
    record["merged_from"] = [str(p) for p in args.merge]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record) + "\n")
    print(markdown(record))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["train", "probe", "eval", "all"], default="all")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--cpu-minutes", type=float, default=10.0)
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "arms")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--malaria-n", type=int, default=300)
    ap.add_argument("--yeast-n", type=int, default=600)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/msnoop_postproc_cache"))
    ap.add_argument("--out", type=Path, default=REPO / "results" / "bench_pretrain_arms")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        help="combine the result files of invocations run in parallel (e.g. one --stage eval per arm, each with its "
        "own --out) into --out, with each arm's training record from runs/, and exit",
    )
    args = ap.parse_args()
    if args.merge:
        merge(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path = args.out.with_suffix(".json")
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    record["cpu_minutes"] = args.cpu_minutes
    if args.stage in ("train", "all"):
        record["train"] = {**record.get("train", {}), **stage_train(args)}
    if args.stage in ("probe", "all"):
        record["probe"] = stage_probe(args)
    if args.stage in ("eval", "all"):
        record["eval"] = stage_eval(args)
    record["seconds"] = time.perf_counter() - t0
    from msnoop.core.runtime import provenance

    record["provenance"] = provenance()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record) + "\n")
    print(markdown(record))


if __name__ == "__main__":
    main()
