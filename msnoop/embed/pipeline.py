"""The streaming embedding job: manifest -> read/decode -> preprocess -> embed -> write, on Ray Data.

Stages (all lazy, streamed block by block with bounded memory):

1. ``read_and_prepare`` (CPU tasks): read every channel file of every image, check it (finite, not
   constant, channel shapes agree) and turn each channel into normalised input tiles. A bad image
   becomes a row with an ``error`` instead of tiles (or raises, in strict mode).
2. ``EmbedActor`` (actor pool, one GPU per actor where GPUs exist): embeds all tiles of the block in
   batches, averages tiles per channel and concatenates channels.
3. ``write_block`` (CPU tasks): writes the block's embeddings and errors as new Parquet parts and
   returns only counts, so the driver never holds embeddings.

Metadata never passes through Ray Data's per-block type inference: blocks carry each image's id, paths
and row position; ``write_block`` takes the metadata from the run's Arrow table (one object in the
object store) and writes every part with the run's one schema (:func:`output_schemas`), fixed from the
whole manifest before any work and saved in ``run.json`` (``metadata_schema``). At the end every id of
the manifest must be in ``embeddings/`` or ``errors/`` exactly once (:func:`check_totals`).

Afterwards the LanceDB table is rebuilt from the Parquet parts (streamed).

**Cells mode** (config section ``cells:``, Microsnoop's full-field pipeline, ANCHORS 1.6): stage 1
segments the nucleus channel, crops every cell with the same window in all channels
(:func:`msnoop.preprocess.crop.crop_cells`, zero-padded to the input size) and normalises each crop
channel like the ``native`` preset (normalize99 after padding); the tiles of an image are its cells,
cell-major then channel-major. Stage 2 embeds each cell (channels concatenated) and averages the cells
of each image. Stage 3 writes one row per cell to ``<out>/cells/`` and the per-image mean, with
``Metadata_CellCount``, to ``<out>/embeddings/``. The cells part of a block is written before its
embeddings part; a cells part whose images are not all finished (a run killed in between) is removed
at the next start, so resuming never duplicates cells.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from msnoop.config import EmbedJob, config_hash, save_resolved
from msnoop.io.manifest import ID_COLUMN, PATH_PREFIX, load_image_table, metadata_arrow, table_schema
from msnoop.io.readers import ImageReadError, check_image, read_channels, read_labels
from msnoop.preprocess.presets import Preprocessing, prepare_channel
from msnoop.store import parts
from msnoop.store.lance import build_table

if TYPE_CHECKING:
    from msnoop.models.checkpoint import LoadedModel

# torch-dependent modules (embedder, checkpoint) are imported inside the functions that need them:
# read and write tasks start many worker processes, and importing torch costs each ~1.5 s of CPU.

logger = logging.getLogger(__name__)

CELLS = "cells"  # <out>/cells/part-*.parquet: one row per cell (cells mode)
MASKS = "masks"  # <out>/masks/<image id>.tif: label masks (cells.save_masks)
CELL_COLUMNS = ["Metadata_CellID", "Metadata_CentroidY", "Metadata_CentroidX", "Metadata_Area"]
CELL_COUNT = "Metadata_CellCount"  # cells averaged into the image vector
CELLS_FOUND = "Metadata_CellsFound"  # cells kept by cropping (before max_cells_per_image)
ROW = "_row"  # position of an image in this run's metadata table (metadata never travels through Ray)


class StrictModeError(RuntimeError):
    """Raised in strict mode at the first bad image; the message is the image's error."""


@dataclass
class EmbedResult:
    out_dir: Path
    n_input: int
    n_skipped: int
    n_embedded: int
    n_errors: int
    n_rows_total: int
    n_errors_total: int
    seconds: float
    table: str | None
    errors_preview: list[tuple[str, str]]
    n_cells: int = 0  # cells embedded by this run (cells mode)
    n_cells_total: int = 0  # rows of <out>/cells/ (cells mode)

    @property
    def images_per_s(self) -> float:
        return (self.n_embedded + self.n_errors) / self.seconds if self.seconds > 0 else 0.0

    @property
    def cells_per_s(self) -> float:
        return self.n_cells / self.seconds if self.seconds > 0 else 0.0


def load_image(
    row: pd.Series,
    channels: list[str],
    *,
    selectors: dict[str, int | str | None] | None = None,
    z: Any = "refuse",
) -> list[np.ndarray]:
    """Read and check all channels of one image row; raises ImageReadError naming the file.

    Args:
        row: An image-table row (``Metadata_Path_<ch>`` per channel).
        channels: Channel names, in embedding order.
        selectors: Per channel, the plane of a multi-channel file (index or OME channel name); None =
            the file holds the one channel (see :func:`msnoop.io.readers.select_plane`).
        z: The ``input.z`` policy for z-stacks and time series.
    """
    selectors = selectors or {}
    by_path: dict[str, list[str]] = {}
    for ch in channels:
        path = row[f"{PATH_PREFIX}{ch}"]
        if not isinstance(path, str) or not path:
            raise ImageReadError(row[ID_COLUMN], f"no file for channel {ch!r}")
        by_path.setdefault(path, []).append(ch)
    planes: dict[str, np.ndarray] = {}
    for path, chans in by_path.items():  # a file holding several channels is decoded once
        for ch, img in zip(chans, read_channels(path, [selectors.get(ch) for ch in chans], z=z), strict=True):
            check_image(img, path if selectors.get(ch) is None else f"{path} [channel {selectors[ch]!r}]")
            planes[ch] = img
    images = [planes[ch] for ch in channels]
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        found = ", ".join(f"{ch}={im.shape}" for ch, im in zip(channels, images, strict=True))
        raise ImageReadError(row[f"{PATH_PREFIX}{channels[0]}"], f"channels differ in shape: {found}")
    return images


