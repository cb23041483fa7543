"""The Microsnoop network: a cellpose-style residual U-Net.

The encoder/decoder follow cellpose's ``CPnet`` building blocks as used by Microsnoop
(``net_desc.CNNNet`` with ``depths=[32, 64, 128, 256]``, one input channel): pre-activation
``BN -> ReLU -> Conv3x3`` blocks with 1x1 projection shortcuts, max-pooling between levels,
additive skip connections, nearest-neighbour upsampling and a style vector (the L2-normalised
global average of the deepest map) injected into every decoder conv through a linear layer.

References:
    - Xun et al., Microsnoop: a generalist tool for microscopy image representation, The
      Innovation 2024; code https://github.com/cellimnet/microsnoop-publish
    - Stringer et al., Cellpose, Nature Methods 2021; code https://github.com/MouseLand/cellpose
"""

from __future__ import annotations

from collections.abc import Sequence

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msnoop.models.registry import register_model


def _brc(in_channels: int, out_channels: int, size: int) -> nn.Sequential:
    """BatchNorm -> ReLU -> Conv (pre-activation)."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels, eps=1e-5),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, size, padding=size // 2),
    )


def _bc(in_channels: int, out_channels: int, size: int) -> nn.Sequential:
    """BatchNorm -> Conv, used for the projection shortcut."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels, eps=1e-5),
        nn.Conv2d(in_channels, out_channels, size, padding=size // 2),
    )


