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
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from msnoop.config import EmbedJob, config_hash, save_resolved
from msnoop.embed.embedder import Embedder, combine_tiles
from msnoop.io.manifest import ID_COLUMN, PATH_PREFIX, load_image_table
from msnoop.io.readers import ImageReadError, check_image, read_image
from msnoop.models.checkpoint import LoadedModel, resolve_model
from msnoop.preprocess.presets import Preprocessing, prepare_channel
from msnoop.store import parts
from msnoop.store.lance import build_table

logger = logging.getLogger(__name__)


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

    @property
    def images_per_s(self) -> float:
        return (self.n_embedded + self.n_errors) / self.seconds if self.seconds > 0 else 0.0


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


def read_and_prepare(batch: pd.DataFrame, *, channels: list[str], spec: dict[str, Any], strict: bool) -> dict[str, Any]:
    """Stage 1: image rows -> tiles per image (variable count), tile counts per channel, errors."""
    pre = Preprocessing(**spec)
    size = pre.input_size
    tiles: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    errors: list[str] = []
    for _, row in batch.iterrows():
        try:
            images = load_image(row, channels)
            per_channel = [prepare_channel(im, pre) for im in images]
            tiles.append(np.concatenate(per_channel))
            counts.append(np.array([len(t) for t in per_channel], dtype=np.int64))
            errors.append("")
        except ImageReadError as exc:
            if strict:
                raise StrictModeError(str(exc)) from exc
            tiles.append(np.zeros((0, size, size), dtype=np.float32))
            counts.append(np.zeros(len(channels), dtype=np.int64))
            errors.append(str(exc))
    out: dict[str, Any] = {c: batch[c].to_numpy() for c in batch.columns}
    out["tiles"] = _ragged(tiles)
    out["counts"] = np.stack(counts) if counts else np.zeros((0, len(channels)), dtype=np.int64)
    out["error"] = np.array(errors, dtype=object)
    return out


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    obj = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        obj[i] = a
    return obj