def channel_selectors(cfg: EmbedJob) -> dict[str, int | str | None]:
    """Plane of each channel in multi-channel files: ``input.channel_index``, OME names, or None (one per file)."""
    inp = cfg.input
    if inp.channel_index is not None:
        return {ch: int(inp.channel_index[ch]) for ch in inp.channels}
    if inp.channel_names or inp.ome_zarr is not None:
        return {ch: ch for ch in inp.channels}
    return {ch: None for ch in inp.channels}


def _mask_path(masks_dir: str | Path, image_id: str) -> Path:
    """``<masks_dir>/<image id>.tif``; the id's folders are kept, odd characters become ``_``."""
    parts_ = [re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in str(image_id).replace("\\", "/").split("/")]
    parts_ = [p for p in parts_ if p not in ("", ".", "..")] or ["image"]
    return Path(masks_dir).joinpath(*parts_[:-1], parts_[-1] + ".tif")


def _save_mask(labels: np.ndarray, path: Path) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if labels.max(initial=0) < 2**16 else np.uint32
    tmp = path.with_name(f".{path.name}.tmp")
    tifffile.imwrite(tmp, labels.astype(dtype, copy=False), compression="zlib")
    os.replace(tmp, path)


def _subset_seed(seed: int, image_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(str(image_id).encode())])


def prepare_cells(
    images: list[np.ndarray],
    image_id: str,
    *,
    cells: dict[str, Any],
    pre: Preprocessing,
    path: str,
    masks_dir: str | None = None,
    mask_path: str | None = None,
) -> tuple[np.ndarray, pd.DataFrame, int]:
    """Cells mode for one image: segment, crop every cell in all channels, normalise each crop channel.

    Args:
        images: The image's ``[H, W]`` channels, in ``input.channels`` order.
        image_id: Its id (seeds the ``max_cells_per_image`` subset, names the mask file).
        cells: ``CellsConfig.model_dump()`` plus ``channels`` and ``nucleus_channel``.
        pre: The job's preprocessing (``native`` mode): crop side and normalisation.
        path: The nucleus channel's file, for messages.
        masks_dir: Where to write the label mask, or None.
        mask_path: The image's existing label mask (segmentation backend ``mask``): read instead of segmenting.

    Returns:
        ``(tiles [N * C, S, S] float32`` (cell-major, channel-major), the crop table of the N embedded cells
        (:func:`~msnoop.preprocess.crop.crop_windows` columns), cells found before subsetting``)``.

    Raises:
        ImageReadError: Segmentation failed, the mask does not match the image, or (``empty='error'``) no
            cell was found.
    """
    from msnoop.preprocess.crop import crop_cells, crop_windows
    from msnoop.segment import SegmentationConfig

    seg = SegmentationConfig(**cells["segmentation"])
    nucleus = cells["nucleus_channel"]
    nuc_index = list(cells["channels"]).index(nucleus)
    size = pre.input_size
    if seg.backend == "mask":
        if not mask_path:
            raise ImageReadError(path, f"no mask file in column {seg.column!r} (segmentation backend 'mask')")
        labels = read_labels(mask_path)
        path = mask_path if labels.shape != images[nuc_index].shape else path
    else:
        try:
            labels = np.asarray(seg.run(images[nuc_index]))
        except (ValueError, RuntimeError) as exc:
            raise ImageReadError(path, f"segmentation of channel {nucleus!r} failed: {exc}") from exc
    if labels.shape != images[nuc_index].shape:
        raise ImageReadError(
            path, f"segmentation mask has shape {labels.shape} but the image is {images[nuc_index].shape}"
        )
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ImageReadError(
            path, f"segmentation returned a {labels.ndim}-D {labels.dtype} array, not an integer label image"
        )
    if masks_dir:
        _save_mask(labels, _mask_path(masks_dir, image_id))
    stack = np.stack(images)
    opts = {"ratio": cells["ratio"], "size": size, "skip_border": cells["skip_border"]}
    windows = crop_windows(labels, **opts)
    found = len(windows)
    limit = cells.get("max_cells_per_image")
    if limit is not None and found > limit:
        rng = _subset_seed(cells.get("seed", 0), image_id)
        keep = rng.choice(windows["cell_id"].to_numpy(), size=limit, replace=False)
        labels = np.where(np.isin(labels, keep), labels, 0)  # windows depend on each cell alone: same crops
    try:
        crops, table = crop_cells(stack, labels, **opts)
    except ValueError as exc:
        raise ImageReadError(path, f"cropping cells failed: {exc}") from exc
    if not len(table) and cells["empty"] == "error":
        n_nuclei = int(np.count_nonzero(np.unique(labels)))
        why = (
            f"all {n_nuclei} touch the image border (cells.skip_border)"
            if n_nuclei and cells["skip_border"]
            else "none could be cropped"
            if n_nuclei
            else "segmentation found no nucleus"
        )
        raise ImageReadError(
            path,
            f"no cell to embed: {why} in channel {nucleus!r} (set cells.empty: zero to write a zero vector instead)",
        )
    native = pre if pre.mode == "native" else pre.model_copy(update={"mode": "native"})
    tiles = np.empty((crops.shape[0] * crops.shape[1], size, size), dtype=np.float32)
    for k, crop in enumerate(crops.reshape(-1, size, size)):
        tiles[k] = prepare_channel(crop, native)[0]
    return tiles, table, found


