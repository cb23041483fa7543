"""Typer command functions for evaluation (registered in ``msnoop.cli``).

Proposed CLI names: ``msnoop eval knn`` (:func:`knn_command`) and ``msnoop eval nsc`` (:func:`nsc_command`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer

from msnoop.cliutil import fail, split_list
from msnoop.evaluate.bbbc021 import nsc, nscb
from msnoop.evaluate.knn import knn_evaluate, parse_cv
from msnoop.evaluate.tables import feature_columns, read_table, split_table

logger = logging.getLogger(__name__)


def _write_json(obj: dict[str, Any], path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    typer.echo(f"wrote {path.resolve()}")


def _load(table: Path, exclude: str | None = None) -> pd.DataFrame:
    try:
        df = read_table(table)
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    if exclude:
        try:
            drop = df.eval(exclude).fillna(False).to_numpy(dtype=bool)
        except Exception as exc:  # pandas raises many types for a bad query
            fail(f"--exclude query {exclude!r} could not be evaluated: {exc}")
        df = df[~drop].reset_index(drop=True)
        if df.empty:
            fail(f"--exclude {exclude!r} leaves no row of {table}")
    return df


def knn_command(
    table: Annotated[Path, typer.Argument(help="Feature table: .parquet, .csv or .csv.gz (Metadata_* + features).")],
    label: Annotated[str, typer.Option("--label", help="Column holding the class label, e.g. Metadata_Protein.")],
    k: Annotated[int, typer.Option("--k", "-k", help="Neighbours (Microsnoop: 11 for CyCLOPS, 1 for TissueNet).")] = 11,
    cv: Annotated[
        str, typer.Option(help="'loo', 'kfold:<n>' (stratified) or 'group:<column>' (leave one group out).")
    ] = "loo",
    metric: Annotated[str, typer.Option(help="'cosine' or 'l2'.")] = "cosine",
    seed: Annotated[int, typer.Option(help="Shuffling seed for kfold.")] = 0,
    exclude: Annotated[
        str | None, typer.Option(help="pandas query of rows to leave out, e.g. \"Metadata_Compound == 'DMSO'\".")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the metrics as JSON here.")] = None,
    index: Annotated[
        str, typer.Option(help="'auto' (IVF for large CPU runs, else exact), 'exact' or 'ivf' (approximate).")
    ] = "auto",
) -> None:
    """kNN classification of profiles (FAISS, Microsnoop vote): accuracy, balanced accuracy, MCC, macro-F1."""
    df = _load(table, exclude)
    if label not in df.columns:
        fail(
            f"label column {label!r} is not in {table}; "
            f"metadata columns: {[c for c in df.columns if str(c).startswith('Metadata_')]}"
        )
    if df[label].isna().any():
        fail(f"label column {label!r} has {int(df[label].isna().sum())} missing value(s); drop them with --exclude")
    try:
        kind, arg = parse_cv(cv)
        groups = None
        if kind == "group":
            if not arg or arg not in df.columns:
                fail(f"cv={cv!r}: expected 'group:<column>' naming a column of the table")
            groups = df[arg].astype(str).to_numpy()
        feats = [f for f in feature_columns(df) if f != label]
        _, X = split_table(df, feats)
        res = knn_evaluate(X, df[label].to_numpy(), k=k, cv=cv, groups=groups, metric=metric, seed=seed, index=index)  # type: ignore[arg-type]
    except ValueError as exc:
        fail(str(exc))
    res["table"] = str(table)
    res["label"] = label
    res["n_features"] = int(X.shape[1])
    typer.echo(
        f"kNN on {table.name}: n={res['n']}  features={res['n_features']}  label={label}  classes={res['n_classes']}"
        f" (chance {res['chance']:.3f})  k={k}  cv={cv}  metric={metric}"
    )
    for key, name in [
        ("accuracy", "accuracy"),
        ("balanced_accuracy", "balanced accuracy"),
        ("mcc", "MCC"),
        ("macro_f1", "macro-F1"),
    ]:
        typer.echo(f"  {name:<18} {res[key]:.4f}")
    typer.echo("  per-class accuracy:")
    counts = df[label].astype(str).value_counts()
    for name, acc in res["per_class_accuracy"].items():
        typer.echo(f"    {name:<30} {acc:.4f}  (n={int(counts.get(name, 0))})")
    _write_json(res, json_path)


def nsc_command(
    table: Annotated[Path, typer.Argument(help="Treatment-level table (one row per compound-concentration).")],
    moa: Annotated[str, typer.Option(help="MOA column.")] = "Metadata_moa",
    compound: Annotated[str, typer.Option(help="Compound column.")] = "Metadata_Compound",
    batch: Annotated[
        list[str] | None,
        typer.Option(help="Batch column(s) for NSCB, repeated or comma-separated (e.g. Metadata_Plate,Metadata_Week)."),
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
        str | None, typer.Option(help="pandas query of rows to leave out, e.g. \"Metadata_Compound == 'DMSO'\".")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
) -> None:
    """NSC / NSCB: 1-NN cosine MOA matching excluding the same compound (and the same batch)."""
    df = _load(table, exclude)
    batches = split_list(batch)
    if batch_match not in ("equal", "overlap"):
        fail(f"expected --batch-match 'equal' or 'overlap', found {batch_match!r}")
    drop = [m.strip() for m in drop_moas.split(",")] if drop_moas else None
    try:
        results: dict[str, Any] = {
            "table": str(table),
            "n_treatments": len(df),
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
    except ValueError as exc:
        fail(str(exc))
    typer.echo(f"MOA matching on {table.name}: {len(df)} treatments, 1-NN cosine")
    for name, r in results.items():
        if not isinstance(r, dict):
            continue
        extra = (
            f"  (dropped MOAs: {', '.join(r['dropped_moas']) or 'none'}; batch {r['batch_match']})"
            if "dropped_moas" in r
            else ""
        )
        typer.echo(f"  {name:<28} {r['accuracy']:.4f}  ({r['n_correct']}/{r['n']}){extra}")
    _write_json(results, json_path)


def map_command(
    table: Annotated[
        Path, typer.Argument(help="Profile/embedding table: msnoop output folder, .parquet, .csv, .lance.")
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
        str | None, typer.Option(help="Drop rows matching this pandas query first, e.g. controls.")
    ] = None,
    null_size: Annotated[int, typer.Option(help="Random rankings per (n_pos, n_total) for the p-values.")] = 10000,
    threshold: Annotated[float, typer.Option(help="Significance threshold (after BH correction).")] = 0.05,
    seed: Annotated[int, typer.Option(help="Seed of the null distributions.")] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the summary as JSON here.")] = None,
) -> None:
    """Mean average precision of retrieval (copairs rules), permutation p-values, BH, fraction retrieved."""
    from msnoop.evaluate.retrieval import average_precision, mean_average_precision, retrieval_summary

    df = _load(table, exclude)
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
        meta, X = split_table(df)
        ap = average_precision(meta, X, **rules)
        scores = mean_average_precision(ap, sameby=pos, null_size=null_size, threshold=threshold, seed=seed)
        summary = retrieval_summary(ap, scores)
    except ValueError as exc:  # no positive/negative pairs, no features, non-finite values
        fail(f"mAP on {table}: {exc}")
    summary.update({"table": str(table), "rules": rules, "null_size": null_size, "threshold": threshold})
    typer.echo(
        f"mAP on {table}: {summary['n_profiles']} profiles, {summary['n_groups']} groups by {', '.join(pos)}\n"
        f"  mean AP            {summary['mean_ap']:.4f}\n"
        f"  mean mAP           {summary['mean_map']:.4f}\n"
        f"  fraction retrieved {summary['fraction_retrieved']:.4f}  (BH q < {threshold})"
    )
    _write_json(summary, json_path)
