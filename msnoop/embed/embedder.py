"""Pure-PyTorch embedding of multi-channel images (no Ray): the reference the pipeline must match.

Every channel of every image is embedded as its own one-channel image; the tile embeddings of a
channel are averaged, and the channel vectors are concatenated in channel order (Microsnoop's
``reshape_data(mode='concat')``), so a C-channel image gets a ``C * embed_dim`` vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from msnoop.core.runtime import uses_bf16
from msnoop.models.checkpoint import LoadedModel
from msnoop.preprocess.presets import Preprocessing, prepare_channel


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


class Embedder:
    """Embeds preprocessed tiles and whole images with one loaded model.

    Args:
        model: Network and preprocessing from :func:`msnoop.models.checkpoint.resolve_model`.
        batch_size: Tiles per forward pass.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        amp: bf16 autocast: ``cuda`` (GPUs only), ``auto`` (also CPUs with native bf16) or ``off``.
    """

    def __init__(self, model: LoadedModel, *, batch_size: int = 64, device: str = "auto", amp: str = "cuda") -> None:
        self.model = model
        self.device = pick_device(device)
        self.net = model.net.to(self.device).eval()
        self.batch_size = batch_size
        self.use_amp = uses_bf16(amp, self.device)

    @property
    def preprocess(self) -> Preprocessing:
        """The preprocessing images get before the network (the model's)."""
        return self.model.preprocess

    @property
    def embed_dim(self) -> int:
        """Length of one channel's embedding (an image's vector is ``channels x embed_dim``)."""
        return int(self.net.embed_dim)  # type: ignore[arg-type]

    @torch.inference_mode()
    def embed_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """``[N, S, S]`` normalised tiles -> ``[N, embed_dim]`` float32, each row L2-normalised."""
        out = np.empty((len(tiles), self.embed_dim), dtype=np.float32)
        for start in range(0, len(tiles), self.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(tiles[start : start + self.batch_size]))[:, None]
            chunk = chunk.to(self.device, non_blocking=True)
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                emb = self.net.embed(chunk)  # type: ignore[operator]
            emb = emb.float()
            emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
            out[start : start + len(chunk)] = emb.cpu().numpy()
        return out

    def prepare(self, channels: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Preprocess every channel of one image.

        Returns:
            ``tiles [T, S, S]`` for all channels stacked, and ``counts [C]``: tiles per channel.
        """
        per_channel = [prepare_channel(ch, self.preprocess) for ch in channels]
        return np.concatenate(per_channel), np.array([len(t) for t in per_channel], dtype=np.int64)

    def embed_images(self, images: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """Embed images given as sequences of ``[H, W]`` channels -> ``[N, C * embed_dim]``."""
        prepared = [self.prepare(img) for img in images]
        if not prepared:
            return np.zeros((0, 0), dtype=np.float32)
        tiles = np.concatenate([t for t, _ in prepared])
        emb = self.embed_tiles(tiles)
        return combine_tiles(emb, [c for _, c in prepared])


def combine_tiles(tile_embeddings: np.ndarray, counts: Sequence[np.ndarray]) -> np.ndarray:
    """Average tile embeddings per channel and concatenate channels, per image.

    Args:
        tile_embeddings: ``[sum of all counts, D]`` in image-major, channel-major, tile order.
        counts: For each image, ``[C]`` tiles per channel.

    Returns:
        ``[N, C * D]`` float32.
    """
    rows = []
    pos = 0
    for c in counts:
        parts = []
        for n in c:
            parts.append(tile_embeddings[pos : pos + int(n)].mean(axis=0))
            pos += int(n)
        rows.append(np.concatenate(parts))
    return np.stack(rows).astype(np.float32, copy=False)
