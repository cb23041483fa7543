"""The streaming embedding job: manifest -> read/decode -> preprocess -> embed -> write, on Ray Data.

Stages (all lazy, streamed block by block with bounded memory):

1. ``read_and_prepare`` (CPU tasks): read every channel file of every image, check it (finite, not
   constant, channel shapes agree) and turn each channel into normalised input tiles. A bad image
   becomes a row with an ``error`` instead of tiles (or raises, in strict mode).
2. ``EmbedActor`` (actor pool, one GPU per actor where GPUs exist): embeds all tiles of the block in
   batches, averages tiles per channel and concatenates channels.
3. ``write_block`` (CPU tasks): writes the block's embeddings and errors as new Parquet parts and
   returns only counts, so the driver never holds embeddings.

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

from msnoop.config import EmbedJob, config_hash, save_resolved
from msnoop.io.manifest import ID_COLUMN, PATH_PREFIX, load_image_table
from msnoop.io.readers import ImageReadError, check_image, read_image
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


def load_image(row: pd.Series, channels: list[str]) -> list[np.ndarray]:
    """Read and check all channels of one image row; raises ImageReadError naming the file."""
    images = []
    for ch in channels:
        path = row[f"{PATH_PREFIX}{ch}"]
        if not isinstance(path, str) or not path:
            raise ImageReadError(row[ID_COLUMN], f"no file for channel {ch!r}")
        img = read_image(path)
        check_image(img, path)
        images.append(img)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        found = ", ".join(f"{ch}={im.shape}" for ch, im in zip(channels, images, strict=True))
        raise ImageReadError(row[f"{PATH_PREFIX}{channels[0]}"], f"channels differ in shape: {found}")
    return images


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
) -> tuple[np.ndarray, pd.DataFrame, int]:
    """Cells mode for one image: segment, crop every cell in all channels, normalise each crop channel.

    Args:
        images: The image's ``[H, W]`` channels, in ``input.channels`` order.
        image_id: Its id (seeds the ``max_cells_per_image`` subset, names the mask file).
        cells: ``CellsConfig.model_dump()`` plus ``channels`` and ``nucleus_channel``.
        pre: The job's preprocessing (``native`` mode): crop side and normalisation.
        path: The nucleus channel's file, for messages.
        masks_dir: Where to write the label mask, or None.

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
) -> dict[str, Any]:
    """Stage 1: image rows -> tiles per image (variable count), tile counts per channel, errors.

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
            images = load_image(row, channels)
            if cells is None:
                per_channel = [prepare_channel(im, pre) for im in images]
                tiles.append(np.concatenate(per_channel))
                counts.append(np.array([len(t) for t in per_channel], dtype=np.int64))
            else:
                nuc_path = str(row[f"{PATH_PREFIX}{cells['nucleus_channel']}"])
                cell_tiles, table, n_found = prepare_cells(
                    images, str(row[ID_COLUMN]), cells=cells, pre=pre, path=nuc_path, masks_dir=masks_dir
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


def _cells_table(meta: pd.DataFrame, batch: dict[str, Any], ok: np.ndarray) -> pa.Table | None:
    """One row per cell of the block's good images: image metadata + cell columns + ``emb_*``."""
    image_cols = [c for c in meta.columns if c not in (CELL_COUNT, CELLS_FOUND)]
    rows: list[int] = []
    tables: list[np.ndarray] = []
    embs: list[np.ndarray] = []
    for i in np.flatnonzero(ok):
        t = np.asarray(batch["cell_table"][i], dtype=np.float64).reshape(-1, 4)
        if len(t):
            rows.extend([i] * len(t))
            tables.append(t)
            embs.append(np.asarray(batch["cell_embedding"][i], dtype=np.float32))
    if not rows:
        return None
    cell_meta = meta[image_cols].iloc[rows].reset_index(drop=True)
    t = np.concatenate(tables)
    cell_meta["Metadata_CellID"] = t[:, 0].astype(np.int64)
    cell_meta["Metadata_CentroidY"] = t[:, 1]
    cell_meta["Metadata_CentroidX"] = t[:, 2]
    cell_meta["Metadata_Area"] = t[:, 3].astype(np.int64)
    return parts.embeddings_frame(cell_meta, np.concatenate(embs))


def write_block(batch: dict[str, Any], *, out_dir: str, channels: list[str], cells: bool = False) -> dict[str, Any]:
    """Stage 3: write the block's embeddings and errors as Parquet parts; return counts only.

    In cells mode the block's cells are written first (``<out>/cells/``), then the image means, so a
    finished image always has its cells on disk (see :func:`_drop_orphan_cells` for the other case).
    """
    error = batch["error"]
    ok = np.array([e == "" for e in error], dtype=bool)
    meta_cols = [c for c in batch if c.startswith("Metadata_")]
    meta = pd.DataFrame({c: batch[c] for c in meta_cols})
    n_cells = 0
    if cells and ok.any():
        cell_table = _cells_table(meta, batch, ok)
        if cell_table is not None:
            parts.write_part(cell_table, Path(out_dir) / CELLS)
            n_cells = cell_table.num_rows
    if ok.any():
        table = parts.embeddings_frame(meta[ok].reset_index(drop=True), batch["embedding"][ok])
        parts.write_part(table, Path(out_dir) / parts.EMBEDDINGS)
    if (~ok).any():
        bad = meta[~ok]
        paths = [";".join(str(bad[f"{PATH_PREFIX}{ch}"].iloc[i]) for ch in channels) for i in range(len(bad))]
        err = pa.Table.from_pydict(
            {ID_COLUMN: bad[ID_COLUMN].astype(str).tolist(), "path": paths, "reason": [str(e) for e in error[~ok]]}
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
    return {**spec, "channels": list(cfg.input.channels), "nucleus_channel": cfg.nucleus_channel}


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
    channels = list(cfg.input.channels)
    info = run_info(cfg, model, spec)
    try:
        _check_resumable(cfg, out_dir, info)
    except OutputMismatchError as exc:
        if cfg.output.on_mismatch != "replace":
            raise
        logger.warning("%s; output.on_mismatch is 'replace': removing them and embedding again", exc)
        for sub in (parts.EMBEDDINGS, parts.ERRORS, CELLS, MASKS):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
    done = parts.read_ids(out_dir / parts.EMBEDDINGS) | parts.read_ids(out_dir / parts.ERRORS)
    if cfg.cells is not None:
        _drop_orphan_cells(out_dir, parts.read_ids(out_dir / parts.EMBEDDINGS))
    todo = table[~table[ID_COLUMN].isin(done)].reset_index(drop=True)
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
        block = cfg.runtime.images_per_block
        frames = [todo.iloc[i : i + block] for i in range(0, len(todo), block)]
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
            fn_kwargs={"out_dir": str(out_dir.resolve()), "channels": channels, "cells": cells is not None},
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
    n_total = parts.count_rows(out_dir / parts.EMBEDDINGS)
    n_err_total = parts.count_rows(out_dir / parts.ERRORS)
    n_cells_total = parts.count_rows(out_dir / CELLS) if cfg.cells is not None else 0
    if cfg.output.write_lance:
        n_rows = build_table(
            cfg.lancedb_uri, cfg.table_name, out_dir / parts.EMBEDDINGS, dim=info["embed_dim"], info=info
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
            build_table(cfg.lancedb_uri, f"{cfg.table_name}_cells", out_dir / CELLS, dim=info["embed_dim"], info=info)
    preview: list[tuple[str, str]] = []
    if n_err_total:
        err = parts.read_frame(out_dir / parts.ERRORS, columns=[ID_COLUMN, "reason"]).head(5)
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
