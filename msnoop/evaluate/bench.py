"""``msnoop bench``: several embedders and baselines over one dataset, through the same pipeline and protocol.

A bench config names a dataset by an embedding config (its ``input`` and ``preprocess`` sections are
used), the models to embed it with, the baselines to compute from the same files, and the kNN tasks::

    job: bench
    name: yeast
    dataset: configs/yeast.yaml
    models: [default, "random:microsnoop_cnn:0"]
    baselines: [pixels_pca, intensity]
    tasks:
      - {label: Metadata_protein, cv: "group:Metadata_field", k: 11}
    output: {dir: results/bench/yeast}

Each model's embeddings go to ``<output.dir>/embeddings/<slug>`` with the Ray pipeline, which resumes,
so a second run only evaluates. Results: ``results.csv``, ``results.md`` and ``results.json`` (with the
commit, the date and the machine) beside the resolved config.
"""

from __future__ import annotations

import json
import logging
import re
import time
from datetime import date
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from msnoop.core import storage as st
from msnoop.core.config import StrictModel as _Strict
from msnoop.core.config import read_yaml, validate_config
from msnoop.core.rundir import RunDir
from msnoop.core.runtime import Amp
from msnoop.core.runtime_env import RuntimeEnvConfig, runtime_env_field
from msnoop.embed.config import EmbedJob
from msnoop.vectors.distance import Metric
from msnoop.vectors.postprocess import DEFAULT_POSTPROCESS, PostprocessMethod
from msnoop.vectors.postprocess import postprocess as apply_postprocess

logger = logging.getLogger(__name__)

Baseline = Literal["pixels_pca", "intensity"]


class BenchTask(_Strict):
    """One kNN task of a bench: the label, the neighbours, the protocol and the distance."""

    label: str = Field(..., description="label column, e.g. Metadata_protein")
    k: int = Field(11, ge=1)
    cv: str = Field("loo", description="'loo', 'kfold:<n>' or 'group:<column>'")
    metric: Metric = "cosine"
    name: str | None = Field(None, description="short name in the table (default: the label without Metadata_)")

    @property
    def title(self) -> str:
        """The task's short name in the results table."""
        return self.name or self.label.removeprefix("Metadata_")


class BenchOutput(_Strict):
    """Where a bench writes its results and each model's embeddings."""

    dir: Path


class BenchRuntime(_Strict):
    """The Ray cluster the bench's embeddings run on, and the precision every model is embedded in."""

    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray cluster for the embeddings")
    address: str | None = None
    amp: Amp = Field(
        "off",
        description="bf16 autocast for every model's embeddings, replacing the dataset config's: 'off' (float32, "
        "the reference path) by default, because bf16 rounding moves networks unequally. On yeast it moved the shipped "
        "model's 11-NN balanced accuracy by -0.003 to 0.000 but a random network's by +0.011 and +0.023 (paired "
        "bootstrap interval [+0.006, +0.040]): that network's features vary between cells by about as much as bf16 "
        "rounds them (docs/RESULTS.md)",
    )


class BenchJob(_Strict):
    """``job: bench``: one dataset embedded by several models and compared with baselines by kNN tasks."""

    job: Literal["bench"] = "bench"
    name: str
    dataset: Path = Field(
        ..., description="an embedding config (job: embed) whose input and preprocessing are benchmarked"
    )
    models: list[str] = Field(default_factory=lambda: ["default", "random:microsnoop_cnn:0"])
    baselines: list[Baseline] = Field(default_factory=lambda: ["pixels_pca", "intensity"])
    pixel_channels: list[str] | None = Field(None, description="channels for pixels_pca (default: all)")
    pca_components: int = Field(32, ge=1)
    tasks: list[BenchTask] = Field(..., min_length=1)
    postprocess: PostprocessMethod = Field(
        DEFAULT_POSTPROCESS,
        description="applied to every row's features (embeddings and baselines alike) before the kNN: "
        "'standardize' as msnoop knn / search do by default, 'raw' as stored",
    )
    output: BenchOutput
    runtime: BenchRuntime = Field(default_factory=BenchRuntime)
    runtime_env: RuntimeEnvConfig | None = runtime_env_field()


