"""The plate-screen job (``job: screen``): read every well of a plate from its cells, learnt from the controls.

A translocation or phenotype screen asks, per well, "how far has this well moved from the negative towards
the positive controls?". The job answers it from per-cell embeddings (``msnoop embed`` in cells mode) without
a hand-made feature: a classifier trained on the control wells' cells scores every cell, and a well's readout
is the share of its cells that look like the positive controls
(:func:`msnoop.screen.readout.cell_classifier_readout`; control wells are scored out of fit). Then the assay
window (Z' between the control wells) and, with a dose column, the dose response (Spearman rho per series)::

    job: screen
    name: bbbc013_screen
    input: results/bbbc013_cells_default          # a cells-mode embed output (its cells/ table) or a per-cell table
    metadata:                                     # optional plate map joined onto the cells
      table: ../shared/data/bbbc013/1049_Metadata.csv
      keys: {Metadata_Row: Row, Metadata_Column: Column}
    well: [Metadata_Row, Metadata_Column]
    positive: "Metadata_SBS_Controls == 1"
    negative: "Metadata_SBS_Controls == -1"
    dose: Metadata_SBS_Doses
    series:                                       # a column, or {label: SQL condition}; one rho per series
      A-D: "Metadata_Row in ['A', 'B', 'C', 'D']"
      E-H: "Metadata_Row in ['E', 'F', 'G', 'H']"
    output: {dir: results/bbbc013_screen}

Run with ``msnoop screen CONFIG`` (or ``msnoop run`` / ``msnoop submit``). Outputs in ``output.dir``:
``wells.parquet`` (one row per well: the metadata that is constant within it, ``Metadata_Screen_Control``,
``Metadata_Screen_Cells``, ``Metadata_Screen_Series`` and the readout ``Metadata_Screen_Readout``),
``screen.json`` (Z', rho, the classifier's C and cross-validation losses), ``screen.png`` (control wells and
dose-response curves) and ``resolved_config.yaml``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from msnoop.core import storage as st
from msnoop.core.config import StrictModel as _Strict
from msnoop.core.rundir import RunDir
from msnoop.core.runtime_env import RuntimeEnvConfig, runtime_env_field
from msnoop.correct.profile import MetadataJoin

logger = logging.getLogger(__name__)

__all__ = ["ScreenJob", "plot_screen", "read_cells_table", "run_screen", "summary"]


class ScreenReadout(_Strict):
    """How a well is read from its cells: the classifier's regularisation and the per-well statistic."""

    aggregate: Literal["probability", "logit"] = Field(
        "probability", description="per well: mean P(positive) over its cells (share responding) or mean logit"
    )
    C: float | Literal["cv"] = Field("cv", description="inverse L2 strength, or 'cv' (grouped CV of the log loss)")
    folds: int = Field(5, ge=2, description="folds of that cross-validation")
    seed: int = 0

    @field_validator("C")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if v != "cv" and not v > 0:
            raise ValueError(f"must be 'cv' or a positive number, found {v!r}")
        return v


class ScreenOutput(_Strict):
    """Where a screen job writes (its :class:`~msnoop.core.rundir.RunDir`)."""

    dir: Path


class ScreenJob(_Strict):
    """A plate screen read out per cell by a classifier trained on the control wells."""

    job: Literal["screen"] = "screen"
    name: str = "screen"
    input: Path = Field(..., description="cells-mode embed output folder (its cells/), or a per-cell table")
    metadata: MetadataJoin | None = Field(None, description="plate map joined onto the cells (controls, doses)")
    well: list[str] = Field(..., min_length=1, description="columns that together name a well")
    positive: str = Field(..., min_length=1, description="SQL condition selecting the positive-control cells")
    negative: str = Field(..., min_length=1, description="SQL condition selecting the negative-control cells")
    dose: str | None = Field(None, description="numeric dose column: Spearman rho of the readout over sample wells")
    series: str | dict[str, str] | None = Field(
        None, description="column, or {label: SQL condition} for each series: one dose response per series"
    )
    readout: ScreenReadout = Field(default_factory=ScreenReadout)
    output: ScreenOutput
    runtime_env: RuntimeEnvConfig | None = runtime_env_field()


def read_cells_table(path: Path) -> pd.DataFrame:
    """Per-cell rows: the ``cells/`` table of a cells-mode embed output, or any table :func:`read_table` reads.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is an embed output without ``cells/`` (not a cells-mode run), or unreadable.
    """
    from msnoop.core.tables import read_table

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cell table {path} does not exist")
    run = RunDir(path)
    if path.is_dir() and run.exists():
        if not Path(run.cells).is_dir():
            raise ValueError(
                f"{path} is an msnoop embed output without a {RunDir.CELLS}/ folder: expected a cells-mode run "
                "(a `cells:` section in its config), found one row per image"
            )
        return pd.read_parquet(run.cells)
    if path.is_dir() and not path.suffix:
        return pd.read_parquet(path)  # a folder of Parquet parts, e.g. <embed output>/cells
    return read_table(path)


