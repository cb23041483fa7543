"""``job: segtrain``: train a cellpose 3.1 nucleus model from scratch on hand-drawn masks, offline.

cellpose's own nucleus weights are downloads; this job makes the ``cellpose`` backend usable without
network by training one (``cellpose.train.train_seg`` on a randomly initialised ``CellposeModel``) on
local image/mask pairs, then scoring it against the built-in backend on held-out images::

    msnoop segtrain configs/segtrain_coelho.yaml

The split is by image: within each sub-folder (e.g. a Coelho set), in sorted order, even positions
train and odd positions are held out. These are the same halves as ``jobs/bench_segmentation.py``
(``dev`` = even, ``holdout`` = odd), so both backends are compared on images that neither was fitted on.

Outputs in ``output.dir``: the weights (``<name>``, a cellpose 3.x model file), ``segtrain.json``
(per-image AP of both backends, losses, timing), ``SEGMENTATION_CARD.md``, ``loss_curve.png`` and
``resolved_config.yaml``. With ``output.ship_to`` set, the weights are copied there only if they beat
the built-in backend's mean AP@0.5 on the held-out images, with the card beside them (``<ship_to>.md``).

Use the weights with ``cells.segmentation: {backend: cellpose, model: <path>}`` in an embed config.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from msnoop.core import storage as st
from msnoop.core.config import StrictModel as _Strict
from msnoop.core.rundir import RunDir
from msnoop.core.runtime import UseGpu
from msnoop.core.runtime_env import RuntimeEnvConfig, runtime_env_field
from msnoop.io.readers import readable_suffixes

logger = logging.getLogger(__name__)

__all__ = ["SegTrainJob", "find_pairs", "run_segtrain", "split_pairs"]

THRESHOLDS = (0.5, 0.75, 0.9)


class SegTrainData(_Strict):
    """The image/mask pairs to train and score on."""

    images: Path = Field(..., description="folder of nucleus images (sub-folders allowed)")
    masks: Path = Field(..., description="folder of instance label images with the same relative paths")
    limit: int | None = Field(None, ge=2, description="first N pairs per sub-folder (smoke runs)")


class SegTrainParams(_Strict):
    """cellpose 3.1's training settings."""

    epochs: int = Field(100, ge=1, description="passes over the training images (one random crop each)")
    batch_size: int = Field(8, ge=1)
    learning_rate: float = Field(0.005, gt=0, description="AdamW learning rate (cellpose 3.1 default)")
    weight_decay: float = Field(1e-5, ge=0)
    bsize: int = Field(224, ge=64, description="training crop side; a multiple of 16")
    nimg_per_epoch: int | None = Field(None, ge=1, description="images drawn per epoch; default all")
    min_train_masks: int = Field(5, ge=0, description="images with fewer masks are not trained on")
    seed: int = 0


class SegTrainOutput(_Strict):
    """Where the run writes (its :class:`~msnoop.core.rundir.RunDir`) and where winning weights are shipped."""

    dir: Path
    ship_to: Path | None = Field(
        None, description="copy the weights here if they beat the built-in backend on the held-out images"
    )
    half: bool = Field(True, description="store the weights as float16 (half the size; cellpose loads them)")


class SegTrainJob(_Strict):
    """``job: segtrain``: train a cellpose nucleus model offline, score it against the built-in backend."""

    job: Literal["segtrain"] = "segtrain"
    name: str = "msnoop_nuclei"
    data: SegTrainData
    train: SegTrainParams = Field(default_factory=SegTrainParams)
    output: SegTrainOutput
    use_gpu: UseGpu = "auto"
    runtime_env: RuntimeEnvConfig | None = runtime_env_field()


