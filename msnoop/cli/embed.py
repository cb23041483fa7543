"""CLI: embed images, run or validate any job config, submit a job to a Ray cluster, the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from msnoop.cli.common import EXIT_FAILED, SetOpt, fail, load_job, message


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
        if arg == "actors":
            value = _actors_option(str(value))
        out.append((keys[arg], str(value) if isinstance(value, Path) else value))
    return out


def _actors_option(text: str) -> Any:
    """``--actors``: ``4`` -> 4, ``1:8`` -> ``{"min": 1, "max": 8}``, ``auto`` as is (validated with the config)."""
    lo, sep, hi = text.strip().partition(":")
    if sep:
        return {"min": int(lo), "max": int(hi)} if lo.isdigit() and hi.isdigit() else text
    return int(text) if text.strip().lstrip("-").isdigit() else text.strip()


def print_embed_result(result: Any) -> None:
    """Print what an embedding run did: counts, rates, where its outputs are, the first errors and how to retry."""
    from msnoop.core.rundir import RunDir

    run = RunDir(result.out_dir)
    out = run.absolute()
    typer.echo(
        f"\nEmbedded {result.n_embedded} images ({result.n_errors} errors, {result.n_skipped} already done) "
        f"in {result.seconds:.1f} s ({result.images_per_s:.3g} images/s"
        + (f", {result.cells_per_s:.3g} cells/s)." if result.n_cells else ").")
    )
    typer.echo(f"Output: {out}  (Parquet: {run.EMBEDDINGS}/, errors: {run.ERRORS}/)")
    typer.echo(
        f"Totals: {result.n_rows_total} embedded + {result.n_errors_total} errors = {result.n_input} input images"
    )
    if getattr(result, "n_cells_total", 0):
        typer.echo(
            f"Cells: {result.n_cells} embedded in this run, {result.n_cells_total} in total "
            f"(single-cell table: {run.CELLS}/)"
        )
    if result.table:
        typer.echo(f"LanceDB table: {result.table!r} in {result.lancedb or run.lancedb_uri()}")
    if result.errors_preview:
        typer.echo(f"\n{result.n_errors_total} images could not be embedded, e.g.:")
        for image_id, reason in result.errors_preview:
            typer.echo(f"  {image_id}: {reason}")
        typer.echo(
            f"Fix them and run again with --retry-errors (or --set runtime.retry_errors=true) to embed them again; "
            f"the list is in {RunDir(out).errors}"
        )


def embed(
    config: Annotated[
        str | None, typer.Argument(help="job YAML, a path or a URI (optional when every field is given as an option)")
    ] = None,
    manifest: Annotated[
        str | None, typer.Option(help="CSV/Parquet manifest (a path or s3://...): one path column per channel")
    ] = None,
    loaddata: Annotated[str | None, typer.Option(help="CellProfiler LoadData CSV (a path or s3://...)")] = None,
    folder: Annotated[str | None, typer.Option(help="image folder or s3://... prefix (with --pattern)")] = None,
    pattern: Annotated[str | None, typer.Option(help="filename pattern, e.g. '{Metadata_Well}_{channel}.tif'")] = None,
    channels: Annotated[str | None, typer.Option(help="comma-separated channel names, in embedding order")] = None,
    model: Annotated[str | None, typer.Option(help="checkpoint path, 'default' or 'random:<arch>[:seed]'")] = None,
    out: Annotated[str | None, typer.Option(help="output folder or object storage URI (s3://bucket/prefix)")] = None,
    name: Annotated[str | None, typer.Option(help="job name (default table name)")] = None,
    table: Annotated[str | None, typer.Option(help="LanceDB table name")] = None,
    mode: Annotated[str | None, typer.Option(help="native | tight | rescale | tile")] = None,
    limit: Annotated[int | None, typer.Option(help="only the first N images")] = None,
    id_column: Annotated[str | None, typer.Option(help="manifest column with unique image ids")] = None,
    batch_size: Annotated[int | None, typer.Option(help="tiles per forward pass")] = None,
    actors: Annotated[
        str | None,
        typer.Option(help="embedding actors (one GPU each where present): N, MIN:MAX (a pool that grows) or auto"),
    ] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of a local Ray cluster")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default RAY_ADDRESS or a local cluster)")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="stop at the first bad image")] = False,
    retry_errors: Annotated[
        bool, typer.Option("--retry-errors", help="embed again the images recorded in errors/ by earlier runs")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Embed images (one vector per image) into Parquet and a LanceDB table; re-runs resume."""
    from msnoop.core.config import ConfigError
    from msnoop.embed.pipeline import StrictModeError, TotalsError
    from msnoop.job_kinds import run_embed_job

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
    )
    cfg = load_job(config, set_, job="embed", overrides=overrides)
    try:
        result = run_embed_job(cfg)
    except StrictModeError as exc:
        fail(f"strict mode: {exc}", EXIT_FAILED)
    except TotalsError as exc:
        fail(f"{exc} (nothing written is lost; please report this with the output folder's run.json)", EXIT_FAILED)
    except (ConfigError, ValueError, FileNotFoundError, KeyError) as exc:
        fail(message(exc))
    print_embed_result(result)


