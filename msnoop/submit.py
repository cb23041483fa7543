"""Send a validated job config to a Ray cluster with the Ray Jobs API (``msnoop submit``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from msnoop.core.config import absolutize, config_hash, config_to_yaml
from msnoop.core.runtime_env import SECRET_MARKERS, RuntimeEnvOptions, redact_runtime_env

logger = logging.getLogger(__name__)

__all__ = [
    "SECRET_MARKERS",
    "RuntimeEnvOptions",
    "Submission",
    "dashboard_address",
    "follow_job",
    "job_runtime_env",
    "job_status",
    "redact_runtime_env",
    "submit_job",
]

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
CONFIG_NAME = "msnoop_job.yaml"


@dataclass
class Submission:
    """A job sent to a Ray cluster: its id, the address, what runs there, and the equivalent ``ray job submit``."""

    job_id: str
    address: str
    entrypoint: str
    working_dir: str
    equivalent_command: str


def job_runtime_env(cfg: BaseModel, options: RuntimeEnvOptions | None = None) -> RuntimeEnvOptions:
    """The config's ``runtime_env:`` section (if its job kind has one) merged with ``options`` (options win)."""
    base = getattr(cfg, "runtime_env", None) or RuntimeEnvOptions()
    return base.merged(options)


def dashboard_address(address: str | None) -> str:
    """The Jobs API address: ``--address``, else ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS`` if HTTP, else the
    dashboard of a running ``msnoop cluster`` (:mod:`msnoop.core.local_cluster`), else ``http://127.0.0.1:8265``."""
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not addr or addr == "auto":
        from msnoop.core.local_cluster import recorded_cluster

        running = recorded_cluster()
        return running.dashboard if running is not None else DEFAULT_DASHBOARD
    if addr.startswith("ray://"):
        raise ValueError(
            f"{addr} is a Ray Client address; the Jobs API needs the dashboard address, e.g. http://HEAD:8265"
        )
    if not addr.startswith(("http://", "https://")):
        host = addr.split(":")[0]
        return f"http://{host}:8265"
    return addr


def _client(address: str):  # type: ignore[no-untyped-def]
    # A local `ray.init()` writes ~/.ray/auth_token and a later `ray start` then requires it: send it.
    token = Path.home() / ".ray" / "auth_token"
    if token.is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    from msnoop.core.runtime import quiet_ray_loggers

    if not logging.getLogger("msnoop").isEnabledFor(logging.DEBUG):  # quiet unless `msnoop -v`
        quiet_ray_loggers()

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise ConnectionError(
            f"cannot reach a Ray cluster's Jobs API at {address} ({exc}); start one here with `msnoop cluster start` "
            "or pass --address http://HEAD:8265"
        ) from None


def submit_job(
    cfg: BaseModel,
    *,
    address: str | None = None,
    python: str | None = None,
    job_id: str | None = None,
    runtime_env: RuntimeEnvOptions | None = None,
) -> Submission:
    """Submit ``cfg`` as a Ray job; the config travels in a small uploaded working dir.

    The entrypoint runs ``python -m msnoop run msnoop_job.yaml`` on the cluster, which must have msnoop
    installed (the Docker image does, or ``runtime_env.pip``). ``python`` defaults to this interpreter
    for a local cluster and ``python`` otherwise. Local paths in the config are made absolute; URIs
    (``s3://...``) are kept as they are.

    The job's Ray ``runtime_env`` is the config's ``runtime_env:`` section with ``runtime_env`` (the command
    line's options) on top (:meth:`RuntimeEnvOptions.merged`: options win); ``${NAME}`` values are read from
    this process's environment. The uploaded config keeps the ``${NAME}`` references, and the printed
    equivalent command masks secret values (:func:`redact_runtime_env`).

    Raises:
        ValueError: A ``${NAME}`` value whose variable is not set here.
        ConnectionError: No Jobs API at the address.
    """
    addr = dashboard_address(address)
    cfg = absolutize(cfg)
    local = any(h in addr for h in ("127.0.0.1", "localhost"))
    interpreter = python or (sys.executable if local else "python")
    options = job_runtime_env(cfg, runtime_env)
    options.resolved_env_vars()  # before anything is written: an unset ${NAME} fails here
    workdir = Path(tempfile.mkdtemp(prefix="msnoop_job_"))
    (workdir / CONFIG_NAME).write_text(config_to_yaml(cfg))
    entrypoint = f"{shlex.quote(interpreter)} -m msnoop run {CONFIG_NAME}"
    kind = getattr(cfg, "job", "job")
    sid = job_id or f"msnoop-{kind}-{config_hash(cfg)}-{int(time.time())}"
    runtime_env = options.to_runtime_env(str(workdir))
    client = _client(addr)
    job = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, submission_id=sid, metadata={"msnoop_job": str(kind)}
    )
    equivalent = (
        f"ray job submit --address {addr} --submission-id {sid} "
        f"--runtime-env-json {shlex.quote(json.dumps(redact_runtime_env(runtime_env)))} -- {entrypoint}"
    )
    logger.debug("submitted %s with runtime_env %s", sid, redact_runtime_env(runtime_env))
    return Submission(
        job_id=job, address=addr, entrypoint=entrypoint, working_dir=str(workdir), equivalent_command=equivalent
    )


def follow_job(address: str, job_id: str, *, out: Any = None, poll_s: float = 1.0) -> str:
    """Stream a job's logs until it ends; returns the final status name (SUCCEEDED, FAILED, STOPPED)."""
    client = _client(address)
    out = out or sys.stdout

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # log streaming is best effort; the status below is authoritative
        logger.debug("log tail ended: %s", exc)
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return str(status.value if hasattr(status, "value") else status)
        time.sleep(poll_s)


def job_status(address: str, job_id: str) -> str:
    """The Ray Jobs status of ``job_id`` at ``address`` (``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ...)."""
    status = _client(address).get_job_status(job_id)
    return str(status.value if hasattr(status, "value") else status)
