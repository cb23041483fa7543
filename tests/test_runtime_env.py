"""The ``runtime_env:`` section of job configs: validated, merged with `msnoop submit`'s options (options win),
sent with the job, and never a secret's value in what is saved or printed."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from msnoop.core.config import ConfigError, config_hash, config_to_yaml, save_resolved
from msnoop.core.runtime_env import RuntimeEnvConfig, RuntimeEnvOptions, is_secret_name, redact_runtime_env
from msnoop.job_kinds import JOB_KINDS, build_config

SECRET = "s3cr3t-value-9f2c"  # a value that must never show up in a saved or printed file


def _embed(runtime_env=None, tmp: Path | None = None):
    data = {
        "job": "embed",
        "input": {"manifest": str((tmp or Path(".")) / "m.csv"), "channels": ["dna"]},
        "model": "random:test_cnn:0",
        "output": {"dir": str((tmp or Path(".")) / "out")},
    }
    if runtime_env is not None:
        data["runtime_env"] = runtime_env
    return build_config(data)


def test_every_job_kind_takes_a_runtime_env_section():
    for name, kind in JOB_KINDS.items():
        field = kind.config_class().model_fields.get("runtime_env")
        assert field is not None, f"job: {name} has no runtime_env section"
        assert RuntimeEnvConfig in getattr(field.annotation, "__args__", (field.annotation,)), name


def test_env_var_values_property():
    """Generated names and values: a config accepts a value unless the name looks secret and the value is a
    literal; printing masks exactly the secret-looking names; ``${NAME}`` is read from the given environment."""
    rng = random.Random(18)
    words = ["AWS", "SECRET", "ACCESS", "KEY", "REGION", "HF", "TOKEN", "MSNOOP", "LOG", "DB", "PASSWORD", "HOME"]
    checked = {"rejected": 0, "accepted": 0}
    for _ in range(120):
        name = "_".join(rng.sample(words, rng.randint(1, 3))).lower() if rng.random() < 0.2 else None
        name = name or "_".join(rng.sample(words, rng.randint(1, 3)))
        literal = rng.random() < 0.5
        value = SECRET if literal else f"${{{name}}}"
        secret = any(m in name.upper() for m in ("SECRET", "KEY", "TOKEN", "PASSWORD", "CREDENTIAL", "SESSION"))
        assert is_secret_name(name) == secret
        if secret and literal:
            with pytest.raises(ConfigError, match=rf"runtime_env\.env_vars.*{name}: a secret's value") as err:
                _embed({"env_vars": {name: value, "OTHER": "1"}})
            assert SECRET not in str(err.value)  # the error does not echo the value
            checked["rejected"] += 1
            continue
        cfg = _embed({"env_vars": {name: value}})
        checked["accepted"] += 1
        assert SECRET not in config_to_yaml(cfg) or not secret
        sent = cfg.runtime_env.to_runtime_env("/w", environ={name: SECRET})
        assert sent["env_vars"][name] == SECRET  # the job gets the value
        shown = json.dumps(redact_runtime_env(sent))
        assert (SECRET in shown) == (not secret)  # what is printed masks exactly the secret-looking ones
    assert min(checked.values()) > 20


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"pip": ["msnoop"], "image_uri": "img"}, "not both"),
        ({"conda": "env.yaml"}, "unknown key 'runtime_env.conda'"),
        ({"env_vars": {"A": 1.5}}, "runtime_env.env_vars.A"),
        ({"env_vars": {"DB_PASSWORD": 1234567}}, "runtime_env.env_vars.DB_PASSWORD"),
        ({"env_vars": {"BAD-NAME": "1"}}, "environment variable names"),
        ({"pip": ["git+https://user:tok@example.com/x.git"]}, "credentials in a pip URL"),
        ({"pip": ["--index-url https://tok@pypi.example.com/simple", "msnoop"]}, "https://***@"),
    ],
)
def test_runtime_env_section_rejects(section, says):
    with pytest.raises(ConfigError) as err:
        _embed(section)
    assert says in str(err.value)
    assert "tok@" not in str(err.value) and "1234567" not in str(err.value)  # no credential is echoed


def test_merge_options_win_property():
    rng = random.Random(5)
    for _ in range(200):
        base_env = {f"V{i}": f"c{i}" for i in rng.sample(range(6), rng.randint(0, 4))}
        opt_env = {f"V{i}": f"o{i}" for i in rng.sample(range(6), rng.randint(0, 4))}
        base_iso = rng.choice([{}, {"pip": ["a==1", "b"]}, {"image_uri": "cfg:1"}])
        opt_iso = rng.choice([{}, {"pip": ["c"]}, {"image_uri": "opt:2"}])
        merged = RuntimeEnvConfig(env_vars=base_env, **base_iso).merged(RuntimeEnvOptions(env_vars=opt_env, **opt_iso))
        assert merged.env_vars == {**base_env, **opt_env}
        winner = opt_iso or base_iso
        assert merged.pip == winner.get("pip", []) and merged.image_uri == winner.get("image_uri")


def test_hash_ignores_runtime_env_and_saved_config_keeps_references(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    section = {"pip": ["msnoop==0.1.0"], "env_vars": {"AWS_SECRET_ACCESS_KEY": "${AWS_SECRET_ACCESS_KEY}"}}
    cfg = _embed(section, tmp_path)
    assert config_hash(cfg) == config_hash(_embed(None, tmp_path))
    saved = Path(save_resolved(cfg, tmp_path / "out")).read_text()
    assert "${AWS_SECRET_ACCESS_KEY}" in saved and SECRET not in saved
    again = build_config(yaml.safe_load(saved))
    assert again.runtime_env == cfg.runtime_env


class _Recorder:
    """Stands in for Ray's JobSubmissionClient: records what `msnoop submit` sends (a real head is used by
    tests/test_cli.py's submit test; here only the arguments matter)."""

    def __init__(self):
        self.calls = []

    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        return kwargs["submission_id"]


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr("msnoop.submit._client", lambda address: rec)
    return rec