def run(
    config: Annotated[
        str, typer.Argument(help="any msnoop job YAML, a path or a URI (job: embed | pretrain | profile | ...)")
    ],
    set_: SetOpt = None,
) -> None:
    """Run any job config in this process (the entrypoint that `msnoop submit` uses on the cluster)."""
    from msnoop.core.config import ConfigError
    from msnoop.job_kinds import run_job

    cfg = load_job(config, set_)
    try:
        _, summary = run_job(cfg)
    except (ConfigError, ValueError, FileNotFoundError, KeyError, ImportError) as exc:
        fail(message(exc))
    except RuntimeError as exc:
        fail(str(exc), EXIT_FAILED)
    if summary:
        typer.echo(summary)


def validate(config: Annotated[str, typer.Argument(help="job YAML, a path or a URI")], set_: SetOpt = None) -> None:
    """Validate a job config and print it resolved (no work is done)."""
    from msnoop.core.config import config_hash, config_to_yaml

    cfg = load_job(config, set_)
    typer.echo(f"# valid {cfg.job} config, hash {config_hash(cfg)}")
    typer.echo(config_to_yaml(cfg))


def submit(
    config: Annotated[str, typer.Argument(help="job YAML, a path or a URI")],
    address: Annotated[str | None, typer.Option(help="Ray dashboard/Jobs address, e.g. http://HEAD:8265")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", help="stream logs until the job ends; exit 1 if it failed")
    ] = False,
    python: Annotated[
        str | None, typer.Option(help="interpreter on the cluster (default: this one for a local cluster)")
    ] = None,
    pip: Annotated[
        list[str] | None, typer.Option("--pip", help="pip package for the job's runtime_env (repeatable)")
    ] = None,
    image_uri: Annotated[str | None, typer.Option(help="container image for the job's workers (runtime_env)")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="KEY=VALUE set on the job's workers (repeatable)")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Send a job to a Ray cluster with the Ray Jobs API."""
    from msnoop.submit import RuntimeEnvOptions, follow_job, submit_job

    cfg = load_job(config, set_)
    try:
        pairs = [item.split("=", 1) for item in env or []]
        if any(len(p) != 2 or not p[0] for p in pairs):
            raise ValueError(f"--env expects KEY=VALUE, found {[e for e in env or [] if '=' not in e]}")
        options = RuntimeEnvOptions(pip=pip or [], image_uri=image_uri, env_vars=dict(pairs))
        sub = submit_job(cfg, address=address, python=python, runtime_env=options)
    except (ConnectionError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"Submitted job {sub.job_id} to {sub.address}")
    typer.echo(f"Equivalent command:\n  {sub.equivalent_command}")
    if follow:
        status = follow_job(sub.address, sub.job_id)
        typer.echo(f"\nJob {sub.job_id} {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(EXIT_FAILED)
    else:
        typer.echo(f"Follow with: ray job logs --address {sub.address} --follow {sub.job_id}")


ClusterAction = Literal["start", "status", "stop"]


def cluster(
    action: Annotated[ClusterAction, typer.Argument(help="start | status | stop")],
    num_cpus: Annotated[int | None, typer.Option(help="CPUs the cluster offers (start; default all)")] = None,
    port: Annotated[int | None, typer.Option(help="GCS port (start; default a free one)")] = None,
    dashboard_port: Annotated[
        int | None, typer.Option(help="dashboard / Jobs API port (start; default 8265, or a free one)")
    ] = None,
) -> None:
    """A Ray cluster on this machine, on 127.0.0.1 only: msnoop commands and `msnoop submit` use it while it runs."""
    from msnoop.core.local_cluster import ClusterError, recorded_cluster, start_local_cluster, stop_local_cluster

    if action == "stop":
        n = stop_local_cluster()
        typer.echo(f"stopped the local cluster ({n} processes)" if n else "no local cluster was running")
        return
    if action == "status":
        running = recorded_cluster()
        if running is None:
            fail("no local cluster is running; start one with `msnoop cluster start`", EXIT_FAILED)
        _describe_cluster(running, "running")
        return
    try:
        local, started = start_local_cluster(num_cpus=num_cpus, port=port, dashboard_port=dashboard_port)
    except ClusterError as exc:
        fail(str(exc), EXIT_FAILED)
    _describe_cluster(local, "started" if started else "already running")


def _describe_cluster(local: Any, state: str) -> None:
    typer.echo(f"Local Ray cluster {state}, listening on 127.0.0.1 only")
    typer.echo(f"  address    {local.address}   (msnoop commands here join it; ray.init(address=...) in Python)")
    typer.echo(f"  dashboard  {local.dashboard}   (the Jobs API: msnoop submit JOB.yaml sends jobs there)")
    typer.echo(f"  started as {local.command}")
    typer.echo("Stop it with: msnoop cluster stop")


def demo(
    out: Annotated[Path, typer.Option(help="folder for the synthetic data and results")] = Path("demo_output"),
    n_per_class: Annotated[int, typer.Option(help="cells per class (4 classes)")] = 12,
    model: Annotated[str | None, typer.Option(help="model reference (default: the shipped model)")] = None,
) -> None:
    """Generate synthetic cells, embed them into Parquet and LanceDB, and search: msnoop end to end in a minute."""
    from msnoop.demo import run_demo
    from msnoop.query.search import open_results, search_by_id

    result, cfg = run_demo(out, n_per_class=n_per_class, model=model)
    print_embed_result(result)
    ref = open_results(cfg.output.dir)
    first = ref.table.search().where("Metadata_Class = 'punctate'").select(["Metadata_ImageID"]).limit(1).to_arrow()
    query_id = first.column("Metadata_ImageID")[0].as_py()
    hits = search_by_id(ref, query_id, k=8)
    typer.echo(f"\nNearest neighbours of {query_id} (class punctate), model {cfg.model}:")
    typer.echo(hits[["Metadata_ImageID", "_distance", "Metadata_Class"]].to_string(index=False))
    same = float((hits["Metadata_Class"] == "punctate").mean())
    typer.echo(f"\n{same:.0%} of the 8 nearest neighbours share the query's class (chance 25%).")
    typer.echo(f"Try: msnoop search {cfg.output.dir} --id {query_id} --k 5 --where \"Metadata_Class = 'membrane'\"")


COMMANDS = [
    ("embed", embed, None),
    ("submit", submit, None),
    ("cluster", cluster, None),
    ("run", run, None),
    ("validate", validate, None),
    ("demo", demo, None),
]
