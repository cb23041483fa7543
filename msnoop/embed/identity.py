"""The identity of an embedding run: every setting that can change a stored vector or row.

A resumed run adds rows to a table that earlier runs started; it may only do so when every row would have come
out the same. The identity is derived from the job's config itself: every leaf field of
:class:`~msnoop.embed.config.EmbedJob` (``input.z``, ``input.channel_index``, ``cells.segmentation.backend``,
``runtime.amp``, ...) is part of it, except

* the settings listed in :data:`NOT_IDENTITY`, each with the reason it changes no stored vector or row, and
* the settings in :data:`RESOLVED`, which enter as what they resolve to: the model as the checkpoint's sha256 (or
  the random network's name), the preprocessing as the one the model embeds with.

A setting added to the config later is therefore part of the identity unless it is listed here: nothing can be
left out silently (``tests/test_identity.py`` checks that every field is accounted for). The identity is saved in
``run.json`` before any work; :meth:`msnoop.core.rundir.RunDir.check_resumable` compares it with a folder's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, get_args

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

if TYPE_CHECKING:
    from msnoop.embed.config import EmbedJob
    from msnoop.models.checkpoint import LoadedModel
    from msnoop.preprocess.presets import Preprocessing

__all__ = [
    "NOT_IDENTITY",
    "RESOLVED",
    "amp_precision",
    "config_leaves",
    "config_paths",
    "field_defaults",
    "run_identity",
]

#: Settings that change no stored vector or row, and why. Keys are dotted config paths; a section's key covers
#: everything below it.
NOT_IDENTITY: dict[str, str] = {
    "job": "always 'embed'",
    "name": "names the LanceDB table only",
    "input.manifest": "where the rows are listed; a resume may list more rows (rows are matched by id)",
    "input.loaddata": "where the rows are listed (as input.manifest)",
    "input.folder": "where the rows are listed (as input.manifest)",
    "input.ome_zarr": "where the rows are listed (as input.manifest)",
    "input.pattern": "how a folder's files are listed; the ids and paths it gives are the rows",
    "input.root": "where relative paths start; ids are relative to it, so moved files keep their ids",
    "input.limit": "how many of the listed rows this run embeds",
    "input.dtypes": "metadata types, compared column by column (RunDir.resumed_schema)",
    "output.dir": "where the folder is",
    "output.table": "names the LanceDB table only",
    "output.lancedb": "where the LanceDB table goes",
    "output.write_lance": "whether the LanceDB table is built; the parts are the same",
    "output.index": "the LanceDB search index; the stored vectors are the same",
    "output.index_threshold": "the LanceDB search index; the stored vectors are the same",
    "output.on_mismatch": "what to do when identities differ",
    "runtime.address": "which Ray cluster runs the job",
    "runtime.num_cpus": "the size of a local Ray cluster",
    "runtime.ray_min_images": "whether a small job runs in this process or on Ray: the same stages write the same rows",
    "runtime.object_store_mb": "Ray's object store size",
    "runtime.batch_size": "tiles per forward pass; the network runs in eval mode, rows are independent",
    "runtime.images_per_block": "images per Ray Data block; parts are named by their ids",
    "runtime.actors": "the size of the actor pool",
    "runtime.actor_resources": "where the actors run",
    "runtime.actor_cpus": "CPUs per actor",
    "runtime.use_gpu": "the device; float32 results agree to rounding (bf16 is runtime.amp, part of the identity)",
    "runtime.memory_format": "the layout of weights and inputs; the same vectors up to float summation order",
    "runtime.inflight_mb": "read-ahead memory",
    "runtime.strict": "whether the run stops at the first bad image; rows written are the same",
    "runtime.retry_errors": "whether error rows are tried again; rows are replaced, never mixed",
    "runtime.progress": "the progress bar",
    "runtime.worker_env": "environment variables copied to Ray tasks (credentials)",
    "runtime_env": "how `msnoop submit` sets up the job's processes",
    "storage": "how object storage is reached (endpoint, region)",
    "cells.save_masks": "whether label masks are also written for inspection",
    "cells.lance_cells_table": "whether the cells' LanceDB table is built; the parts are the same",
}

#: Settings that enter the identity as what they resolve to, not as written.
RESOLVED: dict[str, str] = {
    "model": "model: the checkpoint's sha256, or the random network's name (a path differs between machines)",
    "preprocess": "preprocess: the preprocessing the loaded model embeds with (a checkpoint fixes its preset)",
    "runtime.amp": "precision: bf16 or float32 on this machine's CPU and on GPUs (amp_precision); two settings that "
    "give the same precision here are the same run",
    "runtime.backend": "precision (onnxruntime runs float32 on CPUs whatever runtime.amp says)",
}


def _excluded(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in (*NOT_IDENTITY, *RESOLVED))


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The config section class of a field's annotation (``CellsConfig`` or ``CellsConfig | None``), or None for
    a value (which may itself be a union with a small model, e.g. ``runtime.actors``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _optional(annotation: Any) -> bool:
    return type(None) in get_args(annotation)


def config_leaves(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf setting of a config class as a dotted path (sections are walked, optional ones too; an optional
    section's own path stands for its presence, e.g. ``cells``: whole-image vs cells mode)."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        section = _section_class(field.annotation)
        if section is None or _optional(field.annotation):
            out.append(prefix + name)
        if section is not None:
            out += config_leaves(section, f"{prefix}{name}.")
    return out


def config_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every setting and every section of a config class as a dotted path."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        out.append(prefix + name)
        section = _section_class(field.annotation)
        if section is not None:
            out += config_paths(section, f"{prefix}{name}.")
    return out


def field_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """The default of every leaf setting that has one (JSON values), by dotted path."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        section = _section_class(field.annotation)
        if section is not None:
            out.update(field_defaults(section, f"{prefix}{name}."))
        if field.default is not PydanticUndefined or field.default_factory is not None:
            default = field.get_default(call_default_factory=True)
            if not isinstance(default, BaseModel):
                out[prefix + name] = to_jsonable_python(default)
    return out


