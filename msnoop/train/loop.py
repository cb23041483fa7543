"""Pure-PyTorch masked-reconstruction training: optimiser, schedule, loss, one step, a run of steps.

Nothing here imports Ray: the Ray Train wrapper (:mod:`msnoop.train.pretrain`) and the benchmark's
bare loop call the same :func:`train_steps`, and the tests exercise it directly.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from msnoop.core.runtime import uses_bf16
from msnoop.models.registry import create_model
from msnoop.train.config import OptimConfig, PretrainJob
from msnoop.train.data import ChannelPool, batch_rng
from msnoop.train.masking import mask_images

logger = logging.getLogger(__name__)


def unwrap(net: nn.Module) -> nn.Module:
    """The bare network inside a DistributedDataParallel wrapper (or ``net`` itself)."""
    return net.module if hasattr(net, "module") else net


def build_optimizer(net: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; norm weights and biases (1-D parameters) get no weight decay (MAE convention)."""
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


class WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, job: PretrainJob) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + cosine schedule over ``job.train.steps`` optimiser steps.

    The multiplier is wrapped in a plain function so that a resumed run keeps the *job's* schedule
    (LambdaLR would otherwise restore a callable object's attributes, e.g. the old total, from the checkpoint).
    """
    fn = WarmupCosine(job.warmup_steps, job.train.steps, job.optim.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: fn(step))


def reconstruction_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, mode: str = "masked", average: str = "batch"
) -> torch.Tensor:
    """MSE between reconstruction and original.

    Args:
        pred: ``[N, 1, H, W]`` reconstruction.
        target: ``[N, 1, H, W]`` unmasked input.
        mask: ``[N, 1, H, W]``, 1 on masked pixels.
        mode: ``masked`` (mean over masked pixels, MAE default) or ``full`` (mean over all pixels).
        average: ``batch`` (one mean over every pixel of the batch) or ``image`` (a mean per image, then over
            the images that have any pixel in the loss).
    """
    err = (pred.float() - target.float()) ** 2  # [N, 1, H, W]
    weight = torch.ones_like(err) if mode == "full" else mask.float()
    if average == "batch":
        return (err * weight).sum() / weight.sum().clamp_min(1.0)
    pixels = weight.flatten(1).sum(1)  # [N] pixels of each image in the loss
    per_image = (err * weight).flatten(1).sum(1) / pixels.clamp_min(1.0)  # [N]
    counted = (pixels > 0).float()  # [N]
    return (per_image * counted).sum() / counted.sum().clamp_min(1.0)


def second_view(crops: torch.Tensor, job: PretrainJob, generator: torch.Generator) -> torch.Tensor:
    """Another view of each crop for the agreement term: own flips / 90° rotation, intensity jitter and mask.

    Args:
        crops: ``[B, 1, S, S]`` normalised crops (already augmented once by the pool).
        job: ``data.augment.intensity_jitter`` and the mask settings are reused.
        generator: The step's random stream (CPU), so a step stays a pure function of ``(seed, rank, step)``.

    Returns:
        ``[B, 1, S, S]`` float32, on ``crops``' device.
    """
    b = crops.shape[0]
    draw = torch.randint(0, 8, (b,), generator=generator).tolist()
    views = []
    for i, d in enumerate(draw):
        v = torch.rot90(crops[i], d % 4, dims=(-2, -1))
        views.append(torch.flip(v, dims=(-1,)) if d >= 4 else v)
    out = torch.stack(views)
    j = job.data.augment.intensity_jitter
    if j > 0:
        gain = 1 + j * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
        offset = j / 2 * (2 * torch.rand(b, 1, 1, 1, generator=generator) - 1)
        out = out * gain.to(out.device) + offset.to(out.device)
    masked, _ = mask_images(out, job.mask.ratio, job.mask.patch_size, generator=generator, select=job.mask.select)
    return masked


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """VICReg's three terms for two ``[B, D]`` batches of embeddings (Bardes et al., ICLR 2022, eq. 1-4).

    Returns:
        ``invariance`` (mean squared difference), ``variance`` (hinge on each dimension's standard
        deviation below 1, averaged over both views) and ``covariance`` (sum of squared off-diagonal
        covariances / D, averaged over both views), each a scalar tensor.
    """
    d = z1.shape[1]

    def var(z: torch.Tensor) -> torch.Tensor:
        return torch.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean()

    def cov(z: torch.Tensor) -> torch.Tensor:
        zc = z - z.mean(dim=0)
        c = (zc.T @ zc) / max(z.shape[0] - 1, 1)  # [D, D]
        return (c.pow(2).sum() - c.diagonal().pow(2).sum()) / d

    return {
        "invariance": torch.nn.functional.mse_loss(z1, z2),
        "variance": (var(z1) + var(z2)) / 2,
        "covariance": (cov(z1) + cov(z2)) / 2,
    }


@dataclass
class TrainState:
    """Everything needed to continue a run exactly: network, optimiser, schedule, step, loss history."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    terms: dict[str, float] = field(default_factory=dict)  # the last step's loss terms (not saved)
    cpu_s: float = 0.0  # CPU seconds of training so far, over every stretch of a resumed run
    # (step resumed at, steps) of the learning-rate ramp after a resume without optimiser moments (not saved)
    rewarm: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as tensors and plain values (``torch.save``-able)."""
        return {
            "model": unwrap(self.net).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "history": list(self.history),
            "cpu_s": self.cpu_s,
        }

    def load_state_dict(self, state: dict[str, Any], *, rewarm_steps: int = 50) -> None:
        """Restore a :meth:`state_dict` (network, optimiser, schedule, step, history, CPU seconds).

        A compact state (no ``optimizer``: :func:`msnoop.train.pretrain.write_compact_state`) keeps this state's
        fresh optimiser, whose moments start at zero; its learning rate then ramps linearly from ``1 /
        rewarm_steps`` of the schedule's to the schedule's over ``rewarm_steps`` steps (:meth:`ramp_lr`), as
        Adam's first steps at full rate would be as large as at the start of training, without its warm-up.
        Float16 weights are cast to the network's dtype.
        """
        unwrap(self.net).load_state_dict(state["model"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.history = list(state.get("history", []))
        self.cpu_s = float(state.get("cpu_s", 0.0))
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            return
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # a fresh optimiser holds the schedule's first rate
        self.rewarm = (self.step, rewarm_steps)
        self.ramp_lr()

    def ramp_lr(self) -> None:
        """Scale the rate of the next step during the ramp after a compact resume (see :meth:`load_state_dict`)."""
        if self.rewarm is None:
            return
        start, steps = self.rewarm
        done = self.step - start  # steps taken since the resume
        if done >= steps:
            self.rewarm = None
            return
        for group in self.optimizer.param_groups:
            group["lr"] *= (done + 1) / steps


def init_weights(net: torch.nn.Module, job: PretrainJob) -> None:
    """Copy the weights of ``job.model.init`` (a checkpoint path or ``"default"``) into ``net``.

    Raises:
        ValueError: The checkpoint is another architecture, or its tensors do not fit ``net``.
    """
    from msnoop.models.checkpoint import resolve_model

    loaded = resolve_model(str(job.model.init))
    if loaded.arch != job.model.arch:
        raise ValueError(
            f"model.init {job.model.init!r} is a {loaded.arch!r} checkpoint; model.arch is {job.model.arch!r}"
        )
    try:
        net.load_state_dict(loaded.net.state_dict())
    except RuntimeError as exc:
        raise ValueError(
            f"model.init {job.model.init!r} does not fit model.arch_kwargs {job.model.arch_kwargs}: {exc}"
        ) from exc


def build_state(job: PretrainJob, device: torch.device | str = "cpu") -> TrainState:
    """A network (seeded with ``job.train.seed``, or ``job.model.init``'s weights), AdamW and the schedule.

    With distillation on, the trained module is a :class:`msnoop.train.distill.DistillStudent` (the network
    plus its heads), so that one forward call serves DistributedDataParallel.
    """
    torch.manual_seed(job.train.seed)
    net = create_model(job.model.arch, **job.model.arch_kwargs)
    if job.model.init:
        init_weights(net, job)
    if job.distill.enabled:
        from msnoop.train.distill import DistillStudent

        net = DistillStudent(net, job.distill)  # type: ignore[arg-type]
    net = net.to(device)
    optimizer = build_optimizer(net, job.optim)
    return TrainState(net=net, optimizer=optimizer, scheduler=build_scheduler(optimizer, job))


def step_geometry(job: PretrainJob, rng: np.random.Generator) -> tuple[int, int]:
    """``(crop side, crops)`` of one step: ``data.crop_size`` and ``train.batch_size``, or with mixed canvases a
    side drawn from ``data.crop_sizes`` and ``batch_size * (crop_size / side)^2`` crops (at least 2, so that
    batch statistics exist), which keeps the pixels, and so the cost, of every step about equal."""
    sizes = job.data.crop_sizes
    if not sizes:
        return job.data.crop_size, job.train.batch_size
    side = int(sizes[int(rng.integers(len(sizes)))])
    return side, max(2, round(job.train.batch_size * (job.data.crop_size / side) ** 2))


def make_batch(pool: ChannelPool, job: PretrainJob, *, rank: int, step: int) -> tuple[torch.Tensor, torch.Generator]:
    """The crops of one step and the generator for its masks, both fixed by ``(seed, rank, step)``.

    Returns:
        ``([B, 1, S, S] float32 crops on CPU, torch generator)``; ``S`` and ``B`` from :func:`step_geometry`.
    """
    rng = batch_rng(job.train.seed, rank, step)
    size, n = step_geometry(job, rng)
    crops, _ = pool.batch(n, rng, size=size)  # [B, S, S]
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return torch.from_numpy(crops)[:, None], gen


def iter_batches(
    pool: ChannelPool, job: PretrainJob, *, rank: int, start: int, until: int
) -> Iterator[tuple[torch.Tensor, torch.Generator]]:
    """Batches of steps ``start .. until-1``, prepared ``job.train.prefetch`` steps ahead in threads.

    Every batch depends only on ``(seed, rank, step)``, so prefetching does not change the stream.
    """
    ahead = job.train.prefetch
    if ahead == 0:
        for step in range(start, until):
            yield make_batch(pool, job, rank=rank, step=step)
        return
    with ThreadPoolExecutor(max_workers=job.train.loader_threads, thread_name_prefix="msnoop-batches") as ex:
        pending: deque[Future[tuple[torch.Tensor, torch.Generator]]] = deque()
        nxt = start
        while nxt < until or pending:
            while nxt < until and len(pending) <= ahead:
                pending.append(ex.submit(make_batch, pool, job, rank=rank, step=nxt))
                nxt += 1
            yield pending.popleft().result()


def distill_loss(
    state: TrainState,
    crops: torch.Tensor,
    masked: torch.Tensor,
    mask: torch.Tensor,
    job: PretrainJob,
    teacher: torch.nn.Module | None,
) -> torch.Tensor:
    """Reconstruction, distillation and spread terms of a student step (``state.terms`` gets each term).

    Args:
        crops / masked / mask: ``[B, 1, S, S]`` whole crops, masked crops, 1 on masked pixels.
        teacher: :class:`msnoop.train.distill.Teacher`, needed when ``job.distill`` is on.
    """
    from msnoop.train.distill import distill_terms, spread_terms

    device = crops.device
    student = unwrap(state.net)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_bf16(job.train.amp, device)):
        out = state.net(masked, decode=job.mask.weight > 0)
        pooled, tmap = teacher(crops) if teacher is not None else ({}, None)
    terms: dict[str, torch.Tensor] = {}
    if out["pred"] is not None:
        terms["reconstruction"] = reconstruction_loss(out["pred"], crops, mask, job.mask.loss, job.mask.average)
    terms.update(distill_terms(out, pooled, tmap, mask, student))  # type: ignore[arg-type]
    if job.spread.variance > 0 or job.spread.covariance > 0:
        terms.update(spread_terms(out["z"]))  # type: ignore[arg-type]
    weights = {
        "reconstruction": job.mask.weight,
        "distill": job.distill.weight,
        "spatial": job.distill.spatial,
        "variance": job.spread.variance,
        "covariance": job.spread.covariance,
    }
    state.terms = {k: float(v.detach()) for k, v in terms.items()}
    return sum((weights[k] * v for k, v in terms.items()), start=torch.zeros((), device=device))


def freeze_batchnorm(net: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: running statistics used and kept; affine weights still learn."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def train_step(
    state: TrainState,
    crops: torch.Tensor,
    job: PretrainJob,
    *,
    generator: torch.Generator,
    teacher: torch.nn.Module | None = None,
) -> float:
    """One optimiser step on a batch; returns the loss.

    Args:
        state: Network (train mode), optimiser and schedule; ``state.step`` is incremented.
        crops: ``[B, 1, S, S]`` normalised crops on the network's device.
        job: Masking, loss and optimiser settings.
        generator: Randomness of the masks.
        teacher: The frozen teacher (:class:`msnoop.train.distill.Teacher`) when ``job.distill`` is on.

    Raises:
        FloatingPointError: The loss is NaN or infinite (lower optim.lr or enable grad_clip).
        ValueError: ``job.distill`` is on and no teacher is given.
    """
    device = crops.device
    masked, mask = mask_images(
        crops, job.mask.ratio, job.mask.patch_size, generator=generator, select=job.mask.select
    )  # [B, 1, S, S] x2
    if job.distill.enabled or job.spread.variance > 0 or job.spread.covariance > 0:
        if job.distill.enabled and teacher is None:
            raise ValueError("job.distill is on: train_step needs the teacher (msnoop.train.distill.Teacher)")
        loss = distill_loss(state, crops, masked, mask, job, teacher)
        return _optimise(state, loss, job)
    kwargs: dict[str, torch.Tensor] = {}
    if job.mask.skips == "drop_masked":
        kwargs["skip_keep"] = 1.0 - mask
    agree = job.agreement.weight > 0
    if agree:
        kwargs["view2"] = second_view(crops, job, generator)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=uses_bf16(job.train.amp, device)):
        out = state.net(masked, **kwargs)  # [B, 1, S, S], or with view2 (pred, z1 [B, C], z2 [B, C])
    pred = out[0] if agree else out
    recon = reconstruction_loss(pred, crops, mask, job.mask.loss, job.mask.average)
    state.terms = {"reconstruction": float(recon.detach())}
    loss = job.mask.weight * recon
    if agree:
        terms = vicreg_terms(out[1].float(), out[2].float())
        a = job.agreement
        loss = loss + a.weight * (
            a.invariance * terms["invariance"] + a.variance * terms["variance"] + a.covariance * terms["covariance"]
        )
    return _optimise(state, loss, job)


def _optimise(state: TrainState, loss: torch.Tensor, job: PretrainJob) -> float:
    """Backward pass, gradient clipping, optimiser and schedule step; returns the loss.

    Raises:
        FloatingPointError: The loss is NaN or infinite.
    """
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at step {state.step} (lr {state.scheduler.get_last_lr()[0]:.3g}); "
            "lower optim.lr or set optim.grad_clip"
        )
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if job.optim.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(state.net.parameters(), job.optim.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.step += 1
    state.ramp_lr()
    return float(loss.detach())


def build_teacher(job: PretrainJob, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The frozen teacher of ``job.distill`` on ``device``."""
    from msnoop.train.distill import Teacher

    return Teacher(job.distill.taps if job.distill.weight > 0 else [], spatial=job.distill.spatial > 0).to(device)


def train_steps(
    state: TrainState,
    pool: ChannelPool,
    job: PretrainJob,
    *,
    until: int,
    rank: int = 0,
    world_size: int = 1,
    should_stop: Callable[[TrainState], bool] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    on_checkpoint: Callable[[TrainState], None] | None = None,
    teacher: torch.nn.Module | None = None,
) -> str:
    """Train from ``state.step`` until ``state.step == until`` (or ``should_stop`` says so).

    Args:
        state: Training state; updated in place.
        pool: Source of crops.
        job: The run's settings (batch size, masking, logging and checkpoint intervals).
        until: Last step number to reach.
        rank: Worker rank (selects the worker's own data stream).
        world_size: Number of workers (for the global samples/s figure).
        should_stop: Called after every step; ``True`` ends the run early (e.g. a time budget).
        on_log: Receives ``{"step", "loss", "lr", "samples_per_s", "loss_<term>"...}`` every ``log_every`` steps
            (one ``loss_<term>`` per loss term, e.g. ``loss_reconstruction``, ``loss_distill``).
        on_checkpoint: Called every ``checkpoint_every`` steps and once at the end.
        teacher: The frozen teacher when ``job.distill`` is on (built from the job when ``None``).

    Returns:
        ``"steps"`` when ``until`` was reached, ``"stopped"`` when ``should_stop`` ended it.
    """
    device = next(state.net.parameters()).device
    state.net.train()
    if job.train.batchnorm == "frozen":
        freeze_batchnorm(state.net)
    if job.distill.enabled and teacher is None:
        teacher = build_teacher(job, device)
    losses: list[float] = []
    term_sums: dict[str, float] = {}
    seen = 0  # crops since the last log (mixed canvases vary the batch)
    t0 = time.perf_counter()
    reason = "steps"
    batches = iter_batches(pool, job, rank=rank, start=state.step, until=until)
    try:
        for crops, gen in batches:
            loss = train_step(state, crops.to(device, non_blocking=True), job, generator=gen, teacher=teacher)
            losses.append(loss)
            seen += len(crops)
            for k, v in state.terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v
            stop = should_stop(state) if should_stop is not None else False
            if state.step % job.train.log_every == 0 or state.step == until or stop:
                dt = time.perf_counter() - t0
                record = {
                    "step": state.step,
                    "loss": float(np.mean(losses)),
                    "lr": float(state.optimizer.param_groups[0]["lr"]),  # the rate of the next step, ramp included
                    "samples_per_s": seen * world_size / max(dt, 1e-9),
                    **{f"loss_{k}": v / len(losses) for k, v in term_sums.items()},
                }
                state.history.append({"step": record["step"], "loss": record["loss"], "lr": record["lr"]})
                if on_log is not None:
                    on_log(record)
                losses, t0, term_sums, seen = [], time.perf_counter(), {}, 0
            if on_checkpoint is not None and (
                state.step % job.train.checkpoint_every == 0 or stop or state.step == until
            ):
                on_checkpoint(state)
            if stop:
                reason = "stopped"
                break
    finally:
        batches.close()  # also waits for batches prefetched before an early stop
    return reason
