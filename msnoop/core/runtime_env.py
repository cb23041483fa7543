"""A job's Ray ``runtime_env``: the ``runtime_env:`` section of any job config and ``msnoop submit``'s options.

``msnoop submit`` sends it with the job (Ray's Jobs API); every task and actor of the job inherits it. It holds
pip packages *or* a container image (Ray takes one or the other) and environment variables.

Secrets never sit in a config: a job config is saved beside its outputs (``resolved_config.yaml``) and printed
by ``msnoop validate``. A variable whose name looks secret (:data:`SECRET_MARKERS`) must be written as a
reference, ``AWS_SECRET_ACCESS_KEY: ${AWS_SECRET_ACCESS_KEY}``, which ``msnoop submit`` fills in from its own
environment when it sends the job; pip requirements must not carry credentials in a URL. What msnoop prints
shows secret values as ``***`` (:func:`redact_runtime_env`). Ray itself stores a job's runtime_env in its job
table, so the safest place for credentials remains the nodes' environment (Kubernetes secrets, instance roles).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator, model_validator

from msnoop.core.config import StrictModel

#: environment variable names whose values are never printed and never written in a config
SECRET_MARKERS = ("SECRET", "KEY", "TOKEN", "PASSWORD", "CREDENTIAL", "SESSION")

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def is_secret_name(name: str) -> bool:
    """Whether an environment variable's name looks like it holds a secret (contains a :data:`SECRET_MARKERS`)."""
    return any(m in name.upper() for m in SECRET_MARKERS)


def reference(value: str) -> str | None:
    """The variable named by a ``${NAME}`` value, or None for a literal value."""
    m = _REFERENCE.match(value)
    return m.group(1) if m else None


