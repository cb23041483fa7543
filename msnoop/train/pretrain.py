"""Ray Train wrapper: ``TorchTrainer`` around the pure-torch loop, checkpoints, resume, final outputs.

Layout of ``output.dir``::

    resolved_config.yaml      the validated job
    train_log.jsonl           one JSON line per log interval (rank 0; append-only, so steps after the
                              last checkpoint repeat after a resume; the checkpoint's history is exact)
    ray/<name>/checkpoint_*/  resumable checkpoints (state.pt: model, optimiser, schedule, step, ...)
    model.pt                  the trained network in ``save_checkpoint`` format (loadable by ``msnoop embed``)
    MODEL_CARD.md, loss_curve.png, reconstructions.png

A run is resumed from its latest checkpoint when it is started again with the same ``name`` and
``output.dir`` (after a crash, a kill or a time budget), and automatically after a worker failure
(``runtime.max_failures``). Every worker draws its own crop stream from ``(seed, rank, step)``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msnoop.core.config import save_resolved
from msnoop.core.progress import progress_bar
from msnoop.core.storage import atomic_path
from msnoop.models.checkpoint import file_sha256, save_checkpoint
from msnoop.models.registry import create_model
from msnoop.preprocess.presets import Preprocessing
from msnoop.train.config import PretrainJob, absolutize
from msnoop.train.data import ChannelPool
from msnoop.train.distill import network_state
from msnoop.train.loop import TrainState, build_state, train_steps

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
LOG_FILE = "train_log.jsonl"


class ResumeError(RuntimeError):
    """A checkpoint to resume from does not match the job (different model or geometry)."""


@dataclass
class PretrainResult:
    """Where a pretraining run left its outputs, and how it ended."""

    model_path: Path
    card_path: Path
    figure_path: Path | None
    loss_curve_path: Path | None
    steps: int
    final_loss: float | None
    stop_reason: str
    elapsed_s: float


def run_dir(job: PretrainJob) -> Path:
    """Ray Train storage folder of a run: ``<output.dir>/ray/<name>``."""
    return Path(job.output.dir) / "ray" / job.name


def _identity(job_data: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint must share with the job that resumes it."""
    return {
        "model": job_data["model"],
        "crop_size": job_data["data"]["crop_size"],
        "crop_sizes": job_data["data"].get("crop_sizes"),
        "mask": job_data["mask"],
        "distill": job_data.get("distill"),
        "spread": job_data.get("spread"),
    }


