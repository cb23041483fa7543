"""Masked feature distillation: the U-Net's deepest map learns to predict an ImageNet network's features.

Microsnoop's objective (rebuild masked pixels) is solved mostly through the U-Net's high-resolution skip
connections, so the deepest map, the one msnoop embeds, learns little from it (measured in the model card:
swapping the deepest map between images raises the masked error by 32 %, swapping the other skips by
778 %). Here the deepest map gets a target of its own: the student sees the masked crop, a frozen teacher
the whole crop, and heads on the student's pooled deepest map predict the teacher's pooled features at
several depths (MaskDistill, Peng et al. 2022; BEiT v2, Peng et al. 2022; SEED, Fang et al. ICLR 2021:
distillation lifts small self-supervised networks far more than longer training).

Every trainable part (the U-Net and the heads) is one module, :class:`DistillStudent`, so that one forward
call serves DistributedDataParallel; the teacher stays outside it, frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msnoop.models.cnn import MicrosnoopCNN, style_vector
from msnoop.models.efficientnet_lite import TAP_CHANNELS, ImageNetTeacher, grey_to_rgb_input
from msnoop.train.config import DistillConfig

SPATIAL_TAP = "early"  # stride 8, as the U-Net's deepest map


class TargetNorm(nn.Module):
    """Per-dimension standardisation of teacher targets with running (EMA) statistics.

    Buffers travel with checkpoints, so a resumed run standardises as before. The first batch sets the
    statistics; later batches move them by ``momentum``.
    """

    def __init__(self, dim: int, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, t: torch.Tensor) -> None:
        """Fold a batch ``[B, D]`` (or ``[P, D]`` positions) into the statistics."""
        mean, var = t.float().mean(0), t.float().var(0, unbiased=False) if len(t) > 1 else torch.zeros_like(t[0])
        if int(self.seen) == 0:
            self.mean.copy_(mean)
            self.var.copy_(var.clamp_min(1e-6))
        else:
            self.mean.lerp_(mean, self.momentum)
            self.var.lerp_(var.clamp_min(1e-6), self.momentum)
        self.seen += 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Standardise ``[B, D]`` targets with the running statistics."""
        return (t.float() - self.mean) / self.var.sqrt()