def read_and_prepare(
    batch: pd.DataFrame,
    *,
    channels: list[str],
    spec: dict[str, Any],
    strict: bool,
    cells: dict[str, Any] | None = None,
    masks_dir: str | None = None,
    selectors: dict[str, int | str | None] | None = None,
    z: Any = "refuse",
) -> dict[str, Any]:
    """Stage 1: image rows -> tiles per image (variable count), tile counts per channel, errors.

    ``selectors`` and ``z`` say how multi-plane files are read (see :func:`load_image`).

    In cells mode (``cells`` given: ``CellsConfig.model_dump()`` plus ``channels`` and
    ``nucleus_channel``) the tiles are the image's cell crops (see :func:`prepare_cells`), and the
    output also has ``cell_table`` (per image ``[N, 4]`` float64: cell id, centroid y, centroid x, area),
    ``Metadata_CellCount`` and ``Metadata_CellsFound``.
    """
    pre = Preprocessing(**spec)
    size = pre.input_size
    tiles: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    errors: list[str] = []
    cell_tables: list[np.ndarray] = []
    found: list[int] = []
    for _, row in batch.iterrows():
        try:
            images = load_image(row, channels, selectors=selectors, z=z)
            if cells is None:
                per_channel = [prepare_channel(im, pre) for im in images]
                tiles.append(np.concatenate(per_channel))
                counts.append(np.array([len(t) for t in per_channel], dtype=np.int64))
            else:
                nuc_path = str(row[f"{PATH_PREFIX}{cells['nucleus_channel']}"])
                mask_col = cells.get("mask_column")
                cell_tiles, table, n_found = prepare_cells(
                    images,
                    str(row[ID_COLUMN]),
                    cells=cells,
                    pre=pre,
                    path=nuc_path,
                    masks_dir=masks_dir,
                    mask_path=(row[mask_col] or None) if mask_col else None,
                )
                tiles.append(cell_tiles)
                counts.append(np.full(len(channels), len(table), dtype=np.int64))
                cell_tables.append(
                    table[["cell_id", "centroid_y", "centroid_x", "area"]].to_numpy(dtype=np.float64).reshape(-1, 4)
                )
                found.append(n_found)
            errors.append("")
        except ImageReadError as exc:
            if strict:
                raise StrictModeError(str(exc)) from exc
            tiles.append(np.zeros((0, size, size), dtype=np.float32))
            counts.append(np.zeros(len(channels), dtype=np.int64))
            errors.append(str(exc))
            cell_tables.append(np.zeros((0, 4), dtype=np.float64))
            found.append(0)
    out: dict[str, Any] = {c: batch[c].to_numpy() for c in batch.columns}
    out["tiles"] = _ragged(tiles)
    out["counts"] = np.stack(counts) if counts else np.zeros((0, len(channels)), dtype=np.int64)
    out["error"] = np.array(errors, dtype=object)
    if cells is not None:
        out["cell_table"] = _ragged(cell_tables)
        out[CELL_COUNT] = np.array([len(t) for t in cell_tables], dtype=np.int64)
        out[CELLS_FOUND] = np.array(found, dtype=np.int64)
    return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    obj = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        obj[i] = a
    return obj


class EmbedActor:
    """Stage 2 (callable class for the actor pool): tiles -> per-image embedding.

    With ``cells=True`` every ``C`` consecutive tiles of an image are one cell: the output also has
    ``cell_embedding`` (per image ``[N, C * D]``) and ``embedding`` is the mean over the image's cells
    (zeros for an image without cells).
    """

    def __init__(
        self,
        model: Any,
        *,
        batch_size: int,
        device: str,
        torch_threads: int | None,
        cells: bool = False,
        amp: str = "cuda",
    ) -> None:
        if device == "cpu" and "torch" not in sys.modules:
            # OpenMP threads that spin while they wait lose their core to every other process on a small
            # machine, so they sleep instead (libgomp reads this when torch loads, hence before the import)
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import ray
        import torch

        from msnoop.embed.embedder import Embedder

        self.cells = cells

        if torch_threads:
            torch.set_num_threads(torch_threads)
        loaded: LoadedModel = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.embedder = Embedder(loaded, batch_size=batch_size, device=device, amp=amp)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        tiles = batch.pop("tiles")
        counts = batch["counts"]
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        n_channels = counts.shape[1] if counts.ndim == 2 else 0
        dim = self.embedder.embed_dim * n_channels
        emb = np.zeros((len(ok), dim), dtype=np.float32)
        if self.cells:
            return self._cells(batch, tiles, ok, emb)
        if ok.any():
            stacked = np.concatenate([np.asarray(tiles[i], dtype=np.float32) for i in np.flatnonzero(ok)])
            tile_emb = self.embedder.embed_tiles(stacked)
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
            stacked = np.concatenate([np.asarray(tiles[i], dtype=np.float32) for i in todo])
            # one row per cell: its C channel embeddings concatenated (tiles are cell-major, channel-major)
            per_cell = self.embedder.embed_tiles(stacked).reshape(-1, dim)
            pos = 0
            for i in todo:
                cell_emb[i] = per_cell[pos : pos + n_cells[i]]
                emb[i] = cell_emb[i].mean(axis=0, dtype=np.float64)
                pos += n_cells[i]
        batch["embedding"] = emb
        batch["cell_embedding"] = _ragged(cell_emb)
        return batch


