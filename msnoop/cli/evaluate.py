"""CLI: evaluate a table: kNN classification, NSC/NSCB, mAP retrieval, HTML report, benchmark jobs."""

from __future__ import annotations

import logging
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from msnoop.cli.common import EXIT_FAILED, SetOpt, fail, load_job, split_list, write_json
from msnoop.vectors.postprocess import DEFAULT_POSTPROCESS, POSTPROCESS_CHOICES

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)


#: The ``--postprocess`` option of every evaluation.
PostprocessOpt = Annotated[
    str | None,
    typer.Option(
        help=f"One of {', '.join(POSTPROCESS_CHOICES)} (standardize: z-score each feature over the table, no "
        "labels; raw: the features as stored); default: the table's own (an embed output's output.postprocess; "
        f"raw for sphered profiles and LanceDB tables; else {DEFAULT_POSTPROCESS})."
    ),
]


def _load(table: str | Path, exclude: str | None = None, postprocess: str | None = None) -> tuple[pd.DataFrame, str]:
    """The table's rows (those ``exclude`` leaves) and the post-processing to apply; bad input exits with code 2."""
    from msnoop.evaluate.features import read_features

    try:
        df, method = read_features(table, postprocess_method=postprocess)
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    if exclude:
        from msnoop.core.filters import FilterError, filter_mask

        try:
            drop = filter_mask(df, exclude)
        except FilterError as exc:
            fail(f"--exclude: {exc}")
        df = df[~drop].reset_index(drop=True)
        if df.empty:
            fail(f"--exclude {exclude!r} leaves no row of {table}")
    return df, method


