"""Ray session management and run provenance (versions, device, config hash)."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

#: ``runtime.use_gpu``: GPUs when the cluster has them, always (an error without), or never.
UseGpu = Literal["auto", "yes", "no"]
#: ``runtime.amp``: where bf16 autocast runs (see :data:`AMP_HELP`).
Amp = Literal["cuda", "auto", "off"]

AMP_HELP = (
    "bf16 autocast: 'cuda' on GPUs only; 'auto' also on CPUs with native bf16 (AVX512-BF16 or AMX), "
    "about 2x faster there (measured: embedding 2x, training 2.3x per crop); 'off' never"
)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), where autocast speeds the network up.

    Elsewhere bf16 is emulated and slower than float32.
    """
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch.cpu helpers (torch >= 2.1)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def uses_bf16(amp: str, device: Any, backend: str = "torch") -> bool:
    """Whether the network runs under bf16 autocast on ``device`` (a ``torch.device``) for an ``amp`` setting.

    ``amp`` is ``cuda`` (GPUs only), ``auto`` (also CPUs with native bf16) or ``off``; the ``onnxruntime`` backend
    runs float32 whatever ``amp`` says.
    """
    if amp == "off" or backend != "torch":
        return False
    if device.type == "cuda":
        return True
    return amp == "auto" and device.type == "cpu" and cpu_has_native_bf16()


#: Tiles per forward pass on a GPU ("a GPU keeps large batches"): the pipeline's batch size before the CPU defaults.
GPU_BATCH_SIZE = 64

#: Pixels per forward pass on a CPU (``batch_size: auto``): a batch holds ``max(1, CPU_BATCH_PIXELS // (H * W))``
#: tiles, capped at ``CPU_MAX_BATCH``: 2 tiles of 224 px, 8 of 128 px, 32 of 64 px. Chosen by measurement
#: (``jobs/bench_cpu.py`` stage ``sweep``, 2 AVX-512 cores, tiles per CPU-second): 224 px tiles ran fastest in
#: batches of 1-4 and slower from 8 on (the feature maps of a batch fall out of the caches: the first level alone
#: is 32 x 224 x 224 floats, 6.4 MB, per tile), 64 px tiles fastest in batches of 32.
CPU_BATCH_PIXELS = 32 * 64 * 64
CPU_MAX_BATCH = 64