class EmbedActor:
    """Stage 2 (callable class for the actor pool): tiles -> per-image embedding."""

    def __init__(self, model: Any, *, batch_size: int, device: str, torch_threads: int | None) -> None:
        import ray
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        loaded: LoadedModel = ray.get(model) if isinstance(model, ray.ObjectRef) else model
        self.embedder = Embedder(loaded, batch_size=batch_size, device=device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        tiles = batch.pop("tiles")
        counts = batch["counts"]
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        n_channels = counts.shape[1] if counts.ndim == 2 else 0
        dim = self.embedder.embed_dim * n_channels
        emb = np.zeros((len(ok), dim), dtype=np.float32)
        if ok.any():
            stacked = np.concatenate([np.asarray(tiles[i], dtype=np.float32) for i in np.flatnonzero(ok)])
            tile_emb = self.embedder.embed_tiles(stacked)
            emb[ok] = combine_tiles(tile_emb, [counts[i] for i in np.flatnonzero(ok)])
        batch["embedding"] = emb
        return batch


def write_block(batch: dict[str, Any], *, out_dir: str, channels: list[str]) -> dict[str, Any]:
    """Stage 3: write the block's embeddings and errors as Parquet parts; return counts only."""
    error = batch["error"]
    ok = np.array([e == "" for e in error], dtype=bool)
    meta_cols = [c for c in batch if c.startswith("Metadata_")]
    meta = pd.DataFrame({c: batch[c] for c in meta_cols})
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
    return {"n_ok": np.array([int(ok.sum())]), "n_err": np.array([int((~ok).sum())])}


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

    return {
        "job": "embed",
        "name": cfg.name,
        "table": cfg.table_name,
        "lancedb": cfg.lancedb_uri,
        "model": cfg.model,
        "model_source": model.source,
        "model_sha256": model.sha256,
        "arch": model.arch,
        "preprocess": spec.model_dump(),
        "channels": list(cfg.input.channels),
        "embed_dim_per_channel": int(model.net.embed_dim),  # type: ignore[arg-type]
        "embed_dim": int(model.net.embed_dim) * len(cfg.input.channels),  # type: ignore[arg-type]
        "config_hash": config_hash(cfg),
        "provenance": provenance(),
    }


def prepare_model(cfg: EmbedJob) -> tuple[LoadedModel, Preprocessing]:
    """Resolve the model and the preprocessing the job will use (checkpoint's preset wins)."""
    probe = resolve_model(cfg.model)
    spec = cfg.preprocess.resolve(probe.preprocess if probe.sha256 else None)
    model = resolve_model(cfg.model, preprocess=spec)
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
    done = parts.read_ids(out_dir / parts.EMBEDDINGS) | parts.read_ids(out_dir / parts.ERRORS)
    todo = table[~table[ID_COLUMN].isin(done)].reset_index(drop=True)
    prov = provenance()
    logger.info(
        "msnoop %s | torch %s | ray %s | device %s | config %s",
        prov["msnoop"], prov["torch"], prov["ray"], ", ".join(prov["gpus"]) or "cpu", config_hash(cfg),
    )
    logger.info(
        "%d images in %s; %d already done, %d to embed; model %s; preprocessing %s",
        len(table), out_dir, len(table) - len(todo), len(todo), model.source, spec.model_dump(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out_dir)
    info = run_info(cfg, model, spec)
    parts.write_run_info(out_dir, info)

    n_ok = n_err = 0
    if len(todo):
        init_ray(cfg.runtime.address, num_cpus=cfg.runtime.num_cpus,
                 object_store_memory=cfg.runtime.object_store_mb * 1024**2 if cfg.runtime.object_store_mb else None,
                 quiet=not cfg.runtime.progress)
        use_gpu, res = _resources(cfg)
        n_cpus = int(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
        threads = None if use_gpu else max(1, n_cpus // cfg.runtime.actors)
        model_ref = ray.put(model)
        block = cfg.runtime.images_per_block
        frames = [todo.iloc[i : i + block] for i in range(0, len(todo), block)]
        # Read/write tasks take a fraction of a CPU on small clusters, so that they and the actor pool
        # always fit together (on 1-2 CPUs, whole-CPU tasks next to an actor would wait forever); their
        # request differs from the actor's so Ray Data does not fuse reading into the embedding actor.
        task_cpus = min(1.0, float(ray.cluster_resources().get("CPU", 1)) / 8)
        ds = ray.data.from_pandas(frames)
        ds = ds.map_batches(
            read_and_prepare,
            batch_format="pandas",
            batch_size=None,
            num_cpus=task_cpus,
            fn_kwargs={"channels": channels, "spec": spec.model_dump(), "strict": cfg.runtime.strict},
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
            },
            **res,
        )
        ds = ds.map_batches(write_block, batch_size=None, num_cpus=task_cpus, fn_kwargs={"out_dir": str(out_dir.resolve()), "channels": channels})
        last = time.perf_counter()
        try:
            for row in ds.iter_rows():
                n_ok += int(row["n_ok"])
                n_err += int(row["n_err"])
                now = time.perf_counter()
                if cfg.runtime.progress and now - last > 5:
                    done_n = n_ok + n_err
                    rate = done_n / (now - t0)
                    eta = (len(todo) - done_n) / rate if rate > 0 else float("nan")
                    logger.info("%d/%d images (%d errors), %.1f img/s, ETA %.0f s", done_n, len(todo), n_err, rate, eta)
                    last = now
        except Exception as exc:
            cause = _find_strict(exc)
            if cause is not None:
                raise StrictModeError(cause) from None
            raise
    info["last_run"] = {"embedded": n_ok, "errors": n_err, "seconds": time.perf_counter() - t0}
    parts.write_run_info(out_dir, info)
    n_total = parts.count_rows(out_dir / parts.EMBEDDINGS)
    n_err_total = parts.count_rows(out_dir / parts.ERRORS)
    if cfg.output.write_lance:
        build_table(cfg.lancedb_uri, cfg.table_name, out_dir / parts.EMBEDDINGS, dim=info["embed_dim"], info=info)
    preview: list[tuple[str, str]] = []
    if n_err_total:
        err = parts.read_frame(out_dir / parts.ERRORS, columns=[ID_COLUMN, "reason"]).head(5)
        preview = list(zip(err[ID_COLUMN], err["reason"], strict=True))
    return EmbedResult(
        out_dir=out_dir, n_input=len(table), n_skipped=len(table) - len(todo), n_embedded=n_ok, n_errors=n_err,
        n_rows_total=n_total, n_errors_total=n_err_total, seconds=time.perf_counter() - t0,
        table=cfg.table_name if cfg.output.write_lance else None, errors_preview=preview,
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
