"""Job kinds: each declared once here, with its config class, its runner, its summary and its CLI verb.

A job config is YAML with a ``job:`` key (``embed``, ``pretrain``, ``profile``, ``screen``, ``bench``,
``segtrain``). :func:`load_config` validates one into its typed config class before any work, and
:func:`run_job` runs it; ``msnoop run``, ``msnoop submit``, the Python API (:func:`msnoop.run`) and each
verb of the CLI go through this table. Config classes and runners are named as ``"module:attribute"``
and imported on first use, so that ``msnoop --help`` loads none of the stages.

Adding a kind: write its config class (pydantic, ``extra="forbid"``) beside its stage, a runner
``run(cfg) -> result`` and a ``summary(cfg, result) -> str``, and add one :class:`JobKind` below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from msnoop.core.config import ConfigError, apply_overrides, read_yaml, validate_config


@dataclass(frozen=True)
class JobKind:
    """One kind of job.

    Attributes:
        name: The ``job:`` value of its configs.
        config: ``"module:Class"`` of its config model.
        run: ``"module:function"`` taking the validated config and returning a result object.
        summary: ``"module:function"`` taking ``(config, result)`` and returning a printable paragraph.
        verb: The CLI command that runs a config of this kind (``msnoop <verb> CONFIG``).
        help: One line for ``msnoop --help``.
    """

    name: str
    config: str
    run: str
    summary: str
    verb: str
    help: str

    def config_class(self) -> type[BaseModel]:
        """The config model (imported on first use)."""
        return _resolve(self.config)

    def runner(self) -> Any:
        """The function that runs a validated config (imported on first use)."""
        return _resolve(self.run)

    def summarizer(self) -> Any:
        """The function ``(config, result) -> str`` that describes a finished run (imported on first use)."""
        return _resolve(self.summary)


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


JOB_KINDS: dict[str, JobKind] = {
    kind.name: kind
    for kind in (
        JobKind(
            "embed",
            "msnoop.embed.config:EmbedJob",
            "msnoop.job_kinds:run_embed_job",
            "msnoop.job_kinds:embed_summary",
            "embed",
            "Embed images (one vector per image, or per cell) into Parquet and a LanceDB table; re-runs resume.",
        ),
        JobKind(
            "pretrain",
            "msnoop.train.config:PretrainJob",
            "msnoop.train.pretrain:run_pretrain",
            "msnoop.train.pretrain:summary",
            "pretrain",
            "Masked-reconstruction pretraining on Ray Train (resumes from the last checkpoint).",
        ),
        JobKind(
            "profile",
            "msnoop.correct.profile:ProfileJob",
            "msnoop.job_kinds:run_profile_job",
            "msnoop.correct.profile:summary",
            "profile",
            "Sphere a profile table on its controls and aggregate it to wells/treatments.",
        ),
        JobKind(
            "screen",
            "msnoop.screen.plate:ScreenJob",
            "msnoop.screen.plate:run_screen",
            "msnoop.screen.plate:summary",
            "screen",
            "Read a plate out per well from its cells (classifier on the controls): Z', dose response.",
        ),
        JobKind(
            "bench",
            "msnoop.evaluate.bench:BenchJob",
            "msnoop.evaluate.bench:run_bench",
            "msnoop.evaluate.bench:summary",
            "bench",
            "Embed a dataset with several models, compute baselines, compare them by kNN (Markdown + CSV).",
        ),
        JobKind(
            "segtrain",
            "msnoop.segment.segtrain:SegTrainJob",
            "msnoop.segment.segtrain:run_segtrain",
            "msnoop.segment.segtrain:summary",
            "segtrain",
            "Train a cellpose 3.1 nucleus model offline on image/mask pairs; compare it to the built-in one.",
        ),
    )
}


def job_kind(name: str | None, source: str = "<command line>") -> JobKind:
    """The :class:`JobKind` called ``name``; a missing or unknown name raises :class:`ConfigError`."""
    known = ", ".join(sorted(JOB_KINDS))
    if name is None:
        raise ConfigError(f"invalid config {source}: missing key 'job' (one of {known})")
    if name not in JOB_KINDS:
        raise ConfigError(f"invalid config {source}: unknown job {name!r}; expected one of {known}")
    return JOB_KINDS[name]


def build_config(
    data: dict[str, Any],
    *,
    source: str = "<command line>",
    overrides: list[tuple[str, Any]] | None = None,
    job: str | None = None,
) -> Any:
    """Validate a config mapping (after ``overrides``, ``[(dotted key, value)]``) into its job's config class.

    Raises:
        ConfigError: Unknown job kind, or an invalid, unknown or missing key (each named, with ``source``).
    """
    data = apply_overrides(data, overrides)
    kind = job_kind(job or data.get("job"), source)
    data.setdefault("job", kind.name)
    return validate_config(kind.config_class(), data, source=source)


def load_config(
    config: str | Path | dict[str, Any] | BaseModel | None,
    *,
    overrides: list[tuple[str, Any]] | None = None,
    job: str | None = None,
) -> Any:
    """A validated job config from a YAML path, a mapping, a config object, or (``None``) overrides alone.

    Args:
        config: What to validate. A config object is returned as it is (re-validated if overrides are given).
        overrides: ``[(dotted key, value)]`` applied before validation.
        job: The job kind when ``config`` does not say (``job:`` key).

    Raises:
        ConfigError: The file is missing or not YAML, or the config is invalid (the message names the key).
    """
    if isinstance(config, BaseModel):
        if not overrides:
            return config
        config = config.model_dump(mode="json")
    if config is None:
        return build_config({}, overrides=overrides, job=job)
    if isinstance(config, dict):
        return build_config(config, overrides=overrides, job=job)
    return build_config(read_yaml(config), source=str(config), overrides=overrides, job=job)


def run_job(cfg: Any) -> tuple[Any, str]:
    """Run a validated config according to its ``job`` kind; returns ``(result, one-paragraph summary)``."""
    kind = job_kind(getattr(cfg, "job", None))
    result = kind.runner()(cfg)
    return result, kind.summarizer()(cfg, result)


def run_embed_job(cfg: Any) -> Any:
    """``job: embed``: embed to Parquet parts (:func:`msnoop.embed.pipeline.run_embed`), then publish them to LanceDB.

    On object storage (``output.dir`` or ``output.lancedb`` an ``s3://...`` URI) the LanceDB table is written by
    Ray tasks straight from the parts (:func:`msnoop.store.lance_ray.build_table_ray`).

    The folder's writer lock is held from before the embedding starts until the table is written, so readers
    never see the parts and the table of two different moments without being told.

    Returns:
        The :class:`~msnoop.embed.pipeline.EmbedResult`, with ``table`` set when a LanceDB table was written.
    """
    run = cfg.run_dir
    run.check_writable()  # before the lock's claim is written: one line naming the location
    with run.writer_lock("msnoop embed"):  # embedding and publishing: one writer from start to end
        return _embed_and_publish(cfg, run)


def _embed_and_publish(cfg: Any, run: Any) -> Any:
    from msnoop.core import parts
    from msnoop.core import storage as st
    from msnoop.embed.cells import output_schemas
    from msnoop.embed.pipeline import run_embed, worker_env_args
    from msnoop.store.publish import publish_embeddings

    result = run_embed(cfg)
    if cfg.output.write_lance:
        info = run.read_info()
        run.write_info({**info, "status": run.RUNNING})  # until the table is written too
        meta = parts.schema_from_json(info["metadata_schema"])
        schema, cells_schema = output_schemas(meta, info["embed_dim"], cfg.cells is not None)
        if run.is_uri or st.is_uri(cfg.lancedb_uri):
            from msnoop.core.runtime import init_ray

            init_ray(  # the table is written by Ray tasks (a no-op when the embed run started the session)
                cfg.runtime.address,
                num_cpus=cfg.runtime.num_cpus,
                object_store_memory=cfg.runtime.object_store_mb * 1024**2 if cfg.runtime.object_store_mb else None,
                quiet=not cfg.runtime.progress,
            )
        publish_embeddings(
            run,
            cfg.lancedb_uri,
            cfg.table_name,
            info=info,
            schema=schema,
            cells_schema=cells_schema,
            postprocess=cfg.output.postprocess,
            index=cfg.output.index,
            index_threshold=cfg.output.index_threshold,
            cells=cfg.cells is not None and cfg.cells.lance_cells_table,
            ray_remote_args=worker_env_args(cfg) or None,
        )
        run.write_info({**run.read_info(), "status": run.COMPLETE})
        result.table = cfg.table_name
        result.lancedb = cfg.lancedb_uri
    return result


def embed_summary(cfg: Any, r: Any) -> str:
    """One paragraph about a finished embedding run: counts of this run, the folder's totals, where it is."""
    out = r.out_dir if isinstance(r.out_dir, str) else Path(r.out_dir).resolve()
    return (
        f"embedded {r.n_embedded} images ({r.n_errors} errors, {r.n_skipped} already done) in {r.seconds:.1f} s; "
        f"totals {r.n_rows_total} + {r.n_errors_total} errors = {r.n_input}; output {out}"
    )


def run_profile_job(cfg: Any) -> dict[str, Any]:
    """``job: profile``: sphere and aggregate (:func:`msnoop.correct.profile.run_profile`), then publish to LanceDB.

    Returns:
        The correction record; ``record["tables"]`` names the LanceDB tables when ``output.write_lance``.
    """
    from msnoop.core.rundir import RunDir
    from msnoop.correct.profile import run_profile
    from msnoop.store.publish import publish_profiles

    record = run_profile(cfg)
    if cfg.output.write_lance:
        record["tables"] = publish_profiles(RunDir(cfg.output.dir), record)
    return record
