"""The embedding stage: an actor pool (one GPU per actor where the cluster has GPUs) turns tiles into vectors."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from msnoop.embed.cells import CELL_COUNT
from msnoop.embed.dataset import _ragged

if TYPE_CHECKING:
    from msnoop.models.checkpoint import LoadedModel

# torch-dependent modules (embedder, checkpoint) are imported inside the functions that need them:
# read and write tasks start many worker processes, and importing torch costs each ~1.5 s of CPU.


class EmbedActor:
    """Stage 2 (callable class for the actor pool): tiles -> per-image embedding.

    With ``cells=True`` every ``C`` consecutive tiles of an image are one cell: the output also has
    ``cell_embedding`` (per image ``[N, C * D]``) and ``embedding`` is the mean over the image's cells
    (zeros for an image without cells). With ``write`` (the keyword arguments of
    :func:`msnoop.embed.write.write_block`) the actor also writes each block's parts and returns the block's
    counts instead of its vectors.
    """

    def __init__(
        self,
        model: Any,
        *,
        batch_size: int | str,
        device: str,
        torch_threads: int | None,
        cells: bool = False,
        amp: str = "auto",
        memory_format: str = "auto",
        backend: str = "torch",
        write: dict[str, Any] | None = None,
    ) -> None:
        if device == "cpu" and "torch" not in sys.modules:
            # OpenMP threads that spin while they wait lose their core to every other process on a small
            # machine, so they sleep instead (libgomp reads this when torch loads, hence before the import)
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import ray
        import torch

        from msnoop.embed.embedder import Embedder

        self.cells = cells
        self.write = write

        if torch_threads:
            torch.set_num_threads(torch_threads)
        loaded: LoadedModel = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.embedder = Embedder(
            loaded, batch_size=batch_size, device=device, amp=amp, memory_format=memory_format, backend=backend
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.write is None:
            return self.embed(batch)
        from msnoop.embed.write import write_block

        return write_block(self.embed(batch), **self.write)

    def embed(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The block with ``embedding`` (and ``cell_embedding`` in cells mode) added; ``tiles`` removed."""
        tiles = batch.pop("tiles")
        counts = batch["counts"]
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        n_channels = counts.shape[1] if counts.ndim == 2 else 0
        dim = self.embedder.embed_dim * n_channels
        emb = np.zeros((len(ok), dim), dtype=np.float32)
        if self.cells:
            return self._cells(batch, tiles, ok, emb)
        if ok.any():
            # one array per image: with tight canvases images differ in tile size; the embedder batches by size
            tile_emb = self.embedder.embed_tiles([np.asarray(tiles[i], dtype=np.float32) for i in np.flatnonzero(ok)])
            from msnoop.embed.embedder import combine_tiles

            emb[ok] = combine_tiles(tile_emb, [counts[i] for i in np.flatnonzero(ok)])
        batch["embedding"] = emb
        return batch

    def _cells(self, batch: dict[str, Any], tiles: Any, ok: np.ndarray, emb: np.ndarray) -> dict[str, Any]:
        dim = emb.shape[1]
        n_cells = np.asarray(batch[CELL_COUNT], dtype=np.int64)
        cell_emb = [np.zeros((0, dim), dtype=np.float32) for _ in range(len(ok))]
        todo = [i for i in np.flatnonzero(ok) if n_cells[i] > 0]
        if todo:
            # one row per cell: its C channel embeddings concatenated (tiles are cell-major, channel-major)
            per_cell = self.embedder.embed_tiles([np.asarray(tiles[i], dtype=np.float32) for i in todo])
            per_cell = per_cell.reshape(-1, dim)
            pos = 0
            for i in todo:
                cell_emb[i] = per_cell[pos : pos + n_cells[i]]
                emb[i] = cell_emb[i].mean(axis=0, dtype=np.float64)
                pos += n_cells[i]
        batch["embedding"] = emb
        batch["cell_embedding"] = _ragged(cell_emb)
        return batch
