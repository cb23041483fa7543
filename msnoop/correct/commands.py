"""``msnoop profile``: batch correction and aggregation of profile tables (registered in ``msnoop.cli``).

Writes Parquet (the source of truth), a JSON record of the correction, and LanceDB tables ``profiles``
and ``treatments`` for queries (``msnoop search OUT --match "Metadata_Compound = 'taxol'"``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import typer

from msnoop.aggregate.profiles import aggregate_profiles
from msnoop.cliutil import fail, split_list
from msnoop.correct.sphering import METHODS, query_mask, spherize_profiles
from msnoop.evaluate.tables import feature_columns, read_table, write_table

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


def write_profile_tables(out: Path, frames: dict[str, pd.DataFrame], record: dict[str, Any]) -> list[str]:
    """LanceDB tables (one per frame) in ``out/lancedb`` plus ``out/run.json`` naming them.

    The last frame (treatments when there are some) is the table that ``msnoop search OUT`` opens by
    default; the correction record travels in every table's schema metadata.
    """
    from msnoop.store.lance import build_frame_table
    from msnoop.store.parts import write_run_info

    uri = str((out / "lancedb").resolve())
    for name, frame in frames.items():
        info = {"kind": "profiles", "level": name, "correction": record}
        build_frame_table(uri, name, frame, feature_columns(frame), info=info)
    write_run_info(out, {"job": "profile", "lancedb": uri, "table": list(frames)[-1], "tables": list(frames)})
    return list(frames)


def profile_command(
    table: Annotated[Path, typer.Argument(help="Profile table: .parquet, .csv or .csv.gz (Metadata_* + features).")],
    control: Annotated[
        str,
        typer.Option("--control", help="pandas query selecting control rows, e.g. \"Metadata_Compound == 'DMSO'\"."),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (profiles.parquet, treatments.parquet, correction.json).")
    ],
    batch_column: Annotated[
        str | None, typer.Option("--batch-column", help="Column naming each row's batch (plate).")
    ] = None,
    per_batch: Annotated[
        bool,
        typer.Option(
            "--per-batch/--global", help="Fit one sphering per batch (default: one on all controls, Microsnoop)."
        ),
    ] = False,
    method: Annotated[str, typer.Option(help=f"Sphering: {', '.join(METHODS)} or 'none'.")] = "ZCA-cor",
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
) -> None:
    """Sphere a profile table on its controls and aggregate it; writes Parquet plus a JSON record of the correction."""
    try:
        df = read_table(table)
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    n_in = len(df)
    record: dict[str, Any] = {"input": str(table), "n_rows_in": n_in}
    agg_by = split_list(aggregate_by)
    treat_by = split_list(treatment_columns)
    joins = split_list(join)
    if aggregate_method not in ("mean", "median"):
        fail(f"expected --aggregate-method 'mean' or 'median', found {aggregate_method!r}")
    if method != "none" and method not in METHODS:
        fail(f"expected --method in {', '.join(METHODS)} or 'none', found {method!r}")
    eps = _parse_epsilon(epsilon)
    try:
        if agg_by:
            df = aggregate_profiles(
                df, agg_by, aggregate_method, join=[batch_column] if batch_column and batch_column not in agg_by else ()
            )  # type: ignore[arg-type]
            record["aggregate_by"] = {"columns": agg_by, "method": aggregate_method, "n_rows": len(df)}
        if method == "none":
            sphered, info = df, {"method": "none"}
        else:
            sphered, info = spherize_profiles(
                df,
                control_query=control,
                batch_column=batch_column,
                per_batch=per_batch,
                method=method,  # type: ignore[arg-type]
                epsilon=eps,  # type: ignore[arg-type]
                variance_floor=variance_floor,
            )
        record["sphering"] = info
        out.mkdir(parents=True, exist_ok=True)
        p_rows = write_table(sphered, out / "profiles.parquet")
        typer.echo(f"wrote {p_rows.resolve()}  ({len(sphered)} rows x {len(feature_columns(sphered))} features)")
        if treat_by:
            rows = sphered
            if not keep_controls:
                rows = sphered[~query_mask(sphered, control)]
            tj = list(dict.fromkeys(([batch_column] if batch_column else []) + joins))
            treatments = aggregate_profiles(rows, treat_by, aggregate_method, join=tj)  # type: ignore[arg-type]
            p_t = write_table(treatments, out / "treatments.parquet")
            record["treatments"] = {
                "columns": treat_by,
                "method": aggregate_method,
                "joined": tj,
                "controls_included": keep_controls,
                "n_rows": len(treatments),
            }
            typer.echo(f"wrote {p_t.resolve()}  ({len(treatments)} treatments)")
    except ValueError as exc:
        fail(str(exc))
    p_json = out / "correction.json"
    p_json.write_text(json.dumps(record, indent=2) + "\n")
    typer.echo(f"wrote {p_json.resolve()}")
    try:
        tables = write_profile_tables(
            out, {"profiles": sphered} | ({"treatments": treatments} if treat_by else {}), record
        )
    except ValueError as exc:
        fail(str(exc))
    typer.echo(f'LanceDB {out / "lancedb"}: tables {", ".join(tables)}; query with: msnoop search {out} --match "..."')
    if method != "none":
        typer.echo(
            f"sphering: {info['method']} epsilon={info['epsilon']} fit={info['fit']} on {info['n_controls']} controls; "
            f"{info['n_features']} features"
            + (f", dropped {len(info['dropped_features'])} constant" if info["dropped_features"] else "")
        )
