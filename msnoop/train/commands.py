"""Command-line front end of pretraining (registered by the CLI as ``msnoop pretrain``)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from msnoop.config import ConfigError, load_config, parse_overrides
from msnoop.train.config import PretrainJob

logger = logging.getLogger(__name__)


def load_pretrain_job(config: Path | None, overrides: list[str] | None = None) -> PretrainJob:
    """Load and validate a pretrain config, with ``key.sub=value`` overrides.

    Raises:
        ConfigError: The file or an override is invalid, or the config is not a pretrain job.
    """
    job = load_config(config, overrides=parse_overrides(overrides or []), job="pretrain")
    if not isinstance(job, PretrainJob):
        raise ConfigError(f"config {config}: expected job 'pretrain', found {type(job).__name__}")
    return job


def pretrain_command(
    config: Path | None = typer.Argument(None, help="pretrain YAML config (e.g. configs/pretrain_default.yaml)"),
    set_: list[str] = typer.Option([], "--set", help="override a key, e.g. --set train.steps=200 (repeatable)"),
) -> None:
    """Masked-reconstruction pretraining with Ray Train; resumes a run with the same name and output dir."""
    from msnoop.train.ray_train import run_pretrain

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        job = load_pretrain_job(config, set_)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    res = run_pretrain(job)
    typer.echo(f"Wrote model: {res.model_path.resolve()}")
    typer.echo(f"Wrote model card: {res.card_path.resolve()}")
    if res.figure_path:
        typer.echo(f"Wrote reconstruction figure: {res.figure_path.resolve()}")
    loss = f"{res.final_loss:.5f}" if res.final_loss is not None else "n/a"
    typer.echo(f"Steps: {res.steps} ({res.stop_reason}), final loss {loss}, {res.elapsed_s / 60:.1f} min")
