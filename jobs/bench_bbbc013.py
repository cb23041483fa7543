"""BBBC013 (FKHR-GFP translocation, one 96-well plate): Z' between control wells and dose-response rho.

    python jobs/bench_bbbc013.py --emb tile=results/bbbc013 --emb cells=results/bbbc013_cells

Each ``--emb NAME=DIR`` is an ``msnoop embed`` output folder of ../shared/data/bbbc013 (one field per well,
so one image = one well profile). Wells are joined with ``1049_Metadata.csv`` on Row/Column.

Plate layout (from the metadata; checked at run time and written to the JSON):

* rows A-D: columns 01-02 negative controls (SBS_Controls -1, dose 0), 03-11 samples (doses 1-9),
  column 12 positive controls (+1, dose 10);
* rows E-H: column 01 positive controls (dose 10), columns 02 and 12 negative controls (dose 0), 03-11
  samples (doses 1-9).

So 16 negative and 8 positive control wells, and 2 series x 4 replicate rows x 9 doses = 72 sample wells.

Protocol, for each embedding and for each sphering variant:

* ``none``: raw embeddings;
* ``ZCA-cor knee``: :func:`msnoop.correct.sphering.spherize_profiles` fitted on the 16 negative-control wells
  (applied to all wells);
* ``ZCA-cor knee, LOO fit``: the same, but each negative-control well is scored in a sphering fitted on
  the other 15 negative wells, so no well takes part in the transform it is scored with.

Readout: :func:`msnoop.screen.readout.control_axis_readout`, the projection onto the (mean positive - mean
negative) axis, leave-one-out for control wells (0 ~ negative, 1 ~ positive controls). Metrics: Z'
between the positive and negative control wells; Spearman rho of the readout against SBS_Doses over the
36 sample wells of rows A-D and of rows E-H (and, as a secondary number, with the control wells added as
doses 0 and 10). The direction is set by the positive controls (dose 10), so a positive rho means the
readout moves towards the positive controls with dose; rho is reported as measured.

Cells-mode outputs (a ``cells/`` folder of per-cell rows) are also read out per cell:
:func:`msnoop.screen.readout.cell_classifier_readout`, a logistic regression trained on the cells of the control
wells (leave-one-well-out for control wells, C chosen by grouped cross-validation of the cell-level log loss), a
well being the mean over its cells of P(positive) (``cell classifier, P(positive)``: the share of responding
cells, the readout declared for this plate) or of the logit (``cell classifier, logit``). It is told only which
wells are controls, as the control-axis readout is.

Hand-made baseline: the DNA channel is segmented with :func:`msnoop.segment.segment` (built-in backend),
nuclei = the instance mask, cytoplasm = a ring of ``--ring`` px around the nuclei (binary dilation with a
disk, minus the nuclei); per well, the ratio mean GFP in nuclei / mean GFP in the ring. Reported as is
(``N/C GFP ratio``) and through the same control-axis readout. The data README's floor for it is Z' 0.70,
rho 0.90 (A-D) and 0.92 (E-H).

Writes results/bench_bbbc013.{json,md} and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness import data_dir, write_results

from msnoop.correct.sphering import spherize_profiles
from msnoop.screen.readout import cell_classifier_readout, control_axis_readout, dose_response, z_prime
from msnoop.core.tables import feature_columns, read_table, split_table

DATA = data_dir("bbbc013")
N_WELLS = 96
SERIES = {"A-D": tuple("ABCD"), "E-H": tuple("EFGH")}
NEG_QUERY = "Metadata_SBS_Controls == -1"

logger = logging.getLogger("bench_bbbc013")


# --------------------------------------------------------------------------- plate layout


def _norm_column(col: Any) -> str:
    """``1``, ``"1"``, ``"01"`` -> ``"01"``."""
    try:
        return f"{int(str(col).strip()):02d}"
    except ValueError as exc:
        raise ValueError(f"expected a plate column number such as '01', found {col!r}") from exc


def load_layout(data: Path) -> pd.DataFrame:
    """The plate metadata: one row per well with Row, Column ("01".."12"), SBS_Doses, SBS_Controls, series."""
    path = data / "1049_Metadata.csv"
    md = pd.read_csv(path, dtype={"Column": str, "Row": str})
    needed = {"ImageNumber", "Row", "Column", "SBS_Doses", "SBS_Controls"}
    if not needed <= set(md.columns):
        raise SystemExit(f"{path}: expected columns {sorted(needed)}, found {list(md.columns)}")
    md["Column"] = md["Column"].map(_norm_column)
    md["Row"] = md["Row"].str.strip().str.upper()
    md["series"] = md["Row"].map({r: s for s, rows in SERIES.items() for r in rows})
    if md["series"].isna().any() or md.duplicated(["Row", "Column"]).any() or len(md) != N_WELLS:
        raise SystemExit(f"{path}: expected the 96 wells A-H x 01-12 once each, found {len(md)} rows")
    return md


def describe_layout(md: pd.DataFrame) -> dict[str, Any]:
    """Which columns hold which controls and doses, per series (for the report)."""
    out: dict[str, Any] = {}
    for s, g in md.groupby("series", sort=True):
        kinds = {}
        for kind, code in (("negative", -1), ("positive", 1), ("sample", 0)):
            gg = g[g["SBS_Controls"] == code]
            cols = sorted(gg["Column"].unique())
            kinds[kind] = {
                "n_wells": len(gg),
                "columns": cols,
                "doses": sorted(int(d) for d in gg["SBS_Doses"].unique()),
            }
        # every row of the series has the same layout?
        per_row = g.groupby("Row").apply(
            lambda x: tuple(zip(x["Column"], x["SBS_Doses"], x["SBS_Controls"], strict=True)), include_groups=False
        )
        kinds["rows"] = sorted(g["Row"].unique())
        kinds["same_layout_in_every_row"] = bool(per_row.nunique() == 1)
        kinds["dose_by_column"] = {c: int(d) for c, d in g.groupby("Column")["SBS_Doses"].first().items()}
        out[str(s)] = kinds
    return out


# --------------------------------------------------------------------------- metrics


def score(readout: np.ndarray, md: pd.DataFrame) -> dict[str, Any]:
    """Z' and dose-response rho for one per-well readout aligned with ``md``."""
    ctrl = md["SBS_Controls"].to_numpy()
    pos, neg, sample = ctrl == 1, ctrl == -1, ctrl == 0
    res: dict[str, Any] = {"n_wells": len(md), "n_pos": int(pos.sum()), "n_neg": int(neg.sum())}
    res["z_prime"] = z_prime(readout[pos], readout[neg]) if pos.sum() >= 2 and neg.sum() >= 2 else None
    dose = md["SBS_Doses"].to_numpy(dtype=float)
    series = md["series"].to_numpy()
    for key, rows in (("rho", sample), ("rho_with_controls", np.ones(len(md), bool))):
        vals: dict[str, float | None] = {}
        for s in SERIES:
            m = rows & (series == s)
            ok = m.sum() >= 3 and np.ptp(dose[m]) > 0
            vals[s] = dose_response(readout[m], dose[m], series[m])[s] if ok else None
        res[key] = vals
    res["mean_readout"] = {
        "negative": float(readout[neg].mean()) if neg.any() else None,
        "positive": float(readout[pos].mean()) if pos.any() else None,
    }
    return res


