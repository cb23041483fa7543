"""Pure-PyTorch embedding of multi-channel images (no Ray): the reference the pipeline must match.

Every channel of every image is embedded as its own one-channel image; the tile embeddings of a
channel are averaged, and the channel vectors are concatenated in channel order (Microsnoop's
``reshape_data(mode='concat')``), so a C-channel image gets a ``C * embed_dim`` vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from msnoop.core.runtime import inference_settings
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
        model: Network and preprocessing from :func:`msnoop.models.checkpoint.resolve_model`. Its network is
            moved to ``device`` (and to channels-last memory format where that is used) in place.
        batch_size: Tiles per forward pass, or ``auto``: by device and canvas
            (:meth:`msnoop.core.runtime.InferenceSettings.tiles_per_batch`: a GPU keeps batches of 64, a CPU takes
            as many tiles as fit its caches, e.g. 2 of 224 px or 32 of 64 px).
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        amp: bf16 autocast: ``auto`` (GPUs and CPUs with native bf16: AVX512-BF16 or AMX), ``cuda`` (GPUs only;
            float32 on every CPU, the reference path) or ``off``.
        memory_format: ``auto`` (channels-last on CPUs), ``channels_last`` or ``contiguous``.
        backend: ``torch`` (the reference path) or ``onnxruntime`` (CPUs, always float32, ``amp`` aside: the
            network exported to ONNX and run by ONNX Runtime, vectors within 1e-6 of torch's float32 ones, about
            1.4x faster; the ``onnx`` extra).

    Raises:
        ValueError: An unknown ``batch_size``, ``amp``, ``memory_format`` or ``backend``, or ``onnxruntime`` on a
            GPU.
        ImportError: ``backend="onnxruntime"`` without onnxruntime and onnx installed.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        batch_size: int | str = "auto",
        device: str = "auto",
        amp: str = "auto",
        memory_format: str = "auto",
        backend: str = "torch",
    ) -> None:
        self.model = model
        self.device = pick_device(device)
        self.settings = inference_settings(
            self.device, batch_size=batch_size, amp=amp, memory_format=memory_format, backend=backend
        )
        self._memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        self.net = model.net.to(self.device, memory_format=self._memory_format).eval()
        self.use_amp = self.settings.bf16
        self._onnx = None
        if self.settings.backend == "onnxruntime":
            from msnoop.embed.onnx_backend import OnnxRuntimeEncoder

            self._onnx = OnnxRuntimeEncoder(self.net, threads=torch.get_num_threads())

    @property
    def preprocess(self) -> Preprocessing:
        """The preprocessing images get before the network (the model's)."""
        return self.model.preprocess

    @property
    def embed_dim(self) -> int:
        """Length of one channel's embedding (an image's vector is ``channels x embed_dim``)."""
        return int(self.net.embed_dim)  # type: ignore[arg-type]

    @torch.inference_mode()
    def embed_tiles(self, tiles: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """Embed normalised one-channel tiles, each row L2-normalised.

        Args:
            tiles: ``[N, S, S]`` float32 tiles of one canvas, or a sequence of ``[n_i, S_i, S_i]`` arrays whose
                canvases may differ (tight canvases): tiles of one canvas go through the network together, in
                batches of :meth:`~msnoop.core.runtime.InferenceSettings.tiles_per_batch` tiles, so every batch
                has one shape and a tile's vector does not depend on the other tiles given with it.

        Returns:
            ``[sum of n_i, embed_dim]`` float32, in the order given.
        """
        groups = [tiles] if isinstance(tiles, np.ndarray) else [np.asarray(t) for t in tiles]
        sizes = np.array([len(g) for g in groups], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        out = np.empty((int(starts[-1]), self.embed_dim), dtype=np.float32)
        by_canvas: dict[tuple[int, ...], list[int]] = {}
        for i, g in enumerate(groups):
            if len(g):
                by_canvas.setdefault(tuple(g.shape[1:]), []).append(i)
        for canvas, members in by_canvas.items():
            stacked = groups[members[0]] if len(members) == 1 else np.concatenate([groups[i] for i in members])
            emb = self._embed_canvas(stacked, self.settings.tiles_per_batch(*canvas))
            pos = 0
            for i in members:
                out[starts[i] : starts[i + 1]] = emb[pos : pos + sizes[i]]
                pos += int(sizes[i])
        return out

    def _embed_canvas(self, tiles: np.ndarray, batch_size: int) -> np.ndarray:
        """``[N, H, W]`` tiles of one canvas -> ``[N, embed_dim]`` float32, L2-normalised rows."""
        out = np.empty((len(tiles), self.embed_dim), dtype=np.float32)
        for start in range(0, len(tiles), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(tiles[start : start + batch_size], dtype=np.float32))
            if self._onnx is not None:
                emb = torch.from_numpy(self._onnx(chunk[:, None].numpy()))
            else:
                chunk = chunk[:, None].to(self.device, non_blocking=True).contiguous(memory_format=self._memory_format)
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
        """Embed images given as sequences of ``[H, W]`` channels -> ``[N, C * embed_dim]`` float32."""
        prepared = [self.prepare(img) for img in images]
        if not prepared:
            return np.zeros((0, 0), dtype=np.float32)
        emb = self.embed_tiles([t for t, _ in prepared])  # images may differ in canvas (preprocess mode tight)
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
