"""Cells mode (Microsnoop's full-field pipeline): segment, crop every cell, one row per cell.

The read stage segments the nucleus channel, crops every cell with the same window in all channels
(:func:`msnoop.preprocess.crop.crop_cells`, zero-padded to the input size) and normalises each crop
channel like the ``native`` preset (normalize99 after padding); the tiles of an image are its cells,
cell-major then channel-major. The embedding actor embeds each cell (channels concatenated) and averages
the cells of each image. The write stage writes one row per cell to ``<out>/cells/`` and the per-image
mean, with ``Metadata_CellCount``, to ``<out>/embeddings/``. The cells part of a block is written before
its embeddings part; a cells part whose images are not all finished (a run killed in between) is removed
at the next start (:func:`drop_orphan_cells`), so resuming never duplicates cells.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from msnoop.core import parts
from msnoop.core import storage as st
from msnoop.core.idset import IdSet
from msnoop.core.partindex import PartIndex
from msnoop.core.parts import ID_COLUMN
from msnoop.core.rundir import RunDir
from msnoop.io.readers import ImageReadError, read_labels
from msnoop.preprocess.presets import Preprocessing, prepare_channel

if TYPE_CHECKING:
    from msnoop.embed.config import EmbedJob

logger = logging.getLogger(__name__)

CELL_COLUMNS = ["Metadata_CellID", "Metadata_CentroidY", "Metadata_CentroidX", "Metadata_Area"]

CELL_COUNT = "Metadata_CellCount"  # cells averaged into the image vector

CELLS_FOUND = "Metadata_CellsFound"  # cells kept by cropping (before max_cells_per_image)


def saved_mask_path(masks_dir: str | Path, image_id: str) -> Path:
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
    storage: Any = None,
) -> tuple[np.ndarray, pd.DataFrame, int]:
    """Cells mode for one image: segment, crop every cell in all channels, normalise each crop channel.

    Args:
        images: The image's ``[H, W]`` channels, in ``input.channels`` order.
        image_id: Its id (seeds the ``max_cells_per_image`` subset, names the mask file).
        cells: ``CellsConfig.model_dump()`` plus ``channels`` and ``nucleus_channel``.
        pre: The job's preprocessing (``native`` mode): crop side and normalisation.
        path: The nucleus channel's file, for messages.
        masks_dir: Where to write the label mask, or None.
        mask_path: The image's existing label mask (segmentation backend ``mask``): read instead of segmenting
            (a local path or a URI; ``storage``: its settings). A binary mask is split into its objects
            (:func:`~msnoop.io.readers.read_labels`).

    Returns:
        ``(tiles [N * C, S, S] float32`` (cell-major, channel-major), the crop table of the N embedded cells
        (:func:`~msnoop.preprocess.crop.crop_windows` columns), cells found before subsetting``)``.

    Raises:
        ImageReadError: Segmentation failed, the mask does not match the image, or (``empty='error'``) no
            cell was found.
    """
    from msnoop.preprocess.crop import crop_cells, crop_windows
    from msnoop.segment.config import SegmentationConfig

    seg = SegmentationConfig(**cells["segmentation"])
    nucleus = cells["nucleus_channel"]
    nuc_index = list(cells["channels"]).index(nucleus)
    size = pre.input_size
    if seg.backend == "mask":
        if not isinstance(mask_path, str) or not mask_path.strip():
            raise ImageReadError(path, f"no mask file: column {seg.column!r} is blank for this image")
        labels = read_labels(mask_path, storage=storage)
        if labels.shape != images[nuc_index].shape:
            raise ImageReadError(
                mask_path, f"mask has shape {labels.shape} but its image {path} is {images[nuc_index].shape}"
            )
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
        _save_mask(labels, saved_mask_path(masks_dir, image_id))
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


def with_embeddings(meta: pa.Table, extra: dict[str, np.ndarray], emb: np.ndarray, schema: pa.Schema) -> pa.Table:
    """``meta`` + ``extra`` columns + embedding columns, as exactly ``schema``."""
    have = set(meta.column_names)  # once: a wide manifest's thousands of columns stay linear
    arrays = [meta.column(f.name) for f in schema if f.name in have]
    arrays += [pa.array(extra[f.name], type=f.type) for f in schema if f.name in extra]
    arrays += [pa.array(emb[:, i].astype(np.float32, copy=False)) for i in range(emb.shape[1])]
    return pa.Table.from_arrays(arrays, schema=schema)


def cells_table(
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
    return with_embeddings(meta.take(pa.array(take)), extra, np.concatenate(embs), schema)


def drop_orphan_cells(run: RunDir, finished: set[str] | IdSet, *, index: PartIndex | None = None) -> int:
    """Remove cells parts holding an image whose mean was never written (a run killed mid-block); returns how many.

    Each block writes its cells part before its embeddings part, with the same image ids, so such a
    part's images are all redone by this run; keeping the part would duplicate their cells. With ``index`` (the
    folder's :class:`~msnoop.core.partindex.PartIndex`) and an :class:`IdSet`, the parts' ids come from it.
    """
    removed = 0
    if index is not None and isinstance(finished, IdSet):
        scan = index.scan(run.CELLS)
        gone = [f for f, h in zip(scan.files, scan.ids, strict=True) if not finished.contains(h).all()]
        for f in gone:
            logger.warning("removing %s: its images have no image-level row yet and will be embedded again", f)
            st.remove(f, run.storage)
        index.forget(run.CELLS, gone)
        return len(gone)
    for f in parts.part_files(run.cells, storage=run.storage):
        fs, path = st.resolve(f, run.storage)
        col = pq.read_table(path, columns=[ID_COLUMN], filesystem=fs).column(ID_COLUMN).to_pylist()
        whole = (
            bool(finished.contains_ids(col).all()) if isinstance(finished, IdSet) else {str(i) for i in col} <= finished
        )
        if not whole:
            logger.warning("removing %s: its images have no image-level row yet and will be embedded again", f)
            st.remove(f, run.storage)
            removed += 1
    return removed


def cells_spec(cfg: EmbedJob) -> dict[str, Any] | None:
    """What the read stage needs of the ``cells:`` section (JSON-serialisable), or ``None`` for whole images."""
    if cfg.cells is None:
        return None
    spec = cfg.cells.model_dump(mode="json")
    return {
        **spec,
        "channels": list(cfg.input.channels),
        "nucleus_channel": cfg.nucleus_channel,
        "mask_column": cfg.cells.segmentation.mask_column,
    }