def _fmt(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.3f}"


# --------------------------------------------------------------------------- embeddings


def load_embedding(folder: str, md: pd.DataFrame, allow_partial: bool) -> pd.DataFrame:
    """One row per well: the embedding joined with the plate metadata (``Metadata_SBS_*``, ``Metadata_series``)."""
    return join_layout(read_table(folder), folder, md, allow_partial)


def well_keys(df: pd.DataFrame, folder: str) -> pd.DataFrame:
    """A copy of ``df`` with ``Metadata_Row`` ("A".."H") and ``Metadata_Column`` ("01".."12") normalised."""
    for col in ("Metadata_Row", "Metadata_Column"):
        if col not in df.columns:
            raise SystemExit(
                f"{folder}: expected a {col} column (an msnoop embed output of BBBC013), found {list(df.columns)[:8]}"
            )
    df = df.copy()
    df["Metadata_Row"] = df["Metadata_Row"].astype(str).str.strip().str.upper()
    df["Metadata_Column"] = df["Metadata_Column"].map(_norm_column)
    return df


def join_layout(df: pd.DataFrame, folder: str, md: pd.DataFrame, allow_partial: bool) -> pd.DataFrame:
    """:func:`load_embedding` on a table already read (rows of one well are averaged)."""
    df = well_keys(df, folder)
    feats = feature_columns(df)
    n_rows = len(df)
    if df.duplicated(["Metadata_Row", "Metadata_Column"]).any():
        n_wells = df.groupby(["Metadata_Row", "Metadata_Column"]).ngroups
        logger.warning("%s: %d rows for %d wells; averaging the rows of each well", folder, n_rows, n_wells)
        df = df.groupby(["Metadata_Row", "Metadata_Column"], as_index=False)[feats].mean()
    lay = md.rename(
        columns={
            "Row": "Metadata_Row",
            "Column": "Metadata_Column",
            "SBS_Doses": "Metadata_SBS_Doses",
            "SBS_Controls": "Metadata_SBS_Controls",
            "series": "Metadata_series",
            "ImageNumber": "Metadata_PlateImageNumber",
        }
    )
    joined = df.merge(lay, on=["Metadata_Row", "Metadata_Column"], how="left", validate="one_to_one")
    unmatched = joined["Metadata_SBS_Controls"].isna()
    if unmatched.any():
        bad = joined.loc[unmatched, ["Metadata_Row", "Metadata_Column"]].astype(str).agg("-".join, axis=1).tolist()
        raise SystemExit(f"{folder}: {int(unmatched.sum())} well(s) not in 1049_Metadata.csv: {bad[:10]}")
    if "Metadata_ImageNumber" in joined.columns:
        mism = pd.to_numeric(joined["Metadata_ImageNumber"], errors="coerce") != joined["Metadata_PlateImageNumber"]
        if mism.any():
            raise SystemExit(
                f"{folder}: Metadata_ImageNumber disagrees with 1049_Metadata.csv for {int(mism.sum())} well(s)"
            )
    if len(joined) < N_WELLS:
        msg = f"{folder} has {len(joined)} of {N_WELLS} wells (embedding still running?)"
        if not allow_partial:
            raise SystemExit(msg + "; wait for it to finish or pass --allow-partial")
        logger.warning(msg + "; scoring the wells present (--allow-partial)")
    joined["Metadata_SBS_Controls"] = joined["Metadata_SBS_Controls"].astype(int)
    joined["Metadata_SBS_Doses"] = joined["Metadata_SBS_Doses"].astype(int)
    joined = joined.sort_values(["Metadata_Row", "Metadata_Column"]).reset_index(drop=True)
    return joined[[c for c in joined.columns if c not in feats] + feats]