def slug(model: str) -> str:
    """A folder name for a model reference (``random:microsnoop_cnn:0`` -> ``random_microsnoop_cnn_0``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).stem if model.endswith(".pt") else model).strip("_")


def model_run(job: BenchJob, model: str) -> RunDir:
    """The output folder of one model's embeddings inside the bench output: ``embeddings/<slug>``."""
    return RunDir(job.output.dir).sub(RunDir.EMBEDDINGS, slug(model))


def dataset_job(job: BenchJob, model: str) -> EmbedJob:
    """The dataset's embedding config with ``model`` and an output folder inside the bench output."""
    data = read_yaml(job.dataset)
    if data.get("job", "embed") != "embed":
        raise ValueError(f"bench {job.name!r}: dataset {job.dataset} is a {data['job']!r} config, expected job: embed")
    base = validate_config(EmbedJob, data, source=str(job.dataset))
    runtime = base.runtime.model_copy(
        update={
            k: v for k, v in {"num_cpus": job.runtime.num_cpus, "address": job.runtime.address}.items() if v is not None
        }
        | {"amp": job.runtime.amp}
    )
    # the bench's own cache: embeddings of an older model (e.g. a retrained `default`) are made again
    out = base.output.model_copy(
        update={"dir": model_run(job, model).location, "lancedb": None, "on_mismatch": "replace"}
    )
    return base.model_copy(
        update={"model": model, "output": out, "runtime": runtime, "name": f"{job.name}_{slug(model)}"}
    )


def missing_inputs(cfg: EmbedJob) -> list[Path]:
    """Input files or folders of an embedding config that do not exist (a dataset that is absent)."""
    paths = [p for p in (cfg.input.manifest, cfg.input.loaddata, cfg.input.folder) if p is not None]
    return [p for p in paths if not Path(p).exists()]


def _evaluate(
    name: str,
    kind: str,
    X: np.ndarray,
    meta: pd.DataFrame,
    tasks: list[BenchTask],
    seconds: float,
    postprocess: str = DEFAULT_POSTPROCESS,
) -> dict[str, Any]:
    from msnoop.evaluate.knn import knn_evaluate, parse_cv

    X, _ = apply_postprocess(X, postprocess)  # the same for every row: embeddings and baselines

    row: dict[str, Any] = {
        "features": name,
        "kind": kind,
        "dim": int(X.shape[1]),
        "n": len(X),
        "seconds": round(seconds, 1),
        "postprocess": postprocess,
    }
    for t in tasks:
        if t.label not in meta.columns:
            raise ValueError(
                f"task label {t.label!r} is not a column of the table; metadata: {[c for c in meta.columns if c.startswith('Metadata_')]}"
            )
        cv_kind, arg = parse_cv(t.cv)
        groups = meta[arg].astype(str).to_numpy() if cv_kind == "group" and arg else None
        res = knn_evaluate(X, meta[t.label].astype(str).to_numpy(), k=t.k, cv=t.cv, groups=groups, metric=t.metric)
        row[f"{t.title}_balanced_accuracy"] = res["balanced_accuracy"]
        row[f"{t.title}_macro_f1"] = res["macro_f1"]
        row[f"{t.title}_chance"] = res["chance"]
    return row


def _baseline(job: BenchJob, kind: str, table: pd.DataFrame, channels: list[str]) -> np.ndarray:
    from msnoop.evaluate.baselines import intensity_features, pixels_pca

    if kind == "pixels_pca":
        return pixels_pca(table, job.pixel_channels or channels, n_components=job.pca_components)
    return intensity_features(table, channels)


def _baseline_name(job: BenchJob, kind: str, channels: list[str]) -> str:
    if kind == "pixels_pca":
        return f"pixels PCA{job.pca_components} ({'+'.join(job.pixel_channels or channels)})"
    return "intensity statistics"


