"""CLI: batch-corrected profiles (``msnoop profile``) and plate screens read out per cell (``msnoop screen``).

``profile`` writes Parquet (the source of truth), a JSON record of the correction, and LanceDB tables
``profiles`` and ``treatments`` for queries (``msnoop search OUT --match "Metadata_Compound = 'taxol'"``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from pydantic import ValidationError

from msnoop.cli.common import SetOpt, fail, load_job, split_list
from msnoop.vectors.postprocess import SPHERIZE_METHODS

logger = logging.getLogger(__name__)


def _parse_epsilon(value: str) -> float | str:
    if value.strip().lower() == "knee":
        return "knee"
    try:
        eps = float(value)
    except ValueError:
        eps = float("nan")
    if not (np.isfinite(eps) and eps > 0):
        fail(f"expected --epsilon 'knee' or a positive number, found {value!r}")
    return eps


def profile_command(
    table: Annotated[
        Path,
        typer.Argument(
            help="A job config (.yaml, job: profile), or a profile table: embed output folder, .parquet, .csv, .csv.gz."
        ),
    ],
    control: Annotated[
        str | None,
        typer.Option("--control", help="SQL condition selecting control rows, e.g. \"Metadata_Compound = 'DMSO'\"."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (profiles.parquet, treatments.parquet, correction.json)."),
    ] = None,
    batch_column: Annotated[
        str | None, typer.Option("--batch-column", help="Column naming each row's batch (plate).")
    ] = None,
    per_batch: Annotated[
        bool,
        typer.Option(
            "--per-batch/--global", help="Fit one sphering per batch (default: one on all controls, Microsnoop)."
        ),
    ] = False,
    method: Annotated[str, typer.Option(help=f"Sphering: {', '.join(SPHERIZE_METHODS)} or 'none'.")] = "ZCA-cor",
    epsilon: Annotated[str, typer.Option(help="'knee' (Microsnoop's eigenvalue floor) or a positive number.")] = "knee",
    variance_floor: Annotated[
        float, typer.Option(help="-cor methods: variances are clipped at this (Microsnoop 1e-3).")
    ] = 1e-3,
    aggregate_by: Annotated[
        list[str] | None,
        typer.Option(
            help="Aggregate rows BEFORE sphering by these columns (e.g. cells -> images/wells); "
            "comma-separated or repeated."
        ),
    ] = None,
    aggregate_method: Annotated[str, typer.Option(help="'mean' or 'median' for both aggregation steps.")] = "mean",
    treatment_columns: Annotated[
        list[str] | None,
        typer.Option(
            help="Aggregate sphered rows AFTER sphering into treatments by these columns "
            "(e.g. Metadata_Compound,Metadata_Concentration)."
        ),
    ] = None,
    join: Annotated[
        list[str] | None,
        typer.Option(
            help="Columns collapsed to comma-joined unique values in treatment rows (the batch column always is)."
        ),
    ] = None,
    keep_controls: Annotated[
        bool,
        typer.Option(
            "--keep-controls/--drop-controls", help="Keep control rows in the treatment table (default: drop)."
        ),
    ] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="config override KEY=VALUE (with a YAML), repeatable")
    ] = None,
) -> None:
    """Sphere a profile table on its controls and aggregate it; writes Parquet, LanceDB tables and a JSON record.

    Give either a ``job: profile`` YAML (options then override nothing but --set) or a table plus options.
    """
    from msnoop.core.config import ConfigError
    from msnoop.correct.profile import ProfileJob, summary
    from msnoop.job_kinds import run_profile_job

    try:
        if table.suffix in (".yaml", ".yml"):
            job = load_job(table, set_, job="profile")
        else:
            if control is None or out is None:
                fail("with a table argument, --control and --out are required (or pass a job: profile YAML)")
            if aggregate_method not in ("mean", "median"):
                fail(f"expected --aggregate-method 'mean' or 'median', found {aggregate_method!r}")
            if method != "none" and method not in SPHERIZE_METHODS:
                fail(f"expected --method in {', '.join(SPHERIZE_METHODS)} or 'none', found {method!r}")
            job = ProfileJob.model_validate(
                {
                    "input": table,
                    "control": control,
                    "batch_column": batch_column,
                    "sphering": {
                        "method": method,
                        "epsilon": _parse_epsilon(epsilon),
                        "fit": "per_batch" if per_batch else "global",
                        "variance_floor": variance_floor,
                    },
                    "aggregate": {"before": split_list(aggregate_by), "method": aggregate_method},
                    "treatments": {
                        "columns": split_list(treatment_columns),
                        "join": split_list(join),
                        "keep_controls": keep_controls,
                    },
                    "output": {"dir": out},
                }
            )
    except ConfigError as exc:
        fail(str(exc))
    except ValidationError as exc:
        fail(f"invalid profile options: {exc}")
    if not isinstance(job, ProfileJob):
        fail(f"{table} is a {getattr(job, 'job', '?')!r} config; msnoop profile takes job: profile configs")
    try:
        record = run_profile_job(job)
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    typer.echo(summary(job, record))


def screen(
    config: Annotated[Path, typer.Argument(help="screen YAML (job: screen), e.g. configs/bbbc013_screen.yaml")],
    set_: SetOpt = None,
) -> None:
    """Read a plate out per well from its cells with a classifier trained on the control wells."""
    from msnoop.screen.plate import run_screen, summary

    job = load_job(config, set_, job="screen")
    try:
        rec = run_screen(job)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
    typer.echo(summary(job, rec))


COMMANDS = [
    ("profile", profile_command, "Sphere on controls, aggregate to wells/treatments (any profile table)."),
    ("screen", screen, None),
]
