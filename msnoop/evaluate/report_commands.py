"""Typer command function for HTML reports (registered in ``msnoop.cli``).

Proposed CLI name: ``msnoop eval report`` (:func:`report_command`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from msnoop.cliutil import fail


def report_command(
    table: Annotated[
        Path, typer.Argument(help="Feature table: msnoop output folder, .parquet, .csv, .csv.gz or .lance.")
    ],
    label: Annotated[str, typer.Option("--label", help="Class column, e.g. Metadata_Protein.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder for report.html and its PNG figures.")],
    batch: Annotated[
        str | None, typer.Option("--batch", help="Batch column: a second map panel coloured by it.")
    ] = None,
    k: Annotated[int, typer.Option("--k", "-k", help="kNN neighbours.")] = 11,
    cv: Annotated[str, typer.Option(help="'loo', 'kfold:<n>' or 'group:<column>'.")] = "loo",
    queries: Annotated[int, typer.Option(help="Nearest-neighbour gallery rows (random queries).")] = 4,
) -> None:
    """HTML report: 2-D map, kNN metrics and confusion matrix, nearest-neighbour image galleries."""
    from msnoop.evaluate.report import build_report

    try:
        page = build_report(table, label=label, batch=batch, out_dir=out, k=k, cv=cv, n_queries=queries)
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    import json

    unreadable = json.loads((page.parent / "report.json").read_text()).get("unreadable_images") or []
    if unreadable:
        fail(
            f"report written to {page}, but {len(unreadable)} gallery image(s) could not be read "
            f"(shown grey), e.g. {unreadable[0]}",
            1,
        )
    typer.echo(str(page))