def knn_command(
    table: Annotated[
        str,
        typer.Argument(
            help="Feature table: .parquet, .csv or .csv.gz (Metadata_* + features), or an embed output folder "
            "(a path or an s3://... URI)."
        ),
    ],
    label: Annotated[str, typer.Option("--label", help="Column holding the class label, e.g. Metadata_Protein.")],
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours (Microsnoop: 11 for CyCLOPS, 1 for TissueNet).")] = 11,
    cv: Annotated[
        str, typer.Option(help="'loo', 'kfold:<n>' (stratified) or 'group:<column>' (leave one group out).")
    ] = "loo",
    metric: Annotated[str, typer.Option(help="'cosine' or 'l2'.")] = "cosine",
    seed: Annotated[int, typer.Option(help="Shuffling seed for kfold.")] = 0,
    exclude: Annotated[
        str | None, typer.Option(help="SQL condition of rows to leave out, e.g. \"Metadata_Compound = 'DMSO'\".")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the metrics as JSON here.")] = None,
    index: Annotated[
        str, typer.Option(help="'auto' (IVF for large CPU runs, else exact), 'exact' or 'ivf' (approximate).")
    ] = "auto",
    postprocess: PostprocessOpt = None,
) -> None:
    """kNN classification of profiles (FAISS, Microsnoop vote): accuracy, balanced accuracy, MCC, macro-F1."""
    from msnoop.evaluate.knn import knn_table

    try:
        res = knn_table(
            table, label, k=k, cv=cv, metric=metric, seed=seed, exclude=exclude, index=index, postprocess=postprocess
        )  # type: ignore[arg-type]
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    typer.echo(str(res))
    write_json(res.metrics, json_path)


def nsc_command(
    table: Annotated[
        str, typer.Argument(help="Treatment-level table (one row per compound-concentration); a path or s3://...")
    ],
    moa: Annotated[str, typer.Option(help="MOA column.")] = "Metadata_moa",
    compound: Annotated[str, typer.Option(help="Compound column.")] = "Metadata_Compound",
    batch: Annotated[
        list[str] | None,
        typer.Option(help="Batch column(s) for NSCB, repeated or comma-separated (e.g. Metadata_Plate,Metadata_Week)."),
    ] = None,
    batch_map: Annotated[
        Path | None,
        typer.Option(
            help="Plate map (CSV/Parquet) giving batch columns the table lacks: one key column the table also has "
            "(e.g. Metadata_Plate) and the batch column(s) named by --batch (e.g. Metadata_Week)."
        ),
    ] = None,
    batch_match: Annotated[str, typer.Option(help="'equal' (batch strings equal, Microsnoop) or 'overlap'.")] = "equal",
    drop_moas: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated MOAs dropped before NSCB; default: MOAs within a single batch of each batch column. "
            "BBBC021/Microsnoop: 'Cholesterol-lowering,Kinase inhibitors'."
        ),
    ] = None,
    exclude: Annotated[
        str | None, typer.Option(help="SQL condition of rows to leave out, e.g. \"Metadata_Compound = 'DMSO'\".")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    postprocess: PostprocessOpt = None,
) -> None:
    """NSC / NSCB: 1-NN cosine MOA matching excluding the same compound (and the same batch)."""
    from msnoop.core.tables import read_table
    from msnoop.evaluate.features import postprocessed_table
    from msnoop.evaluate.nsc import BATCH_MATCHES, apply_batch_map, nsc, nscb

    df, method = _load(table, exclude, postprocess)
    batches = split_list(batch)
    if batch_match not in BATCH_MATCHES:
        fail(f"expected --batch-match 'equal' or 'overlap', found {batch_match!r}")
    drop = [m.strip() for m in drop_moas.split(",")] if drop_moas else None
    try:
        if batch_map is not None:
            df = apply_batch_map(df, read_table(batch_map), batches)
        missing = [b for b in batches if b not in df.columns]
        if missing:
            raise ValueError(
                f"batch column(s) {missing} are not in {table}; name one of its columns or give a plate map with "
                "--batch-map"
            )
        df, post = postprocessed_table(df, method=method)
        results: dict[str, Any] = {
            "table": str(table),
            "n_treatments": len(df),
            "postprocess": post,
            "NSC": nsc(df, moa_column=moa, compound_column=compound),
        }
        for b in batches:
            results[f"NSCB[{b}]"] = nscb(
                df,
                batch_column=b,
                moa_column=moa,
                compound_column=compound,
                drop_moas=drop,
                batch_match=batch_match,  # type: ignore[arg-type]
            )
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    typer.echo(
        f"MOA matching on {posixpath.basename(table.rstrip('/'))}: {len(df)} treatments, 1-NN cosine, "
        f"postprocess={method}"
    )
    for name, r in results.items():
        if not isinstance(r, dict) or "accuracy" not in r:
            continue
        extra = (
            f"  (dropped MOAs: {', '.join(r['dropped_moas']) or 'none'}; batch {r['batch_match']}; "
            f"{r['batch_excluded_pairs']} cross-compound pairs share a batch)"
            if "dropped_moas" in r
            else ""
        )
        typer.echo(f"  {name:<28} {r['accuracy']:.4f}  ({r['n_correct']}/{r['n']}){extra}")
    write_json(results, json_path)


