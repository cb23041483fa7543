"""One-channel training pool: every channel of every image of every source is a sample.

A training crop is made the way inference sees images (the ``microsnoop`` preset of
:mod:`msnoop.preprocess.presets`), plus
augmentation:

1. pick a source with probability ∝ ``weight * f(n_samples)`` (``f`` = 1, sqrt or n), then a sample
   uniformly within it, so that one big dataset does not drown the others;
2. cut a ``crop_size`` window: a random position in a large image, centred zero padding for a small one;
   scale jitter and free rotation are folded into the same bilinear resampling (outside = 0);
3. flips and 90° rotations;
4. quality filters (CytoImageNet): crops whose image content is constant, or whose 75th percentile is 0,
   are redrawn; images with at most two distinct values (label masks) are dropped;
5. ``normalize99`` over the whole crop, padding included (as at inference), then intensity jitter.

Images are preloaded (in a compact dtype) when the pool's estimated size fits ``preload_mb``, else
read from disk for every crop. Batches are a pure function of ``(seed, rank, step)``, which makes runs
reproducible and resumable without storing any data-loader state.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from msnoop.io.manifest import ID_COLUMN, load_image_table, path_column
from msnoop.io.readers import ImageReadError, read_image
from msnoop.preprocess.normalize import normalize99
from msnoop.train.config import AugmentConfig, DataConfig, FilterConfig, SourceConfig

logger = logging.getLogger(__name__)


MAX_NORMALIZED = 50.0
"""Largest (max - min) / (99th - 1st percentile) of an accepted crop (the ``drop_uniform`` filter)."""


class PoolError(ValueError):
    """The training pool cannot be built (no usable samples, unreadable sources)."""


@dataclass
class SourceStats:
    """What one source contributed; recorded in checkpoints and the model card."""

    name: str
    channels: list[str]
    n_images: int
    n_samples: int
    n_binary: int = 0
    n_unreadable: int = 0
    probability: float = 0.0
    example_shape: list[int] = field(default_factory=list)


def compact(image: np.ndarray) -> np.ndarray:
    """Store an image in the smallest dtype that holds it exactly (uint8/uint16, else float32)."""
    if image.size and np.all(image == np.round(image)):
        lo, hi = float(image.min()), float(image.max())
        if lo >= 0 and hi <= 255:
            return image.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return image.astype(np.uint16)
    return image.astype(np.float32, copy=False)


def is_binary(image: np.ndarray) -> bool:
    """True when an image has at most two distinct values (a label or threshold mask)."""
    lo, hi = image.min(), image.max()
    return bool(np.all((image == lo) | (image == hi)))


def batch_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The random stream of one batch: a pure function of ``(seed, rank, step)``."""
    return np.random.default_rng([seed, rank, step])