def _per_well(flags: np.ndarray, codes: np.ndarray, n_wells: int, what: str, wells: np.ndarray) -> np.ndarray:
    """Per-well value of a per-cell flag that must not change within a well."""
    hits = np.bincount(codes, weights=flags.astype(float), minlength=n_wells)
    total = np.bincount(codes, minlength=n_wells)
    mixed = np.flatnonzero((hits > 0) & (hits < total))
    if mixed.size:
        raise ValueError(
            f"the {what} query selects some but not all cells of {mixed.size} well(s), e.g. "
            f"{wells[mixed[:5]].tolist()}: it must select whole wells"
        )
    return hits > 0


def _series(df: pd.DataFrame, spec: str | dict[str, str] | None) -> np.ndarray:
    """Per-cell series label: one value (``None``), a column's values, or the label of the query a cell matches."""
    from msnoop.core.filters import filter_mask

    if spec is None:
        return np.full(len(df), "all", dtype=object)
    if isinstance(spec, str):
        if spec not in df.columns:
            meta = [c for c in df.columns if str(c).startswith("Metadata_")]
            raise ValueError(f"series column {spec!r} is not in the table; its metadata columns are {meta}")
        return df[spec].astype(str).to_numpy(dtype=object)
    labels = np.full(len(df), "other", dtype=object)
    hits = np.zeros(len(df), dtype=np.int64)
    for label, query in spec.items():
        m = filter_mask(df, query)
        labels[m] = label
        hits += m
    if (hits > 1).any():
        raise ValueError(f"series queries overlap: {int((hits > 1).sum())} cell(s) match more than one of {list(spec)}")
    return labels


def run_screen(job: ScreenJob) -> dict[str, Any]:
    """Run a screen job; returns its record (also written to ``screen.json``).

    Raises:
        FileNotFoundError: The input table does not exist.
        ValueError: A missing column, a query that does not parse or selects part of a well, fewer than two
            wells of a control, no sample wells for a dose response, non-numeric doses; the message names
            the table and what was expected.
    """
    from msnoop.core.filters import filter_mask
    from msnoop.core.tables import feature_columns, write_table
    from msnoop.correct.profile import join_metadata
    from msnoop.screen.readout import cell_classifier_readout, dose_response, z_prime

    cells = read_cells_table(job.input)
    source = str(job.input)
    if job.metadata is not None:
        cells = join_metadata(cells, job.metadata, source=source)
    needed = [*job.well, *([job.dose] if job.dose else [])]
    if missing := [c for c in needed if c not in cells.columns]:
        meta = [c for c in cells.columns if str(c).startswith("Metadata_")]
        raise ValueError(f"cell table {source}: no column(s) {missing}; its metadata columns are {meta}")
    feats = feature_columns(cells)
    if not feats:
        raise ValueError(f"cell table {source}: expected feature columns (emb_*, or any non-Metadata_ column)")
    keys = cells[job.well].astype(str).agg("-".join, axis=1) if len(job.well) > 1 else cells[job.well[0]].astype(str)
    codes, wells = pd.factorize(keys, sort=True)
    wells = np.asarray(wells, dtype=object)
    n = len(wells)
    pos = _per_well(filter_mask(cells, job.positive), codes, n, "positive", wells)
    neg = _per_well(filter_mask(cells, job.negative), codes, n, "negative", wells)
    X = cells[feats].to_numpy(np.float64)
    ro = job.readout
    readout, info = cell_classifier_readout(
        X, codes, np.arange(n), pos, neg, C=ro.C, folds=ro.folds, aggregate=ro.aggregate, seed=ro.seed
    )

    first = pd.Series(np.arange(len(cells))).groupby(codes).first().to_numpy()
    meta_cols = [c for c in cells.columns if str(c).startswith("Metadata_")]
    constant = [c for c in meta_cols if cells.groupby(codes)[c].nunique(dropna=False).max() <= 1]
    table = cells.iloc[first][constant].reset_index(drop=True)
    table.insert(0, "Metadata_Well", wells)
    table["Metadata_Screen_Control"] = np.where(pos, "positive", np.where(neg, "negative", "sample"))
    table["Metadata_Screen_Cells"] = np.asarray(info["cells_per_well"])
    table["Metadata_Screen_Readout"] = readout

    record: dict[str, Any] = {
        "name": job.name,
        "input": source,
        "n_cells": len(cells),
        "n_features": len(feats),
        "wells": {
            "total": n,
            "positive": int(pos.sum()),
            "negative": int(neg.sum()),
            "sample": int(n - (pos | neg).sum()),
        },
        "readout": {"method": "per-cell classifier", "aggregate": ro.aggregate, "C": info["C"], "fits": info["fits"]},
        "z_prime": z_prime(readout[pos], readout[neg]),
        "mean_readout": {"positive": float(readout[pos].mean()), "negative": float(readout[neg].mean())},
    }
    if "cv_log_loss" in info:
        record["readout"]["cv_log_loss"] = {str(c): v for c, v in info["cv_log_loss"].items()}
    if job.dose:
        if job.dose not in constant:
            raise ValueError(
                f"cell table {source}: dose column {job.dose!r} varies within a well; expected one per well"
            )
        dose = pd.to_numeric(table[job.dose], errors="coerce").to_numpy()
        if np.isnan(dose).any():
            raise ValueError(f"cell table {source}: dose column {job.dose!r} has non-numeric or missing values")
        table["Metadata_Screen_Series"] = _series(cells, job.series)[first]
        sample = ~(pos | neg)
        if sample.sum() < 3:
            raise ValueError(
                f"a dose response needs at least 3 sample wells (neither control), found {int(sample.sum())}"
            )
        record["dose_column"] = job.dose
        record["rho"] = dose_response(readout[sample], dose[sample], table["Metadata_Screen_Series"].to_numpy()[sample])

    run = RunDir(job.output.dir)
    run.save_config(job)
    write_table(table, run.wells)
    record["plot"] = str(plot_screen(table, record, run.screen_plot))
    st.write_text(run.screen, json.dumps(record, indent=2, default=str) + "\n")  # complete or absent
    logger.info("screen %s: Z' %.3f over %d wells", job.name, record["z_prime"], n)
    return record


