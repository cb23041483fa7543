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

from pydantic import BaseModel, ConfigDict, Field, model_validator

from msnoop.core.config import absolutize, config_hash, config_to_yaml

logger = logging.getLogger(__name__)

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
CONFIG_NAME = "msnoop_job.yaml"


#: environment variable names whose values are never printed (the equivalent command shows ***)
SECRET_MARKERS = ("SECRET", "KEY", "TOKEN", "PASSWORD", "CREDENTIAL", "SESSION")


class RuntimeEnvOptions(BaseModel):
    """What the job's processes get on the cluster beyond the config (a Ray ``runtime_env``).

    ``pip``: packages installed into a per-job virtualenv on every node; ``image_uri``: run the job's
    workers in this container image (Ray's ``image_uri`` runtime_env, needs podman on the nodes; on
    KubeRay use the RayCluster's image instead); ``env_vars``: set on every worker. Secrets belong
    in the cluster's environment (Kubernetes secrets, instance roles), not here: values of names
    containing KEY/SECRET/TOKEN/PASSWORD are masked in what msnoop prints, but Ray stores a job's
    runtime_env in its job table.
    """

    model_config = ConfigDict(extra="forbid")

    pip: list[str] = Field(default_factory=list, description="pip requirements, e.g. ['msnoop==0.1.0']")
    image_uri: str | None = Field(None, description="container image for the job's workers")
    env_vars: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_isolation(self) -> RuntimeEnvOptions:
        if self.pip and self.image_uri:
            raise ValueError("runtime_env: give pip packages or an image_uri, not both (Ray rejects the pair)")
        return self

    def to_runtime_env(self, working_dir: str) -> dict[str, Any]:
        env: dict[str, Any] = {"working_dir": working_dir, "env_vars": {"PYTHONUNBUFFERED": "1", **self.env_vars}}
        if self.pip:
            env["pip"] = list(self.pip)
        if self.image_uri:
            env["image_uri"] = self.image_uri
        return env


def redact_runtime_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``runtime_env`` with the values of secret-looking ``env_vars`` replaced by ``***``."""
    out = dict(runtime_env)
    env = out.get("env_vars") or {}
    out["env_vars"] = {k: ("***" if any(m in k.upper() for m in SECRET_MARKERS) else v) for k, v in env.items()}
    return out


@dataclass
class Submission:
    job_id: str
    address: str
    entrypoint: str
    working_dir: str
    equivalent_command: str


def dashboard_address(address: str | None) -> str:
    """The Jobs API address: ``--address``, else ``RAY_API_SERVER_ADDRESS``/``RAY_ADDRESS`` if HTTP, else local."""
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not addr or addr == "auto":
        return DEFAULT_DASHBOARD
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

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise ConnectionError(
            f"cannot reach a Ray cluster's Jobs API at {address} ({exc}); start one with `ray start --head` "
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
    """
    addr = dashboard_address(address)
    cfg = absolutize(cfg)
    local = any(h in addr for h in ("127.0.0.1", "localhost"))
    interpreter = python or (sys.executable if local else "python")
    workdir = Path(tempfile.mkdtemp(prefix="msnoop_job_"))
    (workdir / CONFIG_NAME).write_text(config_to_yaml(cfg))
    entrypoint = f"{shlex.quote(interpreter)} -m msnoop run {CONFIG_NAME}"
    kind = getattr(cfg, "job", "job")
    sid = job_id or f"msnoop-{kind}-{config_hash(cfg)}-{int(time.time())}"
    runtime_env = (runtime_env or RuntimeEnvOptions()).to_runtime_env(str(workdir))
    client = _client(addr)
    job = client.submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, submission_id=sid, metadata={"msnoop_job": str(kind)}
    )
    equivalent = (
        f"ray job submit --address {addr} --submission-id {sid} "
        f"--runtime-env-json {shlex.quote(json.dumps(redact_runtime_env(runtime_env)))} -- {entrypoint}"
    )
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
    status = _client(address).get_job_status(job_id)
    return str(status.value if hasattr(status, "value") else status)
