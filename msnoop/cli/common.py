"""Helpers shared by the CLI's command modules: one-line errors, exit codes, config loading, list options.

Exit codes are the same for every command: 0 success, 1 the work ran and failed (a job that failed on the
cluster, strict mode stopping at a bad image, an output that does not add up), 2 bad input (arguments,
config, a file or table that cannot be used). User errors print one ``error:`` line, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

#: Exit code of a command whose work ran and failed.
EXIT_FAILED = 1
#: Exit code of bad input: arguments, config, files.
EXIT_USAGE = 2

SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override any config field: section.key=value (YAML value)")
]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` (its first line is what matters) on stderr and exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def message(exc: BaseException) -> str:
    """The user-facing text of an exception (a KeyError's own message, not its repr)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def split_list(values: list[str] | None) -> list[str]:
    """Repeated and/or comma-separated option values -> flat list."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def load_job(
    config: str | Path | None,
    set_: list[str] | None = None,
    *,
    job: str | None = None,
    overrides: list[tuple[str, Any]] | None = None,
) -> Any:
    """Validate a job config (YAML path, or options alone when ``config`` is None); a bad one exits with code 2.

    ``job`` names the kind the command expects: a config of another kind is refused with the command to use.
    """
    from msnoop.core.config import ConfigError, parse_overrides
    from msnoop.job_kinds import JOB_KINDS, load_config

    try:
        cfg = load_config(
            config, overrides=[*(overrides or []), *parse_overrides(set_ or [])], job=job if config is None else None
        )
    except ConfigError as exc:
        fail(str(exc))
    if job is not None and cfg.job != job:
        verb = JOB_KINDS[cfg.job].verb
        fail(f"{config} is a {cfg.job!r} config and this command takes job: {job} configs; run it with `msnoop {verb}`")
    return cfg


def write_json(obj: dict[str, Any], path: str | Path | None) -> None:
    """Write ``obj`` as indented JSON to ``path`` (a path or a URI; folders are created; the file is complete or
    absent) and say so; nothing when ``path`` is None."""
    import json

    from msnoop.core import storage as st

    if path is None:
        return
    st.write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")  # complete or absent
    typer.echo(f"wrote {path if st.is_uri(path) else Path(path).resolve()}")