def plot_screen(table: pd.DataFrame, record: dict[str, Any], path: Path) -> Path:
    """Left: the control wells' readouts (Z' in the title); right, with a dose column: readout against dose."""
    from msnoop.core.plotting import save, subplots

    dose_col = record.get("dose_column")
    fig, axes = subplots(1, 2 if dose_col else 1, figsize=(11 if dose_col else 5, 4), squeeze=False, sharey=True)
    ax = axes[0][0]
    rng = np.random.default_rng(0)
    for x, kind in enumerate(("negative", "positive")):
        vals = table.loc[table["Metadata_Screen_Control"] == kind, "Metadata_Screen_Readout"].to_numpy()
        ax.scatter(x + rng.uniform(-0.15, 0.15, len(vals)), vals, s=14, label=f"{kind} ({len(vals)} wells)")
        ax.hlines([vals.mean()], x - 0.3, x + 0.3, color="k", lw=1)
    ax.set_xticks([0, 1], ["negative", "positive"])
    ax.set_ylabel(f"readout ({record['readout']['aggregate']})")
    ax.set_title(f"control wells: Z' = {record['z_prime']:.2f}")
    if dose_col:
        ax = axes[0][1]
        sample = table[table["Metadata_Screen_Control"] == "sample"]
        rho = record.get("rho", {})
        for series, g in sample.groupby("Metadata_Screen_Series", sort=True):
            mean = g.groupby(dose_col)["Metadata_Screen_Readout"].mean()
            label = f"{series}: rho {rho.get(series, np.nan):.2f}"
            (line,) = ax.plot(mean.index, mean.to_numpy(), marker="o", label=label)
            ax.scatter(g[dose_col], g["Metadata_Screen_Readout"], s=8, alpha=0.5, color=line.get_color())
        for kind, ls in (("negative", ":"), ("positive", "--")):
            ax.axhline(record["mean_readout"][kind], color="grey", ls=ls, lw=1, label=f"{kind} controls (mean)")
        ax.set_xlabel(dose_col)
        ax.set_title("dose response (sample wells)")
        ax.legend(fontsize=7)
    return save(fig, path, dpi=120)


def summary(job: ScreenJob, record: dict[str, Any]) -> str:
    """Human-readable lines about a finished screen job."""
    run = RunDir(job.output.dir)
    w = record["wells"]
    lines = [
        f"wrote {run.wells.resolve()}  ({w['total']} wells from {record['n_cells']} cells: "
        f"{w['positive']} positive, {w['negative']} negative controls, {w['sample']} samples)",
        f"readout: per-cell classifier (C {record['readout']['C']:g}), mean {record['readout']['aggregate']} per well; "
        f"Z' {record['z_prime']:.3f} (positive {record['mean_readout']['positive']:.3f}, "
        f"negative {record['mean_readout']['negative']:.3f})",
    ]
    if "rho" in record:
        lines.append("dose response, Spearman rho: " + ", ".join(f"{s}: {r:.3f}" for s, r in record["rho"].items()))
    lines.append(f"plot {Path(record['plot']).resolve()}; record {run.screen.resolve()}")
    return "\n".join(lines)
