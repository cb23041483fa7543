"""The batch-experiment job (``job: profile``): sphere a profile table on its controls, then aggregate.

One typed config names everything that a plate experiment needs: the input table (an ``msnoop embed``
output folder, a LanceDB table, or any Parquet/CSV table with ``Metadata_*`` columns such as CellProfiler
profiles), the control selector, the batch (plate) column, the sphering and the aggregation levels::

    job: profile
    name: bbbc021_profiles
    input: ../shared/data/bbbc021_profiles/well_profiles.parquet
    control: "Metadata_compound == 'DMSO'"
    batch_column: Metadata_Plate
    sphering: {method: ZCA-cor, epsilon: knee, fit: global}
    treatments: {columns: [Metadata_compound, Metadata_concentration], join: [Metadata_moa]}
    output: {dir: results/bbbc021_profiles}

Run with ``msnoop profile CONFIG`` (or ``msnoop run`` / ``msnoop submit``). Outputs in ``output.dir``:
``profiles.parquet`` (sphered rows), ``treatments.parquet`` (when ``treatments.columns`` is set),
``correction.json`` (what was fitted), ``resolved_config.yaml`` and LanceDB tables ``profiles`` and
``treatments`` for ``msnoop search OUT --match ...``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field, field_validator

from msnoop.core import storage as st
from msnoop.core.config import StrictModel as _Strict
from msnoop.core.rundir import RunDir
from msnoop.core.runtime_env import RuntimeEnvConfig, runtime_env_field
from msnoop.vectors.postprocess import SpherizeMethod

logger = logging.getLogger(__name__)

__all__ = ["ProfileJob", "join_metadata", "run_profile", "summary"]


class SpheringConfig(_Strict):
    """How the profiles are sphered on their controls (:class:`msnoop.vectors.sphering.Spherize`)."""

    method: SpherizeMethod | Literal["none"] = Field(
        "ZCA-cor", description="whitening of the controls' covariance (ZCA-cor: Microsnoop); 'none' skips it"
    )
    epsilon: float | Literal["knee"] = Field(
        "knee", description="eigenvalue regulariser: 'knee' (Microsnoop's rule) or a positive number"
    )
    fit: Literal["global", "per_batch"] = Field(
        "global", description="one transform fitted on all controls (Microsnoop) or one per batch"
    )
    variance_floor: float = Field(1e-3, gt=0, description="-cor methods: feature variances are clipped at this")

    @field_validator("epsilon")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not v > 0:
            raise ValueError(f"epsilon must be 'knee' or > 0, found {v}")
        return v


class AggregateConfig(_Strict):
    """Rows aggregated before sphering (e.g. cells to wells) and the statistic used for every aggregation."""

    before: list[str] = Field(
        default_factory=list, description="aggregate rows BEFORE sphering by these columns (e.g. cells -> wells)"
    )
    method: Literal["mean", "median"] = "mean"


class TreatmentConfig(_Strict):
    """The treatment table: sphered rows aggregated after sphering by the treatment columns."""

    columns: list[str] = Field(
        default_factory=list, description="aggregate sphered rows AFTER sphering into treatments by these columns"
    )
    join: list[str] = Field(
        default_factory=list, description="columns collapsed to comma-joined unique values (the batch column always is)"
    )
    keep_controls: bool = Field(False, description="keep control rows in the treatment table")


class MetadataJoin(_Strict):
    """A plate map (CSV/Parquet) joined onto the profile rows before anything else."""

    table: Path = Field(..., description="plate map: .csv, .csv.gz or .parquet")
    keys: dict[str, str] = Field(
        ..., min_length=1, description="profile column -> plate-map column, compared as text, e.g. {Metadata_Row: Row}"
    )
    prefix: str = Field("Metadata_", description="prefix given to plate-map columns that lack it")


class ProfileOutput(_Strict):
    """Where a profile job writes (its :class:`~msnoop.core.rundir.RunDir`) and whether it builds LanceDB tables."""

    dir: Path
    write_lance: bool = True


class ProfileJob(_Strict):
    """A batch experiment: correction fitted on controls, then well/treatment profiles."""

    job: Literal["profile"] = "profile"
    name: str = "profiles"
    input: Path = Field(..., description="profile table: embed output folder, .lance, .parquet, .csv or .csv.gz")
    control: str = Field(..., min_length=1, description="SQL condition selecting the negative controls")
    batch_column: str | None = Field(None, description="column naming each row's batch (plate)")
    metadata: MetadataJoin | None = Field(None, description="plate map joined onto the rows (e.g. controls, doses)")
    sphering: SpheringConfig = Field(default_factory=SpheringConfig)
    aggregate: AggregateConfig = Field(default_factory=AggregateConfig)
    treatments: TreatmentConfig = Field(default_factory=TreatmentConfig)
    output: ProfileOutput
    runtime_env: RuntimeEnvConfig | None = runtime_env_field()


def join_metadata(df: pd.DataFrame, spec: MetadataJoin, *, source: str) -> pd.DataFrame:
    """``df`` with the plate map's columns added (prefixed ``spec.prefix``), matched on ``spec.keys`` as text.

    Raises:
        ValueError: A join column is missing, the plate map has duplicate keys, or rows find no match
            (the message names the table and the first unmatched keys).
    """
    path = spec.table
    if not path.is_file():
        raise FileNotFoundError(f"plate map {path} does not exist")
    right_cols = list(spec.keys.values())
    if path.suffix == ".parquet":
        plate = pd.read_parquet(path)
    else:
        plate = pd.read_csv(path, dtype=dict.fromkeys(right_cols, str))
    if missing := [c for c in spec.keys if c not in df.columns]:
        meta = [c for c in df.columns if str(c).startswith("Metadata_")]
        raise ValueError(f"metadata join: {source} lacks {missing} (has {meta})")
    if missing := [c for c in right_cols if c not in plate.columns]:
        raise ValueError(f"metadata join: plate map {path} lacks {missing} (has {list(plate.columns)})")
    rename = {c: (c if str(c).startswith(spec.prefix) else f"{spec.prefix}{c}") for c in plate.columns}
    plate = plate.rename(columns=rename)
    keys = [rename[c] for c in right_cols]
    for c in keys:
        plate[c] = plate[c].astype(str).str.strip()
    if plate.duplicated(keys).any():
        raise ValueError(f"metadata join: plate map {path} has duplicate keys {keys}")
    left = df.copy()
    tmp = [f"__key{i}" for i in range(len(keys))]
    for t, c in zip(tmp, spec.keys, strict=True):
        left[t] = left[c].astype(str).str.strip()
    plate = plate.rename(columns=dict(zip(keys, tmp, strict=True)))
    clash = [c for c in plate.columns if c in left.columns and c not in tmp]
    if clash:
        plate = plate.drop(columns=clash)  # the profile table's own values win
        logger.info("metadata join: kept the profile table's %s", clash)
    out = left.merge(plate, on=tmp, how="left", indicator=True)
    unmatched = out["_merge"] != "both"
    if unmatched.any():
        bad = out.loc[unmatched, list(spec.keys)].astype(str).agg("/".join, axis=1).unique().tolist()
        raise ValueError(
            f"metadata join: {int(unmatched.sum())} row(s) of {source} have no match in {path} on {spec.keys}: {bad[:10]}"
        )
    return out.drop(columns=[*tmp, "_merge"])


def run_profile(job: ProfileJob) -> dict[str, Any]:
    """Run a batch experiment; returns the correction record (also written to ``correction.json``).

    Raises:
        FileNotFoundError: The input table does not exist.
        ValueError: Unreadable table, a column that is not there, no controls (in a batch), a control
            query that does not parse; the message names the table and what was expected.
    """
    from msnoop.aggregate.profiles import aggregate_profiles
    from msnoop.core.filters import filter_mask
    from msnoop.core.tables import feature_columns, read_table, write_table
    from msnoop.correct.sphering import spherize_profiles

    df = read_table(job.input)
    record: dict[str, Any] = {"name": job.name, "input": str(job.input), "n_rows_in": len(df)}
    if job.metadata is not None:
        df = join_metadata(df, job.metadata, source=str(job.input))
        record["metadata"] = {"table": str(job.metadata.table), "keys": job.metadata.keys}
    needed = [*job.aggregate.before, *job.treatments.columns, *job.treatments.join]
    if job.batch_column:
        needed.append(job.batch_column)
    missing = [c for c in dict.fromkeys(needed) if c not in df.columns]
    if missing:
        meta = [c for c in df.columns if str(c).startswith("Metadata_")]
        raise ValueError(f"table {job.input}: no column(s) {missing}; its metadata columns are {meta}")
    batch = job.batch_column
    if job.aggregate.before:
        join = [batch] if batch and batch not in job.aggregate.before else []
        df = aggregate_profiles(df, job.aggregate.before, job.aggregate.method, join=join)
        record["aggregate_by"] = {"columns": job.aggregate.before, "method": job.aggregate.method, "n_rows": len(df)}
    sph = job.sphering
    if sph.method == "none":
        sphered, info = df, {"method": "none"}
    else:
        sphered, info = spherize_profiles(
            df,
            control_query=job.control,
            batch_column=batch,
            per_batch=sph.fit == "per_batch",
            method=sph.method,
            epsilon=sph.epsilon,
            variance_floor=sph.variance_floor,
        )
    record["sphering"] = info
    run = RunDir(job.output.dir)
    run.save_config(job)
    # the rows are sphered on their controls: evaluations and searches use them as they are
    run.write_info({"job": "profile", "name": job.name, "postprocess": {"method": "raw"}})
    write_table(sphered, run.profiles)
    frames: dict[str, pd.DataFrame] = {"profiles": sphered}
    if job.treatments.columns:
        rows = sphered if job.treatments.keep_controls else sphered[~filter_mask(sphered, job.control)]
        join = list(dict.fromkeys(([batch] if batch else []) + job.treatments.join))
        treatments = aggregate_profiles(rows, job.treatments.columns, job.aggregate.method, join=join)
        write_table(treatments, run.treatments)
        frames["treatments"] = treatments
        record["treatments"] = {
            "columns": job.treatments.columns,
            "method": job.aggregate.method,
            "joined": join,
            "controls_included": job.treatments.keep_controls,
            "n_rows": len(treatments),
        }
    record["n_features"] = len(feature_columns(sphered))
    st.write_text(run.correction, json.dumps(record, indent=2, default=str) + "\n")  # complete or absent
    logger.info("profile job %s: %s", job.name, {k: len(v) for k, v in frames.items()})
    return record


def summary(job: ProfileJob, record: dict[str, Any]) -> str:
    """Human-readable lines about a finished profile job."""
    run = RunDir(job.output.dir)
    lines = [f"wrote {run.profiles.resolve()}  ({record['n_rows_in']} rows in)"]
    if "treatments" in record:
        lines.append(f"wrote {run.treatments.resolve()}  ({record['treatments']['n_rows']} treatments)")
    lines.append(f"wrote {run.correction.resolve()}")
    info = record["sphering"]
    if info.get("method") != "none":
        dropped = info.get("dropped_features") or []
        lines.append(
            f"sphering: {info['method']} epsilon={info['epsilon']} fit={info['fit']} on {info['n_controls']} "
            f"controls; {info['n_features']} features" + (f", dropped {len(dropped)} constant" if dropped else "")
        )
    if "tables" in record:
        lines.append(
            f"LanceDB {run.lancedb_uri()}: tables {', '.join(record['tables'])}; "
            f'query with: msnoop search {run} --match "..."'
        )
    return "\n".join(lines)