def test_submit_sends_config_runtime_env_merged_with_options_and_prints_it_masked(tmp_path, monkeypatch, recorder):
    from msnoop.cli import app

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET + "hf")
    data = {
        "job": "embed",
        "input": {"manifest": str(tmp_path / "m.csv"), "channels": ["dna"]},
        "model": "random:test_cnn:0",
        "output": {"dir": "s3://bucket/run"},
        "runtime_env": {
            "pip": ["msnoop==0.1.0"],
            "env_vars": {
                "AWS_SECRET_ACCESS_KEY": "${AWS_SECRET_ACCESS_KEY}",
                "MSNOOP_LOG": "info",
                "AWS_REGION": "eu-west-1",
            },
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    args = ["submit", str(path), "--address", "http://127.0.0.1:1", "--env", "AWS_REGION=us-east-1"]
    result = CliRunner().invoke(app, [*args, "--env", "HF_TOKEN=${HF_TOKEN}", "--image-uri", "ghcr.io/x/msnoop:1"])
    assert result.exit_code == 0, result.output
    (call,) = recorder.calls
    env = call["runtime_env"]
    assert env["env_vars"] == {
        "PYTHONUNBUFFERED": "1",
        "AWS_SECRET_ACCESS_KEY": SECRET,  # read from this environment at submit time
        "MSNOOP_LOG": "info",
        "AWS_REGION": "us-east-1",  # the option wins
        "HF_TOKEN": SECRET + "hf",
    }
    assert env["image_uri"] == "ghcr.io/x/msnoop:1" and "pip" not in env  # the option's image replaces pip
    assert SECRET not in result.output and "***" in result.output
    uploaded = (Path(env["working_dir"]) / "msnoop_job.yaml").read_text()
    assert SECRET not in uploaded and "${AWS_SECRET_ACCESS_KEY}" in uploaded
    shutil.rmtree(env["working_dir"])


def test_submit_names_an_unset_reference_and_sends_nothing(tmp_path, monkeypatch, recorder):
    from msnoop.cli import app

    monkeypatch.delenv("MSNOOP_UNSET_KEY", raising=False)
    data = {
        "job": "embed",
        "input": {"manifest": str(tmp_path / "m.csv"), "channels": ["dna"]},
        "model": "random:test_cnn:0",
        "output": {"dir": str(tmp_path / "out")},
        "runtime_env": {"env_vars": {"MSNOOP_UNSET_KEY": "${MSNOOP_UNSET_KEY}"}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["submit", str(path), "--address", "http://127.0.0.1:1"])
    assert result.exit_code != 0
    assert "runtime_env.env_vars.MSNOOP_UNSET_KEY" in result.output and "not set" in result.output
    assert recorder.calls == []
