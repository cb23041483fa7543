"""BatchNorm statistics re-estimated at the inference geometry, after training on smaller crops.

Training on crops of ``S`` px (96 on CPU) while inference pads single cells to 224 px gives BatchNorm
running statistics of inputs that the network never sees at inference: a 64 px yeast cell fills 44 % of
a 96 px crop but 8 % of a 224 px input. Re-estimating the statistics on unlabelled crops of the training
pool drawn at the inference size (no weight changes) fixes that mismatch. Measured on the first CPU
default model (400 yeast cells, 11-NN leave-one-field-out, protein / localisation balanced accuracy):
0.530 / 0.696 before, 0.629 / 0.783 after, against 0.594 / 0.750 for a random network.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msnoop.models.checkpoint import load_checkpoint, save_checkpoint
from msnoop.train.config import PretrainJob
from msnoop.train.data import ChannelPool, batch_rng

logger = logging.getLogger(__name__)


def recalibrate_batchnorm(
    net: nn.Module, pool: ChannelPool, *, batches: int, batch_size: int = 32, seed: int = 0
) -> dict[str, Any]:
    """Replace every BatchNorm layer's running mean/variance by their average over ``batches`` pool batches.

    The network is run forward (encoder and decoder, no gradients) in train mode with cumulative
    averaging (``momentum=None``); weights are unchanged and the network is left in eval mode.

    Args:
        net: Network with BatchNorm layers.
        pool: Crops at the inference size (e.g. ``ChannelPool`` with ``crop_size=224``).
        batches: Number of batches.
        batch_size: Crops per batch.
        seed: Seed of the batch stream (independent of the training stream).

    Returns:
        What was done: ``{"batches", "batch_size", "crop_size", "seed", "layers"}``.
    """
    if batches < 1:
        raise ValueError(f"expected batches >= 1, found {batches}")
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ValueError("the network has no BatchNorm layer to recalibrate")
    saved = [m.momentum for m in norms]
    device = next(net.parameters()).device
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    net.train()
    try:
        with torch.no_grad():
            for b in range(batches):
                crops, _ = pool.batch(batch_size, batch_rng(seed, 0, b))
                net(torch.from_numpy(crops)[:, None].to(device))
    finally:
        for m, mom in zip(norms, saved, strict=True):
            m.momentum = mom
        net.eval()
    return {
        "batches": batches,
        "batch_size": batch_size,
        "crop_size": pool.crop_size,
        "seed": seed,
        "layers": len(norms),
    }


def recalibrate_on_job_pool(
    net: nn.Module, job: PretrainJob, *, size: int, batches: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Recalibrate ``net`` on ``job``'s data pool cropped at ``size`` px.

    Defaults: ``job.output.bn_recalibration_batches`` batches, seed ``job.train.seed + 1`` (a stream
    independent of training).
    """
    pool = ChannelPool.from_config(job.data.model_copy(update={"crop_size": size}))
    n = batches if batches is not None else job.output.bn_recalibration_batches
    return recalibrate_batchnorm(net, pool, batches=n, seed=job.train.seed + 1 if seed is None else seed)


def recalibrate_checkpoint(
    src: str | Path, dst: str | Path, job: PretrainJob, *, batches: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Recalibrate a saved checkpoint on ``job``'s data pool at the checkpoint's input size; write ``dst``.

    The checkpoint's metadata gains ``bn_recalibration``; weights keep their precision (float16 when the
    source was saved so).

    Returns:
        The ``bn_recalibration`` record.
    """
    model = load_checkpoint(src)
    size = model.preprocess.input_size
    rec = recalibrate_on_job_pool(model.net, job, size=size, batches=batches, seed=seed)
    save_checkpoint(
        dst,
        model.net,
        arch=model.arch,
        preprocess=model.preprocess,
        arch_kwargs=model.arch_kwargs,
        meta=dict(model.meta) | {"bn_recalibration": rec},
        half=model.half,
    )
    logger.info("recalibrated BatchNorm statistics of %s at %d px (%d batches): %s", src, size, rec["batches"], dst)
    return rec


__all__ = ["recalibrate_batchnorm", "recalibrate_checkpoint", "recalibrate_on_job_pool"]
