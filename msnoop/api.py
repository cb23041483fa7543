"""The Python API: load a model, embed in-memory images, run any job, search, evaluate, describe and export a
table (notebook-sized).

Example::

    import numpy as np
    import msnoop

    model = msnoop.load_model("default")                       # the shipped model (or a checkpoint path)
    cells = np.random.rand(8, 2, 64, 64).astype(np.float32)     # 8 two-channel 64 x 64 crops
    X = msnoop.embed_images(cells, channel_axis=1, model=model) # (8, 512) float32: 2 channels x 256
    result = msnoop.run("configs/yeast.yaml")                   # any job config: path, dict or config object
    adata = msnoop.to_anndata("results/yeast")                  # AnnData: obs = metadata, X = vectors
    hits = msnoop.search("results/yeast", image_id="images/AAC1/AAC1_1_rfp_10_gfp", k=5)   # a DataFrame
    res = msnoop.knn("results/yeast", "Metadata_protein", cv="group:Metadata_field")     # res.balanced_accuracy
    print(msnoop.info("results/yeast"))                          # rows, channels, model, preprocessing

Everything here is a thin layer over the stages (:mod:`msnoop.models`, :mod:`msnoop.embed`,
:mod:`msnoop.job_kinds`, :mod:`msnoop.query`, :mod:`msnoop.evaluate.knn`, :mod:`msnoop.store.anndata`); the CLI
calls the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from pydantic import BaseModel

    from msnoop.evaluate.knn import KnnResult
    from msnoop.models.checkpoint import LoadedModel
    from msnoop.query.info import TableInfo


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


#: The smallest side of a plane ``embed_images`` takes as an image: a narrower "plane" is almost always a
#: channel axis read as a side (an ``(H, W, C)`` image given without ``channel_axis``).
MIN_SIDE = 4

_LAYOUTS = (
    "accepted layouts: an (N, H, W) array of one-channel images (channel_axis=None; an (H, W) array is one image); "
    "an (N, C, H, W) array with "
    "channel_axis=1; an (N, H, W, C) array with channel_axis=-1 (or 3); a list of (H, W) arrays (channel_axis=None) "
    "or of per-image arrays with the channel axis within one image, e.g. (C, H, W) with channel_axis=0"
)


def embed_images(
    images: np.ndarray | Sequence[np.ndarray],
    *,
    channel_axis: int | None = None,
    model: LoadedModel | str | Path = "default",
    batch_size: int | str = "auto",
    device: str = "auto",
) -> np.ndarray:
    """Embed in-memory images: every channel as its own one-channel image, channel vectors concatenated.

    Args:
        images: An ``(N, C, H, W)`` / ``(N, H, W, C)`` array (say which axis is the channel with
            ``channel_axis``), an ``(N, H, W)`` array of one-channel images (``channel_axis=None``), or a
            sequence of per-image arrays of that layout (sizes may differ between images). Any integer, float or
            boolean dtype; intensities are normalised per channel (1st/99th percentiles, Microsnoop).
        channel_axis: Axis of the channel in each image *including* the leading image axis for an array
            (``1`` for ``(N, C, H, W)``, ``-1`` or ``3`` for ``(N, H, W, C)``); for a sequence, the axis within
            one image (``0`` for ``(C, H, W)``). ``None``: one channel. Must lie in ``[-ndim, ndim)``.
        model: A loaded model (:func:`load_model`) or a reference for it.
        batch_size: One-channel tiles per forward pass, or ``"auto"``: 64 on a GPU, on a CPU as many as fit its
            caches (:meth:`msnoop.core.runtime.InferenceSettings.tiles_per_batch`).
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda[:i]"``.

    Returns:
        ``(N, C * D)`` float32 (``D`` = 256 for the default model): Microsnoop's readout, each channel block
        L2-normalised, in channel order. An empty batch (``N = 0``) gives ``(0, C * D)``.

    Raises:
        ValueError: The layout is ambiguous or impossible (wrong number of dimensions for ``channel_axis``, an axis
            out of range, a plane with a side under :data:`MIN_SIDE` pixels, e.g. an ``(H, W, 3)`` image given
            without ``channel_axis``), images of one batch have different numbers of channels, a dtype is not
            numeric, an image has non-finite values or is constant; the message says which shapes are accepted.
    """
    from msnoop.embed.embedder import Embedder
    from msnoop.io.readers import check_image

    loaded = load_model(model) if isinstance(model, str | Path) else model
    per_image, n_channels = _split_channels(images, channel_axis)
    for i, channels in enumerate(per_image):
        for c, ch in enumerate(channels):
            check_image(np.asarray(ch, dtype=np.float32), f"image {i} channel {c}")
    embedder = Embedder(loaded, batch_size=batch_size, device=device)
    if not per_image:
        return np.zeros((0, n_channels * embedder.embed_dim), dtype=np.float32)
    return embedder.embed_images([[np.asarray(ch, dtype=np.float32) for ch in channels] for channels in per_image])


def _axis(channel_axis: int, ndim: int, what: str) -> int:
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"channel_axis={channel_axis} is out of range for {what} ({ndim} axes: -{ndim} to {ndim - 1})")
    return channel_axis % ndim


def _check_planes(shape: tuple[int, ...], what: str, channel_axis: int | None) -> None:
    """Each plane of an image must be an image: both sides at least :data:`MIN_SIDE`."""
    h, w = shape[-2:]
    if min(h, w) < MIN_SIDE:
        hint = (
            "an (H, W, C) image? give a batch axis and channel_axis=-1"
            if channel_axis is None
            else f"is channel_axis={channel_axis} the channel axis?"
        )
        raise ValueError(
            f"{what}: planes of {h} x {w} px are not images (a side under {MIN_SIDE} px; {hint}); {_LAYOUTS}"
        )


def _split_channels(
    images: np.ndarray | Sequence[np.ndarray], channel_axis: int | None
) -> tuple[list[list[np.ndarray]], int]:
    """``(per image, its [H, W] channels; the number of channels C)``, or a ``ValueError`` naming the layouts."""
    if isinstance(images, np.ndarray):
        if images.dtype.kind not in "uifb":
            raise ValueError(f"expected a numeric array, found dtype {images.dtype}")
        if channel_axis is None:
            if images.ndim == 2:  # one (H, W) image
                images = images[None]
            if images.ndim != 3:
                raise ValueError(f"found an array of shape {images.shape} without channel_axis; {_LAYOUTS}")
            if len(images):
                _check_planes(images.shape, f"an array of shape {images.shape} read as (N, H, W)", None)
            return [[im] for im in images], 1
        if images.ndim != 4:
            raise ValueError(f"found an array of shape {images.shape} with channel_axis={channel_axis}; {_LAYOUTS}")
        axis = _axis(channel_axis, 4, f"an array of shape {images.shape}")
        if axis == 0:
            raise ValueError(f"channel_axis={channel_axis} is the image axis of an (N, ...) array; {_LAYOUTS}")
        stacked = np.moveaxis(images, axis, 1)
        if len(images):
            _check_planes(stacked.shape, f"an array of shape {images.shape} with channel_axis={channel_axis}", axis)
        return [list(im) for im in stacked], int(stacked.shape[1])
    out = []
    counts = set()
    for i, im in enumerate(images):
        im = np.asarray(im)
        if im.dtype.kind not in "uifb":
            raise ValueError(f"image {i}: expected a numeric array, found dtype {im.dtype}")
        want = 2 if channel_axis is None else 3
        if im.ndim != want:
            raise ValueError(
                f"image {i}: found shape {im.shape}, expected {want} axes"
                + (" (H, W) without channel_axis" if channel_axis is None else f" with channel_axis={channel_axis}")
                + f"; {_LAYOUTS}"
            )
        if channel_axis is not None:
            im = np.moveaxis(im, _axis(channel_axis, 3, f"image {i} of shape {im.shape}"), 0)
        _check_planes(im.shape, f"image {i} of shape {im.shape}", channel_axis)
        out.append([im] if channel_axis is None else list(im))
        counts.add(len(out[-1]))
    if len(counts) > 1:
        raise ValueError(
            f"images have different numbers of channels ({sorted(counts)}); one batch has one channel list"
        )
    if not out and channel_axis is not None:
        raise ValueError(
            "an empty list with channel_axis: the number of channels is unknown; give an (0, C, H, W) array instead"
        )
    return out, counts.pop() if counts else 1


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
    """An embedding or profile table as AnnData (see :func:`msnoop.store.anndata.to_anndata`): ``X`` the vectors
    as stored, ``obsm["X_msnoop"]`` the vectors msnoop compares (``scanpy.pp.neighbors(adata, use_rep="X_msnoop")``).
    """
    from msnoop.store.anndata import to_anndata as _to_anndata

    return _to_anndata(table, path)


def search(
    table: str | Path,
    *,
    image_id: str | None = None,
    image: Sequence[str | Path] | None = None,
    match: str | None = None,
    k: int = 10,
    where: str | None = None,
    table_name: str | None = None,
) -> pd.DataFrame:
    """The ``k`` nearest rows (cosine distance) to an image of the table, a new image, or a group of rows.

    Args:
        table: An output folder (embed or profile), a folder inside one (``cells/``, ``lancedb/``), a ``.lance``
            table, or a LanceDB URI with ``table_name``.
        image_id: Query by a row of the table (``Metadata_ImageID``); the row itself is left out.
        image: Query by a new image: one file per channel, in the table's channel order (embedded with the
            table's recorded model and preprocessing).
        match: Query by the mean of the rows this SQL filter selects (they are left out), e.g.
            ``"Metadata_Compound = 'taxol'"``.
        k: Rows to return.
        where: SQL filter on the candidates, e.g. ``"Metadata_Plate = 'P1'"``.
        table_name: A table inside a LanceDB URI.

    Returns:
        ``k`` rows (fewer if fewer match), nearest first: the table's metadata columns and ``_distance``
        (cosine distance, ``1 - cos``).

    Raises:
        ValueError: Not exactly one of ``image_id``, ``image``, ``match``; ``k < 1``; an invalid filter; or a
            folder without a LanceDB table.
        KeyError: ``image_id`` or ``match`` selects no row.
    """
    from msnoop.query.search import open_results, search_by_id, search_by_match, search_image

    if sum([image_id is not None, bool(image), match is not None]) != 1:
        raise ValueError("give exactly one of image_id, image or match")
    if k < 1:
        raise ValueError(f"k must be at least 1, found {k}")
    ref = open_results(table, table_name)
    if image_id is not None:
        return search_by_id(ref, image_id, k=k, where=where)
    if match is not None:
        return search_by_match(ref, match, k=k, where=where)
    return search_image(ref, list(image or []), k=k, where=where)


def knn(
    table: str | Path | pd.DataFrame,
    label: str,
    *,
    k: int = 11,
    cv: str = "loo",
    metric: str = "cosine",
    exclude: str | None = None,
    postprocess: str | None = None,
) -> KnnResult:
    """kNN classification of a table's rows by ``label`` (Microsnoop vote), as ``msnoop knn`` computes it.

    Args:
        table: Any table msnoop writes or reads (an output folder, ``cells/``, a ``.lance`` table, Parquet/CSV), or
            a DataFrame of ``Metadata_*`` and feature columns.
        label: The class column, e.g. ``"Metadata_protein"``.
        k: Neighbours.
        cv: ``"loo"``, ``"kfold:<n>"`` or ``"group:<column>"`` (leave one group out, e.g. the field or plate).
        metric: ``"cosine"`` or ``"l2"``.
        exclude: SQL condition of rows to leave out first.
        postprocess: ``"standardize"`` or ``"raw"``; None: the table's own.

    Returns:
        A :class:`~msnoop.evaluate.knn.KnnResult`: ``.accuracy``, ``.balanced_accuracy``, ``.per_class`` (a
        DataFrame), ``.metrics`` (everything, JSON-serialisable); ``print()`` shows the summary.

    Raises:
        FileNotFoundError: ``table`` does not exist.
        ValueError: As :func:`msnoop.evaluate.knn.knn_table`.
    """
    from msnoop.evaluate.knn import knn_table

    return knn_table(table, label, k=k, cv=cv, metric=metric, exclude=exclude, postprocess=postprocess)  # type: ignore[arg-type]


def info(table: str | Path, table_name: str | None = None) -> TableInfo:
    """What a table holds and how it was made (rows, dimensions, channels, model, preprocessing, correction).

    Args:
        table: Any table msnoop writes (see :func:`msnoop.query.info.describe`), or a LanceDB URI with ``table_name``.
        table_name: A table inside a LanceDB URI.

    Returns:
        A :class:`~msnoop.query.info.TableInfo`; ``print()`` shows what ``msnoop info`` prints.

    Raises:
        FileNotFoundError: ``table`` does not exist.
        ValueError: ``table`` holds no table msnoop can read.
    """
    from msnoop.query.info import describe

    return describe(table, table_name)


__all__ = ["embed_images", "info", "knn", "load_model", "run", "search", "to_anndata"]
