"""CLI: masked-reconstruction pretraining (``msnoop pretrain``) and cellpose nucleus training (``msnoop segtrain``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from msnoop.cli.common import SetOpt, fail, load_job


def load_pretrain_job(config: Path | None, overrides: list[str] | None = None) -> Any:
    """Load and validate a pretrain config, with ``key.sub=value`` overrides.

    Raises:
        ConfigError: The file or an override is invalid, or the config is not a pretrain job.
    """
    from msnoop.core.config import ConfigError, parse_overrides
    from msnoop.job_kinds import load_config

    job = load_config(config, overrides=parse_overrides(overrides or []), job="pretrain")
    if job.job != "pretrain":
        raise ConfigError(f"config {config}: expected job 'pretrain', found {job.job!r}")
    return job


def pretrain(
    config: Annotated[
        Path | None, typer.Argument(help="pretrain YAML config (e.g. configs/pretrain_default.yaml)")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Masked-reconstruction pretraining with Ray Train; resumes a run with the same name and output dir."""
    from msnoop.train.pretrain import run_pretrain, summary

    job = load_job(config, set_, job="pretrain")
    try:
        res = run_pretrain(job)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(summary(job, res))


def segtrain(
    config: Annotated[Path, typer.Argument(help="segtrain YAML (job: segtrain), e.g. configs/segtrain_coelho.yaml")],
    set_: SetOpt = None,
) -> None:
    """Train a cellpose 3.1 nucleus model on image/mask pairs and compare it with the built-in backend."""
    from msnoop.segment.segtrain import run_segtrain, summary

    job = load_job(config, set_, job="segtrain")
    try:
        rec = run_segtrain(job)
    except (ImportError, FileNotFoundError, ValueError, RuntimeError) as exc:
        fail(str(exc))
    typer.echo(summary(job, rec))


COMMANDS = [("pretrain", pretrain, None), ("segtrain", segtrain, None)]