CELL_FIELDS = [
    pa.field("Metadata_CellID", pa.int64()),
    pa.field("Metadata_CentroidY", pa.float64()),
    pa.field("Metadata_CentroidX", pa.float64()),
    pa.field("Metadata_Area", pa.int64()),
]


def output_schemas(meta: pa.Schema, dim: int, cells: bool) -> tuple[pa.Schema, pa.Schema | None]:
    """The Parquet schemas of ``embeddings/`` and (cells mode) ``cells/`` parts: every part is written with them.

    ``embeddings``: the run's metadata schema (+ ``Metadata_CellCount``, ``Metadata_CellsFound`` int64 in
    cells mode) + ``emb_0000 ... emb_<dim-1>`` float32. ``cells``: metadata + cell id, centroid y/x, area
    + ``emb_*``.
    """
    emb = [pa.field(c, pa.float32()) for c in parts.emb_columns(dim)]
    if not cells:
        return pa.schema([*meta, *emb]), None
    counts = [pa.field(CELL_COUNT, pa.int64()), pa.field(CELLS_FOUND, pa.int64())]
    return pa.schema([*meta, *counts, *emb]), pa.schema([*meta, *CELL_FIELDS, *emb])


def _with_embeddings(meta: pa.Table, extra: dict[str, np.ndarray], emb: np.ndarray, schema: pa.Schema) -> pa.Table:
    """``meta`` + ``extra`` columns + embedding columns, as exactly ``schema``."""
    arrays = [meta.column(f.name) for f in schema if f.name in meta.column_names]
    arrays += [pa.array(extra[f.name], type=f.type) for f in schema if f.name in extra]
    arrays += [pa.array(emb[:, i].astype(np.float32, copy=False)) for i in range(emb.shape[1])]
    return pa.Table.from_arrays(arrays, schema=schema)


def _cells_table(
    meta: pa.Table, rows: np.ndarray, batch: dict[str, Any], ok: np.ndarray, schema: pa.Schema
) -> pa.Table | None:
    """One row per cell of the block's good images: image metadata + cell columns + ``emb_*``."""
    take: list[int] = []
    tables: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    for i in np.flatnonzero(ok):
        t = np.asarray(batch["cell_table"][i], dtype=np.float64).reshape(-1, 4)
        if len(t):
            take.extend([int(rows[i])] * len(t))
            tables.append(t)
            embs.append(np.asarray(batch["cell_embedding"][i], dtype=np.float32))
    if not take:
        return None
    t = np.concatenate(tables)
    extra = {
        "Metadata_CellID": t[:, 0].astype(np.int64),
        "Metadata_CentroidY": t[:, 1],
        "Metadata_CentroidX": t[:, 2],
        "Metadata_Area": t[:, 3].astype(np.int64),
    }
    return _with_embeddings(meta.take(pa.array(take)), extra, np.concatenate(embs), schema)


def write_block(
    batch: dict[str, Any],
    *,
    out_dir: str,
    channels: list[str],
    cells: bool = False,
    meta: Any,
    schema: pa.Schema,
    cells_schema: pa.Schema | None = None,
) -> dict[str, Any]:
    """Stage 3: write the block's embeddings and errors as Parquet parts; return counts only.

    Metadata comes from ``meta`` (the run's metadata as an Arrow table with the run's schema, or its Ray
    object ref), looked up by each row's ``_row``: values and types are the manifest's, whatever Ray
    made of the block. Every part is written with ``schema`` / ``cells_schema`` (:func:`output_schemas`)
    and errors with :data:`msnoop.store.parts.ERRORS_SCHEMA`.

    In cells mode the block's cells are written first (``<out>/cells/``), then the image means, so a
    finished image always has its cells on disk (see :func:`_drop_orphan_cells` for the other case).
    """
    if not isinstance(meta, pa.Table):
        import ray

        meta = ray.get(meta)
    error = batch["error"]
    ok = np.array([e == "" for e in error], dtype=bool)
    rows = np.asarray(batch[ROW], dtype=np.int64)
    n_cells = 0
    if cells and ok.any():
        assert cells_schema is not None
        cell_table = _cells_table(meta, rows, batch, ok, cells_schema)
        if cell_table is not None:
            parts.write_part(cell_table, Path(out_dir) / CELLS)
            n_cells = cell_table.num_rows
    if ok.any():
        extra = {c: np.asarray(batch[c], dtype=np.int64)[ok] for c in (CELL_COUNT, CELLS_FOUND)} if cells else {}
        table = _with_embeddings(meta.take(pa.array(rows[ok])), extra, np.asarray(batch["embedding"])[ok], schema)
        parts.write_part(table, Path(out_dir) / parts.EMBEDDINGS)
    if (~ok).any():
        bad = meta.take(pa.array(rows[~ok])).to_pydict()
        paths = [
            ";".join(
                "" if bad[f"{PATH_PREFIX}{ch}"][i] is None else str(bad[f"{PATH_PREFIX}{ch}"][i]) for ch in channels
            )
            for i in range(int((~ok).sum()))
        ]
        err = pa.Table.from_pydict(
            {ID_COLUMN: [str(v) for v in bad[ID_COLUMN]], "path": paths, "reason": [str(e) for e in error[~ok]]},
            schema=parts.ERRORS_SCHEMA,
        )
        parts.write_part(err, Path(out_dir) / parts.ERRORS)
    return {"n_ok": np.array([int(ok.sum())]), "n_err": np.array([int((~ok).sum())]), "n_cells": np.array([n_cells])}