def _head(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


class DistillStudent(nn.Module):
    """The U-Net plus its distillation heads and target statistics.

    Args:
        net: The network being trained; :attr:`net` is what is saved as the model.
        cfg: Taps, head width, spatial term, target momentum.

    Shapes:
        ``forward(x [N, 1, S, S])`` -> dict with ``pred`` (``[N, 1, S, S]`` or ``None`` without ``decode``),
        ``z`` (``[N, C]`` pooled deepest map, before L2 normalisation), ``heads`` (tap -> ``[N, C_tap]``) and
        ``spatial`` (``[N, 40, S/8, S/8]`` or ``None``).
    """

    def __init__(self, net: MicrosnoopCNN, cfg: DistillConfig) -> None:
        super().__init__()
        self.net = net
        dim = net.embed_dim
        taps = cfg.taps if cfg.weight > 0 else []
        self.heads = nn.ModuleDict({t: _head(dim, cfg.head_hidden, TAP_CHANNELS[t]) for t in taps})
        self.norms = nn.ModuleDict({t: TargetNorm(TAP_CHANNELS[t], cfg.target_momentum) for t in taps})
        self.spatial_head = nn.Conv2d(dim, TAP_CHANNELS[SPATIAL_TAP], 1) if cfg.spatial > 0 else None
        self.spatial_norm = TargetNorm(TAP_CHANNELS[SPATIAL_TAP], cfg.target_momentum) if cfg.spatial > 0 else None

    @property
    def embed_dim(self) -> int:
        """The network's embedding length (the heads do not change it)."""
        return self.net.embed_dim

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The network's own embedding: ``[N, 1, H, W] -> [N, embed_dim]``."""
        return self.net.embed(x)

    def forward(self, x: torch.Tensor, *, decode: bool = True) -> dict[str, torch.Tensor | dict | None]:
        """Encoder, optionally the decoder, and the heads in one call (see the class docstring for shapes)."""
        maps = self.net.encoder(x)
        deepest = maps[-1]
        z = deepest.mean(dim=(-2, -1))
        return {
            "pred": self.net.decoder(maps, style_vector(deepest)) if decode else None,
            "z": z,
            "heads": {t: h(z) for t, h in self.heads.items()},
            "spatial": self.spatial_head(deepest) if self.spatial_head is not None else None,
        }


class Teacher(nn.Module):
    """The frozen ImageNet network, giving pooled targets per tap and the stride-8 map."""

    def __init__(self, taps: Sequence[str], spatial: bool) -> None:
        super().__init__()
        self.taps = list(taps)
        self.want = list(dict.fromkeys([*self.taps, *([SPATIAL_TAP] if spatial else [])]))
        self.spatial = spatial
        self.model = ImageNetTeacher(self.want)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``[N, 1, S, S]`` unmasked crops -> (tap -> pooled ``[N, C_tap]``, stride-8 map or ``None``)."""
        maps = dict(zip(self.want, self.model.net.features(grey_to_rgb_input(crops), self.want), strict=True))
        pooled = {t: maps[t].mean(dim=(-2, -1)).float() for t in self.taps}
        return pooled, (maps[SPATIAL_TAP].float() if self.spatial else None)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` per row, averaged: ``[N, D] x [N, D] -> scalar``."""
    return (1 - F.cosine_similarity(pred.float(), target.float(), dim=1, eps=1e-6)).mean()


def spread_terms(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """VICReg's variance (hinge on std below 1) and covariance (off-diagonal squares / d) of ``z [B, D]``."""
    z = z.float()
    d = z.shape[1]
    std = torch.sqrt(z.var(dim=0) + 1e-4)
    zc = z - z.mean(dim=0)
    c = (zc.T @ zc) / max(z.shape[0] - 1, 1)
    return {"variance": torch.relu(1 - std).mean(), "covariance": (c.pow(2).sum() - c.diagonal().pow(2).sum()) / d}


def distill_terms(
    out: dict, teacher_pooled: dict[str, torch.Tensor], teacher_map: torch.Tensor | None, mask: torch.Tensor,
    student: DistillStudent,
) -> dict[str, torch.Tensor]:
    """The distillation losses of one batch.

    Args:
        out: :meth:`DistillStudent.forward`'s output on the masked crops.
        teacher_pooled: tap -> ``[N, C_tap]`` pooled teacher features of the whole crops.
        teacher_map: ``[N, 40, h, w]`` teacher stride-8 map, or ``None``.
        mask: ``[N, 1, S, S]``, 1 on masked pixels.
        student: The (unwrapped) student, whose target statistics are updated here.

    Returns:
        ``{"distill": ..., "spatial": ...}`` (the keys of the terms that are on), scalar tensors.
    """
    terms: dict[str, torch.Tensor] = {}
    if student.heads:
        losses = []
        for tap, pred in out["heads"].items():
            norm = student.norms[tap]
            norm.update(teacher_pooled[tap])
            losses.append(cosine_loss(pred, norm(teacher_pooled[tap])))
        terms["distill"] = torch.stack(losses).mean()
    if out["spatial"] is not None and teacher_map is not None and student.spatial_norm is not None:
        pred = out["spatial"].float()  # [N, 40, S/8, S/8]
        target = teacher_map
        if target.shape[-2:] != pred.shape[-2:]:  # "same" padding rounds up odd sides
            target = F.interpolate(target, size=pred.shape[-2:], mode="bilinear", align_corners=False)
        where = F.adaptive_avg_pool2d(mask.float(), pred.shape[-2:])[:, 0] > 0.5  # [N, h, w] masked cells
        if bool(where.any()):
            t = target.permute(0, 2, 3, 1)[where]  # [P, 40]
            p = pred.permute(0, 2, 3, 1)[where]
            student.spatial_norm.update(t)
            terms["spatial"] = cosine_loss(p, student.spatial_norm(t))
        else:
            terms["spatial"] = pred.sum() * 0.0
    return terms


def network_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The U-Net's own weights from a training state dict (a :class:`DistillStudent`'s or a bare network's)."""
    if any(k.startswith("net.") for k in model_state):
        return {k[4:]: v for k, v in model_state.items() if k.startswith("net.")}
    return dict(model_state)
