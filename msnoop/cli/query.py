"""CLI: search an embedding/profile table, describe it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from msnoop.cli.common import fail, message


def search(
    table: Annotated[str, typer.Argument(help="job output folder, or a LanceDB URI with --table")],
    image_id: Annotated[str | None, typer.Option("--id", help="query by an image id in the table")] = None,
    image: Annotated[
        list[str] | None,
        typer.Option("--image", help="query image (a path or s3://...): one file per channel, in the table's order"),
    ] = None,
    match: Annotated[
        str | None,
        typer.Option(
            "--match",
            help="query by the mean of the rows this SQL filter selects, e.g. \"Metadata_Compound = 'taxol'\"",
        ),
    ] = None,
    k: Annotated[int, typer.Option(help="neighbours to return")] = 10,
    where: Annotated[str | None, typer.Option(help="SQL filter, e.g. \"Metadata_Plate = 'P1'\"")] = None,
    table_name: Annotated[str | None, typer.Option("--table", help="table name inside a LanceDB URI")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON records")] = False,
    exact: Annotated[
        bool | None, typer.Option("--exact/--ann", help="force exact or index search (default: automatic)")
    ] = None,
) -> None:
    """Nearest rows (cosine distance) to an image of the table, a new image, or the mean of the rows --match selects."""
    import pandas as pd

    from msnoop.query.search import open_results, search_by_id, search_by_match, search_image

    if sum([image_id is not None, bool(image), match is not None]) != 1:
        fail("give exactly one of --id ID, --image PATH [--image PATH ...] or --match FILTER")
    if k < 1:
        fail(f"--k must be at least 1, found {k}")
    try:
        ref = open_results(table, table_name)
        if image_id is not None:
            hits = search_by_id(ref, image_id, k=k, where=where, exact=exact)
        elif match is not None:
            hits = search_by_match(ref, match, k=k, where=where, exact=exact)
            typer.echo(f"query: mean of {hits.attrs['query_rows']} row(s) matching {match}")
        else:
            hits = search_image(ref, list(image or []), k=k, where=where, exact=exact)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        fail(message(exc))
    if hits.empty:
        fail(f"no row of table {ref.name!r} ({ref.uri}) matches --where {where!r}" if where else "no neighbours found")
    hits = hits.drop(columns=[c for c in hits.columns if c.startswith("Metadata_Path_")])
    if as_json:
        typer.echo(hits.to_json(orient="records", double_precision=10))
    else:
        # distances between close neighbours differ in the 4th-6th digit: print enough of them to tell
        with pd.option_context(
            "display.max_columns", 12, "display.width", 160, "display.float_format", "{:.6g}".format
        ):
            typer.echo(hits.to_string(index=False))


def info(
    table: Annotated[
        str,
        typer.Argument(
            help="any table msnoop writes: an output folder, its embeddings/, cells/ or lancedb/, a .lance table, "
            "Parquet/CSV; or a LanceDB URI with --table"
        ),
    ],
    table_name: Annotated[str | None, typer.Option("--table", help="table name inside a LanceDB URI")] = None,
) -> None:
    """Describe a table: rows, dimensions, channels, model, preprocessing, correction, errors."""
    from msnoop.query.info import describe

    try:
        described = describe(table, table_name)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        fail(message(exc))
    typer.echo(str(described))


def export(
    table: Annotated[
        str,
        typer.Argument(
            help="any table msnoop writes (output folder, cells/, .lance, profile Parquet) or Parquet/CSV; paths or "
            "s3://..."
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="file to write (a path or s3://...): .h5ad (AnnData, for scanpy)")],
) -> None:
    """Export a table as AnnData (.h5ad): obs metadata, X vectors as stored, obsm["X_msnoop"] the ones msnoop compares.

    The file is complete or absent: a metadata column that .h5ad cannot store is refused before anything is written.
    """
    import json

    from msnoop.core import storage as st
    from msnoop.store.anndata import OBSM_KEY, UNS_KEY, to_anndata

    try:
        adata = to_anndata(table, out)
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(message(exc))
    where = out if st.is_uri(out) else Path(out).resolve()
    method = json.loads(adata.uns[UNS_KEY]["postprocess"]).get("method")
    typer.echo(
        f"wrote {where}: {adata.n_obs} rows x {adata.n_vars} features; X as stored, "
        f'obsm["{OBSM_KEY}"] {method} (what msnoop compares: scanpy.pp.neighbors(adata, use_rep="{OBSM_KEY}"))'
    )


COMMANDS = [("search", search, None), ("info", info, None), ("export", export, None)]