class ResDown(nn.Module):
    """Residual encoder block: two residual units of two pre-activation convs each."""

    def __init__(self, in_channels: int, out_channels: int, size: int = 3) -> None:
        super().__init__()
        self.proj = _bc(in_channels, out_channels, 1)
        self.conv = nn.Sequential(
            _brc(in_channels, out_channels, size),
            _brc(out_channels, out_channels, size),
            _brc(out_channels, out_channels, size),
            _brc(out_channels, out_channels, size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, in, H, W] -> [N, out, H, W]``."""
        x = self.proj(x) + self.conv[1](self.conv[0](x))
        return x + self.conv[3](self.conv[2](x))


class Encoder(nn.Module):
    """Four ResDown levels; returns every level's map, finest first.

    For a ``[N, 1, 224, 224]`` input and depths 32/64/128/256 the maps are
    ``[N, 32, 224, 224]``, ``[N, 64, 112, 112]``, ``[N, 128, 56, 56]`` and ``[N, 256, 28, 28]``.
    """

    def __init__(self, in_channels: int, depths: Sequence[int], size: int = 3) -> None:
        super().__init__()
        nbase = [in_channels, *depths]
        self.down = nn.Sequential(*[ResDown(nbase[i], nbase[i + 1], size) for i in range(len(depths))])
        self.maxpool = nn.MaxPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[N, in, H, W]`` -> one map per level, finest first (each level halves H and W)."""
        maps: list[torch.Tensor] = []
        for level, block in enumerate(self.down):
            maps.append(block(x if level == 0 else self.maxpool(maps[-1])))
        return maps


class _StyleConv(nn.Module):
    """Pre-activation conv whose output is shifted by ``Linear(style)`` broadcast over H x W."""

    def __init__(self, in_channels: int, out_channels: int, style_channels: int, size: int) -> None:
        super().__init__()
        self.conv = _brc(in_channels, out_channels, size)
        self.full = nn.Linear(style_channels, out_channels)

    def forward(self, style: torch.Tensor, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (plus ``skip``) ``[N, in, H, W]`` -> ``[N, out, H, W]``, shifted by ``Linear(style [N, C])``."""
        if skip is not None:
            x = x + skip
        return self.conv(x) + self.full(style)[:, :, None, None]


class ResUp(nn.Module):
    """Residual decoder block with an additive skip connection and style conditioning."""

    def __init__(self, in_channels: int, out_channels: int, style_channels: int, size: int = 3) -> None:
        super().__init__()
        self.proj = _bc(in_channels, out_channels, 1)
        self.conv = nn.Sequential(
            _brc(in_channels, out_channels, size),
            _StyleConv(out_channels, out_channels, style_channels, size),
            _StyleConv(out_channels, out_channels, style_channels, size),
            _StyleConv(out_channels, out_channels, style_channels, size),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, in, H, W]`` plus ``skip`` ``[N, out, H, W]``, conditioned on ``style`` ``[N, C]``:
        ``[N, out, H, W]``."""
        x = self.proj(x) + self.conv[1](style, self.conv[0](x), skip=skip)
        return x + self.conv[3](style, self.conv[2](style, x))


class Decoder(nn.Module):
    """Mirror of the encoder; every block is conditioned on the style vector."""

    def __init__(self, depths: Sequence[int], out_channels: int, size: int = 3) -> None:
        super().__init__()
        nbase = [*depths, depths[-1]]  # e.g. [32, 64, 128, 256, 256]
        style_channels = depths[-1]
        self.up = nn.Sequential(*[ResUp(nbase[i], nbase[i - 1], style_channels, size) for i in range(1, len(nbase))])
        self.head = nn.Sequential(
            nn.BatchNorm2d(depths[0], eps=1e-5),
            nn.ReLU(inplace=True),
            nn.Conv2d(depths[0], out_channels, 1),
        )

    def forward(self, maps: list[torch.Tensor], style: torch.Tensor) -> torch.Tensor:
        """The encoder's maps (finest first) and the style ``[N, C]`` -> the reconstruction ``[N, out, H, W]``."""
        x = self.up[-1](maps[-1], maps[-1], style)
        for level in range(len(self.up) - 2, -1, -1):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = self.up[level](x, maps[level], style)
        return self.head(x)


def style_vector(deepest: torch.Tensor) -> torch.Tensor:
    """Global average pool of the deepest map, L2-normalised: ``[N, C, H, W] -> [N, C]``."""
    pooled = deepest.mean(dim=(-2, -1))
    return pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)


class MicrosnoopCNN(nn.Module):
    """Residual U-Net that reconstructs a one-channel image and exposes its embedding.

    Args:
        in_channels: Input channels; Microsnoop uses 1 (every channel is embedded on its own).
        out_channels: Reconstructed channels.
        depths: Feature depths of the four levels.

    Example:
        >>> net = MicrosnoopCNN(depths=(8, 16, 32, 64))
        >>> net.embed(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 64])
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, depths: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        if len(depths) < 2:
            raise ValueError(f"depths needs at least two levels, found {list(depths)}")
        self.depths = tuple(int(d) for d in depths)
        self.in_channels = in_channels
        self.encoder = Encoder(in_channels, self.depths)
        self.decoder = Decoder(self.depths, out_channels)

    @property
    def embed_dim(self) -> int:
        """Length of the embedding: the deepest level's depth."""
        return self.depths[-1]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding of each image: ``[N, 1, H, W] -> [N, depths[-1]]``, L2-normalised."""
        return style_vector(self.encoder(x)[-1])

    def forward(
        self, x: torch.Tensor, skip_keep: torch.Tensor | None = None, view2: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction: ``[N, in, H, W] -> [N, out, H, W]``; H and W must be multiples of 8.

        The two optional arguments serve pretraining recipes (``msnoop.train``); inference passes neither.

        Args:
            x: ``[N, in, H, W]`` input.
            skip_keep: ``[N, 1, H, W]`` 0/1 map; every skip connection except the deepest map is multiplied
                by it (average-pooled to the skip's resolution), so that where it is 0 the decoder can only
                use what reached the deepest map (skips dropped over masked patches).
            view2: ``[N, in, H, W]`` a second view of the same images, run through the encoder only, in the
                same batch as ``x`` (one forward call, as DistributedDataParallel requires).

        Returns:
            The reconstruction, or with ``view2`` a tuple ``(reconstruction, z1 [N, C], z2 [N, C])`` of the
            deepest map's global average (before the L2 normalisation of the embedding) for both views.
        """
        n = x.shape[0]
        maps = self.encoder(x if view2 is None else torch.cat([x, view2]))
        z = maps[-1].mean(dim=(-2, -1))  # [N or 2N, C]
        if view2 is not None:
            maps = [m[:n] for m in maps]
        if skip_keep is not None:
            keep = skip_keep.to(maps[0].dtype)
            maps = [
                m * F.avg_pool2d(keep, x.shape[-1] // m.shape[-1]) if level < len(maps) - 1 else m
                for level, m in enumerate(maps)
            ]
        pred = self.decoder(maps, style_vector(maps[-1]))
        if view2 is None:
            return pred
        return pred, z[:n], z[n:]


@register_model
def microsnoop_cnn(**kwargs: Any) -> MicrosnoopCNN:
    """The Microsnoop CNN: depths 32/64/128/256, one input channel, 256-d embedding (~6.6 M params)."""
    return MicrosnoopCNN(**{"in_channels": 1, "out_channels": 1, "depths": (32, 64, 128, 256), **kwargs})


@register_model
def test_cnn(**kwargs: Any) -> MicrosnoopCNN:
    """A tiny variant (depths 4/8/16/32) for tests: same code path, milliseconds per batch."""
    return MicrosnoopCNN(**{"in_channels": 1, "out_channels": 1, "depths": (4, 8, 16, 32), **kwargs})