def _drop_orphan_cells(out_dir: Path, finished: set[str]) -> int:
    """Remove cells parts holding an image whose mean was never written (a run killed mid-block).

    Each block writes its cells part before its embeddings part, with the same image ids, so such a
    part's images are all redone by this run; keeping the part would duplicate their cells.
    """
    removed = 0
    for f in parts.part_files(out_dir / CELLS):
        ids = set(pd.read_parquet(f, columns=[ID_COLUMN])[ID_COLUMN].astype(str))
        if not ids <= finished:
            logger.warning("removing %s: its images have no image-level row yet and will be embedded again", f.name)
            f.unlink()
            removed += 1
    return removed


def _cells_spec(cfg: EmbedJob) -> dict[str, Any] | None:
    if cfg.cells is None:
        return None
    spec = cfg.cells.model_dump(mode="json")
    return {
        **spec,
        "channels": list(cfg.input.channels),
        "nucleus_channel": cfg.nucleus_channel,
        "mask_column": cfg.cells.segmentation.mask_column,
    }


def _resources(cfg: EmbedJob) -> tuple[bool, dict[str, Any]]:
    import ray

    total_gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = cfg.runtime.use_gpu == "yes" or (cfg.runtime.use_gpu == "auto" and total_gpus > 0)
    if cfg.runtime.use_gpu == "yes" and total_gpus == 0:
        raise RuntimeError("runtime.use_gpu is 'yes' but the Ray cluster has no GPU; set it to 'auto' or 'no'")
    total_cpus = ray.cluster_resources().get("CPU", 1)
    cpus = cfg.runtime.actor_cpus or (1.0 if use_gpu else min(0.5, total_cpus / 4))
    res: dict[str, Any] = {"num_cpus": cpus}
    if use_gpu:
        res["num_gpus"] = 1
    return use_gpu, res


def run_info(cfg: EmbedJob, model: LoadedModel, spec: Preprocessing) -> dict[str, Any]:
    from msnoop.runtime import provenance

    info: dict[str, Any] = {
        "job": "embed",
        "name": cfg.name,
        "table": cfg.table_name,
        "lancedb": cfg.lancedb_uri,
        "model": cfg.model,
        "model_source": model.source,
        "model_sha256": model.sha256,
        "arch": model.arch,
        "preprocess": spec.model_dump(),
        "amp": cfg.runtime.amp,  # bf16 autocast setting; rows differ from float32 ones by bf16 rounding only
        "channels": list(cfg.input.channels),
        "embed_dim_per_channel": int(model.net.embed_dim),  # type: ignore[arg-type]
        "embed_dim": int(model.net.embed_dim) * len(cfg.input.channels),  # type: ignore[arg-type]
        "config_hash": config_hash(cfg),
        "provenance": provenance(),
    }
    if cfg.cells is not None:
        info["cells"] = {**cfg.cells.model_dump(mode="json"), "nucleus_channel": cfg.nucleus_channel}
    return info


def prepare_model(cfg: EmbedJob) -> tuple[LoadedModel, Preprocessing]:
    """Resolve the model and the preprocessing the job will use.

    A checkpoint's preset and input size fill in what the job leaves unset and refuse a different one.
    """
    from msnoop.models.checkpoint import reconcile_preprocess, resolve_model

    model = resolve_model(cfg.model)  # a checkpoint comes back with its stored preprocessing
    spec = cfg.preprocess.resolve(model.preprocess if model.sha256 else None)
    if model.sha256:
        spec = reconcile_preprocess(model.preprocess, spec, source=model.source)
    model.preprocess = spec
    return model, spec


