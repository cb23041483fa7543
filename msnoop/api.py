"""The Python API: load a model, embed in-memory images, run any job, export a table (notebook-sized).

Example::

    import numpy as np
    import msnoop

    model = msnoop.load_model("default")                       # the shipped model (or a checkpoint path)
    cells = np.random.rand(8, 2, 64, 64).astype(np.float32)     # 8 two-channel 64 x 64 crops
    X = msnoop.embed_images(cells, channel_axis=1, model=model) # (8, 512) float32: 2 channels x 256
    result = msnoop.run("configs/yeast.yaml")                   # any job config: path, dict or config object
    adata = msnoop.to_anndata("results/yeast")                  # AnnData: obs = metadata, X = vectors

Everything here is a thin layer over the stages (:mod:`msnoop.models`, :mod:`msnoop.embed`,
:mod:`msnoop.job_kinds`, :mod:`msnoop.store.anndata`); the CLI calls the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pydantic import BaseModel

    from msnoop.models.checkpoint import LoadedModel


def load_model(ref: str | Path = "default", *, preset: str | None = None, mode: str | None = None) -> LoadedModel:
    """Load a model by reference, with the preprocessing it was trained with.

    Args:
        ref: ``"default"`` (the model shipped in the package), a checkpoint path (``.pt``), or
            ``"random:<arch>[:seed]"`` (an untrained network, a reference point).
        preset: Override the normalisation preset (``"microsnoop"``, ``"cytoimagenet"``); a checkpoint refuses
            one it was not trained with.
        mode: ``"native"`` (pad to 224, tile larger images; Microsnoop's default), ``"rescale"`` or ``"tile"``.

    Returns:
        A :class:`~msnoop.models.checkpoint.LoadedModel` (``.net``, ``.preprocess``, ``.sha256``, ``.source``).

    Raises:
        CheckpointError: The file is missing or not an msnoop checkpoint, the architecture is unknown, or the
            preprocessing contradicts the checkpoint's.
    """
    from msnoop.models.loading import load_for_embedding
    from msnoop.preprocess.config import PreprocessConfig

    pre = PreprocessConfig(**{k: v for k, v in {"preset": preset, "mode": mode}.items() if v is not None})
    loaded, _ = load_for_embedding(str(ref), pre)
    return loaded


def embed_images(
    images: np.ndarray | Sequence[np.ndarray],
    *,
    channel_axis: int | None = None,
    model: LoadedModel | str | Path = "default",
    batch_size: int = 64,
    device: str = "auto",
) -> np.ndarray:
    """Embed in-memory images: every channel as its own one-channel image, channel vectors concatenated.

    Args:
        images: An ``(N, C, H, W)`` / ``(N, H, W, C)`` array (say which axis is the channel with
            ``channel_axis``), an ``(N, H, W)`` array of one-channel images (``channel_axis=None``), or a
            sequence of per-image arrays of that layout (sizes may differ between images). Any integer or
            float dtype; intensities are normalised per channel (1st/99th percentiles, Microsnoop).
        channel_axis: Axis of the channel in each image *including* the leading image axis for an array
            (``1`` for ``(N, C, H, W)``, ``-1`` or ``3`` for ``(N, H, W, C)``); for a sequence, the axis within
            one image (``0`` for ``(C, H, W)``). ``None``: one channel.
        model: A loaded model (:func:`load_model`) or a reference for it.
        batch_size: One-channel tiles per forward pass.
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.

    Returns:
        ``(N, C * D)`` float32 (``D`` = 256 for the default model): Microsnoop's readout, each channel block
        L2-normalised, in channel order.

    Raises:
        ValueError: An image is not 2-D per channel, channels of one image differ in shape, or an image has
            non-finite values or is constant.
    """
    from msnoop.embed.embedder import Embedder
    from msnoop.io.readers import check_image

    loaded = load_model(model) if isinstance(model, str | Path) else model
    per_image = _split_channels(images, channel_axis)
    for i, channels in enumerate(per_image):
        shapes = {c.shape for c in channels}
        if len(shapes) != 1 or next(iter(shapes)).__len__() != 2:
            raise ValueError(f"image {i}: expected channels of one 2-D shape, found shapes {sorted(shapes)}")
        for c, ch in enumerate(channels):
            check_image(np.asarray(ch, dtype=np.float32), f"image {i} channel {c}")
    return Embedder(loaded, batch_size=batch_size, device=device).embed_images(
        [[np.asarray(ch, dtype=np.float32) for ch in channels] for channels in per_image]
    )


def _split_channels(images: np.ndarray | Sequence[np.ndarray], channel_axis: int | None) -> list[list[np.ndarray]]:
    if isinstance(images, np.ndarray):
        if channel_axis is None:
            if images.ndim == 2:
                images = images[None]
            if images.ndim != 3:
                raise ValueError(
                    f"expected (N, H, W) one-channel images without channel_axis, found shape {images.shape}"
                )
            return [[im] for im in images]
        if images.ndim != 4:
            raise ValueError(f"expected (N, C, H, W) or (N, H, W, C) with channel_axis, found shape {images.shape}")
        axis = channel_axis % 4
        if axis == 0:
            raise ValueError("channel_axis 0 is the image axis of an (N, ...) array; give the channel's axis (1 or 3)")
        stacked = np.moveaxis(images, axis, 1)
        return [list(im) for im in stacked]
    out = []
    for im in images:
        im = np.asarray(im)
        if channel_axis is None:
            out.append([im])
        else:
            out.append(list(np.moveaxis(im, channel_axis % im.ndim, 0)))
    return out


def run(config: str | Path | dict[str, Any] | BaseModel, **overrides: Any) -> Any:
    """Run any msnoop job (``job: embed | pretrain | profile | screen | bench | segtrain``) in this process.

    Args:
        config: A YAML path, a config mapping (as the YAML would hold it), or a validated config object.
        **overrides: Dotted keys with ``__`` for ``.``, e.g. ``run(cfg, output__dir="results/x")``.

    Returns:
        The job's result: :class:`~msnoop.embed.pipeline.EmbedResult` for ``embed``, the results record (dict)
        for ``profile``/``screen``/``bench``/``segtrain``, a ``PretrainResult`` for ``pretrain``.

    Raises:
        ConfigError: The config is invalid (the message names the file and key), before any work.
    """
    from msnoop.job_kinds import load_config, run_job

    pairs = [(k.replace("__", "."), v) for k, v in overrides.items()]
    cfg = load_config(config, overrides=pairs or None)
    result, _ = run_job(cfg)
    return result


def to_anndata(table: str | Path, path: str | Path | None = None) -> Any:
    """An embedding or profile table as AnnData (see :func:`msnoop.store.anndata.to_anndata`)."""
    from msnoop.store.anndata import to_anndata as _to_anndata

    return _to_anndata(table, path)


__all__ = ["embed_images", "load_model", "run", "to_anndata"]