def identity_defaults(job: type[BaseModel]) -> dict[str, Any]:
    """What a folder's identity stands for where it lacks a key (a setting added to msnoop since it was written):
    every setting's default, and for ``precision`` the one of ``amp: cuda``, the only setting before precision
    was recorded (float32 on CPUs, bf16 on GPUs)."""
    return {**field_defaults(job), "precision": amp_precision("cuda")}


def _values(node: BaseModel, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in type(node).model_fields.items():
        value = getattr(node, name)
        key = prefix + name
        if isinstance(value, BaseModel):
            if _optional(field.annotation):
                out[key] = "set"  # an optional section is present (e.g. cells mode)
            out.update(_values(value, key + "."))
        else:
            out[key] = to_jsonable_python(value)
    return out


def run_identity(cfg: EmbedJob, model: LoadedModel, spec: Preprocessing) -> dict[str, Any]:
    """The run's identity: dotted setting -> JSON value, for every setting that can change a stored vector or row.

    Args:
        cfg: The validated job.
        model: The loaded model (its sha256 or name stands for ``model``).
        spec: The preprocessing the model embeds with (stands for ``preprocess``).

    Returns:
        A JSON-able dict, sorted by key: the config's leaves except :data:`NOT_IDENTITY` and :data:`RESOLVED`,
        plus ``model`` (sha256 or name), ``model.arch``, ``model.embed_dim_per_channel``, ``preprocess`` and
        ``precision``.
    """
    found = {k: v for k, v in _values(cfg).items() if not _excluded(k)}
    found["model"] = model.sha256 or model.source
    found["model.arch"] = model.arch
    found["model.embed_dim_per_channel"] = int(model.net.embed_dim)  # type: ignore[arg-type]
    found["preprocess"] = to_jsonable_python(spec.model_dump())
    found["precision"] = amp_precision(cfg.runtime.amp, cfg.runtime.backend)
    return dict(sorted(found.items()))


def amp_precision(amp: str, backend: str = "torch") -> dict[str, str]:
    """The precision (``bf16`` or ``float32``) an ``amp`` setting gives the network on this machine's CPU and on GPUs.

    bf16 vectors differ from float32 ones by rounding, so precision is part of a run's identity; ``amp: cuda`` and
    ``amp: auto`` on a CPU without native bf16 give the same precision and are the same run. ``backend="onnxruntime"``
    runs float32 on CPUs whatever ``amp`` says. The CPU is the one this process runs on
    (:func:`msnoop.core.runtime.cpu_has_native_bf16`): on a cluster whose nodes differ from the driver's, the record
    can be wrong for them.

    Returns:
        ``{"cpu": "bf16" | "float32", "gpu": "bf16" | "float32"}``.
    """
    import torch

    from msnoop.core.runtime import uses_bf16

    cpu = uses_bf16(amp, torch.device("cpu"), backend)
    gpu = uses_bf16(amp, torch.device("cuda"))  # onnxruntime is refused on GPUs: there the network is torch's
    return {"cpu": "bf16" if cpu else "float32", "gpu": "bf16" if gpu else "float32"}
