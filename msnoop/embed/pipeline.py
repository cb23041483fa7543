"""The streaming embedding job: manifest -> read/decode -> preprocess -> embed -> Parquet parts, on Ray Data.

Stages (all lazy, streamed block by block with bounded memory):

0. :func:`msnoop.embed.source.manifest_dataset` (one read task): streams the manifest into blocks of images
   still to embed; the driver only plans it (header, one schema) and checks its ids (16 bytes per row).
1. :func:`msnoop.embed.dataset.read_and_prepare` (CPU tasks): read and check every channel file of every
   image and turn it into normalised input tiles (or an error row).
2. :class:`msnoop.embed.actor.EmbedActor` (actor pool, one GPU per actor where GPUs exist): embeds the
   tiles in batches, averages tiles per channel and concatenates channels.
3. :func:`msnoop.embed.write.write_block` (CPU tasks): writes the block's embeddings and errors as new
   Parquet parts and returns only counts, so the driver never holds embeddings.

With a ``cells:`` section the read stage segments and crops cells (:mod:`msnoop.embed.cells`). The
Parquet parts are the job's result and the source of truth; the LanceDB table is built from them by the
store stage (:func:`msnoop.store.publish.publish_embeddings`), which :mod:`msnoop.job_kinds` runs after this.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from msnoop.core import parts
from msnoop.core import storage as st
from msnoop.core.config import ConfigError, config_hash
from msnoop.core.idset import IdSet
from msnoop.core.partindex import FLUSH_EVERY_S, PartIndex
from msnoop.core.progress import progress_bar
from msnoop.core.rundir import FolderBusyError, OutputMismatchError, RunDir, WriterLock
from msnoop.embed.actor import EmbedActor
from msnoop.embed.cells import cells_spec, drop_orphan_cells, output_schemas
from msnoop.embed.config import EmbedJob
from msnoop.embed.dataset import StrictModeError, channel_selectors, read_and_prepare
from msnoop.embed.source import manifest_dataset, read_blocks
from msnoop.embed.totals import TotalsError, check_totals, error_preview
from msnoop.embed.write import PARTS, provenance_record, write_block
from msnoop.io.config import path_column
from msnoop.io.table_stream import ImageTableSource, ids_of, plan_image_table, scan_ids
from msnoop.models.loading import load_for_embedding
from msnoop.preprocess.presets import Preprocessing

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from msnoop.models.checkpoint import LoadedModel

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "EmbedResult",
    "FolderBusyError",
    "OutputMismatchError",
    "StrictModeError",
    "TotalsError",
    "in_process",
    "prepare_model",
    "run_embed",
    "run_in_process",
    "run_info",
]


@dataclass
class EmbedResult:
    """What an embedding run did and what its output folder holds.

    Attributes:
        out_dir: The output folder: a local path, or the URI as given (``s3://...``).
        n_input: Images in the manifest.
        n_skipped: Images already embedded or recorded as errors before this run.
        n_embedded, n_errors: Images embedded / recorded as errors by this run.
        n_rows_total, n_errors_total: Rows of ``embeddings/`` and ``errors/`` that belong to the manifest.
        seconds: Wall time of the run.
        table: The LanceDB table written by the store stage, or ``None``.
        lancedb: The LanceDB database that holds ``table`` (``output.lancedb``, else ``<dir>/lancedb``), or ``None``.
        errors_preview: Up to five ``(image id, reason)`` rows of ``errors/``.
        n_cells, n_cells_total: Cells embedded by this run / rows of ``cells/`` (cells mode).
    """

    out_dir: Path | str
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
    lancedb: str | None = None  # the LanceDB database holding ``table`` (output.lancedb or <dir>/lancedb)

    @property
    def images_per_s(self) -> float:
        """Images (embedded or recorded as errors) per second of this run; 0 for a run that did nothing."""
        return (self.n_embedded + self.n_errors) / self.seconds if self.seconds > 0 else 0.0

    @property
    def cells_per_s(self) -> float:
        """Cells embedded per second of this run (cells mode)."""
        return self.n_cells / self.seconds if self.seconds > 0 else 0.0


def _resources(cfg: EmbedJob) -> tuple[bool, dict[str, Any]]:
    """``(use_gpu, Ray options of each embedding actor)``: ``num_cpus``, ``num_gpus`` with GPUs, ``resources``."""
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
    if cfg.runtime.actor_resources:
        res["resources"] = dict(cfg.runtime.actor_resources)
    return use_gpu, res


def actor_pool_bounds(
    cfg: EmbedJob, res: dict[str, Any], cluster: dict[str, float], task_cpus: float
) -> tuple[int, int]:
    """``(min_size, max_size)`` of the embedding actors: :func:`msnoop.core.actors.pool_bounds` of ``runtime.actors``.

    ``auto`` leaves ``task_cpus`` (one read or write task) beside the actors: with every CPU taken by actors the
    read and write tasks never start and the pipeline hangs. A pool whose minimum does not fit the
    cluster now is logged: the job waits until it does (an autoscaler adds nodes).
    """
    from msnoop.core.actors import pool_bounds

    gpus = float(res.get("num_gpus", 0.0))
    custom = res.get("resources") or {}
    lo, hi = pool_bounds(
        cfg.runtime.actors,
        cluster,
        cpus_per_actor=float(res["num_cpus"]),
        gpus_per_actor=gpus,
        custom=custom,
        reserve_cpus=task_cpus,
    )
    room = {"CPU": float(res["num_cpus"]), **({"GPU": gpus} if gpus else {}), **custom}
    short = [
        f"{k} {lo * v:g} > {cluster.get(k, 0.0):g}" for k, v in room.items() if lo * v > cluster.get(k, 0.0) + 1e-9
    ]
    if short:
        logger.warning(
            "runtime.actors: %d actor(s) at least, but the cluster has too little now (%s); the job waits for them",
            lo,
            ", ".join(short),
        )
    return lo, hi


def run_info(cfg: EmbedJob, model: LoadedModel, spec: Preprocessing) -> dict[str, Any]:
    """The run's record for ``run.json``: what made the embeddings (model, preprocessing, channels) and its identity.

    ``identity`` (:func:`msnoop.embed.identity.run_identity`) holds every setting that can change a stored vector
    or row; a resume compares it with the folder's (:meth:`RunDir.check_resumable`). ``postprocess`` names the
    post-processing the run's vectors get before any distance (``output.postprocess``); the store stage replaces it
    with the fitted record in the LanceDB table's metadata.
    """
    from msnoop.core.runtime import provenance
    from msnoop.embed.identity import run_identity

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
        "backend": cfg.runtime.backend,  # onnxruntime runs float32 whatever amp says
        "channels": list(cfg.input.channels),
        "embed_dim_per_channel": int(model.net.embed_dim),  # type: ignore[arg-type]
        "embed_dim": int(model.net.embed_dim) * len(cfg.input.channels),  # type: ignore[arg-type]
        "config_hash": config_hash(cfg),
        "postprocess": {"method": cfg.output.postprocess},
        "identity": run_identity(cfg, model, spec),
        "provenance": provenance(),
    }
    if cfg.cells is not None:
        info["cells"] = {**cfg.cells.model_dump(mode="json"), "nucleus_channel": cfg.nucleus_channel}
    return info


def prepare_model(cfg: EmbedJob) -> tuple[LoadedModel, Preprocessing]:
    """The job's model and the preprocessing it embeds with (:func:`msnoop.models.loading.load_for_embedding`).

    Raises:
        CheckpointError: Unknown reference, unreadable checkpoint, or a preprocessing the checkpoint refuses.
    """
    return load_for_embedding(cfg.model, cfg.preprocess, storage=cfg.storage_config)


def _configure_data_context(cfg: EmbedJob) -> None:
    """Ray Data settings of the job: read-ahead bounded by ``runtime.inflight_mb``, no operator progress bars."""
    import ray

    # Bound how far reading runs ahead of embedding: memory stays flat however many images there are.
    ctx = ray.data.DataContext.get_current()
    # The job draws one bar of its own (msnoop.core.progress); Ray Data's per-operator bars (and their dumps
    # every 10 s in logs) would repeat it three times over.
    ctx.enable_progress_bars = False
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(
        object_store_memory=cfg.runtime.inflight_mb * 1024**2
    )
    # The actors request no memory (a fixed request could keep them off small machines), so Ray Data's
    # high-memory detector repeats the same advice every 30 s; once every 10 minutes is enough in a log.
    detectors = getattr(ctx, "issue_detectors_config", None)
    if detectors is not None and hasattr(detectors, "high_memory_detector_config"):
        detectors.high_memory_detector_config.detection_time_interval_s = 600


def _images_are_remote(source: ImageTableSource, channels: list[str]) -> bool:
    """Whether the images are on object storage, judged by the first row's paths (the read tasks then need the
    storage credentials)."""
    head = source.batches(64)
    first = next(head, None)
    head.close()
    return first is not None and any(
        st.is_uri(p) for ch in channels for p in first[1].column(path_column(ch)).to_pylist()[:1]
    )


def build_dataset(
    cfg: EmbedJob,
    source: ImageTableSource,
    done: IdSet,
    n_todo: int,
    model: LoadedModel,
    spec: Preprocessing,
    run: RunDir,
    info: dict[str, Any],
    schemas: tuple[pa.Schema, pa.Schema, pa.Schema | None],
    remote_inputs: bool,
) -> ray.data.Dataset:
    """The lazy Ray Data pipeline manifest -> read -> embed -> write over the rows of ``source`` not in ``done``.

    Metadata stays out of Ray Data's per-block type inference: each row's metadata travels as Arrow IPC bytes
    with the run's schema (:mod:`msnoop.embed.source`), which the write tasks decode, so values and types are
    the manifest's whatever the block size. The driver holds neither the manifest nor its ids: the read task
    streams the manifest and drops the ids in ``done`` (put once in the object store, 16 bytes per id).

    Args:
        n_todo: Rows to embed (Ray Data's row estimate only).
        schemas: The run's metadata schema, and the ``embeddings/`` and ``cells/`` part schemas
            (:func:`msnoop.embed.cells.output_schemas`).
        remote_inputs: Whether the images are on object storage (the read tasks then get the storage credentials).

    Returns:
        A dataset whose rows are per-block counts ``n_ok``, ``n_err``, ``n_cells``.
    """
    import ray

    use_gpu, res = _resources(cfg)
    _configure_data_context(cfg)
    cluster = ray.cluster_resources()
    n_cpus = int(cluster.get("CPU", os.cpu_count() or 1))
    meta_schema = schemas[0]
    mask_col = cfg.cells.segmentation.mask_column if cfg.cells is not None else None
    block = cfg.runtime.images_per_block
    # Read/write tasks take a fraction of a CPU on small clusters, so that they and the actor pool
    # always fit together (on 1-2 CPUs, whole-CPU tasks next to an actor would wait forever).
    task_cpus = min(1.0, float(cluster.get("CPU", 1)) / 8)
    lo, hi = actor_pool_bounds(cfg, res, cluster, task_cpus)
    threads = None if use_gpu else max(1, n_cpus // hi)
    # Without GPUs, reading asks for what the actor asks for, so Ray Data fuses it into the actor: tiles
    # never cross processes and no reader process competes with the actor's torch threads (with the
    # sleeping OpenMP threads above, jobs/bench_embed.py's Ray / bare ratio went from 0.81 to 0.90 on
    # 2 cores). With GPUs, CPU tasks read so that the GPU actors only embed.
    # (On CPUs the read tasks also ask for the actors' custom resources, or the two would not fuse.)
    read_cpus = task_cpus if use_gpu else float(res["num_cpus"])
    read_custom = {"resources": res["resources"]} if not use_gpu and "resources" in res else {}
    # Without GPUs the actor also writes its blocks' parts: one worker process fewer to start (Ray / bare over the
    # whole job in jobs/bench_embed.py, 2 cores: see results/bench_embed.json) and the vectors never leave the
    # actor. The read, embed and write stages then share the storage credentials (a fused stage has one set of
    # options). With GPUs, CPU tasks write so that the GPU actors only embed.
    write_in_actor = not use_gpu
    read_env = worker_env_args(cfg) if remote_inputs or write_in_actor else {}
    logger.info("embedding actor pool: %d to %d actor(s), each %s", lo, hi, res)
    # The manifest reader asks for no CPU (it is light and waits on backpressure most of the time); the request
    # also differs from the image reader's, so Ray Data never fuses the two: one task reading every image
    # would serialise the read stage.
    ds = manifest_dataset(
        source,
        n_todo,
        ray_remote_args={"num_cpus": 0, **(worker_env_args(cfg) if st.is_uri(source.location) else {})},
        schema=meta_schema,
        done=ray.put(done),
        block_rows=block,
        mask_column=mask_col,
    )
    ds = ds.map_batches(
        read_and_prepare,
        batch_format="pandas",
        batch_size=None,
        num_cpus=read_cpus,
        **read_custom,
        **read_env,  # tasks reading s3://... images need the credentials
        fn_kwargs=_read_args(cfg, spec, run),
    )
    actor_args = _actor_args(cfg, ray.put(model), device="cuda" if use_gpu else "cpu", threads=threads)
    if write_in_actor:
        actor_args["write"] = _write_args(cfg, run, info, schemas)
    ds = ds.map_batches(
        EmbedActor,
        batch_size=block,
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        fn_constructor_kwargs=actor_args,
        **res,
        **(read_env if not use_gpu else {}),
    )
    if write_in_actor:
        return ds
    return ds.map_batches(
        write_block,
        batch_size=None,
        num_cpus=task_cpus,
        **worker_env_args(cfg),
        fn_kwargs=_write_args(cfg, run, info, schemas),
    )


def _read_args(cfg: EmbedJob, spec: Preprocessing, run: RunDir) -> dict[str, Any]:
    """Keyword arguments of :func:`~msnoop.embed.dataset.read_and_prepare` for this job (both executors)."""
    return {
        "channels": list(cfg.input.channels),
        "spec": spec.model_dump(),
        "strict": cfg.runtime.strict,
        "cells": cells_spec(cfg),
        "masks_dir": str(run.masks) if cfg.cells is not None and cfg.cells.save_masks else None,
        "selectors": channel_selectors(cfg),
        "z": cfg.input.z,
        "storage": cfg.storage_config,
    }


def _actor_args(cfg: EmbedJob, model: Any, *, device: str, threads: int | None) -> dict[str, Any]:
    """Constructor arguments of :class:`~msnoop.embed.actor.EmbedActor` (``model``: the model or its object ref)."""
    return {
        "model": model,
        "batch_size": cfg.runtime.batch_size,
        "device": device,
        "torch_threads": threads,
        "cells": cfg.cells is not None,
        "amp": cfg.runtime.amp,
        "memory_format": cfg.runtime.memory_format,
        "backend": cfg.runtime.backend,
    }


def _write_args(
    cfg: EmbedJob, run: RunDir, info: dict[str, Any], schemas: tuple[pa.Schema, pa.Schema, pa.Schema | None]
) -> dict[str, Any]:
    """Keyword arguments of :func:`~msnoop.embed.write.write_block` for this job (both executors)."""
    meta_schema, schema, cells_schema = schemas
    return {
        "out_dir": run.absolute(),
        "storage": run.storage,
        "channels": list(cfg.input.channels),
        "cells": cfg.cells is not None,
        "meta_schema": meta_schema,
        "schema": schema,
        "cells_schema": cells_schema,
        "provenance": provenance_record(info),
    }


#: ``runtime.ray_min_images: auto`` on a CPU with images on local disk: there the job run in this process (reading one
#: block ahead in a thread) embeds as many cells/s as a local Ray cluster once both run, 80 yeast cells/s on 2 cores
#: for either at a tight canvas, and saves Ray's start-up (14 s on 2 cores). At the 224 px canvas (8 two-channel
#: images/s on 2 cores) 1000 images take about two minutes, so from there on that start-up is a tenth of the job or
#: less, and Ray's actor pool can use more cores than one process's torch threads do.
RAY_MIN_IMAGES_CPU = 1000
#: ``runtime.ray_min_images: auto`` with a GPU or images on object storage: Ray's read tasks, many at once, keep a
#: GPU or the network busy where one read-ahead thread cannot.
RAY_MIN_IMAGES_PARALLEL_READS = 64


def ray_min_images(cfg: EmbedJob, remote_inputs: bool) -> int:
    """``runtime.ray_min_images`` with ``auto`` resolved for this machine and these inputs (see the constants above)."""
    if cfg.runtime.ray_min_images != "auto":
        return cfg.runtime.ray_min_images
    if remote_inputs or cfg.runtime.use_gpu == "yes":
        return RAY_MIN_IMAGES_PARALLEL_READS
    if cfg.runtime.use_gpu == "auto":
        import torch

        if torch.cuda.is_available():
            return RAY_MIN_IMAGES_PARALLEL_READS
    return RAY_MIN_IMAGES_CPU


def in_process(cfg: EmbedJob, n_todo: int, remote_inputs: bool = False) -> bool:
    """Whether a job with ``n_todo`` images left runs in this process instead of on Ray.

    It does when it is small (fewer than :func:`ray_min_images`) and msnoop would otherwise have to start a
    Ray cluster of its own for it: no ``runtime.address``, no ``RAY_ADDRESS``, no Ray session in this process and
    no running ``msnoop cluster``. Starting Ray costs 5-15 s on a small machine, more than such a job's work; the
    stages and the parts written are the same (:func:`run_in_process`).

    Args:
        remote_inputs: Whether the images are on object storage (``auto`` then starts Ray sooner).
    """
    from msnoop.core.runtime import cluster_to_join

    return n_todo < ray_min_images(cfg, remote_inputs) and cluster_to_join(cfg.runtime.address) is None


def _local_device(cfg: EmbedJob) -> str:
    """``cuda`` or ``cpu`` for an in-process run, following ``runtime.use_gpu``.

    Raises:
        RuntimeError: ``use_gpu: yes`` without a CUDA device.
    """
    import torch

    has_gpu = torch.cuda.is_available()
    if cfg.runtime.use_gpu == "yes" and not has_gpu:
        raise RuntimeError("runtime.use_gpu is 'yes' but this machine has no CUDA device; set it to 'auto' or 'no'")
    return "cuda" if has_gpu and cfg.runtime.use_gpu != "no" else "cpu"


#: Fewest images per block of a job run in this process. A CPU forward batch holds one or two 224 px images but
#: 16 cells of two channels at a tight canvas, and every block is a part file: 300 yeast cells at a tight canvas took
#: 11.4 s end to end in blocks of 8, 7.3 s in blocks of 32 and 8.5 s in blocks of 64 (2 cores, one run each).
IN_PROCESS_MIN_BLOCK = 32
#: The same for full fields cut into cells (``cells``): each image already holds tens of cells, so a block of 8
#: fields is several forward batches and the progress bar still moves every few seconds.
IN_PROCESS_MIN_BLOCK_CELLS = 8


def run_in_process(
    cfg: EmbedJob,
    source: ImageTableSource,
    done: IdSet,
    model: LoadedModel,
    spec: Preprocessing,
    run: RunDir,
    info: dict[str, Any],
    schemas: tuple[pa.Schema, pa.Schema, pa.Schema | None],
    bar: Any,
    index: PartIndex | None = None,
) -> tuple[int, int, int]:
    """The pipeline's stages (read, embed, write) one block after another in this process, without Ray.

    Blocks hold about one forward batch of input-size tiles (tiles per batch / channels images, at least
    :data:`IN_PROCESS_MIN_BLOCK`, or :data:`IN_PROCESS_MIN_BLOCK_CELLS` fields in cells mode, and at most
    ``runtime.images_per_block``), so ``bar`` (a
    :func:`msnoop.core.progress.progress_bar`) moves every few seconds and a block is one part file.
    torch uses ``runtime.num_cpus`` threads when it is set (else its default, one per core). The parts written are
    added to ``index`` (the folder's :class:`~msnoop.core.partindex.PartIndex`) when given.

    Returns:
        ``(embedded, errors, cells)`` of this run.
    """
    actor = EmbedActor(**_actor_args(cfg, model, device=_local_device(cfg), threads=cfg.runtime.num_cpus))
    per_batch = actor.embedder.settings.tiles_per_batch(spec.input_size) // len(cfg.input.channels)
    fewest = IN_PROCESS_MIN_BLOCK_CELLS if cfg.cells is not None else IN_PROCESS_MIN_BLOCK
    block_rows = min(cfg.runtime.images_per_block, max(fewest, per_batch))
    mask_col = cfg.cells.segmentation.mask_column if cfg.cells is not None else None
    read_args = _read_args(cfg, spec, run)
    write_args = _write_args(cfg, run, info, schemas)
    n_ok = n_err = n_cells = 0
    blocks = read_blocks(source, schema=schemas[0], done=done, block_rows=block_rows, mask_column=mask_col)
    for prepared in read_ahead(blocks, lambda block: read_and_prepare(block.to_pandas(), **read_args)):
        counts = write_block(actor(prepared), **write_args)
        ok, err, cells = (int(counts[k][0]) for k in ("n_ok", "n_err", "n_cells"))
        n_ok, n_err, n_cells = n_ok + ok, n_err + err, n_cells + cells
        if index is not None:
            index.add(counts[PARTS][0])
            index.flush(every_s=FLUSH_EVERY_S)
        bar.update(ok + err)
    return n_ok, n_err, n_cells


def read_ahead(blocks: Iterable[T], read: Callable[[T], R]) -> Iterator[R]:
    """``read(block)`` for each block in order, the next block read in a background thread while the caller works on
    the current one.

    Reading (file I/O, TIFF decoding, cell crops, resizing: work that releases the GIL) then overlaps with the
    forward pass, as the read stage of the Ray pipeline does; one block ahead keeps at most two in memory. An
    exception of ``read`` is raised here, at its block's turn.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="msnoop-read") as pool:
        pending: Future[R] | None = None
        for block in blocks:
            ahead = pool.submit(read, block)
            if pending is not None:
                yield pending.result()
            pending = ahead
        if pending is not None:
            yield pending.result()


def worker_env_args(cfg: EmbedJob) -> dict[str, Any]:
    """Ray task options copying ``runtime.worker_env`` variables from this process to the tasks (``runtime_env``).

    Empty when no variable is named (the tasks then see their node's own environment). A named variable that is
    unset here is left out.
    """
    env = {k: os.environ[k] for k in cfg.runtime.worker_env if k in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _stream_counts(
    ds: ray.data.Dataset, n_todo: int, *, t0: float, bar: Any, cells: bool, index: PartIndex | None = None
) -> tuple[int, int, int]:
    """Run the pipeline, moving ``bar`` as blocks are written (and a debug log line every 5 s, for logs);
    returns ``(embedded, errors, cells)`` of this run. The parts each block wrote are added to ``index`` (written
    out every :data:`~msnoop.core.partindex.FLUSH_EVERY_S`)."""
    n_ok = n_err = n_cells = 0
    last = time.perf_counter()
    try:
        for row in ds.iter_rows():
            n_ok += int(row["n_ok"])
            n_err += int(row["n_err"])
            n_cells += int(row["n_cells"])
            bar.update(int(row["n_ok"]) + int(row["n_err"]))
            if index is not None:
                index.add(row[PARTS])
                index.flush(every_s=FLUSH_EVERY_S)
            now = time.perf_counter()
            if now - last > 5:
                done_n = n_ok + n_err
                rate = done_n / (now - t0)
                eta = (n_todo - done_n) / rate if rate > 0 else float("nan")
                cell_rate = f", {n_cells / (now - t0):.3g} cells/s" if cells else ""
                logger.debug(
                    "%d/%d images (%d errors), %.3g img/s%s, ETA %.0f s", done_n, n_todo, n_err, rate, cell_rate, eta
                )
                last = now
    except Exception as exc:
        cause = _find_strict(exc)
        if cause is not None:
            raise StrictModeError(cause) from None
        raise
    return n_ok, n_err, n_cells


def _run_schema(cfg: EmbedJob, run: RunDir, info: dict[str, Any], schema: pa.Schema) -> pa.Schema:
    """The run's metadata schema after the folder's identity check (:meth:`RunDir.check_resumable`).

    A folder made differently is refused, or with ``output.on_mismatch: replace`` emptied of its rows.
    """
    from msnoop.embed.config import EmbedJob
    from msnoop.embed.identity import identity_defaults

    try:
        run.check_resumable(info, defaults=identity_defaults(EmbedJob))
        return run.resumed_schema(schema)
    except OutputMismatchError as exc:
        if cfg.output.on_mismatch != "replace":
            raise
        logger.warning("%s; output.on_mismatch is 'replace': removing them and embedding again", exc)
        run.remove_rows()
        return schema


def _done_ids(cfg: EmbedJob, run: RunDir, wanted: IdSet, index: PartIndex) -> tuple[IdSet, IdSet]:
    """``(embedded, done)``: ids already in ``embeddings/``, and those plus the ids recorded in ``errors/``.

    The ids come from the folder's part index (``index``; parts it does not describe are read and added to it).
    With ``runtime.retry_errors`` this run's ids are first removed from ``errors/`` (only the parts holding some
    are rewritten); in cells mode the cells parts of images without an image-level row are removed
    (:func:`msnoop.embed.cells.drop_orphan_cells`).
    """
    if cfg.runtime.retry_errors:
        scan = index.scan(run.ERRORS)
        hit = [f for f, h in zip(scan.files, scan.ids, strict=True) if wanted.contains(h).any()]
        n = parts.drop_ids(run.errors, wanted.contains_ids, storage=run.storage, files=hit) if hit else 0
        index.forget(run.ERRORS, hit)
        if n:
            logger.info("runtime.retry_errors: %d image(s) recorded in errors/ will be embedded again", n)
    embedded = index.scan(run.EMBEDDINGS).id_set()
    done = embedded | index.scan(run.ERRORS).id_set()
    if cfg.cells is not None:
        drop_orphan_cells(run, embedded, index=index)
    return embedded, done


def _log_start(cfg: EmbedJob, run: RunDir, model: LoadedModel, counts: tuple[int, int, int]) -> None:
    """The versions, the config hash and what this run will do, as two log lines (``counts``: input, done, to do)."""
    from msnoop.core.runtime import provenance

    prov = provenance()
    logger.info(
        "msnoop %s | torch %s | ray %s | device %s | config %s",
        prov["msnoop"],
        prov["torch"],
        prov["ray"],
        ", ".join(prov["gpus"]) or "cpu",
        config_hash(cfg),
    )
    n_input, n_skipped, n_todo = counts
    logger.info(
        "%d images in %s; %d already done, %d to embed; model %s; preprocessing %s",
        n_input,
        run,
        n_skipped,
        n_todo,
        model.source,
        model.preprocess.model_dump(),
    )


def run_embed(cfg: EmbedJob) -> EmbedResult:
    """Run an embedding job to its Parquet parts; resumable (ids already written are skipped).

    The run holds the output folder's writer lock (:meth:`RunDir.writer_lock`) from before the identity check to
    its end; ``run.json`` says ``status: running`` while it writes and ``complete`` once every row is accounted for.

    Args:
        cfg: A validated ``job: embed`` config.

    Returns:
        An :class:`EmbedResult`: counts of this run and totals of the output folder. ``table`` is None
        here; :func:`msnoop.job_kinds.run_embed_job` also builds the LanceDB table from the parts.

    Raises:
        ConfigError: The input table cannot be built (missing manifest, column, duplicate ids).
        OutputMismatchError: ``output.dir`` holds rows made with other settings (another identity) or other
            metadata types, and ``output.on_mismatch`` is ``error``; checked before any work.
        FolderBusyError: Another live process writes ``output.dir`` (the message names it and since when).
        TotalsError: The outputs do not hold every row of the manifest exactly once (a bug, never user input).
        StrictModeError: ``runtime.strict`` and an image could not be embedded (the message is its error).
        CheckpointError: The model reference cannot be resolved.
        StorageError: ``output.dir`` cannot be written (missing bucket, wrong credentials, unreachable endpoint):
            checked before any work, the message names the location.
    """
    t0 = time.perf_counter()
    run = cfg.run_dir
    if cfg.cells is not None and cfg.cells.save_masks and run.is_uri:
        raise ConfigError(f"cells.save_masks writes TIFF masks to a local folder; output.dir is {run}")
    run.check_writable()  # before any work: a missing bucket or wrong credentials fail here
    with run.writer_lock("msnoop embed") as lock:
        return _run_embed_locked(cfg, run, lock, t0)


def _run_embed_locked(cfg: EmbedJob, run: RunDir, lock: WriterLock, t0: float) -> EmbedResult:
    """:func:`run_embed` once the folder's writer lock is held."""
    from msnoop.core.runtime import init_ray
    from msnoop.embed.totals import repair_repeats

    model, spec = prepare_model(cfg)
    mask_col = cfg.cells.segmentation.mask_column if cfg.cells is not None else None
    # The manifest is planned from its header (one schema for the run, before any work) and its ids are checked
    # in one streaming pass; the driver keeps 16 bytes per row (IdSet), never the table.
    source = plan_image_table(cfg.input, storage=run.storage, mask_column=mask_col)
    wanted, n_input = scan_ids(source)
    info = run_info(cfg, model, spec)
    info["ignored_files"] = source.ignored_files
    info["metadata_schema"] = parts.schema_to_json(source.schema)
    meta_schema = _run_schema(cfg, run, info, source.schema)
    info["metadata_schema"] = parts.schema_to_json(meta_schema)
    schema, cells_schema = output_schemas(meta_schema, info["embed_dim"], cfg.cells is not None)
    index = PartIndex.load(run)  # after the identity check: a replaced folder's index went with its rows
    embedded, done = _done_ids(cfg, run, wanted, index)
    n_skipped = int(done.contains(wanted.hashes).sum())
    n_todo = n_input - n_skipped
    foreign = len(done) - n_skipped
    if foreign:
        logger.warning(
            "%s holds %d row(s) whose ids are not in this manifest; they stay in the table. (Ids are the first "
            "channel's path relative to the manifest's folder; folders written when ids were relative to the "
            "common root of all rows hold the same images under other ids: use a new output.dir for them)",
            run,
            foreign,
        )
    _log_start(cfg, run, model, (n_input, n_skipped, n_todo))
    info["status"] = RunDir.RUNNING
    run.save_config(cfg)  # only now: the folder's identity check has passed
    run.write_info(info)

    n_ok = n_err = n_cells = 0
    schemas = (meta_schema, schema, cells_schema)
    if n_todo:
        with progress_bar(n_todo, "embedding", unit="img", enabled=None if cfg.runtime.progress else False) as bar:
            remote_inputs = _images_are_remote(source, list(cfg.input.channels))  # one look at the first row
            if in_process(cfg, n_todo, remote_inputs):
                logger.debug("%d image(s) to embed: in this process, without Ray", n_todo)
                n_ok, n_err, n_cells = run_in_process(cfg, source, done, model, spec, run, info, schemas, bar, index)
            else:
                bar.set_postfix_str("starting Ray", refresh=True)
                init_ray(
                    cfg.runtime.address,
                    num_cpus=cfg.runtime.num_cpus,
                    object_store_memory=cfg.runtime.object_store_mb * 1024**2 if cfg.runtime.object_store_mb else None,
                    quiet=not cfg.runtime.progress,
                )
                ds = build_dataset(cfg, source, done, n_todo, model, spec, run, info, schemas, remote_inputs)
                del done, embedded  # in the object store now; the driver keeps only the run's ids (for the totals)
                bar.set_postfix_str("", refresh=True)
                n_ok, n_err, n_cells = _stream_counts(
                    ds, n_todo, t0=t0, bar=bar, cells=cfg.cells is not None, index=index
                )
    info["last_run"] = {"embedded": n_ok, "errors": n_err, "seconds": time.perf_counter() - t0}
    if cfg.cells is not None:
        info["last_run"]["cells"] = n_cells
    index.flush()
    if n_todo:
        index.relist()  # a write task that failed and was retried may have left a part the index never heard of
    lock.check()  # still this folder's only writer
    repair_repeats(run, cells=cfg.cells is not None, index=index)
    n_total, n_err_total = check_totals(run, wanted, names=lambda hashes: ids_of(source, hashes), index=index)
    n_cells_total = sum(index.scan(RunDir.CELLS).rows) if cfg.cells is not None else 0
    index.compact()
    info["status"] = RunDir.COMPLETE
    run.write_info(info)
    preview = error_preview(run, wanted) if n_err_total else []
    return EmbedResult(
        out_dir=cfg.output.dir,
        n_input=n_input,
        n_skipped=n_skipped,
        n_embedded=n_ok,
        n_errors=n_err,
        n_rows_total=n_total,
        n_errors_total=n_err_total,
        seconds=time.perf_counter() - t0,
        table=None,
        errors_preview=preview,
        n_cells=n_cells,
        n_cells_total=n_cells_total,
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
