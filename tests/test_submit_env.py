"""`msnoop submit` runtime_env options and path/URI handling of configs sent to a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from msnoop.core.config import absolutize
from msnoop.core.storage import Location
from msnoop.submit import RuntimeEnvOptions, redact_runtime_env


def test_runtime_env_built_from_options():
    env = RuntimeEnvOptions(pip=["msnoop==0.1.0"], env_vars={"MSNOOP_X": "1"}).to_runtime_env("/tmp/w")
    assert env == {
        "working_dir": "/tmp/w",
        "env_vars": {"PYTHONUNBUFFERED": "1", "MSNOOP_X": "1"},
        "pip": ["msnoop==0.1.0"],
    }
    env = RuntimeEnvOptions(image_uri="ghcr.io/x/msnoop:0.1").to_runtime_env("/w")
    assert env["image_uri"] == "ghcr.io/x/msnoop:0.1" and "pip" not in env
    assert RuntimeEnvOptions().to_runtime_env("/w") == {"working_dir": "/w", "env_vars": {"PYTHONUNBUFFERED": "1"}}


@pytest.mark.parametrize("bad", [{"pip": ["a"], "image_uri": "img"}, {"conda": "env.yaml"}, {"env_vars": {"A": 1.5}}])
def test_runtime_env_rejects(bad):
    with pytest.raises(ValidationError):
        RuntimeEnvOptions(**bad)


def test_secret_values_are_masked_in_what_is_printed():
    env = RuntimeEnvOptions(
        env_vars={"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ACCESS_KEY_ID": "AKIA", "HF_TOKEN": "t", "AWS_REGION": "eu"}
    ).to_runtime_env("/w")
    shown = redact_runtime_env(env)
    assert shown["env_vars"] == {
        "PYTHONUNBUFFERED": "1",
        "AWS_SECRET_ACCESS_KEY": "***",
        "AWS_ACCESS_KEY_ID": "***",
        "HF_TOKEN": "***",
        "AWS_REGION": "eu",
    }
    assert env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"  # the real runtime_env is unchanged


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dir: Location
    lancedb: Location | None = None


@pytest.mark.parametrize("uri", ["s3://bucket/runs/a", "gs://b/x/", "az://container/p"])
def test_absolutize_keeps_uris_and_absolutises_paths(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = absolutize(_Out(dir="out/run1", lancedb=uri))
    assert cfg.dir == tmp_path / "out" / "run1" and isinstance(cfg.dir, Path)
    assert cfg.lancedb == uri  # exactly as given: no s3:/ mangling, not made relative to the cwd
    assert absolutize(_Out(dir=uri)).dir == uri


def test_kuberay_example_config_validates(tmp_path):
    """The RayJob example's embedded job config is a valid msnoop config and its entrypoint reads it."""
    import yaml

    from msnoop.job_kinds import load_config

    docs = list(yaml.safe_load_all((Path(__file__).parents[1] / "configs/kuberay/rayjob_embed.yaml").read_text()))
    configmap, rayjob = docs
    job = tmp_path / "job.yaml"
    job.write_text(configmap["data"]["job.yaml"])
    cfg = load_config(job)
    assert cfg.job == "embed"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m["mountPath"] for m in head["containers"][0]["volumeMounts"] if m["name"] == "config")
    assert rayjob["spec"]["entrypoint"] == f"python -m msnoop run {mount}/job.yaml"
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == __import__("ray").__version__
    assert "SECRET" not in configmap["data"]["job.yaml"].upper()