def run_embed(cfg: EmbedJob) -> EmbedResult:
    """Run an embedding job end to end; resumable (ids already written are skipped)."""
    import ray

    from msnoop.runtime import init_ray, provenance

    t0 = time.perf_counter()
    out_dir = Path(cfg.output.dir)
    model, spec = prepare_model(cfg)
    table = load_image_table(cfg.input)
    mask_col = cfg.cells.segmentation.mask_column if cfg.cells is not None else None
    if mask_col is not None:
        table = _resolve_mask_column(table, mask_col, cfg)
    channels = list(cfg.input.channels)
    info = run_info(cfg, model, spec)
    meta_schema = table_schema(table)  # one schema for the whole run, fixed before any work
    info["metadata_schema"] = parts.schema_to_json(meta_schema)
    try:
        _check_resumable(cfg, out_dir, info)
        meta_schema = _resumed_schema(out_dir, meta_schema)
    except OutputMismatchError as exc:
        if cfg.output.on_mismatch != "replace":
            raise
        logger.warning("%s; output.on_mismatch is 'replace': removing them and embedding again", exc)
        for sub in (parts.EMBEDDINGS, parts.ERRORS, CELLS, MASKS):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    info["metadata_schema"] = parts.schema_to_json(meta_schema)
    schema, cells_schema = output_schemas(meta_schema, info["embed_dim"], cfg.cells is not None)
    if cfg.runtime.retry_errors:
        retry = parts.read_ids(out_dir / parts.ERRORS) & set(table[ID_COLUMN])
        n = parts.drop_ids(out_dir / parts.ERRORS, retry)
        if n:
            logger.info("runtime.retry_errors: %d image(s) recorded in errors/ will be embedded again", n)
    done = parts.read_ids(out_dir / parts.EMBEDDINGS) | parts.read_ids(out_dir / parts.ERRORS)
    if cfg.cells is not None:
        _drop_orphan_cells(out_dir, parts.read_ids(out_dir / parts.EMBEDDINGS))
    todo_mask = ~table[ID_COLUMN].isin(done)
    foreign = len(done) - int((~todo_mask).sum())
    if foreign:
        logger.warning(
            "%s holds %d row(s) whose ids are not in this manifest; they stay in the table. (Ids are the first "
            "channel's path relative to the manifest's folder; folders written when ids were relative to the "
            "common root of all rows hold the same images under other ids: use a new output.dir for them)",
            out_dir,
            foreign,
        )
    todo = table[todo_mask].reset_index(drop=True)
    prov = provenance()
    logger.info(
        "msnoop %s | torch %s | ray %s | device %s | config %s",
        prov["msnoop"],
        prov["torch"],
        prov["ray"],
        ", ".join(prov["gpus"]) or "cpu",
        config_hash(cfg),
    )
    logger.info(
        "%d images in %s; %d already done, %d to embed; model %s; preprocessing %s",
        len(table),
        out_dir,
        len(table) - len(todo),
        len(todo),
        model.source,
        spec.model_dump(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out_dir)
    parts.write_run_info(out_dir, info)

    cells = _cells_spec(cfg)
    masks_dir = str((out_dir / MASKS).resolve()) if cfg.cells is not None and cfg.cells.save_masks else None
    n_ok = n_err = n_cells = 0
    if len(todo):
        init_ray(
            cfg.runtime.address,
            num_cpus=cfg.runtime.num_cpus,
            object_store_memory=cfg.runtime.object_store_mb * 1024**2 if cfg.runtime.object_store_mb else None,
            quiet=not cfg.runtime.progress,
        )
        use_gpu, res = _resources(cfg)
        # Bound how far reading runs ahead of embedding: memory stays flat however many images there are.
        ctx = ray.data.DataContext.get_current()
        if not sys.stderr.isatty():
            # In logs, Ray's per-operator progress dumps every 10 s drown the job's own progress lines.
            ctx.enable_progress_bars = False
        ctx.execution_options.resource_limits = ray.data.ExecutionResources(
            object_store_memory=cfg.runtime.inflight_mb * 1024**2
        )
        # The actors request no memory (a fixed request could keep them off small machines), so Ray Data's
        # high-memory detector repeats the same advice every 30 s; once every 10 minutes is enough in a log.
        detectors = getattr(ctx, "issue_detectors_config", None)
        if detectors is not None and hasattr(detectors, "high_memory_detector_config"):
            detectors.high_memory_detector_config.detection_time_interval_s = 600
        n_cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        threads = None if use_gpu else max(1, n_cpus // cfg.runtime.actors)
        model_ref = ray.put(model)
        # Metadata stays out of Ray Data's per-block type inference: rows carry their id, paths and position
        # in the run's metadata table, which write_block looks up (values and types as in the manifest).
        meta_ref = ray.put(metadata_arrow(todo, meta_schema))
        light = todo[[ID_COLUMN, *[f"{PATH_PREFIX}{ch}" for ch in channels], *([mask_col] if mask_col else [])]]
        light = light.astype(object).where(light.notna(), "")
        light[ROW] = np.arange(len(todo), dtype=np.int64)
        block = cfg.runtime.images_per_block
        frames = [light.iloc[i : i + block] for i in range(0, len(light), block)]
        # Read/write tasks take a fraction of a CPU on small clusters, so that they and the actor pool
        # always fit together (on 1-2 CPUs, whole-CPU tasks next to an actor would wait forever).
        task_cpus = min(1.0, float(ray.cluster_resources().get("CPU", 1)) / 8)
        # Without GPUs, reading asks for what the actor asks for, so Ray Data fuses it into the actor: tiles
        # never cross processes and no reader process competes with the actor's torch threads (with the
        # sleeping OpenMP threads above, jobs/bench_embed.py's Ray / bare ratio went from 0.81 to 0.90 on
        # 2 cores). With GPUs, CPU tasks read so that the GPU actors only embed.
        read_cpus = task_cpus if use_gpu else float(res["num_cpus"])
        ds = ray.data.from_pandas(frames)
        ds = ds.map_batches(
            read_and_prepare,
            batch_format="pandas",
            batch_size=None,
            num_cpus=read_cpus,
            fn_kwargs={
                "channels": channels,
                "spec": spec.model_dump(),
                "strict": cfg.runtime.strict,
                "cells": cells,
                "masks_dir": masks_dir,
                "selectors": channel_selectors(cfg),
                "z": cfg.input.z,
            },
        )
        ds = ds.map_batches(
            EmbedActor,
            batch_size=block,
            compute=ray.data.ActorPoolStrategy(size=cfg.runtime.actors),
            fn_constructor_kwargs={
                "model": model_ref,
                "batch_size": cfg.runtime.batch_size,
                "device": "cuda" if use_gpu else "cpu",
                "torch_threads": threads,
                "cells": cells is not None,
                "amp": cfg.runtime.amp,
            },
            **res,
        )
        ds = ds.map_batches(
            write_block,
            batch_size=None,
            num_cpus=task_cpus,
            fn_kwargs={
                "out_dir": str(out_dir.resolve()),
                "channels": channels,
                "cells": cells is not None,
                "meta": meta_ref,
                "schema": schema,
                "cells_schema": cells_schema,
            },
        )
        last = time.perf_counter()
        try:
            for row in ds.iter_rows():
                n_ok += int(row["n_ok"])
                n_err += int(row["n_err"])
                n_cells += int(row["n_cells"])
                now = time.perf_counter()
                if cfg.runtime.progress and now - last > 5:
                    done_n = n_ok + n_err
                    rate = done_n / (now - t0)
                    eta = (len(todo) - done_n) / rate if rate > 0 else float("nan")
                    cell_rate = f", {n_cells / (now - t0):.3g} cells/s" if cells is not None else ""
                    logger.info(
                        "%d/%d images (%d errors), %.3g img/s%s, ETA %.0f s",
                        done_n,
                        len(todo),
                        n_err,
                        rate,
                        cell_rate,
                        eta,
                    )
                    last = now
        except Exception as exc:
            cause = _find_strict(exc)
            if cause is not None:
                raise StrictModeError(cause) from None
            raise
    info["last_run"] = {"embedded": n_ok, "errors": n_err, "seconds": time.perf_counter() - t0}
    if cfg.cells is not None:
        info["last_run"]["cells"] = n_cells
    parts.write_run_info(out_dir, info)
    n_total, n_err_total = check_totals(out_dir, table[ID_COLUMN])
    n_cells_total = parts.count_rows(out_dir / CELLS) if cfg.cells is not None else 0
    if cfg.output.write_lance:
        n_rows = build_table(
            cfg.lancedb_uri, cfg.table_name, out_dir / parts.EMBEDDINGS, dim=info["embed_dim"], info=info, schema=schema
        )
        if n_rows and cfg.output.index != "none":
            from msnoop.query.index import ensure_index
            from msnoop.store.lance import open_table

            done = ensure_index(
                open_table(cfg.lancedb_uri, cfg.table_name),
                kind=cfg.output.index,
                threshold_rows=cfg.output.index_threshold,
            )
            logger.info("vector index: %s", done)
        if cfg.cells is not None and cfg.cells.lance_cells_table:
            build_table(
                cfg.lancedb_uri,
                f"{cfg.table_name}_cells",
                out_dir / CELLS,
                dim=info["embed_dim"],
                info=info,
                schema=cells_schema,
            )
    preview: list[tuple[str, str]] = []
    if n_err_total:
        err = parts.read_frame(out_dir / parts.ERRORS, columns=[ID_COLUMN, "reason"])
        err = err[err[ID_COLUMN].isin(set(table[ID_COLUMN]))].head(5)
        preview = list(zip(err[ID_COLUMN], err["reason"], strict=True))
    return EmbedResult(
        out_dir=out_dir,
        n_input=len(table),
        n_skipped=len(table) - len(todo),
        n_embedded=n_ok,
        n_errors=n_err,
        n_rows_total=n_total,
        n_errors_total=n_err_total,
        seconds=time.perf_counter() - t0,
        table=cfg.table_name if cfg.output.write_lance else None,
        errors_preview=preview,
        n_cells=n_cells,
        n_cells_total=n_cells_total,
    )


def _resolve_mask_column(table: pd.DataFrame, column: str, cfg: EmbedJob) -> pd.DataFrame:
    """Resolve the mask-path column once, like image paths (absolute, or a URI as given).

    Raises:
        ConfigError: The column is not in the manifest.
    """
    from msnoop.config import ConfigError
    from msnoop.io.manifest import resolve_path, source_root

    if column not in table.columns:
        meta = [c for c in table.columns if c.startswith("Metadata_") and not c.startswith(PATH_PREFIX)]
        raise ConfigError(f"cells.segmentation.column: no mask column {column!r} in the manifest; columns: {meta}")
    root = source_root(cfg.input)
    return table.assign(**{column: [resolve_path(p, root) for p in table[column]]})


class TotalsError(RuntimeError):
    """The outputs do not account for every row of the manifest exactly once (a bug, never a user error)."""


def check_totals(out_dir: Path, ids: pd.Series) -> tuple[int, int]:
    """Check that every id of this run's table is in ``embeddings/`` or ``errors/``, exactly once.

    Returns:
        ``(embedded, errors)``: rows of this table's ids in each folder; they add up to ``len(ids)``.

    Raises:
        TotalsError: An id is missing, in both folders, or repeated; the message gives counts and examples.
    """
    wanted = set(ids.astype(str))
    found: dict[str, list[str]] = {}
    for folder in (parts.EMBEDDINGS, parts.ERRORS):
        found[folder] = []
        for f in parts.part_files(out_dir / folder):
            col = pq.read_table(f, columns=[ID_COLUMN]).column(ID_COLUMN).to_pylist()
            found[folder].extend(i for i in col if i in wanted)
    emb, err = found[parts.EMBEDDINGS], found[parts.ERRORS]
    problems = []
    missing = wanted - set(emb) - set(err)
    if missing:
        problems.append(f"{len(missing)} id(s) have no output row (e.g. {min(missing)!r})")
    both = set(emb) & set(err)
    if both:
        problems.append(f"{len(both)} id(s) are both embedded and in errors (e.g. {min(both)!r})")
    for name, rows in (("embeddings", emb), ("errors", err)):
        if len(rows) != len(set(rows)):
            problems.append(f"{len(rows) - len(set(rows))} repeated row(s) in {name}/")
    if problems or len(emb) + len(err) != len(wanted):
        raise TotalsError(
            f"{out_dir}: {len(emb)} embedded + {len(err)} errors != {len(wanted)} input images: " + "; ".join(problems)
        )
    return len(emb), len(err)


def _resumed_schema(out_dir: Path, new: pa.Schema) -> pa.Schema:
    """The run's schema when resuming: the stored one plus columns new to this manifest.

    Raises:
        OutputMismatchError: A column's type differs from the stored run's (one table cannot hold both).
    """
    if not parts.part_files(out_dir / parts.EMBEDDINGS) and not parts.part_files(out_dir / parts.ERRORS):
        return new
    try:
        stored = parts.read_run_info(out_dir).get("metadata_schema")
    except FileNotFoundError:
        return new
    if not stored:
        return new
    before = parts.schema_from_json(stored)
    diffs = [
        f"{f.name}: {f.type} there, {new.field(f.name).type} now"
        for f in before
        if f.name in new.names and new.field(f.name).type != f.type
    ]
    if diffs:
        raise OutputMismatchError(
            f"{out_dir} holds rows whose metadata types differ from this manifest's ({'; '.join(diffs)}): one "
            "table cannot hold both. Declare the old types in input.dtypes, use another output.dir, or set "
            "output.on_mismatch: replace"
        )
    return pa.schema([*before, *[f for f in new if f.name not in before.names]])


class OutputMismatchError(ValueError):
    """An output folder holds embeddings made by another model, preprocessing, channel list or mode."""


def _model_label(run: dict[str, Any]) -> str:
    sha = run.get("model_sha256")
    return f"{run.get('model_source')}" + (f" (sha256 {sha[:12]})" if sha else "")


def _check_resumable(cfg: EmbedJob, out_dir: Path, info: dict[str, Any]) -> None:
    """Refuse to resume into a folder whose embeddings were made differently (one table would mix them).

    Compared with the folder's ``run.json``: whole-image vs cells mode, the model (by sha256 for a
    checkpoint, by name for a random network), the preprocessing and the channels.
    """
    if not parts.part_files(out_dir / parts.EMBEDDINGS):
        return
    try:
        before = parts.read_run_info(out_dir)
    except FileNotFoundError:
        return
    diffs = []
    was_cells, is_cells = "cells" in before, cfg.cells is not None
    if was_cells != is_cells:
        mode = {True: "cells mode", False: "whole-image mode"}
        diffs.append(f"it holds a {mode[was_cells]} run; this job is in {mode[is_cells]}")
    # a checkpoint is known by its sha256 (its path may differ between machines), a random network by its name
    identity = [run.get("model_sha256") or run.get("model_source") for run in (before, info)]
    if identity[0] is not None and identity[0] != identity[1]:
        diffs.append(f"model {_model_label(before)} there, {_model_label(info)} now")
    for key in ("preprocess", "channels"):
        if key in before and before[key] != info[key]:
            diffs.append(f"{key} {before[key]} there, {info[key]} now")
    if diffs:
        raise OutputMismatchError(
            f"{out_dir} holds embeddings made differently ({'; '.join(diffs)}): resuming would mix them in "
            "one table. Use another output.dir, remove the old outputs, or set output.on_mismatch: replace"
        )


def _find_strict(exc: BaseException) -> str | None:
    """The strict-mode message inside a (possibly wrapped) Ray task error, if any."""
    seen = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StrictModeError):
            return str(e)
        stack.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    text = str(exc)
    marker = "StrictModeError: "
    if marker in text:
        return text.split(marker, 1)[1].strip().splitlines()[0]
    return None