def latest_checkpoint_dir(job: PretrainJob) -> Path | None:
    """The newest ``checkpoint_*`` folder with a state file under the run folder, if any."""
    root = run_dir(job)
    found = sorted(p for p in root.glob("checkpoint_[0-9]*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    return found[-1] if found else None


def load_state_file(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint's ``state.pt`` (tensors only, ``weights_only``) mapped to ``device``."""
    return torch.load(path, map_location=device, weights_only=True)


def _restore(state: TrainState, job: PretrainJob, device: torch.device) -> None:
    """Load the latest checkpoint (Ray's, else the newest on disk) into ``state``."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    payload = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            payload = load_state_file(Path(d) / STATE_FILE, device)
            source = f"Ray checkpoint {ckpt.path}"
    elif (path := latest_checkpoint_dir(job)) is not None:
        payload = load_state_file(path / STATE_FILE, device)
        source = str(path)
    elif job.train.resume_from is not None:
        payload = load_state_file(Path(job.train.resume_from), device)
        source = f"compact state {job.train.resume_from}"
    if payload is None:
        return
    stored, wanted = _identity(payload["config"]), _identity(json.loads(job.model_dump_json()))
    if stored != wanted:
        raise ResumeError(
            f"run {job.name!r} in {run_dir(job)} has a checkpoint trained with {stored}, but the job asks for "
            f"{wanted}; give the job a new name or delete that folder"
        )
    state.load_state_dict(payload, rewarm_steps=job.train.resume_warmup_steps)
    logger.info("resumed run %s from step %d (%s)", job.name, state.step, source)


def write_compact_state(checkpoint: Path, dest: Path) -> Path:
    """A checkpoint's training state, small enough to keep in a repository: ``train.resume_from`` continues from it.

    Keeps the network (and distillation heads) in float16, the schedule, step, loss history, CPU seconds and the
    job's settings; drops the optimiser's moments (twice the weights' size in float32), which a resumed run
    rebuilds over a short learning-rate ramp (:meth:`msnoop.train.loop.TrainState.load_state_dict`).

    Args:
        checkpoint: A ``checkpoint_*`` folder or its ``state.pt``.
        dest: The file to write (atomically).

    Returns:
        ``dest``.

    Raises:
        FileNotFoundError: ``checkpoint`` holds no state file.
    """
    src = checkpoint / STATE_FILE if checkpoint.is_dir() else checkpoint
    if not src.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {STATE_FILE} (expected a checkpoint folder or its state file)")
    payload = load_state_file(src)
    payload.pop("optimizer", None)
    payload["model"] = {k: v.half() if torch.is_floating_point(v) else v for k, v in payload["model"].items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        torch.save(payload, tmp)
    return dest


def _save_payload(state: TrainState, job: PretrainJob, pool: ChannelPool, world_size: int) -> dict[str, Any]:
    return {
        **state.state_dict(),
        "seed": job.train.seed,
        "world_size": world_size,
        "config": json.loads(job.model_dump_json()),
        "pool": pool.describe(),
    }


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: build pool and model, resume, train, checkpoint.

    Args:
        config: ``{"job": <PretrainJob as JSON dict>, "deadline": unix time or None, "local_mode": bool}``.
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    job = PretrainJob.model_validate(config["job"])
    deadline: float | None = config.get("deadline")
    local_mode = bool(config.get("local_mode"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    pool = ChannelPool.from_config(job.data)
    state = build_state(job)
    _restore(state, job, torch.device("cpu"))
    # moves to the device; DDP when world > 1 (without the decoder pass its parameters get no gradient)
    unused = {"find_unused_parameters": True} if job.mask.weight == 0 else None
    state.net = ray.train.torch.prepare_model(state.net, parallel_strategy_kwargs=unused)
    for opt_state in state.optimizer.state.values():  # optimiser moments follow the parameters
        for k, v in opt_state.items():
            if torch.is_tensor(v) and k != "step":
                opt_state[k] = v.to(device)
    if state.step >= job.train.steps:
        logger.info("run %s already reached step %d", job.name, state.step)
        return
    log_path = Path(job.output.dir) / LOG_FILE
    t_start = time.time()

    cpu_budget = job.train.max_cpu_minutes * 60 if job.train.max_cpu_minutes is not None else None
    # this process, all threads: a budget that other jobs on the machine do not eat, summed over the stretches
    # of a resumed run (the checkpoint carries the CPU seconds spent before)
    cpu0, cpu_before = time.process_time(), state.cpu_s

    def should_stop(st: TrainState) -> bool:
        st.cpu_s = cpu_before + time.process_time() - cpu0
        late = deadline is not None and time.time() > deadline
        spent = cpu_budget is not None and st.cpu_s > cpu_budget
        flag = torch.tensor([1.0 if late or spent else 0.0], device=device)
        if world > 1 and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item() > 0)

    # rank 0 draws the bar where its stderr is a terminal (local mode); Ray workers' logs get none
    bar = progress_bar(
        job.train.steps, "pretraining", unit="step", initial=state.step, enabled=None if rank == 0 else False
    )

    def on_log(record: dict[str, float]) -> None:
        if rank != 0:
            return
        bar.update(int(record["step"]) - bar.n)
        bar.set_postfix_str(f"loss {record['loss']:.4g}", refresh=False)
        line = {
            "time": time.time(),
            "elapsed_s": round(time.time() - t_start, 3),
            "cpu_s": round(cpu_before + time.process_time() - cpu0, 2),
            "world_size": world,
            **record,
        }
        with open(log_path, "a") as fh:
            fh.write(json.dumps(line) + "\n")
        logger.info(
            "step %d loss %.5f lr %.3g %.1f samples/s",
            record["step"],
            record["loss"],
            record["lr"],
            record["samples_per_s"],
        )

    def on_checkpoint(st: TrainState) -> None:
        metrics = {"step": st.step, "loss": st.history[-1]["loss"] if st.history else float("nan")}
        name = f"checkpoint_{st.step:08d}"
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        payload = _save_payload(st, job, pool, world)
        if local_mode:  # local mode does not persist reported checkpoints: write them in place
            target = run_dir(job) / name
            target.mkdir(parents=True, exist_ok=True)
            with atomic_path(target / STATE_FILE) as tmp:  # a kill never leaves half a file
                torch.save(payload, tmp)
            for old in sorted(run_dir(job).glob("checkpoint_[0-9]*"))[: -job.output.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(target)))
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(payload, Path(tmp) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)

    reason = train_steps(
        state,
        pool,
        job,
        until=job.train.steps,
        rank=rank,
        world_size=world,
        should_stop=should_stop,
        on_log=on_log,
        on_checkpoint=on_checkpoint,
    )
    bar.close()
    if rank == 0:
        logger.info("run %s ended at step %d (%s)", job.name, state.step, reason)


def _use_gpu(job: PretrainJob) -> bool:
    if job.runtime.use_gpu == "yes":
        return True
    if job.runtime.use_gpu == "no":
        return False
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) > 0 if ray.is_initialized() else torch.cuda.is_available()


def build_trainer(job: PretrainJob, *, deadline: float | None = None) -> Any:
    """The ``TorchTrainer`` of a job (Ray must already be initialised unless ``num_workers == 0``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rt = job.runtime
    local_mode = rt.num_workers == 0
    use_gpu = _use_gpu(job)
    scaling = ScalingConfig(
        num_workers=rt.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=None if local_mode else {"CPU": rt.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
    )
    run = RunConfig(
        name=job.name,
        storage_path=str(Path(job.output.dir) / "ray"),
        failure_config=FailureConfig(max_failures=rt.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=job.output.keep_checkpoints),
    )
    loop_config = {"job": json.loads(job.model_dump_json()), "deadline": deadline, "local_mode": local_mode}
    return TorchTrainer(train_func, train_loop_config=loop_config, scaling_config=scaling, run_config=run)


def trained_network(job: PretrainJob, payload: dict[str, Any]) -> torch.nn.Module:
    """The network of a training state (a checkpoint's ``state.pt`` payload) in eval mode, float32, without the
    distillation heads: what ``model.pt`` holds (before any BatchNorm recalibration)."""
    net = create_model(job.model.arch, **job.model.arch_kwargs)
    weights = network_state(payload["model"])
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    return net.eval()


def finalize(job: PretrainJob, payload: dict[str, Any], *, stop_reason: str, elapsed_s: float) -> PretrainResult:
    """Write ``model.pt`` (``save_checkpoint`` format), the loss curve, the figure and the model card."""
    from msnoop.core.runtime import provenance
    from msnoop.train.card import loss_curve_figure, reconstruction_figure, write_model_card

    out = Path(job.output.dir)
    net = trained_network(job, payload)
    history = payload.get("history", [])
    final_loss = history[-1]["loss"] if history else None
    preprocess = Preprocessing(preset="microsnoop", mode="native", input_size=job.output.input_size)
    meta = {
        "trained_by": "msnoop pretrain",
        "name": job.name,
        "steps": int(payload["step"]),
        "planned_steps": job.train.steps,
        "seed": job.train.seed,
        "world_size": payload.get("world_size"),
        "batch_size_per_worker": job.train.batch_size,
        "crop_size": job.data.crop_size,
        "mask_ratio": job.mask.ratio,
        "patch_size": job.mask.patch_size,
        "loss": job.mask.loss,
        "mask_select": job.mask.select,
        "loss_average": job.mask.average,
        "reconstruction_weight": job.mask.weight,
        "distill": job.distill.model_dump() if job.distill.enabled else None,
        "spread": job.spread.model_dump() if job.spread.variance or job.spread.covariance else None,
        "crop_sizes": job.data.crop_sizes,
        "batchnorm": job.train.batchnorm,
        "final_loss": final_loss,
        "stop_reason": stop_reason,
        "data": payload.get("pool"),
    }
    recal = None
    if job.output.bn_recalibration_batches > 0 and job.data.crop_size != job.output.input_size:
        from msnoop.train.recalibrate import recalibrate_on_job_pool

        try:
            recal = recalibrate_on_job_pool(net, job, size=job.output.input_size)
            meta["bn_recalibration"] = recal
        except Exception as exc:  # never lose a trained model: save it with the training statistics
            logger.warning("BatchNorm recalibration failed, saving the training statistics: %s", exc)
    model_path = save_checkpoint(
        out / "model.pt",
        net,
        arch=job.model.arch,
        preprocess=preprocess,
        arch_kwargs=job.model.arch_kwargs,
        meta=meta,
        half=job.output.half,
    )
    curve = loss_curve_figure(history, out / "loss_curve.png") if history else None
    figure = None
    try:
        pool = ChannelPool.from_config(job.data.model_copy(update={"preload_mb": 0}))
        figure = reconstruction_figure(net, pool, job, out / "reconstructions.png")
    except Exception as exc:  # a figure must never lose a trained model
        logger.warning("reconstruction figure failed: %s", exc)
    card = write_model_card(
        out / "MODEL_CARD.md",
        job=job,
        payload=payload,
        model_path=model_path,
        sha256=file_sha256(model_path),
        stop_reason=stop_reason,
        elapsed_s=elapsed_s,
        provenance=provenance(),
        figure=figure,
        loss_curve=curve,
        preprocess=preprocess,
        bn_recalibration=recal,
    )
    return PretrainResult(model_path, card, figure, curve, int(payload["step"]), final_loss, stop_reason, elapsed_s)


def run_pretrain(job: PretrainJob, *, base: Path | None = None) -> PretrainResult:
    """Run (or resume) a pretraining job end to end and write its outputs.

    Args:
        job: The validated job; relative paths are taken from ``base`` (default: the current folder).
        base: Folder that relative paths in the job are relative to.

    Returns:
        Paths of the model, card and figures, the steps done and the stop reason.
    """
    from msnoop.core.runtime import init_ray

    t0 = time.time()
    job = absolutize(job, base)
    out = Path(job.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(job, out)
    deadline = None
    if job.train.max_minutes is not None:
        budget = job.train.max_minutes * 60
        deadline = t0 + budget - min(60.0, 0.1 * budget)  # keep time to write the outputs
    if job.runtime.num_workers > 0:
        obj = job.runtime.object_store_mb * 2**20 if job.runtime.object_store_mb else None
        init_ray(job.runtime.address, num_cpus=job.runtime.num_cpus, object_store_memory=obj)
    logger.info(
        "pretrain %s: %d steps, %d worker(s), outputs in %s", job.name, job.train.steps, job.runtime.num_workers, out
    )
    result = build_trainer(job, deadline=deadline).fit()
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            payload = load_state_file(Path(d) / STATE_FILE)
    elif (path := latest_checkpoint_dir(job)) is not None:
        payload = load_state_file(path / STATE_FILE)
    else:
        raise RuntimeError(f"run {job.name!r} finished without a checkpoint in {run_dir(job)}; see the Ray logs above")
    step = int(payload["step"])
    reason = "steps" if step >= job.train.steps else "time budget"
    res = finalize(job, payload, stop_reason=reason, elapsed_s=time.time() - t0)
    logger.info("wrote %s (step %d, %s)", res.model_path, step, reason)
    return res


def train_bare(job: PretrainJob, *, steps: int | None = None) -> tuple[TrainState, float]:
    """The same loop without Ray, in this process (benchmarks, debugging); returns state and samples/s."""
    pool = ChannelPool.from_config(job.data)
    state = build_state(job)
    n = steps or job.train.steps
    t = time.perf_counter()
    train_steps(state, pool, job, until=n)
    dt = time.perf_counter() - t
    return state, n * job.train.batch_size / max(dt, 1e-9)


__all__ = [
    "PretrainResult",
    "ResumeError",
    "build_trainer",
    "finalize",
    "latest_checkpoint_dir",
    "run_dir",
    "run_pretrain",
    "train_bare",
    "train_func",
    "trained_network",
    "write_compact_state",
]


def summary(job: PretrainJob, result: PretrainResult) -> str:
    """What ``msnoop pretrain`` / ``msnoop run`` print at the end of a pretraining job."""
    loss = f"{result.final_loss:.5f}" if result.final_loss is not None else "n/a"
    lines = [f"Wrote model: {result.model_path.resolve()}", f"Wrote model card: {result.card_path.resolve()}"]
    if result.figure_path:
        lines.append(f"Wrote reconstruction figure: {result.figure_path.resolve()}")
    lines.append(f"Steps: {result.steps} ({result.stop_reason}), final loss {loss}, {result.elapsed_s / 60:.1f} min")
    return "\n".join(lines)
