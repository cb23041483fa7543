"""Benchmark: BBBC021 CellProfiler well profiles -> DMSO sphering -> treatments -> NSC / NSCB / mAP.

Input (``../shared/data/bbbc021_profiles``, or ``--data``/``MSNOOP_SHARED_DATA``):
``morpheus_exercise/BBBC021_feature_selected_mad_robustize.csv`` (632 wells x 189 features, MAD-robustized
and feature-selected by pycytominer) and ``BBBC021_v1_moa.csv`` (103 compound-concentrations -> 12 MOAs).

Protocol (Microsnoop's batch-experiment post-processing on well profiles instead of image embeddings):

1. sphering fitted on the DMSO wells (none / ZCA-cor knee on all DMSO = Microsnoop / ZCA-cor epsilon=0.1 on all
   DMSO / ZCA-cor knee per plate);
2. treatment profile = mean of its wells (DMSO excluded), plates and weeks joined into batch strings;
3. NSC (1-NN cosine, other compounds; 103 treatments) and NSCB (also other batch; MOAs in one week dropped ->
   92 treatments) with batch = Microsnoop's plate string (equality) and = week (DeepProfiler);
4. MOA retrieval mAP (copairs rules): positives = same MOA, other compound; negatives = other MOA; mAP per MOA,
   permutation p-values, BH; plus the batch-aware variant (positives also from another week, 92 treatments).

Writes ``results/bench_bbbc021_profiles.json`` and prints a table.

Usage:
    python jobs/bench_bbbc021_profiles.py [--data DIR] [--out results/bench_bbbc021_profiles.json]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
from harness import RESULTS, data_dir, write_results

from msnoop.aggregate.profiles import aggregate_profiles
from msnoop.correct.sphering import spherize_profiles
from msnoop.evaluate.nsc import BBBC021_SINGLE_BATCH_MOAS, nsc, nscb, week_from_plate
from msnoop.evaluate.map import average_precision, mean_average_precision, retrieval_summary
from msnoop.core.tables import feature_columns

logger = logging.getLogger("bench_bbbc021_profiles")

PROFILES = "morpheus_exercise/BBBC021_feature_selected_mad_robustize.csv"
MOA_FILE = "BBBC021_v1_moa.csv"
DMSO = "Metadata_Compound == 'DMSO'"

CONDITIONS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "zca-cor-knee-global (Microsnoop)": {"method": "ZCA-cor", "epsilon": "knee", "per_batch": False},
    "zca-cor-eps0.1-global": {"method": "ZCA-cor", "epsilon": 0.1, "per_batch": False},
    "zca-cor-knee-per-plate": {"method": "ZCA-cor", "epsilon": "knee", "per_batch": True},
}


def load_wells(folder: Path) -> pd.DataFrame:
    """Well profiles with ``Metadata_moa`` from the MOA file and a ``Metadata_Week`` column."""
    wells = pd.read_csv(folder / PROFILES).copy()  # consolidate blocks (pandas 3 reads one block per column)
    moa = pd.read_csv(folder / MOA_FILE).rename(
        columns={"compound": "Metadata_Compound", "concentration": "Metadata_Concentration", "moa": "Metadata_moa_file"}
    )
    wells = wells.merge(moa, on=["Metadata_Compound", "Metadata_Concentration"], how="left")
    treated = wells["Metadata_Compound"] != "DMSO"
    if "Metadata_moa" in wells.columns:
        both = wells.loc[treated, ["Metadata_moa", "Metadata_moa_file"]].dropna()
        if (both["Metadata_moa"] != both["Metadata_moa_file"]).any():
            raise SystemExit("MOA column of the profiles disagrees with BBBC021_v1_moa.csv")
    wells["Metadata_moa"] = wells["Metadata_moa_file"].where(treated, "DMSO")
    week = week_from_plate(wells["Metadata_Plate"]).rename("Metadata_Week")
    return pd.concat([wells.drop(columns=["Metadata_moa_file"]), week], axis=1)


def treatments_from_wells(wells: pd.DataFrame) -> pd.DataFrame:
    """Mean profile per compound-concentration with an MOA (DMSO excluded); plates and weeks joined."""
    treated = wells[(wells["Metadata_Compound"] != "DMSO") & wells["Metadata_moa"].notna()]
    return aggregate_profiles(
        treated, ["Metadata_Compound", "Metadata_Concentration"], "mean", join=["Metadata_Plate", "Metadata_Week"]
    )


def evaluate_condition(
    wells: pd.DataFrame, sphering: dict[str, Any] | None, *, null_size: int = 10000
) -> dict[str, Any]:
    """Sphering (optional) -> treatments -> NSC, NSCB (plate, week), mAP."""
    info: dict[str, Any] = {"method": "none"}
    if sphering is not None:
        wells, info = spherize_profiles(wells, control_query=DMSO, batch_column="Metadata_Plate", **sphering)
        info = {k: v for k, v in info.items() if k != "n_controls_by_batch"}
    t = treatments_from_wells(wells)
    drop = list(BBBC021_SINGLE_BATCH_MOAS)
    res: dict[str, Any] = {
        "sphering": info,
        "n_treatments": len(t),
        "NSC": nsc(t),
        "NSCB_plate": nscb(t, batch_column="Metadata_Plate", drop_moas=drop, batch_match="equal"),
        "NSCB_week": nscb(t, batch_column="Metadata_Week", drop_moas=drop, batch_match="equal"),
    }
    feats = feature_columns(t)
    meta = t.drop(columns=feats)
    ap = average_precision(
        meta,
        t[feats].to_numpy(),
        pos_sameby=["Metadata_moa"],
        pos_diffby=["Metadata_Compound"],
        neg_diffby=["Metadata_moa"],
    )
    res["mAP_moa"] = retrieval_summary(ap, mean_average_precision(ap, sameby=["Metadata_moa"], null_size=null_size))
    t92 = t[~t["Metadata_moa"].isin(drop)].reset_index(drop=True)
    ap_b = average_precision(
        t92.drop(columns=feats),
        t92[feats].to_numpy(),
        pos_sameby=["Metadata_moa"],
        pos_diffby=["Metadata_Compound", "Metadata_Week"],
        neg_diffby=["Metadata_moa"],
    )
    res["mAP_moa_other_week"] = retrieval_summary(
        ap_b, mean_average_precision(ap_b, sameby=["Metadata_moa"], null_size=null_size)
    )
    return res


def main(argv: list[str] | None = None) -> int:
    """Run every condition, write the JSON, print the table; returns the exit code (2: data absent)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="bbbc021_profiles folder (default ../shared/data/bbbc021_profiles)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_bbbc021_profiles.json")
    parser.add_argument("--null-size", type=int, default=10000, help="random rankings per mAP null configuration")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    folder = args.data or data_dir("bbbc021_profiles")
    if not (folder / PROFILES).exists() or not (folder / MOA_FILE).exists():
        print(
            f"error: BBBC021 profiles not found: expected {folder / PROFILES} and {folder / MOA_FILE}; "
            "pass --data DIR or set MSNOOP_SHARED_DATA to the folder holding bbbc021_profiles/",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    wells = load_wells(folder)
    results: dict[str, Any] = {
        "data": str(folder / PROFILES),
        "n_wells": len(wells),
        "n_features": len(feature_columns(wells)),
        "protocol": "1-NN cosine on treatment means; NSCB drops Cholesterol-lowering and Kinase inhibitors (92)",
        "conditions": {
            name: evaluate_condition(wells, sph, null_size=args.null_size) for name, sph in CONDITIONS.items()
        },
    }
    results["seconds"] = round(time.perf_counter() - t0, 2)
    write_results(args.out, results)

    header = (
        f"{'sphering':<34} {'NSC':>7} {'NSCB plate':>11} {'NSCB week':>10}"
        f" {'mAP MOA':>8} {'retr.':>6} {'mAP o.wk':>9} {'retr.':>6}"
    )
    print(f"BBBC021 profiles: {results['n_wells']} wells x {results['n_features']} features -> treatments")
    print(header)
    print("-" * len(header))
    for name, r in results["conditions"].items():
        print(
            f"{name:<34} {r['NSC']['accuracy']:>7.3f} {r['NSCB_plate']['accuracy']:>11.3f}"
            f" {r['NSCB_week']['accuracy']:>10.3f}"
            f" {r['mAP_moa']['mean_map']:>8.3f} {r['mAP_moa']['fraction_retrieved']:>6.2f}"
            f" {r['mAP_moa_other_week']['mean_map']:>9.3f} {r['mAP_moa_other_week']['fraction_retrieved']:>6.2f}"
        )
    r0 = next(iter(results["conditions"].values()))
    print(
        f"(n = {r0['NSC']['n']} treatments for NSC, {r0['NSCB_week']['n']} for NSCB; mAP = mean over MOAs; "
        f"retr. = fraction of MOAs with BH q < 0.05)"
    )
    print(f"wrote {args.out} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