def run_bench(job: BenchJob) -> dict[str, Any]:
    """Embed with every model, compute every baseline, evaluate every task; write the results table.

    Returns:
        The results record (also in ``results.json``); ``{"skipped": reason}`` when the dataset is absent.
    """
    from msnoop.core.progress import progress_bar
    from msnoop.core.runtime import provenance
    from msnoop.core.tables import read_table, split_table
    from msnoop.embed.pipeline import run_embed
    from msnoop.io.manifest import load_image_table

    first = dataset_job(job, job.models[0] if job.models else "random:microsnoop_cnn:0")
    missing = missing_inputs(first)
    if missing:
        reason = f"dataset of bench {job.name!r} is absent: {', '.join(map(str, missing))}"
        logger.warning("skipping: %s", reason)
        return {"name": job.name, "skipped": reason}
    out = job.output.dir
    RunDir(out).save_config(job)
    rows: list[dict[str, Any]] = []
    bar = progress_bar(len(job.models) + len(job.baselines), f"bench {job.name}", unit="arm")
    for model in job.models:
        bar.set_postfix_str(model, refresh=True)
        cfg = dataset_job(job, model)
        t0 = time.perf_counter()
        res = run_embed(cfg)
        if res.n_rows_total == 0:
            raise ValueError(f"bench {job.name!r}: model {model!r} embedded no image (see {cfg.run_dir.errors})")
        meta, X = split_table(read_table(cfg.output.dir))
        rows.append(_evaluate(model, "embedding", X, meta, job.tasks, time.perf_counter() - t0, job.postprocess))
        logger.info("bench %s: %s done", job.name, model)
        bar.update()
    if job.baselines:
        table = load_image_table(first.input)
        channels = list(first.input.channels)
        for kind in job.baselines:
            bar.set_postfix_str(kind, refresh=True)
            t0 = time.perf_counter()
            X = _baseline(job, kind, table, channels)
            rows.append(
                _evaluate(
                    _baseline_name(job, kind, channels),
                    "baseline",
                    X,
                    table,
                    job.tasks,
                    time.perf_counter() - t0,
                    job.postprocess,
                )
            )
            logger.info("bench %s: baseline %s done", job.name, kind)
            bar.update()
    bar.close()
    record = {
        "name": job.name,
        "date": date.today().isoformat(),
        "dataset": str(job.dataset),
        "protocol": [t.model_dump() for t in job.tasks],
        "postprocess": job.postprocess,
        "provenance": provenance(),
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    st.write_text(out / "results.json", json.dumps(record, indent=2, default=str) + "\n")  # each complete or absent
    st.write_text(out / "results.csv", pd.DataFrame(rows).to_csv(index=False))
    st.write_text(out / "results.md", markdown(record) + "\n")
    return record


def markdown(record: dict[str, Any]) -> str:
    """The results as a Markdown table: one row per embedder/baseline, balanced accuracy and macro-F1 per task."""
    tasks = [BenchTask(**t) for t in record["protocol"]]
    head = ["features", "dim"] + [f"{t.title} {m}" for t in tasks for m in ("bal. acc.", "macro-F1")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in record["rows"]:
        cells = [str(r["features"]), str(r["dim"])]
        cells += [f"{r[f'{t.title}_{m}']:.3f}" for t in tasks for m in ("balanced_accuracy", "macro_f1")]
        lines.append("| " + " | ".join(cells) + " |")
    proto = (
        "; ".join(
            f"{t.title}: {t.k}-NN {t.metric}, cv {t.cv}, chance {record['rows'][0][f'{t.title}_chance']:.3f}"
            for t in tasks
        )
        if record["rows"]
        else ""
    )
    sha = (record.get("provenance") or {}).get("git_commit") or (record.get("provenance") or {}).get("git")
    lines.append("")
    post = f" Features {record['postprocess']} before the distance." if "postprocess" in record else ""
    lines.append(
        f"{record['name']}, {record['date']}" + (f", commit {str(sha)[:10]}" if sha else "") + f". {proto}.{post}"
    )
    return "\n".join(lines)


def summary(job: BenchJob, record: dict[str, Any]) -> str:
    """What ``msnoop bench`` / ``msnoop run`` print for one bench: the results table, or why it was skipped."""
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    return f"bench {job.name}: results in {job.output.dir.resolve()}\n" + markdown(record)


__all__ = [
    "BenchJob",
    "BenchTask",
    "dataset_job",
    "markdown",
    "missing_inputs",
    "model_run",
    "run_bench",
    "slug",
    "summary",
]
