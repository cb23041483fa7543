"""Yeast single cells: 11-NN leave-one-field-out, protein (5) and localisation (3), for embeddings and baselines.

    python jobs/bench_yeast.py --emb default=results/yeast --emb random=results/yeast_random

Each ``--emb NAME=DIR`` is an ``msnoop embed`` output folder of ../shared/data/yeast. Baselines are
computed from the same files: GFP pixels PCA32 (the data README's floor), both-channel pixels PCA32,
and per-channel intensity statistics. Protocol: k=11, cosine, Microsnoop's vote, folds = the four
fields (no neighbour from the query's own field). Writes results/bench_yeast.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from harness import data_dir, write_results

from msnoop.io.config import InputConfig
from msnoop.evaluate.baselines import intensity_features, pixels_pca
from msnoop.evaluate.knn import knn_evaluate
from msnoop.core.tables import read_table, split_table
from msnoop.io.manifest import load_image_table

DATA = data_dir("yeast")
TASKS = {"protein": "Metadata_protein", "localisation": "Metadata_localization_yeastgfp"}


def evaluate(name: str, X: np.ndarray, meta, k: int) -> dict:
    row = {"features": name, "dim": int(X.shape[1])}
    for task, col in TASKS.items():
        res = knn_evaluate(
            X, meta[col].astype(str).to_numpy(), k=k, cv="group:field", groups=meta["Metadata_field"].to_numpy()
        )
        row[f"{task}_balanced_accuracy"] = res["balanced_accuracy"]
        row[f"{task}_macro_f1"] = res["macro_f1"]
    print(
        f"{name:28s} protein bal.acc {row['protein_balanced_accuracy']:.3f}  localisation bal.acc {row['localisation_balanced_accuracy']:.3f}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emb", action="append", default=[], help="NAME=DIR of an msnoop embed output on the yeast data")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--k", type=int, default=11)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--out", default="results/bench_yeast")
    args = ap.parse_args()
    if not args.data.exists():
        print(f"skipping: {args.data} is absent (the yeast data lives in ../shared/data/yeast)")
        return
    table = load_image_table(InputConfig(manifest=args.data / "yeast_labels.csv", channels=["gfp", "rfp"]))
    rows = []
    for item in args.emb:
        name, folder = item.split("=", 1)
        df = read_table(folder)
        meta, X = split_table(df)
        if len(df) != len(table):
            print(f"warning: {folder} has {len(df)} rows, the yeast table {len(table)}")
        rows.append(evaluate(name, X, meta, args.k))
    if not args.no_baselines:
        rows.append(evaluate("pixels PCA32 (gfp)", pixels_pca(table, ["gfp"]), table, args.k))
        rows.append(evaluate("pixels PCA32 (gfp+rfp)", pixels_pca(table, ["gfp", "rfp"]), table, args.k))
        rows.append(evaluate("intensity statistics", intensity_features(table, ["gfp", "rfp"]), table, args.k))
    lines = [
        "| features | dim | protein bal. acc. | protein macro-F1 | localisation bal. acc. | localisation macro-F1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['features']} | {r['dim']} | {r['protein_balanced_accuracy']:.3f} | {r['protein_macro_f1']:.3f} | "
            f"{r['localisation_balanced_accuracy']:.3f} | {r['localisation_macro_f1']:.3f} |"
        )
    record = {"protocol": f"{args.k}-NN cosine, leave-one-field-out, Microsnoop vote", "rows": rows}
    write_results(args.out, record, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