def map_command(
    table: Annotated[
        str,
        typer.Argument(
            help="Profile/embedding table: msnoop output folder, .parquet, .csv, .lance; a path or s3://..."
        ),
    ],
    positive: Annotated[
        list[str], typer.Option("--positive", help="Positives share these columns, e.g. Metadata_moa.")
    ],
    pos_diff: Annotated[
        list[str] | None, typer.Option("--pos-diff", help="Positives must differ in these (e.g. the compound).")
    ] = None,
    neg_same: Annotated[
        list[str] | None, typer.Option("--neg-same", help="Negatives must share these (e.g. the plate).")
    ] = None,
    neg_diff: Annotated[
        list[str] | None, typer.Option("--neg-diff", help="Negatives must differ in these (default: --positive).")
    ] = None,
    exclude: Annotated[
        str | None, typer.Option(help="SQL condition of rows to leave out first, e.g. controls.")
    ] = None,
    null_size: Annotated[int, typer.Option(help="Random rankings per (n_pos, n_total) for the p-values.")] = 10000,
    threshold: Annotated[float, typer.Option(help="Significance threshold (after BH correction).")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the null distributions.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the summary as JSON here.")] = None,
    postprocess: PostprocessOpt = None,
) -> None:
    """Mean average precision of retrieval (copairs rules), permutation p-values, BH, fraction retrieved."""
    from msnoop.evaluate.features import table_features
    from msnoop.evaluate.map import average_precision, mean_average_precision, retrieval_summary

    df, method = _load(table, exclude, postprocess)
    pos = split_list(positive)
    rules = {
        "pos_sameby": pos,
        "pos_diffby": split_list(pos_diff),
        "neg_sameby": split_list(neg_same),
        "neg_diffby": split_list(neg_diff) or pos,
    }
    missing = sorted({c for cols in rules.values() for c in cols} - set(df.columns))
    if missing:
        fail(
            f"columns {missing} not in {table}; metadata columns: {[c for c in df.columns if c.startswith('Metadata_')]}"
        )
    try:
        feats = table_features(df, method=method)
        ap = average_precision(feats.meta, feats.X, **rules)
        scores = mean_average_precision(ap, sameby=pos, null_size=null_size, threshold=threshold, seed=seed)
        summary = retrieval_summary(ap, scores)
    except ValueError as exc:  # no positive/negative pairs, no features, non-finite values
        fail(f"mAP on {table}: {exc}")
    summary.update(
        {
            "table": str(table),
            "rules": rules,
            "null_size": null_size,
            "threshold": threshold,
            "postprocess": feats.postprocess,
        }
    )
    typer.echo(
        f"mAP on {table}: {summary['n_profiles']} profiles, {summary['n_groups']} groups by {', '.join(pos)}\n"
        f"  mean AP            {summary['mean_ap']:.4f}\n"
        f"  mean mAP           {summary['mean_map']:.4f}\n"
        f"  fraction retrieved {summary['fraction_retrieved']:.4f}  (BH q < {threshold})"
    )
    write_json(summary, json_path)


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
    map_method: Annotated[
        str,
        typer.Option(
            "--map", help="2-D map: 'auto' (t-SNE to 5,000 rows, UMAP to 100,000, else PCA), 'tsne', 'umap', 'pca'."
        ),
    ] = "auto",
    postprocess: PostprocessOpt = None,
) -> None:
    """HTML report: 2-D map, kNN metrics and confusion matrix, nearest-neighbour image galleries."""
    from msnoop.evaluate.report import build_report

    try:
        page = build_report(
            table,
            label=label,
            batch=batch,
            out_dir=out,
            k=k,
            cv=cv,
            n_queries=queries,
            map_method=map_method,
            postprocess=postprocess,
        )
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    import json

    unreadable = json.loads((page.parent / "report.json").read_text()).get("unreadable_images") or []
    if unreadable:
        fail(
            f"report written to {page}, but {len(unreadable)} gallery image(s) could not be read "
            f"(shown grey), e.g. {unreadable[0]}",
            EXIT_FAILED,
        )
    typer.echo(str(page))


def bench(
    configs: Annotated[list[Path], typer.Argument(help="bench YAMLs (job: bench), e.g. configs/benchmarks/*.yaml")],
    summary: Annotated[Path | None, typer.Option(help="also write all results tables into this Markdown file")] = None,
    set_: SetOpt = None,
) -> None:
    """Embed a dataset with several models, compute baselines, and compare them by kNN (Markdown + CSV table)."""
    from msnoop.core.config import ConfigError
    from msnoop.evaluate.bench import markdown, run_bench

    jobs = [load_job(c, set_, job="bench") for c in configs]  # validate all before any work
    sections = []
    for job in jobs:
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
        from msnoop.core import storage as st

        st.write_text(summary, "\n".join(sections))  # complete or absent
        typer.echo(f"wrote {summary}")


COMMANDS = [
    ("knn", knn_command, "kNN classification of any embedding/profile table (LOO, k-fold, leave-group-out)."),
    ("nsc", nsc_command, "BBBC021-style NSC/NSCB (1-NN, not-same-compound / not-same-batch) on a treatment table."),
    ("map", map_command, "mAP retrieval (copairs rules) with permutation p-values, BH and fraction retrieved."),
    (
        "report",
        report_command,
        "HTML report with PNGs: 2-D map by label/batch, kNN confusion matrix, neighbour galleries.",
    ),
    ("bench", bench, None),
]
