"""The ``msnoop`` command line (typer). Thin: parse, validate, call the library, print."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from msnoop.config import ConfigError, EmbedJob, config_hash, config_to_yaml, load_config, parse_overrides

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Microscopy image embeddings at scale (Microsnoop on Ray)."
)
logger = logging.getLogger("msnoop")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("ray", "lancedb", "urllib3", "filelock", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    _setup_logging(verbose)


def _message(exc: BaseException) -> str:
    """The user-facing text of an exception (a KeyError's own message, not its repr)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override any config field: section.key=value (YAML value)")
]


def _embed_overrides(**given: Any) -> list[tuple[str, Any]]:
    keys = {
        "manifest": "input.manifest",
        "loaddata": "input.loaddata",
        "folder": "input.folder",
        "pattern": "input.pattern",
        "channels": "input.channels",
        "limit": "input.limit",
        "id_column": "input.id_column",
        "model": "model",
        "out": "output.dir",
        "table": "output.table",
        "name": "name",
        "mode": "preprocess.mode",
        "batch_size": "runtime.batch_size",
        "actors": "runtime.actors",
        "address": "runtime.address",
        "strict": "runtime.strict",
        "retry_errors": "runtime.retry_errors",
        "num_cpus": "runtime.num_cpus",
    }
    out: list[tuple[str, Any]] = []
    for arg, value in given.items():
        if value is None or value is False:
            continue
        if arg == "channels":
            value = [c.strip() for c in str(value).split(",") if c.strip()]
        out.append((keys[arg], str(value) if isinstance(value, Path) else value))
    return out


def load_job(config: Path | None, overrides: list[tuple[str, Any]], job: str | None = None) -> Any:
    try:
        return load_config(config, overrides=overrides, job=job if config is None else None)
    except ConfigError as exc:
        fail(str(exc), 2)


def _print_embed_result(result: Any) -> None:
    typer.echo(
        f"\nEmbedded {result.n_embedded} images ({result.n_errors} errors, {result.n_skipped} already done) "
        f"in {result.seconds:.1f} s ({result.images_per_s:.3g} images/s"
        + (f", {result.cells_per_s:.3g} cells/s)." if result.n_cells else ").")
    )
    typer.echo(f"Output: {result.out_dir.resolve()}  (Parquet: embeddings/, errors: errors/)")
    typer.echo(
        f"Totals: {result.n_rows_total} embedded + {result.n_errors_total} errors = {result.n_input} input images"
    )
    if getattr(result, "n_cells_total", 0):
        typer.echo(
            f"Cells: {result.n_cells} embedded in this run, {result.n_cells_total} in total (single-cell table: cells/)"
        )
    if result.table:
        typer.echo(f"LanceDB table: {result.table!r} in {result.out_dir.resolve() / 'lancedb'}")
    if result.errors_preview:
        typer.echo(f"\n{result.n_errors_total} images could not be embedded, e.g.:")
        for image_id, reason in result.errors_preview:
            typer.echo(f"  {image_id}: {reason}")
        typer.echo(
            f"Fix them and run again with --retry-errors (or --set runtime.retry_errors=true) to embed them again; "
            f"the list is in {result.out_dir.resolve() / 'errors'}"
        )