class RuntimeEnvOptions(StrictModel):
    """What the job's processes get on the cluster beyond the config (a Ray ``runtime_env``).

    ``pip``: packages installed into a per-job virtualenv on every node; ``image_uri``: run the job's
    workers in this container image (Ray's ``image_uri`` runtime_env, needs podman on the nodes; on
    KubeRay use the RayCluster's image instead); ``env_vars``: set on every worker; a value ``${NAME}``
    is taken from the environment of ``msnoop submit`` when the job is sent.
    """

    pip: list[str] = Field(default_factory=list, description="pip requirements, e.g. ['msnoop==0.1.0']")
    image_uri: str | None = Field(None, description="container image for the job's workers")
    env_vars: dict[str, str] = Field(
        default_factory=dict,
        description="environment variables of every worker of the job; a value '${NAME}' is read from the "
        "environment of `msnoop submit`",
    )

    @field_validator("env_vars")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not _NAME.match(k)]
        if bad:
            raise ValueError(f"expected environment variable names (letters, digits, _), found {bad}")
        return value

    @model_validator(mode="after")
    def _one_isolation(self) -> RuntimeEnvOptions:
        if self.pip and self.image_uri:
            raise ValueError("runtime_env: give pip packages or an image_uri, not both (Ray rejects the pair)")
        return self

    def merged(self, override: RuntimeEnvOptions | None) -> RuntimeEnvOptions:
        """This runtime_env with ``override``'s settings on top (``override`` wins).

        Pip packages or an image given in ``override`` replace both of this one's (Ray takes one or the other);
        its variables are added, replacing same-named ones.
        """
        if override is None:
            return RuntimeEnvOptions(**self.model_dump())
        isolation = (
            {"pip": list(override.pip), "image_uri": override.image_uri}
            if override.pip or override.image_uri
            else {"pip": list(self.pip), "image_uri": self.image_uri}
        )
        return RuntimeEnvOptions(**isolation, env_vars={**self.env_vars, **override.env_vars})

    def resolved_env_vars(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """``env_vars`` with every ``${NAME}`` value read from ``environ`` (default ``os.environ``).

        Raises:
            ValueError: A referenced variable is not set; the message names the key and the variable.
        """
        environ = os.environ if environ is None else environ
        out = {}
        for key, value in self.env_vars.items():
            name = reference(value)
            if name is None:
                out[key] = value
            elif name in environ:
                out[key] = environ[name]
            else:
                raise ValueError(
                    f"runtime_env.env_vars.{key} is ${{{name}}}, but {name} is not set in this environment"
                )
        return out

    def to_runtime_env(self, working_dir: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The Ray ``runtime_env`` dict sent with the job: ``working_dir``, ``env_vars`` (resolved), ``pip`` or
        ``image_uri``.

        Raises:
            ValueError: A ``${NAME}`` value whose variable is not set in ``environ``.
        """
        env: dict[str, Any] = {
            "working_dir": working_dir,
            "env_vars": {"PYTHONUNBUFFERED": "1", **self.resolved_env_vars(environ)},
        }
        if self.pip:
            env["pip"] = list(self.pip)
        if self.image_uri:
            env["image_uri"] = self.image_uri
        return env


class RuntimeEnvConfig(RuntimeEnvOptions):
    """The ``runtime_env:`` section of a job config, used by ``msnoop submit`` (options on its command line win).

    Unlike the command line's options it is saved with the config, so it holds no secret: a variable whose name
    looks secret (KEY, SECRET, TOKEN, PASSWORD, CREDENTIAL, SESSION) must be a ``${NAME}`` reference, and pip
    requirements must not carry credentials in a URL. A job run in this process (``msnoop run``, ``msnoop
    embed``) does not use it: that process's environment is the job's.
    """

    @field_validator("env_vars")
    @classmethod
    def _no_secret_values(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if is_secret_name(key) and reference(val) is None:
                raise ValueError(
                    f"{key}: a secret's value does not belong in a job config (it is saved beside the outputs); "
                    f"write {key}: ${{{key}}} to take it from the environment of `msnoop submit`, or set it on "
                    "the cluster's nodes"
                )
        return value

    @field_validator("pip")
    @classmethod
    def _no_url_credentials(cls, value: list[str]) -> list[str]:
        for req in value:
            if _URL_CREDENTIALS.search(req):
                shown = _URL_CREDENTIALS.sub(r"\g<scheme>***@", req)
                raise ValueError(
                    f"{shown}: credentials in a pip URL do not belong in a job config; configure the index on the "
                    "nodes (pip.conf, PIP_INDEX_URL)"
                )
        return value


def redact_value(value: Any) -> Any:
    """``value`` with the values of secret-looking keys (at any depth) and URL credentials masked as ``***``.

    Used for what msnoop prints about a config, e.g. the input echoed by a validation error.
    """
    if isinstance(value, Mapping):
        return {
            k: ("***" if is_secret_name(str(k)) and not (isinstance(v, str) and reference(v)) else redact_value(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(r"\g<scheme>***@", value)
    return value


def runtime_env_field() -> Any:
    """The ``runtime_env:`` field of every job config (:class:`RuntimeEnvConfig` or None), described once."""
    return Field(
        None,
        description="Ray runtime_env that `msnoop submit` sends with the job (its --pip/--image-uri/--env options "
        "win): pip packages or a container image, and env_vars; a secret-looking variable must be written "
        "'${NAME}' and is read from the environment of `msnoop submit`. A job run in this process ignores it",
    )


def redact_runtime_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``runtime_env`` for printing: secret-looking ``env_vars`` values and URL credentials in ``pip``
    requirements replaced by ``***``."""
    out = dict(runtime_env)
    env = out.get("env_vars") or {}
    out["env_vars"] = {k: ("***" if is_secret_name(k) else v) for k, v in env.items()}
    if out.get("pip"):
        out["pip"] = [_URL_CREDENTIALS.sub(r"\g<scheme>***@", p) for p in out["pip"]]
    return out


__all__ = [
    "SECRET_MARKERS",
    "RuntimeEnvConfig",
    "RuntimeEnvOptions",
    "is_secret_name",
    "redact_runtime_env",
    "redact_value",
    "reference",
    "runtime_env_field",
]