class ChannelPool:
    """Random one-channel crops from several image sources.

    Args:
        sources: Image sources; each channel of each image is a sample.
        crop_size: Side ``S`` of the square crops.
        weighting: Source probability ∝ ``weight * (1 | sqrt(n) | n)``.
        preload_mb: Preload every image when the estimated pool size (compact dtype) fits.
        augment: Augmentation settings.
        filters: Quality-filter settings.

    Example:
        >>> pool = ChannelPool.from_config(cfg.data)  # doctest: +SKIP
        >>> crops, src = pool.batch(16, batch_rng(0, 0, 0))  # [16, S, S] float32, [16] int
    """

    def __init__(
        self,
        sources: list[SourceConfig],
        *,
        crop_size: int,
        weighting: str = "sqrt",
        preload_mb: int = 1024,
        augment: AugmentConfig | None = None,
        filters: FilterConfig | None = None,
    ) -> None:
        self.crop_size = crop_size
        self.augment = augment or AugmentConfig()
        self.filters = filters or FilterConfig()
        self.paths: list[list[str]] = []  # per source: sample paths
        self.ids: list[list[str]] = []  # per source: "<image id>/<channel>"
        self.stats: list[SourceStats] = []
        for src in sources:
            table = load_image_table(src.input)
            if src.where:
                from msnoop.core.filters import select_rows

                table = select_rows(table, src.where, what=f"data.sources[{src.name}].where")
            paths, ids = [], []
            for ch in src.input.channels:
                for image_id, p in zip(table[ID_COLUMN], table[path_column(ch)], strict=True):
                    if isinstance(p, str) and p:
                        paths.append(p)
                        ids.append(f"{image_id}/{ch}")
            if not paths:
                raise PoolError(f"source {src.name!r} has no image paths; check its input section")
            self.paths.append(paths)
            self.ids.append(ids)
            self.stats.append(SourceStats(src.name, list(src.input.channels), len(table), len(paths)))
        self.images: list[list[np.ndarray | None]] | None = None
        self.bad: list[set[int]] = [set() for _ in sources]
        self.preloaded = self._estimate_mb() <= preload_mb
        if self.preloaded:
            self._preload()
        self._set_probabilities([s.weight for s in sources], weighting)

    @classmethod
    def from_config(cls, cfg: DataConfig) -> ChannelPool:
        """Build the pool described by a job's ``data`` section."""
        return cls(
            cfg.sources,
            crop_size=cfg.crop_size,
            weighting=cfg.weighting,
            preload_mb=cfg.preload_mb,
            augment=cfg.augment,
            filters=cfg.filters,
        )

    # -- loading -------------------------------------------------------------------------------

    def _estimate_mb(self) -> float:
        total = 0.0
        for s, paths in enumerate(self.paths):
            try:
                first = compact(read_image(paths[0]))
            except ImageReadError as exc:
                raise PoolError(f"source {self.stats[s].name!r}: first image unreadable: {exc}") from exc
            self.stats[s].example_shape = list(first.shape)
            total += first.nbytes * len(paths) / 2**20
        return total

    def _load(self, s: int, i: int) -> np.ndarray | None:
        """Read sample ``i`` of source ``s``; ``None`` (and counted) when unreadable or binary."""
        try:
            image = read_image(self.paths[s][i])
        except ImageReadError as exc:
            logger.warning("training pool: skipping unreadable image %s", exc)
            self.stats[s].n_unreadable += 1
            self.bad[s].add(i)
            return None
        if image.size == 0 or not np.isfinite(image).all():
            logger.warning("training pool: skipping %s (empty or NaN/inf pixels)", self.paths[s][i])
            self.stats[s].n_unreadable += 1
            self.bad[s].add(i)
            return None
        if self.filters.drop_binary and is_binary(image):
            self.stats[s].n_binary += 1
            self.bad[s].add(i)
            return None
        return compact(image)

    def _preload(self) -> None:
        self.images = []
        for s, paths in enumerate(self.paths):
            self.images.append([self._load(s, i) for i in range(len(paths))])
            if len(self.bad[s]) == len(paths):
                raise PoolError(
                    f"source {self.stats[s].name!r}: none of its {len(paths)} images is usable "
                    f"({self.stats[s].n_binary} binary, {self.stats[s].n_unreadable} unreadable)"
                )

    def _set_probabilities(self, weights: list[float], weighting: str) -> None:
        sizes = np.array([len(p) - len(b) for p, b in zip(self.paths, self.bad, strict=True)], dtype=np.float64)
        base = {"equal": np.ones_like(sizes), "sqrt": np.sqrt(sizes), "size": sizes}[weighting]
        prob = base * np.asarray(weights, dtype=np.float64)
        self.probabilities = prob / prob.sum()
        for st, p in zip(self.stats, self.probabilities, strict=True):
            st.probability = float(p)

    def image(self, s: int, i: int) -> np.ndarray | None:
        """Sample ``i`` of source ``s`` as stored (compact dtype), or ``None`` when unusable."""
        if i in self.bad[s]:
            return None
        if self.images is not None:
            return self.images[s][i]
        return self._load(s, i)

    # -- crops ---------------------------------------------------------------------------------

    def _window(
        self, image: np.ndarray, rng: np.random.Generator, augment: bool, size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Resample a ``[S, S]`` window of ``image`` (random position/scale/angle when augmenting).

        Args:
            size: Window side ``S`` (default: the pool's ``crop_size``).

        Returns:
            ``(crop, valid)``: float32 ``[S, S]`` with zeros outside the image, bool ``[S, S]`` inside-mask.
        """
        size = size or self.crop_size
        h, w = image.shape
        aug = self.augment
        scale, angle = 1.0, 0.0
        if augment and aug.scale_jitter > 0:
            scale = math.exp(rng.uniform(-math.log1p(aug.scale_jitter), math.log1p(aug.scale_jitter)))
        if augment and aug.rotate:
            angle = rng.uniform(0.0, 2.0 * math.pi)
        span = size / scale  # input pixels covered by the window side
        centre = []
        for length in (h, w):
            if length > span and augment:  # random window inside the image, on the pixel grid
                start = rng.uniform(0, length - span)
                centre.append(round(start) + (span - 1) / 2)
            else:  # centred window; a small image gets centred zero padding, placed like pad_center
                centre.append(-math.floor((span - length) / 2) + (span - 1) / 2)
        # output pixel offsets from the window centre, in input pixels: [S]
        d = (np.arange(size, dtype=np.float64) - (size - 1) / 2) / scale
        dy, dx = np.meshgrid(d, d, indexing="ij")  # [S, S]
        cos, sin = math.cos(angle), math.sin(angle)
        ys = centre[0] + cos * dy - sin * dx  # [S, S] input row of each output pixel
        xs = centre[1] + sin * dy + cos * dx
        valid = (ys >= -0.5) & (ys <= h - 0.5) & (xs >= -0.5) & (xs <= w - 0.5)
        # resample only the bounding box of the window
        y0, y1 = max(int(math.floor(ys.min())), 0), min(int(math.ceil(ys.max())) + 1, h)
        x0, x1 = max(int(math.floor(xs.min())), 0), min(int(math.ceil(xs.max())) + 1, w)
        if y1 <= y0 or x1 <= x0:
            return np.zeros((size, size), np.float32), np.zeros((size, size), bool)
        region = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1], dtype=np.float32))[None, None]
        rh, rw = y1 - y0, x1 - x0
        gx = (xs - x0 + 0.5) / rw * 2 - 1  # align_corners=False convention
        gy = (ys - y0 + 0.5) / rh * 2 - 1
        grid = torch.from_numpy(np.stack([gx, gy], axis=-1).astype(np.float32))[None]  # [1, S, S, 2]
        crop = F.grid_sample(region, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0, 0]
        out = crop.numpy()
        out[~valid] = 0.0
        return out, valid

    def _passes(self, crop: np.ndarray, valid: np.ndarray) -> bool:
        content = crop[valid]
        if content.size == 0:
            return False
        if self.filters.drop_uniform and float(np.ptp(content)) == 0.0:
            return False
        if self.filters.drop_uniform and not self._spread_ok(crop):
            return False
        if self.filters.drop_dim and float(np.percentile(content, 75)) <= 0.0:
            return False
        return True

    @staticmethod
    def _spread_ok(crop: np.ndarray) -> bool:
        """False for a nearly uniform crop with a few outlier pixels: after ``normalize99`` (1st to 99th
        percentile over the crop, padding included) those pixels would exceed ``MAX_NORMALIZED``, and one
        such crop in a batch dominates the loss (a 3.8e9 loss spike at step 650 of the first CPU run)."""
        lo, hi = np.percentile(crop, [1, 99])
        span = float(hi - lo)
        return span > 0 and float(crop.max() - crop.min()) <= MAX_NORMALIZED * span

    def _finish(self, crop: np.ndarray, rng: np.random.Generator, augment: bool) -> np.ndarray:
        aug = self.augment
        if augment and aug.flips:
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            if rng.random() < 0.5:
                crop = crop[::-1, :]
        if augment and aug.rot90:
            crop = np.rot90(crop, int(rng.integers(4)))
        out = normalize99(np.ascontiguousarray(crop))  # padding included, as at inference
        if augment and aug.intensity_jitter > 0:
            j = aug.intensity_jitter
            out = out * np.float32(rng.uniform(1 - j, 1 + j)) + np.float32(rng.uniform(-j / 2, j / 2))
        return out.astype(np.float32, copy=False)

    def crop(
        self, rng: np.random.Generator, source: int | None = None, *, augment: bool = True, size: int | None = None
    ) -> tuple[np.ndarray, int]:
        """One normalised training crop ``[S, S]`` float32 (``S`` = ``size`` or ``crop_size``) and its source."""
        s = int(rng.choice(len(self.paths), p=self.probabilities)) if source is None else source
        n = len(self.paths[s])
        best: tuple[np.ndarray, np.ndarray] | None = None
        for _ in range(max(self.filters.max_tries, 1) * 2):
            i = int(rng.integers(n))
            image = self.image(s, i)
            if image is None:
                if len(self.bad[s]) == n:
                    raise PoolError(f"source {self.stats[s].name!r}: every image turned out unusable")
                continue
            crop, valid = self._window(image, rng, augment, size)
            best = (crop, valid)
            if self._passes(crop, valid):
                break
        if best is None:
            raise PoolError(f"source {self.stats[s].name!r}: no readable image found after many draws")
        return self._finish(best[0], rng, augment), s

    def batch(
        self, batch_size: int, rng: np.random.Generator, *, size: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``batch_size`` crops: ``([B, S, S] float32, [B] int64 source index)``; ``S`` = ``size`` or ``crop_size``."""
        crops, sources = zip(*(self.crop(rng, size=size) for _ in range(batch_size)), strict=True)
        return np.stack(crops), np.asarray(sources, dtype=np.int64)

    def examples(self, source: int, k: int) -> tuple[np.ndarray, list[str]]:
        """``k`` un-augmented crops of distinct images spread over a source (figures): ``[k, S, S]``."""
        n = len(self.paths[source])
        spread = np.linspace(0, n - 1, num=min(k, n)).round().astype(int)  # across channels and images
        spares = np.linspace(0, n - 1, num=min(k * 4, n)).round().astype(int)
        picks = list(dict.fromkeys([*spread.tolist(), *spares.tolist()]))
        crops, names = [], []
        rng = np.random.default_rng(0)
        for i in picks:
            image = self.image(source, int(i))
            if image is None:
                continue
            crop, valid = self._window(image, rng, augment=False)
            if not self._passes(crop, valid):
                continue
            crops.append(self._finish(crop, rng, augment=False))
            names.append(self.ids[source][int(i)])
            if len(crops) == k:
                break
        if not crops:
            return np.zeros((0, self.crop_size, self.crop_size), np.float32), []
        return np.stack(crops), names

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: sources with counts and probabilities, crop size, preload mode."""
        return {
            "crop_size": self.crop_size,
            "preloaded": self.preloaded,
            "n_samples": sum(len(p) - len(b) for p, b in zip(self.paths, self.bad, strict=True)),
            "sources": [vars(st).copy() for st in self.stats],
        }
