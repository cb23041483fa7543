"""CLI: search an embedding/profile table, describe it."""

from __future__ import annotations

import json
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
    """Nearest rows (cosine distance) to an image in the table, a new image, or a group of rows.

    A group (--match) is, for example, a treatment in the batch-corrected table that `msnoop profile` writes:
    msnoop search results/bbbc021_profiles --match "Metadata_compound = 'taxol'" --k 5
    """
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
    table: Annotated[str, typer.Argument(help="job output folder, or a LanceDB URI with --table")],
    table_name: Annotated[str | None, typer.Option("--table")] = None,
) -> None:
    """Describe a table: rows, dimensions, channels, model, preprocessing, errors."""
    from msnoop.core import parts
    from msnoop.core.rundir import RunDir
    from msnoop.query.search import open_results

    try:
        ref = open_results(table, table_name, complete=False)
        state = RunDir(table).state()
    except (KeyError, ValueError, FileNotFoundError) as exc:
        fail(message(exc))
    meta = ref.info
    if state is not None:
        typer.echo(f"state      {state}")
    typer.echo(f"table      {ref.name} ({ref.uri})")
    typer.echo(f"rows       {ref.table.count_rows()}")
    typer.echo(
        f"dimensions {meta.get('embed_dim')} = {len(meta.get('channels', []))} channels x {meta.get('embed_dim_per_channel')}"
    )
    typer.echo(f"channels   {', '.join(meta.get('channels', []))}")
    typer.echo(f"model      {meta.get('model')} ({meta.get('arch')}, sha256 {str(meta.get('model_sha256'))[:12]})")
    typer.echo(f"preprocess {json.dumps(meta.get('preprocess'))}")
    post = meta.get("postprocess") or {"method": "raw"}
    typer.echo(f"vectors    {post['method']}" + (f" (fitted on {post['n']} rows, no labels)" if "n" in post else ""))
    cols = [
        f.name for f in ref.table.schema if f.name.startswith("Metadata_") and not f.name.startswith("Metadata_Path_")
    ]
    typer.echo(f"metadata   {', '.join(cols)}")
    errors = RunDir(table).errors
    if parts.part_files(errors):
        typer.echo(f"errors     {parts.count_rows(errors)} (see {errors})")


def export(
    table: Annotated[
        str,
        typer.Argument(
            help="embed output folder, profile Parquet, any Parquet/CSV table, or .lance (paths or s3://...)"
        ),
    ],
    out: Annotated[str, typer.Option("--out", help="file to write (a path or s3://...): .h5ad (AnnData, for scanpy)")],
) -> None:
    """Export an embedding or profile table as AnnData (.h5ad): obs = metadata, X = vectors, uns = provenance.

    The file is complete or absent: a metadata column that .h5ad cannot store is refused before anything is written.
    """
    from msnoop.core import storage as st
    from msnoop.store.anndata import to_anndata

    try:
        adata = to_anndata(table, out)
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(message(exc))
    where = out if st.is_uri(out) else Path(out).resolve()
    typer.echo(f"wrote {where}: {adata.n_obs} rows x {adata.n_vars} features")


COMMANDS = [("search", search, None), ("info", info, None), ("export", export, None)]