def find_pairs(images: Path, masks: Path, *, limit: int | None = None) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """``(image, mask)`` pairs with the same relative path, sorted; and the images without a mask.

    Raises:
        FileNotFoundError: A folder does not exist, or no image has a mask (the message says where it looked).
    """
    for folder, what in ((images, "images"), (masks, "masks")):
        if not folder.is_dir():
            raise FileNotFoundError(f"segtrain: {what} folder {folder} does not exist")
    suffixes = readable_suffixes()
    files = sorted(p for p in images.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    pairs, unmatched = [], []
    per_folder: dict[Path, int] = {}
    for p in files:
        m = masks / p.relative_to(images)
        if not m.is_file():
            unmatched.append(p)
            continue
        n = per_folder.get(p.parent, 0)
        if limit is not None and n >= limit:
            continue
        per_folder[p.parent] = n + 1
        pairs.append((p, m))
    if not pairs:
        raise FileNotFoundError(
            f"segtrain: none of the {len(files)} images under {images} has a mask with the same relative path "
            f"under {masks} (expected e.g. {masks / files[0].relative_to(images)})"
            if files
            else f"segtrain: no image ({', '.join(suffixes)}) under {images}"
        )
    return pairs, unmatched


def split_pairs(pairs: list[tuple[Path, Path]]) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """Split by image within each sub-folder: even positions (sorted) train, odd positions are held out."""
    train, held = [], []
    pos: dict[Path, int] = {}
    for pair in pairs:
        i = pos.get(pair[0].parent, 0)
        pos[pair[0].parent] = i + 1
        (train if i % 2 == 0 else held).append(pair)
    if not train or not held:
        raise ValueError(f"segtrain needs at least 2 image/mask pairs per split; found {len(pairs)} pairs")
    return train, held


def _use_gpu(setting: str) -> bool:
    import torch

    if setting == "yes" and not torch.cuda.is_available():
        raise RuntimeError("use_gpu: yes, but torch sees no CUDA device")
    return setting != "no" and torch.cuda.is_available()


def _score(pairs: list[tuple[Path, Path]], root: Path, backends: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per-image AP of every backend (``name -> image -> labels``); each pair is read once."""
    from msnoop.segment.metrics import match_instances, read_pair

    from msnoop.core.progress import progress_bar

    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in backends}
    for img_path, mask_path in progress_bar(pairs, "segmentation (held-out images)", unit="img"):
        img, gt = read_pair(img_path, mask_path)
        for name, segment_fn in backends.items():
            t0 = time.perf_counter()
            pred = segment_fn(img)
            ms = 1000 * (time.perf_counter() - t0)
            r = match_instances(gt, pred, THRESHOLDS)
            row = {
                "image": str(img_path.relative_to(root)),
                "backend": name,
                "n_true": r.n_true,
                "n_pred": r.n_pred,
                "ap": [round(float(a), 4) for a in r.ap],
                "ms": round(ms, 1),
            }
            rows[name].append(row)
            logger.debug("%s %s: AP@0.5 %.3f (%d true, %d predicted)", name, row["image"], r.ap[0], r.n_true, r.n_pred)
    return rows


def _loss_figure(losses: np.ndarray, path: Path) -> None:
    from msnoop.core.plotting import save, subplots

    fig, ax = subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(losses) + 1), losses)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cellpose training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    save(fig, path, dpi=120)


def _to_half(path: Path) -> None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    torch.save({k: (v.half() if torch.is_floating_point(v) else v) for k, v in state.items()}, path)


def _card(job: SegTrainJob, rec: dict[str, Any]) -> str:
    cp, bi = rec["holdout"]["cellpose"], rec["holdout"]["builtin"]
    lines = [
        f"# {job.name}: cellpose 3.1 nucleus model trained by msnoop segtrain",
        "",
        (
            f"- Trained from scratch (random initialisation, no downloaded weights) with `cellpose.train.train_seg`, "
            f"cellpose {rec['cellpose_version']}, on {rec['n_train']} images of `{job.data.images}` "
            f"({rec['n_train_masks']} hand-drawn nuclei); {job.train.epochs} epochs, batch {job.train.batch_size}, "
            f"crops {job.train.bsize} px, AdamW lr {job.train.learning_rate}, seed {job.train.seed}; "
            f"{rec['train_minutes']:.1f} min on {rec['device']}."
        ),
        (
            f"- Mean diameter of the training nuclei: {rec['diam_labels']:.1f} px (`diameter: null` rescales inputs "
            "to it; pass the nucleus diameter of other data)."
        ),
        (
            "- Use: `cells.segmentation: {backend: cellpose, model: PATH}` with this file's path; a copy shipped "
            "inside msnoop (`msnoop/weights/`) is also found by its file name."
        ),
        f"- Final training loss {rec['final_loss']:.4f} (loss_curve.png). Weights sha256 `{rec['sha256']}`"
        + (" (float16)." if job.output.half else "."),
        "",
        f"## Held-out images ({rec['n_holdout']}, odd positions of each folder; not trained on)",
        "",
        "| backend | mean AP@0.5 | AP@0.75 | AP@0.9 | per folder AP@0.5 | ms/image (median) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in (("cellpose (this model)", cp), ("built-in (scikit-image)", bi)):
        folders = ", ".join(f"{k} {v:.3f}" for k, v in s["mean_ap@0.5_by_folder"].items())
        lines.append(
            f"| {name} | {s['mean_ap@0.5']:.3f} | {s['mean_ap@0.75']:.3f} | {s['mean_ap@0.9']:.3f} | {folders} "
            f"| {s['ms_per_image_median']:.0f} |"
        )
    lines += ["", f"Shipped: {rec['shipped']}."]
    return "\n".join(lines) + "\n"


def run_segtrain(job: SegTrainJob) -> dict[str, Any]:
    """Train, score both backends on the held-out images, write the outputs; returns the record.

    Raises:
        ImportError: cellpose 3.1 is not installed (the message says how to install it).
        FileNotFoundError: Missing folders or no image/mask pair.
        ValueError: A mask whose shape differs from its image, or too few pairs to split.
    """
    import torch

    from msnoop.segment.builtin import segment_nuclei
    from msnoop.segment.cellpose_backend import _cellpose_version, _import_cellpose_models, segment_cellpose
    from msnoop.segment.metrics import read_pair, summarize_ap

    models = _import_cellpose_models()
    import cellpose
    from cellpose import train as cp_train

    pairs, unmatched = find_pairs(job.data.images, job.data.masks, limit=job.data.limit)
    train_pairs, held_pairs = split_pairs(pairs)
    logger.info(
        "segtrain %s: %d pairs (%d images without a mask skipped): %d train, %d held out",
        job.name,
        len(pairs),
        len(unmatched),
        len(train_pairs),
        len(held_pairs),
    )
    train_data = [read_pair(p, m) for p, m in train_pairs]
    images = [x.astype(np.float32) for x, _ in train_data]
    labels = [y for _, y in train_data]
    out = job.output.dir
    out.mkdir(parents=True, exist_ok=True)
    RunDir(out).save_config(job)

    gpu = _use_gpu(job.use_gpu)
    torch.manual_seed(job.train.seed)
    np.random.seed(job.train.seed)
    model = models.CellposeModel(gpu=gpu, pretrained_model=False, mkldnn=False)
    t0 = time.perf_counter()
    filename, train_losses, _ = cp_train.train_seg(
        model.net,
        train_data=images,
        train_labels=labels,
        channels=[0, 0],
        normalize=True,
        n_epochs=job.train.epochs,
        batch_size=job.train.batch_size,
        learning_rate=job.train.learning_rate,
        weight_decay=job.train.weight_decay,
        bsize=job.train.bsize,
        nimg_per_epoch=job.train.nimg_per_epoch,
        min_train_masks=job.train.min_train_masks,
        save_path=str(out),
        save_every=max(1, job.train.epochs // 4),
        model_name=job.name,
    )
    train_s = time.perf_counter() - t0
    weights = out / job.name
    shutil.move(str(filename), weights)
    shutil.rmtree(out / "models", ignore_errors=True)
    if job.output.half:
        _to_half(weights)
    losses = np.asarray(train_losses, dtype=np.float64)
    _loss_figure(losses, out / "loss_curve.png")

    from msnoop.models.checkpoint import file_sha256

    scored = _score(
        held_pairs,
        job.data.images,
        {"cellpose": lambda im: segment_cellpose(im, model=weights, gpu=gpu), "builtin": segment_nuclei},
    )
    holdout = {
        name: {
            **summarize_ap(rows, THRESHOLDS),
            "ms_per_image_median": round(float(np.median([r["ms"] for r in rows])), 1),
        }
        for name, rows in scored.items()
    }
    better = holdout["cellpose"]["mean_ap@0.5"] > holdout["builtin"]["mean_ap@0.5"]
    rec: dict[str, Any] = {
        "name": job.name,
        "cellpose_version": _cellpose_version(cellpose),
        "device": "cuda" if gpu else "cpu",
        "n_train": len(train_pairs),
        "n_holdout": len(held_pairs),
        "n_without_mask": len(unmatched),
        "n_train_masks": int(sum(int(y.max()) for y in labels)),
        "train_images": [str(p.relative_to(job.data.images)) for p, _ in train_pairs],
        "train_minutes": round(train_s / 60, 2),
        "diam_labels": float(model.net.diam_labels.item()),
        "final_loss": float(losses[-1]),
        "losses": [round(float(v), 5) for v in losses],
        "weights": str(weights),
        "sha256": file_sha256(weights),
        "holdout": holdout,
        "holdout_images": scored["cellpose"] + scored["builtin"],
        "beats_builtin": bool(better),
    }
    ship_to = job.output.ship_to if better else None
    if job.output.ship_to is None:
        rec["shipped"] = "not requested (output.ship_to unset)"
    elif ship_to is None:
        rec["shipped"] = "no: it does not beat the built-in backend on the held-out images"
    else:
        rec["shipped"] = f"yes, copied to `{ship_to}`"
    st.write_text(out / "segtrain.json", json.dumps(rec, indent=2) + "\n")  # complete or absent
    card = _card(job, rec)
    st.write_text(out / "SEGMENTATION_CARD.md", card)
    if ship_to is not None:
        ship_to.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(weights, ship_to)
        # the card travels with the weights, so whoever finds the file finds how it was made and scored
        st.write_text(ship_to.with_name(ship_to.name + ".md"), card)
    logger.info("segtrain %s: %s", job.name, json.dumps(holdout))
    return rec


def summary(job: SegTrainJob, rec: dict[str, Any]) -> str:
    """A few lines about a finished segtrain job."""
    cp, bi = rec["holdout"]["cellpose"], rec["holdout"]["builtin"]
    return (
        f"trained {job.name} on {rec['n_train']} images in {rec['train_minutes']:.1f} min ({rec['device']}); "
        f"held-out mean AP@0.5: cellpose {cp['mean_ap@0.5']:.3f}, built-in {bi['mean_ap@0.5']:.3f} "
        f"({rec['n_holdout']} images); shipped: {rec['shipped']}; outputs in {job.output.dir.resolve()}"
    )