def _plate_md(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "Row": df["Metadata_Row"].to_numpy(),
            "Column": df["Metadata_Column"].to_numpy(),
            "SBS_Doses": df["Metadata_SBS_Doses"].to_numpy(),
            "SBS_Controls": df["Metadata_SBS_Controls"].to_numpy(),
            "series": df["Metadata_series"].to_numpy(),
        }
    )


def sphered_readout(df: pd.DataFrame, method: str, epsilon: Any) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Control-axis readout after sphering fitted on the negative-control wells.

    Returns:
        ``(readout [N], sphered features [N, D], sphering info)``.
    """
    ctrl = df["Metadata_SBS_Controls"].to_numpy()
    sph, info = spherize_profiles(df, control_query=NEG_QUERY, method=method, epsilon=epsilon)
    _, Y = split_table(sph)
    return control_axis_readout(Y, ctrl == 1, ctrl == -1), Y, info


def embedding_readouts(df: pd.DataFrame, method: str, epsilon: Any) -> dict[str, tuple[np.ndarray, dict]]:
    """Readouts for the three sphering variants: ``{variant: (readout [N], info)}``."""
    ctrl = df["Metadata_SBS_Controls"].to_numpy()
    pos, neg = ctrl == 1, ctrl == -1
    _, X = split_table(df)
    out: dict[str, tuple[np.ndarray, dict]] = {"none": (control_axis_readout(X, pos, neg), {"dim": int(X.shape[1])})}

    tag = f"{method} {epsilon}"
    r_in, Y, info = sphered_readout(df, method, epsilon)
    m = info["models"]["all"]
    summary = {
        "dim": int(Y.shape[1]),
        "n_controls": info["n_controls"],
        "dropped_features": len(info["dropped_features"]),
        "rank": m["rank"],
        "knee_index": m["knee_index"],
        "reg": m["reg"],
    }
    out[tag] = (r_in, summary)

    # leave-one-out fit: each negative well is scored in a sphering fitted without it
    r_loo = r_in.copy()
    sph_logger = logging.getLogger("msnoop.correct.sphering")
    old = sph_logger.level
    sph_logger.setLevel(logging.ERROR)  # the rank-deficiency warning repeats for every fit
    try:
        for i in np.flatnonzero(neg):
            d2 = df.copy()
            fit = neg.copy()
            fit[i] = False
            d2["Metadata_fit"] = fit
            s2, _ = spherize_profiles(d2, control_query="Metadata_fit", method=method, epsilon=epsilon)
            _, Y2 = split_table(s2)
            r_loo[i] = control_axis_readout(Y2, pos, neg)[i]
    finally:
        sph_logger.setLevel(old)
    out[f"{tag}, LOO fit"] = (r_loo, dict(summary, fits=int(neg.sum()) + 1))
    return out


# --------------------------------------------------------------------------- per-cell classifier

CLASSIFIER_READOUTS = {"probability": "cell classifier, P(positive)", "logit": "cell classifier, logit"}


def read_cells(folder: str, md: pd.DataFrame) -> pd.DataFrame | None:
    """The per-cell rows of a cells-mode output with a ``Metadata_Well`` id ("A01"), or ``None`` without ``cells/``."""
    cells_dir = Path(folder) / "cells"
    if not cells_dir.is_dir():
        return None
    cells = well_keys(pd.read_parquet(cells_dir), str(cells_dir))
    cells["Metadata_Well"] = cells["Metadata_Row"] + cells["Metadata_Column"]
    known = set(md["Row"] + md["Column"])
    unknown = sorted(set(cells["Metadata_Well"]) - known)
    if unknown:
        raise SystemExit(f"{cells_dir}: {len(unknown)} well(s) not in 1049_Metadata.csv: {unknown[:10]}")
    return cells


def classifier_readouts(
    cells: pd.DataFrame, md: pd.DataFrame, C: float | str = "cv"
) -> tuple[pd.DataFrame, dict[str, tuple[np.ndarray, dict[str, Any]]]]:
    """Per-cell classifier readouts of the wells that have cells: ``(plate md, {readout name: (readout, info)})``.

    The regularisation is chosen once (``C="cv"``) and reused for the logit readout.
    """
    plate = md.assign(Well=md["Row"] + md["Column"])
    plate = plate[plate["Well"].isin(set(cells["Metadata_Well"]))].sort_values(["Row", "Column"])
    plate = plate.reset_index(drop=True)
    X = cells[feature_columns(cells)].to_numpy(np.float64)
    ctrl = plate["SBS_Controls"].to_numpy()
    args = (X, cells["Metadata_Well"].to_numpy(), plate["Well"].to_numpy(), ctrl == 1, ctrl == -1)
    out = {}
    for aggregate, name in CLASSIFIER_READOUTS.items():
        readout, info = cell_classifier_readout(*args, C=C, aggregate=aggregate)
        C = info["C"]
        out[name] = (readout, info)
    return plate, out


# --------------------------------------------------------------------------- cells per well


def cells_curve(
    folder: str,
    md: pd.DataFrame,
    method: str,
    epsilon: Any,
    counts: list[int],
    repeats: int,
    classifier_C: float | None = None,
    cells: pd.DataFrame | None = None,
) -> dict[str, Any] | None:
    """Z' and rho against the number of cells per well, from a cells-mode output's per-cell rows.

    For each count ``k`` up to the most cells any well has, and each of ``repeats`` seeded draws, ``k`` cells of
    every well (all of them when a well has fewer) are averaged into the well profile, sphered on the negative
    controls and read out as in the main table (``control axis``: in-fit sphering, no leave-one-out). With
    ``classifier_C`` the same cells are also read out by the per-cell classifier (``cell classifier``, mean
    P(positive), that fixed C). ``cells`` are the rows :func:`read_cells` returned for ``folder`` when the caller
    has them already. Returns ``None`` when ``folder`` has no ``cells/``.
    """
    if cells is None:
        cells = read_cells(folder, md)
    if cells is None:
        return None
    feats = feature_columns(cells)
    per_well = cells.groupby(["Metadata_Row", "Metadata_Column"]).size()
    points = []
    for k in [c for c in counts if c <= per_well.max()]:  # a larger count would repeat the largest one
        for rep in range(repeats if k < per_well.max() else 1):  # every draw of the largest count is the same
            rng = np.random.default_rng(rep)
            sub = cells.iloc[rng.permutation(len(cells))].groupby(["Metadata_Row", "Metadata_Column"]).head(k)
            well = sub.groupby(["Metadata_Row", "Metadata_Column"], as_index=False)[feats].mean()
            df = join_layout(well, folder, md, allow_partial=False)
            results = {"control axis": score(sphered_readout(df, method, epsilon)[0], _plate_md(df))}
            if classifier_C is not None:
                plate, readouts = classifier_readouts(sub, md, C=classifier_C)
                results["cell classifier"] = score(readouts[CLASSIFIER_READOUTS["probability"]][0], plate)
            for readout, res in results.items():
                points.append(
                    {
                        "readout": readout,
                        "cells": k,
                        "draw": rep,
                        "z_prime": res["z_prime"],
                        **{f"rho {s}": res["rho"][s] for s in SERIES},
                    }
                )
    table = pd.DataFrame(points)
    summary = table.groupby(["readout", "cells"], sort=False).median(numeric_only=True).drop(columns="draw")
    return {
        "cells_per_well": {"min": int(per_well.min()), "median": float(per_well.median()), "max": int(per_well.max())},
        "repeats": repeats,
        "classifier_C": classifier_C,
        "points": points,
        "median": summary.reset_index().to_dict(orient="records"),
    }


Z_FLOOR = -3.0  # lowest Z' drawn in the cells-per-well plot


def plot_cells_curves(curves: dict[str, dict[str, Any]], baseline_z: float | None, path: Path) -> Path:
    """Z' (median of the draws, each draw a dot) against cells per well: one panel per readout, a line per embedding."""
    from msnoop.core.plotting import save, subplots

    readouts = list(dict.fromkeys(p["readout"] for c in curves.values() for p in c["points"]))
    fig, axes = subplots(1, len(readouts), figsize=(6 * len(readouts), 4), squeeze=False, sharey=True)
    for ax, readout in zip(axes[0], readouts, strict=True):
        for name, curve in curves.items():
            pts = pd.DataFrame(curve["points"])
            med = pd.DataFrame(curve["median"])
            pts, med = pts[pts["readout"] == readout], med[med["readout"] == readout]
            if med.empty:
                continue
            (line,) = ax.plot(med["cells"], med["z_prime"], marker="o", label=name)
            ax.scatter(pts["cells"], pts["z_prime"], s=8, alpha=0.4, color=line.get_color())
        if baseline_z is not None:
            ax.axhline(baseline_z, color="k", ls="--", lw=1, label=f"N/C GFP ratio (all nuclei): {baseline_z:.2f}")
        ax.axhline(0.7, color="grey", ls=":", lw=1, label="target Z' 0.70")
        low = min(p["z_prime"] for c in curves.values() for p in c["points"] if p["readout"] == readout)
        if low < Z_FLOOR:  # single-cell draws reach Z' -15: keep the range where the curves differ
            ax.set_ylim(bottom=Z_FLOOR)
            ax.text(0.02, 0.02, f"draws below {Z_FLOOR} not shown", transform=ax.transAxes, fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cells per well")
        ax.set_title(
            "control-axis readout (ZCA-cor knee on well means)"
            if readout == "control axis"
            else "per-cell classifier, mean P(positive)"
        )
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("Z'")
    fig.suptitle("BBBC013: Z' against cells per well")
    return save(fig, path, dpi=120)


# --------------------------------------------------------------------------- N/C baseline


def nc_ratio(md: pd.DataFrame, data: Path, ring: int) -> pd.DataFrame:
    """Per-well nuclear / cytoplasmic-ring mean GFP from the images (DNA segmented with msnoop.segment)."""
    from scipy import ndimage as ndi
    from skimage.morphology import disk

    from msnoop.io.readers import read_image
    from msnoop.segment import segment

    foot = disk(ring)
    rows = []
    t0 = time.perf_counter()
    for r in md.itertuples(index=False):
        stem = f"{int(r.ImageNumber):02d}-{r.Row}-{r.Column}.tif"
        gfp = read_image(data / "images" / f"Channel1-{stem}")
        dna = read_image(data / "images" / f"Channel2-{stem}")
        labels = segment(dna)
        nuc = labels > 0
        cyto = ndi.binary_dilation(nuc, structure=foot) & ~nuc
        n = int(labels.max())
        if n == 0 or not cyto.any():
            raise SystemExit(f"no nuclei found in Channel2-{stem}; cannot compute the N/C ratio")
        areas = np.bincount(labels.ravel())[1:]
        rows.append(
            {
                "Row": r.Row,
                "Column": r.Column,
                "n_nuclei": n,
                "nucleus_diameter_px": float(np.median(np.sqrt(4 * areas[areas > 0] / np.pi))),
                "gfp_nuclei": float(gfp[nuc].mean()),
                "gfp_ring": float(gfp[cyto].mean()),
            }
        )
    out = pd.DataFrame(rows)
    out["nc_ratio"] = out["gfp_nuclei"] / out["gfp_ring"]
    print(
        f"N/C baseline: segmented {len(out)} wells in {time.perf_counter() - t0:.0f} s (median "
        f"{out['n_nuclei'].median():.0f} nuclei/well, diameter {out['nucleus_diameter_px'].median():.1f} px)",
        flush=True,
    )
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--emb", action="append", default=[], help="NAME=DIR of an msnoop embed output of BBBC013 (repeatable)"
    )
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--method", default="ZCA-cor", help="sphering method (default ZCA-cor)")
    ap.add_argument("--epsilon", default="knee", help="'knee' (default) or a positive number")
    ap.add_argument("--ring", type=int, default=3, help="cytoplasmic ring width in px for the N/C baseline (default 3)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the N/C ratio baseline (segments 96 images)")
    ap.add_argument("--allow-partial", action="store_true", help="score an embedding folder with fewer than 96 wells")
    ap.add_argument(
        "--cells-curve",
        default="1,2,4,8,16,32,64,128",
        help="cell counts per well for the Z' curve of cells-mode outputs, up to the most a well has ('' to skip)",
    )
    ap.add_argument("--curve-repeats", type=int, default=5, help="random draws per cell count (default 5)")
    ap.add_argument("--out", default="results/bench_bbbc013")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not (args.data / "1049_Metadata.csv").is_file():
        raise SystemExit(
            f"BBBC013 is absent: expected {args.data}/1049_Metadata.csv and {args.data}/images "
            "(the data lives in ../shared/data/bbbc013, see ../shared/data/README.md)"
        )
    epsilon: Any = args.epsilon if args.epsilon == "knee" else float(args.epsilon)
    md = load_layout(args.data)
    layout = describe_layout(md)

    rows: list[dict[str, Any]] = []
    wells: dict[str, dict[str, float]] = {}
    classifier_c: dict[str, float] = {}
    cell_rows: dict[str, pd.DataFrame] = {}  # per-cell rows of the cells-mode embeddings, read once

    def add(
        features: str, variant: str, readout: np.ndarray, plate: pd.DataFrame, extra: dict, how: str = "control axis"
    ) -> None:
        res = score(readout, plate)
        row = {"features": features, "readout": how, "sphering": variant, **extra, **res}
        rows.append(row)
        key = f"{features} | {how} | {variant}"
        wells[key] = {f"{a}{b}": float(v) for a, b, v in zip(plate["Row"], plate["Column"], readout, strict=True)}
        print(
            f"{features:16s} {how:30s} {variant:24s} Z' {_fmt(res['z_prime'])}  rho A-D {_fmt(res['rho']['A-D'])}  "
            f"E-H {_fmt(res['rho']['E-H'])}  ({res['n_wells']} wells)",
            flush=True,
        )

    for item in args.emb:
        if "=" not in item:
            raise SystemExit(f"--emb expects NAME=DIR, found {item!r}")
        name, folder = item.split("=", 1)
        df = load_embedding(folder, md, args.allow_partial)
        plate = _plate_md(df)
        run = {}
        run_json = Path(folder) / "run.json"
        if run_json.is_file():
            rj = json.loads(run_json.read_text())
            run = {"model": rj.get("model"), "mode": (rj.get("preprocess") or {}).get("mode"), "folder": folder}
        for variant, (readout, info) in embedding_readouts(df, args.method, epsilon).items():
            add(name, variant, readout, plate, {**run, **info})
        cells = read_cells(folder, md)
        if cells is not None:
            cell_rows[name] = cells
            t0 = time.perf_counter()
            cplate, readouts = classifier_readouts(cells, md)
            for how, (readout, info) in readouts.items():
                per_well = np.asarray(info["cells_per_well"])
                extra = {
                    **run,
                    "dim": len(feature_columns(cells)),
                    "C": info["C"],
                    "cv_log_loss": info.get("cv_log_loss"),
                    "fits": info["fits"],
                    "cells_per_well": {"min": int(per_well.min()), "median": float(np.median(per_well))},
                }
                add(name, "none (cells standardised)", readout, cplate, extra, how=how)
            classifier_c[name] = readouts[CLASSIFIER_READOUTS["probability"]][1]["C"]
            logger.info("%s: per-cell classifier readouts in %.0f s", name, time.perf_counter() - t0)

    counts = [int(c) for c in args.cells_curve.split(",") if c.strip()]
    curves: dict[str, dict[str, Any]] = {}
    for item in args.emb if counts else []:
        name, folder = item.split("=", 1)
        curve = cells_curve(
            folder, md, args.method, epsilon, counts, args.curve_repeats, classifier_c.get(name), cell_rows.get(name)
        )
        if curve is not None:
            curves[name] = curve
            for how in dict.fromkeys(r["readout"] for r in curve["median"]):
                print(
                    f"{name}, {how}: Z' by cells per well "
                    + ", ".join(f"{r['cells']}: {_fmt(r['z_prime'])}" for r in curve["median"] if r["readout"] == how)
                )

    baseline = None
    if not args.no_baseline:
        nc = nc_ratio(md, args.data, args.ring).merge(md, on=["Row", "Column"], validate="one_to_one")
        ratio = nc["nc_ratio"].to_numpy()
        ctrl = nc["SBS_Controls"].to_numpy()
        add("N/C GFP ratio", "-", ratio, nc, {"dim": 1, "ring_px": args.ring}, how="raw value")
        axis_readout = control_axis_readout(ratio, ctrl == 1, ctrl == -1)
        add("N/C GFP ratio", "-", axis_readout, nc, {"dim": 1, "ring_px": args.ring})
        baseline = {
            "ring_px": args.ring,
            "median_nuclei_per_well": float(nc["n_nuclei"].median()),
            "median_nucleus_diameter_px": float(nc["nucleus_diameter_px"].median()),
            "floor_in_data_readme": {"z_prime": 0.70, "rho_A-D": 0.90, "rho_E-H": 0.92},
            "per_well": {
                f"{r.Row}{r.Column}": {
                    "n_nuclei": int(r.n_nuclei),
                    "gfp_nuclei": r.gfp_nuclei,
                    "gfp_ring": r.gfp_ring,
                    "nc_ratio": r.nc_ratio,
                }
                for r in nc.itertuples(index=False)
            },
        }

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    protocol = (
        f"one field per well = well profile; readout = projection on (mean positive - mean negative control), "
        f"leave-one-out for control wells; Z' between positive (n=8) and negative (n=16) control wells; "
        f"Spearman rho vs SBS_Doses over sample wells (doses 1-9) of rows A-D and E-H; sphering {args.method} "
        f"epsilon={args.epsilon} fitted on negative-control wells ({NEG_QUERY}). Positive controls (dose 10) "
        "define the readout's direction; rho is reported with its sign as measured. Cells-mode outputs are also "
        "read out by a per-cell logistic regression trained on the control wells' cells (leave-one-well-out for "
        "control wells, C by grouped CV of the cell-level log loss): mean P(positive) or mean logit per well."
    )
    report = {
        "protocol": protocol,
        "layout": layout,
        "baseline": baseline,
        "rows": rows,
        "cells_curve": curves,
        "per_well_readout": wells,
    }
    if curves:
        nc_z = next(
            (r["z_prime"] for r in rows if r["features"] == "N/C GFP ratio" and r["readout"] == "raw value"), None
        )
        plot = plot_cells_curves(curves, nc_z, out.with_name(out.name + "_cells.png"))
        logger.warning("wrote %s", plot)
    lines = [
        "| features | readout | sphering | dim | wells | Z' | rho A-D | rho E-H | rho A-D (+ctrl) | rho E-H (+ctrl) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['features']} | {r['readout']} | {r['sphering']} | {r['dim']} | {r['n_wells']} | "
            f"{_fmt(r['z_prime'])} | "
            f"{_fmt(r['rho']['A-D'])} | {_fmt(r['rho']['E-H'])} | {_fmt(r['rho_with_controls']['A-D'])} | "
            f"{_fmt(r['rho_with_controls']['E-H'])} |"
        )
    notes = [
        "",
        f"Protocol: {protocol}",
        "rho: sample wells only; '+ctrl' adds the control wells as doses 0 (negative) and 10 (positive).",
    ]
    for item in args.emb:
        name, folder = item.split("=", 1)
        r0 = next((r for r in rows if r["features"] == name), {})
        notes.append(f"{name}: {folder}, model {r0.get('model')}, mode {r0.get('mode')}, {r0.get('n_wells')} wells.")
    for name, curve in curves.items():
        for how in dict.fromkeys(r["readout"] for r in curve["median"]):
            med = ", ".join(
                f"{r['cells']}: {_fmt(r['z_prime'])} ({_fmt(r['rho A-D'])} / {_fmt(r['rho E-H'])})"
                for r in curve["median"]
                if r["readout"] == how
            )
            how_text = (
                "control axis on well means, ZCA-cor knee in-fit"
                if how == "control axis"
                else f"per-cell classifier, mean P(positive), C {curve['classifier_C']}"
            )
            notes.append(
                f"{name}, Z' (rho A-D / E-H) by cells per well, median of {curve['repeats']} draws, {how_text}: {med}."
            )
    if baseline:
        notes.append(
            f"N/C baseline: built-in segmentation of the DNA channel, ring {args.ring} px; median "
            f"{baseline['median_nuclei_per_well']:.0f} nuclei per well. Data README floor: Z' 0.70, rho 0.90 / 0.92."
        )
    write_results(out, report, "\n".join(lines + notes))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