@dataclass(frozen=True)
class InferenceSettings:
    """How the embedding network runs on one device; :func:`inference_settings` resolves them from a config.

    Attributes:
        device: ``cpu`` or ``cuda[:i]``.
        batch_size: Fixed tiles per forward pass, or None for the device's rule (:meth:`tiles_per_batch`).
        channels_last: Weights and inputs in channels-last (NHWC) memory format; the same vectors up to float
            summation order (measured max difference ~1e-7 on unit vectors).
        bf16: The network runs under bf16 autocast; vectors differ from float32 ones by bf16 rounding.
        backend: ``torch`` (the reference) or ``onnxruntime`` (CPU, always float32; :mod:`msnoop.embed.onnx_backend`).
    """

    device: str
    batch_size: int | None
    channels_last: bool
    bf16: bool
    backend: str = "torch"

    def tiles_per_batch(self, height: int, width: int | None = None) -> int:
        """Tiles of ``height x width`` pixels per forward pass (``width`` defaults to ``height``).

        A fixed ``batch_size`` holds for every canvas; otherwise a GPU takes :data:`GPU_BATCH_SIZE` and a CPU
        ``CPU_BATCH_PIXELS // (height * width)`` tiles (at least 1, at most :data:`CPU_MAX_BATCH`).
        """
        if self.batch_size is not None:
            return self.batch_size
        if not self.device.startswith("cpu"):
            return GPU_BATCH_SIZE
        pixels = int(height) * int(width if width is not None else height)
        return max(1, min(CPU_MAX_BATCH, CPU_BATCH_PIXELS // max(1, pixels)))

    def record(self) -> dict[str, Any]:
        """JSON-ready record of the settings (for logs and run records)."""
        return {
            "device": self.device,
            "batch_size": self.batch_size if self.batch_size is not None else "auto",
            "channels_last": self.channels_last,
            "bf16": self.bf16,
            "backend": self.backend,
        }


def inference_settings(
    device: Any,
    *,
    batch_size: int | str = "auto",
    amp: str = "auto",
    memory_format: str = "auto",
    backend: str = "torch",
) -> InferenceSettings:
    """Resolve the embedding network's settings for ``device`` (a ``torch.device`` or its name).

    Args:
        device: Where the network runs: ``cpu``, ``cuda`` or ``cuda:i``.
        batch_size: Tiles per forward pass, or ``auto`` (by device and canvas:
            :meth:`InferenceSettings.tiles_per_batch`).
        amp: bf16 autocast setting (see :func:`uses_bf16`).
        memory_format: ``auto`` (channels-last on CPUs, where it measured faster, the default layout on GPUs,
            where it was not measured), ``channels_last`` or ``contiguous``.
        backend: ``torch`` or ``onnxruntime`` (CPUs only; it runs float32 whatever ``amp`` says: its CPU
            provider has no bf16 convolutions).

    Raises:
        ValueError: An unknown ``batch_size``, ``amp``, ``memory_format`` or ``backend`` value, or ``onnxruntime``
            on a GPU.
    """
    import torch

    dev = torch.device(device)
    if amp not in ("cuda", "auto", "off"):
        raise ValueError(f"amp must be 'cuda', 'auto' or 'off'; found {amp!r}")
    if memory_format not in ("auto", "channels_last", "contiguous"):
        raise ValueError(f"memory_format must be 'auto', 'channels_last' or 'contiguous'; found {memory_format!r}")
    if batch_size == "auto":
        fixed = None
    elif isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
        fixed = batch_size
    else:
        raise ValueError(f"batch_size must be a number of tiles >= 1 or 'auto'; found {batch_size!r}")
    channels_last = memory_format == "channels_last" or (memory_format == "auto" and dev.type == "cpu")
    if backend not in ("torch", "onnxruntime"):
        raise ValueError(f"backend must be 'torch' or 'onnxruntime'; found {backend!r}")
    if backend == "onnxruntime" and dev.type != "cpu":
        raise ValueError(f"backend 'onnxruntime' runs on CPUs only; here the network runs on {dev}: set backend torch")
    bf16 = uses_bf16(amp, dev, backend)
    return InferenceSettings(device=str(dev), batch_size=fixed, channels_last=channels_last, bf16=bf16, backend=backend)


def _loopback_env() -> None:
    """Make a local cluster listen on 127.0.0.1 only (measured with ``ss -ltnp``).

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported; with it off, the node address
    resolves to loopback and every listener binds there. The variable reaches the cluster's processes
    through the environment; in this process the constant is patched because ray may already be
    imported. Only for clusters msnoop starts itself: a driver joining a multi-node cluster must
    announce a routable address.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report thread at start
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray starts workers at niceness 15; the embedding actors are this job's main work, so on a shared
    # machine they should not yield to every other process.
    os.environ.setdefault("RAY_worker_niceness", "0")


def ray_session_here() -> bool:
    """Whether this process is already connected to Ray (without importing Ray when it is not loaded)."""
    return "ray" in sys.modules and bool(sys.modules["ray"].is_initialized())


def cluster_to_join(address: str | None = None) -> str | None:
    """The Ray cluster a job of this process runs on, or None when msnoop would start a local one for it.

    In order: a Ray session already open in this process (``"session"``), ``address``, ``RAY_ADDRESS``, the
    cluster that ``msnoop cluster start`` recorded if it is running (:mod:`msnoop.core.local_cluster`).
    """
    if ray_session_here():
        return "session"
    if address or os.environ.get("RAY_ADDRESS"):
        return address or os.environ["RAY_ADDRESS"]
    from msnoop.core.local_cluster import recorded_cluster

    running = recorded_cluster()
    return running.address if running is not None else None


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Connect to the cluster of :func:`cluster_to_join`, else start a local cluster bound to loopback.

    A local cluster is lean: no dashboard, no usage statistics, workers not niced, and ``num_cpus`` and
    ``object_store_memory`` as given (Ray's defaults otherwise).

    Returns:
        ``ray.cluster_resources()``.
    """
    address = cluster_to_join(address)
    if address and "ray" not in sys.modules and (Path.home() / ".ray" / "auth_token").is_file():
        # a `ray start` cluster (token authentication on) wants the token; Ray reads the mode when it is imported
        # (once imported, it turns token authentication on by itself when the token file exists and the variable
        # is unset, so the variable is only set here, before the import)
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    routine = not logging.getLogger("msnoop").isEnabledFor(logging.DEBUG)  # quiet unless `msnoop -v`
    if routine:
        quiet_ray_loggers()  # the token notice is printed inside ray.init
        _drop_forwarded_lines(_RAY_LEVEL_NOTICE)
    kwargs: dict[str, Any] = {"log_to_driver": not quiet, "configure_logging": True, "logging_level": logging.WARNING}
    with _stderr_without(_RAY_LEVEL_NOTICE) if routine else contextlib.nullcontext():
        _start_or_join(ray, address, kwargs, num_cpus=num_cpus, object_store_memory=object_store_memory)
    from ray.data import DataContext

    if quiet:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
    if routine:
        quiet_ray_loggers()  # again: importing ray.data installs its own logging configuration
    return ray.cluster_resources()


def _start_or_join(
    ray: Any, address: str | None, kwargs: dict[str, Any], *, num_cpus: int | None, object_store_memory: int | None
) -> None:
    """``ray.init``: join ``address``, or (None) start a lean local cluster on loopback."""
    if address:
        logger.info("connecting to Ray cluster at %s", address)
        if address.split("://")[-1].split(":")[0] in (LOOPBACK, "localhost"):
            # a cluster on this machine's loopback (`msnoop cluster start`): this driver stays on loopback too, or
            # Ray rewrites the address to the network interface's, where that cluster does not listen
            _loopback_env()
            kwargs["_node_ip_address"] = LOOPBACK
        ray.init(address=address, **kwargs)
    else:
        _loopback_env()
        ray.init(
            address="local",  # never attach to a stray `ray start` cluster by accident
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            # No idle workers started ahead of demand: Ray Data runs its own actors and tasks start workers when
            # they need them, while each prestarted worker imports Ray for 1-2 CPU-seconds that a small machine
            # takes from the embedding actor (jobs/bench_embed.py, 2 cores: see results/bench_embed_1000.json).
            _system_config={"enable_worker_prestart": False, "prestart_worker_first_driver": False},
            **kwargs,
        )


@contextlib.contextmanager
def _stderr_without(pattern: re.Pattern[str]) -> Iterator[None]:
    """Hold back this process's stderr (file descriptor 2: C++ and Python alike) and write it out afterwards, less
    the lines matching ``pattern``. Around ``ray.init``: the driver's own C++ core prints its 'Set ray log level'
    notice there, straight to the descriptor. Does nothing where stderr has no descriptor (captured by a test)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not pattern.search(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


#: Ray's Python loggers that report routine events at INFO/WARNING on every run: Ray Data's executor
#: ("Starting execution of Dataset ...", "Progress bars disabled", "execution finished"), which has its own
#: console handler at INFO (``ray/data/_internal/logging.py``) and ignores the ``ray`` logger's level, the
#: token-authentication notice that every local ``ray.init`` prints, and the Jobs client's notes on each submission.
RAY_ROUTINE_LOGGERS = (
    "ray.data",
    "ray._private.authentication.authentication_token_setup",
    "ray.dashboard.modules.dashboard_sdk",  # `msnoop submit`: "Uploading package ..."
    "ray._private.runtime_env.packaging",  # "Creating a file package for local module ..."
    "ray.dashboard.modules.job.sdk",  # "WebSocket closed for job ..."
)


def quiet_ray_loggers(level: int = logging.ERROR) -> None:
    """Raise Ray's routine Python loggers (:data:`RAY_ROUTINE_LOGGERS`) to ``level``.

    Called by :func:`init_ray` unless the ``msnoop`` logger is at DEBUG (``msnoop -v``), before ``ray.init``
    (the token notice) and after ``ray.data`` is imported (its import installs Ray Data's logging
    configuration, which resets the level). Ray Data still writes everything to ``ray-data.log`` in the
    session's log folder.
    """
    for name in RAY_ROUTINE_LOGGERS:
        logging.getLogger(name).setLevel(level)


#: The notice every Ray C++ process prints at start when ``RAY_BACKEND_LOG_LEVEL`` is set (``msnoop`` sets it
#: to hide Ray's false-alarm ERROR lines, see :mod:`msnoop.cli`); workers' copies reach the driver.
_RAY_LEVEL_NOTICE = re.compile(r"logging\.cc:\d+: Set ray log level from environment variable")


def _drop_forwarded_lines(pattern: re.Pattern[str]) -> None:
    """Drop worker/raylet log lines matching ``pattern`` from what Ray forwards to the driver's terminal.

    Wraps the handler that ``ray.init(log_to_driver=True)`` registers (``"ray_print_logs"`` in
    ``ray._private.ray_logging.global_worker_stdstream_dispatcher``, Ray 2.60), already registered or
    registered later (so it must run before ``ray.init`` to catch the raylet's first lines). Does nothing if
    Ray's internals differ. The lines stay in the session's log files.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    handlers = getattr(dispatcher, "handlers", None)
    add = getattr(dispatcher, "add_handler", None)
    if not isinstance(handlers, list) or add is None:
        return

    def wrap(handle: Any) -> Any:
        if getattr(handle, "_msnoop_filtered", False):
            return handle

        def filtered(data: dict[str, Any]) -> None:
            lines = data.get("lines") if isinstance(data, dict) else None
            if isinstance(lines, list):
                kept = [ln for ln in lines if not (isinstance(ln, str) and pattern.search(ln))]
                if not kept:
                    return
                data = {**data, "lines": kept}
            handle(data)

        filtered._msnoop_filtered = True  # type: ignore[attr-defined]
        return filtered

    for i, (name, handle) in enumerate(list(handlers)):
        if name == "ray_print_logs":
            handlers[i] = (name, wrap(handle))
    if not getattr(add, "_msnoop_filtered", False):

        def add_handler(name: str, handler: Any) -> None:
            add(name, wrap(handler) if name == "ray_print_logs" else handler)

        add_handler._msnoop_filtered = True  # type: ignore[attr-defined]
        dispatcher.add_handler = add_handler


def shutdown_ray() -> None:
    """Stop this process's Ray session, if one is running (a no-op otherwise)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def git_sha(path: Path | None = None) -> str | None:
    """The short commit of the git checkout holding ``path`` (default: msnoop's own folder), or None outside one.

    With ``-dirty`` appended (``"5ec28b3-dirty"``) when tracked files outside ``results/`` differ from that commit:
    what ran was then not the commit alone. ``results/`` is left out because benchmarks rewrite their own result
    files there while they run.
    """
    here = Path(__file__).resolve().parent if path is None else Path(path)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
        if not sha:
            return None
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top,exclude)results"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout.strip()
        return f"{sha}-dirty" if changed else sha
    except (OSError, subprocess.SubprocessError):
        return None


def provenance() -> dict[str, Any]:
    """Versions and device of this process, for logs and output metadata."""
    from importlib.metadata import version

    import numpy
    import torch

    from msnoop import __version__

    info: dict[str, Any] = {
        "msnoop": __version__,
        "git": git_sha(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": version("ray"),  # not `import ray`: a job without Ray (small, local) never loads it
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "host": platform.node(),
    }
    return info
