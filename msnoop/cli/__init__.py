"""The ``msnoop`` command line (typer). Thin: parse, validate, call the library, print.

Verbs are grouped by task in ``msnoop --help``; each group's commands live in the module of that name
(:mod:`msnoop.cli.embed`, :mod:`~msnoop.cli.query`, :mod:`~msnoop.cli.evaluate`, :mod:`~msnoop.cli.profiles`,
:mod:`~msnoop.cli.training`). Importing this package loads typer and the light config modules only; each
command imports its stage when it runs. Exit codes: see :mod:`msnoop.cli.common`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer
import typer.core


def _flag_type_hidden() -> None:
    """Show boolean flags as flags in ``--help`` (typer 0.29's rich help prints ``<bool>`` beside every flag,
    ``--help`` included, as if it took a value; click's plain help does not)."""
    original = typer.core.TyperOption.display_type_rich

    def display_type_rich(self: typer.core.TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag else original(self, ctx)

    typer.core.TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flag_type_hidden()

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Microscopy image embeddings at scale (Microsnoop on Ray).",
)
logger = logging.getLogger("msnoop")

#: Help panels, in the order ``msnoop --help`` shows them.
EMBED, QUERY, EVALUATE, PROFILES, TRAINING = (
    "Embed and submit",
    "Search and inspect",
    "Evaluate",
    "Profiles and screens",
    "Training",
)

# Libraries that log at INFO on every start (faiss's loader: 9 lines; LanceDB's Rust core; Ray's C++ core
# workers, whose first-start notices look like errors): quiet unless -v.
_NOISY = ("ray", "lancedb", "faiss", "urllib3", "filelock", "asyncio", "numexpr", "matplotlib", "PIL", "botocore")


def _sleeping_openmp_threads() -> None:
    """OpenMP threads that spin while they wait lose their core to every other process on a small, shared machine:
    they sleep instead (libgomp reads this when torch loads, so before any command imports it). An embedding run in
    this process (a small job) went from 80 to 45 s on 2 busy cores; the Ray actors set the same."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # Commands print their own summary; msnoop's INFO lines (what a run is about to do, where it wrote) are for -v.
    logging.getLogger("msnoop").setLevel(logging.DEBUG if verbose else logging.WARNING)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # Ray's C++ core (driver, raylet, workers) copies every ERROR line to stderr whatever the log file
        # says, e.g. `core_worker.cc ... E ... has constructor arguments in the object store and
        # max_restarts > 0` once per Ray Data actor pool given an object ref (the embedding model); `error`
        # keeps those, only `fatal` hides them. The threshold also keeps them out of the session's log files:
        # run with -v to debug Ray itself. Setting the variable makes each C++ process print one INFO notice
        # ('Set ray log level ...'); init_ray drops the copies forwarded from workers.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        os.environ.setdefault("RAY_LOG_TO_STDERR", "0")
        os.environ.setdefault("LANCEDB_LOG", "error")


def _print_version(value: bool) -> None:
    if value:
        from msnoop import __version__

        typer.echo(f"msnoop {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="more logging (debug)")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Microscopy image embeddings at scale: the options every command shares (logging, version)."""
    _setup_logging(verbose)
    _sleeping_openmp_threads()


#: One example per command, shown at the end of its ``--help`` (commands run from the repository root, as in the
#: README).
EXAMPLES: dict[str, str] = {
    "embed": "msnoop embed --manifest ../shared/data/hpa_toy/hpa_labels.csv --channels green,blue,red --out "
    "results/hpa   (or: msnoop embed configs/yeast.yaml)",
    "submit": "msnoop cluster start; msnoop submit configs/yeast.yaml --follow   (a remote cluster: --address "
    "http://HEAD:8265)",
    "cluster": "msnoop cluster start --num-cpus 2; msnoop submit configs/yeast.yaml --follow; msnoop cluster stop",
    "run": "msnoop run configs/bbbc021_profiles.yaml",
    "validate": "msnoop validate configs/yeast.yaml --set runtime.actors=4",
    "demo": "msnoop demo --out demo_output",
    "search": 'msnoop search results/yeast --id images/AAC1/AAC1_1_rfp_10_gfp --k 5 --where "Metadata_field = 2"',
    "info": "msnoop info results/yeast",
    "export": 'msnoop export results/yeast --out yeast.h5ad   then scanpy.pp.neighbors(adata, use_rep="X_msnoop")',
    "knn": "msnoop knn results/yeast --label Metadata_protein --cv group:Metadata_field",
    "nsc": "msnoop nsc results/bbbc021_profiles --batch Metadata_Week --batch-map configs/bbbc021_platemap.csv",
    "map": "msnoop map results/bbbc021_profiles --positive Metadata_moa --pos-diff Metadata_Compound",
    "report": "msnoop report results/yeast --label Metadata_localization_yeastgfp --out reports/yeast",
    "bench": "msnoop bench configs/benchmarks/hpa_toy.yaml --summary results/benchmarks.md",
    "profile": "msnoop profile configs/bbbc021_profiles.yaml",
    "screen": "msnoop screen configs/bbbc013_screen.yaml --set input=results/bbbc013_cells",
    "pretrain": "msnoop pretrain configs/pretrain_smoke.yaml",
    "segtrain": "msnoop segtrain configs/segtrain_coelho.yaml",
}


def _register() -> None:
    """Add every command under its task's panel, with its example; a job kind's verb takes its help line from the
    job registry."""
    from msnoop.cli import embed, evaluate, profiles, query, training
    from msnoop.job_kinds import JOB_KINDS

    job_help = {kind.verb: kind.help for kind in JOB_KINDS.values()}

    for module, panel in (
        (embed, EMBED),
        (query, QUERY),
        (evaluate, EVALUATE),
        (profiles, PROFILES),
        (training, TRAINING),
    ):
        for name, fn, help_ in module.COMMANDS:
            app.command(
                name, help=job_help.get(name, help_), epilog=f"Example: {EXAMPLES[name]}", rich_help_panel=panel
            )(fn)


_register()