@app.command()
def embed(
    config: Annotated[
        Path | None, typer.Argument(help="job YAML (optional when every field is given as an option)")
    ] = None,
    manifest: Annotated[Path | None, typer.Option(help="CSV/Parquet manifest: one path column per channel")] = None,
    loaddata: Annotated[Path | None, typer.Option(help="CellProfiler LoadData CSV")] = None,
    folder: Annotated[Path | None, typer.Option(help="image folder (with --pattern)")] = None,
    pattern: Annotated[str | None, typer.Option(help="filename pattern, e.g. '{Metadata_Well}_{channel}.tif'")] = None,
    channels: Annotated[str | None, typer.Option(help="comma-separated channel names, in embedding order")] = None,
    model: Annotated[str | None, typer.Option(help="checkpoint path, 'default' or 'random:<arch>[:seed]'")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder")] = None,
    name: Annotated[str | None, typer.Option(help="job name (default table name)")] = None,
    table: Annotated[str | None, typer.Option(help="LanceDB table name")] = None,
    mode: Annotated[str | None, typer.Option(help="native | rescale | tile")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N images")] = None,
    id_column: Annotated[str | None, typer.Option(help="manifest column with unique image ids")] = None,
    batch_size: Annotated[int | None, typer.Option(help="tiles per forward pass")] = None,
    actors: Annotated[int | None, typer.Option(help="embedding actors (one GPU each where present)")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of a local Ray cluster")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default RAY_ADDRESS or a local cluster)")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="stop at the first bad image")] = False,
    retry_errors: Annotated[
        bool, typer.Option("--retry-errors", help="embed again the images recorded in errors/ by earlier runs")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Embed images (one vector per image) into Parquet and a LanceDB table; re-runs resume."""
    from msnoop.embed.pipeline import StrictModeError, TotalsError, run_embed

    overrides = _embed_overrides(
        manifest=manifest,
        loaddata=loaddata,
        folder=folder,
        pattern=pattern,
        channels=channels,
        model=model,
        out=out,
        name=name,
        table=table,
        mode=mode,
        limit=limit,
        id_column=id_column,
        batch_size=batch_size,
        actors=actors,
        num_cpus=num_cpus,
        address=address,
        strict=strict,
        retry_errors=retry_errors,
    ) + parse_overrides(set_ or [])
    cfg = load_job(config, overrides, job="embed")
    if not isinstance(cfg, EmbedJob):
        fail(f"{config} is a {cfg.job!r} job; use `msnoop run` or the matching command")
    try:
        result = run_embed(cfg)
    except StrictModeError as exc:
        fail(f"strict mode: {exc}")
    except TotalsError as exc:
        fail(f"{exc} (nothing written is lost; please report this with the output folder's run.json)")
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        fail(_message(exc))
    _print_embed_result(result)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="any msnoop job YAML (job: embed | pretrain | ...)")],
    set_: SetOpt = None,
) -> None:
    """Run any job config in this process (the entrypoint that `msnoop submit` uses on the cluster)."""
    from msnoop.jobs import run_job

    cfg = load_job(config, parse_overrides(set_ or []))
    try:
        summary = run_job(cfg)
    except (ConfigError, ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        fail(str(exc))
    if summary:
        typer.echo(summary)


@app.command()
def bench(
    configs: Annotated[list[Path], typer.Argument(help="bench YAMLs (job: bench), e.g. configs/benchmarks/*.yaml")],
    summary: Annotated[Path | None, typer.Option(help="also write all results tables into this Markdown file")] = None,
    set_: SetOpt = None,
) -> None:
    """Embed a dataset with several models, compute baselines, and compare them by kNN (Markdown + CSV table)."""
    from msnoop.evaluate.bench import BenchJob, markdown, run_bench

    jobs = [load_job(c, parse_overrides(set_ or [])) for c in configs]  # validate all before any work
    for c, job in zip(configs, jobs, strict=True):
        if not isinstance(job, BenchJob):
            fail(f"{c} is a {job.job!r} config; msnoop bench takes job: bench configs")
    sections = []
    for job in jobs:
        assert isinstance(job, BenchJob)
        try:
            rec = run_bench(job)
        except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
            fail(f"bench {job.name}: {exc}")
        if "skipped" in rec:
            typer.echo(f"skipped: {rec['skipped']}")
            sections.append(f"### {job.name}\n\nskipped: {rec['skipped']}\n")
            continue
        table = markdown(rec)
        typer.echo(f"\n{job.name} (results in {job.output.dir}):\n{table}")
        sections.append(f"### {job.name}\n\n{table}\n")
    if summary is not None:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text("\n".join(sections))
        typer.echo(f"wrote {summary}")


@app.command()
def validate(config: Annotated[Path, typer.Argument()], set_: SetOpt = None) -> None:
    """Validate a job config and print it resolved (no work is done)."""
    cfg = load_job(config, parse_overrides(set_ or []))
    typer.echo(f"# valid {cfg.job} config, hash {config_hash(cfg)}")
    typer.echo(config_to_yaml(cfg))


@app.command()
def submit(
    config: Annotated[Path, typer.Argument(help="job YAML")],
    address: Annotated[str | None, typer.Option(help="Ray dashboard/Jobs address, e.g. http://HEAD:8265")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="stream logs until the job ends; exit 1 if it failed")
    ] = False,
    python: Annotated[
        str | None, typer.Option(help="interpreter on the cluster (default: this one for a local cluster)")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Send a job to a Ray cluster with the Ray Jobs API."""
    from msnoop.submit import follow_job, submit_job

    cfg = load_job(config, parse_overrides(set_ or []))
    try:
        sub = submit_job(cfg, address=address, python=python)
    except (ConnectionError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"Submitted job {sub.job_id} to {sub.address}")
    typer.echo(f"Equivalent command:\n  {sub.equivalent_command}")
    if follow:
        status = follow_job(sub.address, sub.job_id)
        typer.echo(f"\nJob {sub.job_id} {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)
    else:
        typer.echo(f"Follow with: ray job logs --address {sub.address} --follow {sub.job_id}")


@app.command()
def search(
    table: Annotated[str, typer.Argument(help="job output folder, or a LanceDB URI with --table")],
    image_id: Annotated[str | None, typer.Option("--id", help="query by an image id in the table")] = None,
    image: Annotated[
        list[Path] | None, typer.Option("--image", help="query image: one file per channel, in the table's order")
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
        fail("give exactly one of --id ID, --image PATH [--image PATH ...] or --match FILTER", 2)
    if k < 1:
        fail(f"--k must be at least 1, found {k}", 2)
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
        fail(_message(exc))
    if hits.empty:
        fail(f"no row of table {ref.name!r} ({ref.uri}) matches --where {where!r}" if where else "no neighbours found")
    hits = hits.drop(columns=[c for c in hits.columns if c.startswith("Metadata_Path_")])
    if as_json:
        typer.echo(hits.to_json(orient="records"))
    else:
        with pd.option_context("display.max_columns", 12, "display.width", 160):
            typer.echo(hits.to_string(index=False))


@app.command()
def info(
    table: Annotated[str, typer.Argument(help="job output folder, or a LanceDB URI with --table")],
    table_name: Annotated[str | None, typer.Option("--table")] = None,
) -> None:
    """Describe a table: rows, dimensions, channels, model, preprocessing, errors."""
    from msnoop.query.search import open_results
    from msnoop.store import parts

    try:
        ref = open_results(table, table_name)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        fail(_message(exc))
    meta = ref.info
    typer.echo(f"table      {ref.name} ({ref.uri})")
    typer.echo(f"rows       {ref.table.count_rows()}")
    typer.echo(
        f"dimensions {meta.get('embed_dim')} = {len(meta.get('channels', []))} channels x {meta.get('embed_dim_per_channel')}"
    )
    typer.echo(f"channels   {', '.join(meta.get('channels', []))}")
    typer.echo(f"model      {meta.get('model')} ({meta.get('arch')}, sha256 {str(meta.get('model_sha256'))[:12]})")
    typer.echo(f"preprocess {json.dumps(meta.get('preprocess'))}")
    cols = [
        f.name for f in ref.table.schema if f.name.startswith("Metadata_") and not f.name.startswith("Metadata_Path_")
    ]
    typer.echo(f"metadata   {', '.join(cols)}")
    out = Path(table)
    if (out / parts.ERRORS).is_dir():
        typer.echo(f"errors     {parts.count_rows(out / parts.ERRORS)} (see {out / parts.ERRORS})")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="folder for the synthetic data and results")] = Path("demo_output"),
    n_per_class: Annotated[int, typer.Option(help="cells per class (4 classes)")] = 25,
    model: Annotated[str | None, typer.Option(help="model reference (default: the shipped model)")] = None,
) -> None:
    """Generate synthetic cells, embed them with Ray into LanceDB, and search."""
    from msnoop.demo import run_demo
    from msnoop.query.search import open_results, search_by_id

    result, cfg = run_demo(out, n_per_class=n_per_class, model=model)
    _print_embed_result(result)
    ref = open_results(cfg.output.dir)
    first = ref.table.search().where("Metadata_Class = 'punctate'").select(["Metadata_ImageID"]).limit(1).to_arrow()
    query_id = first.column("Metadata_ImageID")[0].as_py()
    hits = search_by_id(ref, query_id, k=8)
    typer.echo(f"\nNearest neighbours of {query_id} (class punctate), model {cfg.model}:")
    typer.echo(hits[["Metadata_ImageID", "_distance", "Metadata_Class"]].to_string(index=False))
    same = float((hits["Metadata_Class"] == "punctate").mean())
    typer.echo(f"\n{same:.0%} of the 8 nearest neighbours share the query's class (chance 25%).")
    typer.echo(f"Try: msnoop search {cfg.output.dir} --id {query_id} --k 5 --where \"Metadata_Class = 'membrane'\"")


def _register_library_commands() -> None:
    """Commands whose logic lives in the stage packages (thin typer wrappers there)."""
    from msnoop.correct.commands import profile_command
    from msnoop.evaluate.commands import knn_command, map_command, nsc_command
    from msnoop.evaluate.report_commands import report_command
    from msnoop.evaluate.screen_job import screen_command
    from msnoop.segment.train import segtrain_command
    from msnoop.train.commands import pretrain_command

    app.command("knn", help="kNN classification of any embedding/profile table (LOO, k-fold, leave-group-out).")(
        knn_command
    )
    app.command("nsc", help="BBBC021-style NSC/NSCB (1-NN, not-same-compound / not-same-batch) on a treatment table.")(
        nsc_command
    )
    app.command("pretrain", help="Masked-reconstruction pretraining on Ray Train (resumes from the last checkpoint).")(
        pretrain_command
    )
    app.command("map", help="mAP retrieval (copairs rules) with permutation p-values, BH and fraction retrieved.")(
        map_command
    )
    app.command(
        "report", help="HTML report with PNGs: 2-D map by label/batch, kNN confusion matrix, neighbour galleries."
    )(report_command)
    app.command("profile", help="Sphere on controls, aggregate to wells/treatments (any profile table).")(
        profile_command
    )
    app.command(
        "segtrain", help="Train a cellpose 3.1 nucleus model offline on image/mask pairs; compare to built-in."
    )(segtrain_command)
    app.command(
        "screen", help="Read a plate out per well from its cells (classifier on the controls): Z', dose response."
    )(screen_command)


_register_library_commands()


if __name__ == "__main__":  # pragma: no cover
    app()
