"""The job registry: each job kind is declared once, and everything that runs jobs goes through it."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from msnoop.core.config import ConfigError
from msnoop.job_kinds import JOB_KINDS, build_config, job_kind


@pytest.mark.parametrize("name", sorted(JOB_KINDS))
def test_every_kind_resolves_to_a_config_class_runner_summary_and_cli_verb(name):
    from msnoop.cli import app

    kind = JOB_KINDS[name]
    cls = kind.config_class()
    assert cls.model_fields["job"].default == name  # the config's own `job` value is the registry key
    assert callable(kind.runner()) and callable(kind.summarizer())
    result = CliRunner().invoke(app, [kind.verb, "--help"])
    assert result.exit_code == 0, result.output
    assert kind.help.split()[0] in CliRunner().invoke(app, ["--help"]).output  # the verb's help line comes from here


def test_unknown_or_missing_kind_is_one_clear_error():
    with pytest.raises(ConfigError, match="unknown job 'embedd'; expected one of bench, embed"):
        build_config({"job": "embedd"})
    with pytest.raises(ConfigError, match="missing key 'job'"):
        job_kind(None)
