"""A model together with the preprocessing it embeds with: the one place a model reference becomes a ready network.

Every caller that embeds (the embedding job, the Python API, a query image, the benchmarks) loads its model here:

* :func:`load_for_embedding`: a reference (path or URI, ``default``, ``random:<arch>[:seed]``,
  ``imagenet:<network>[:taps]``) and a ``preprocess:`` section. A checkpoint's stored preset and input size fill
  in what the section leaves unset and refuse a different one.
* :func:`load_recorded`: the model a table or run records (its ``model``, ``model_sha256`` and ``preprocess``),
  refusing a checkpoint that has changed since.
"""

from __future__ import annotations

from typing import Any

from msnoop.core.storage import StorageConfig
from msnoop.models.checkpoint import CheckpointError, LoadedModel, reconcile_preprocess, resolve_model
from msnoop.preprocess.config import PreprocessConfig
from msnoop.preprocess.presets import Preprocessing

__all__ = ["load_for_embedding", "load_recorded"]


def load_for_embedding(
    ref: str, preprocess: PreprocessConfig | None = None, *, storage: StorageConfig | None = None
) -> tuple[LoadedModel, Preprocessing]:
    """Load model ``ref`` with the preprocessing it will embed with.

    Args:
        ref: A model reference (see :func:`msnoop.models.checkpoint.resolve_model`).
        preprocess: The job's ``preprocess:`` section (default: all unset).
        storage: Object storage settings for a checkpoint URI (default: the environment).

    Returns:
        ``(model, preprocessing)``; ``model.preprocess`` is that preprocessing.

    Raises:
        CheckpointError: Unknown reference, unreadable checkpoint, or a preprocessing the checkpoint refuses.
    """
    preprocess = preprocess or PreprocessConfig()
    model = resolve_model(ref, storage=storage)  # a checkpoint (path or URI) comes back with its stored preprocessing
    spec = preprocess.resolve(model.preprocess if model.sha256 else None)
    if model.sha256:
        spec = reconcile_preprocess(model.preprocess, spec, source=model.source)
    model.preprocess = spec
    return model, spec


def load_recorded(
    info: dict[str, Any], *, what: str = "the table", storage: StorageConfig | None = None
) -> LoadedModel:
    """The model a run or table recorded, with its recorded preprocessing.

    Args:
        info: A ``run.json`` record or a LanceDB table's metadata: ``model``, ``preprocess`` and, for a
            checkpoint, ``model_sha256``.
        what: How messages name the table.
        storage: Object storage settings for a checkpoint URI.

    Raises:
        CheckpointError: The checkpoint is gone, or its sha256 differs from the recorded one (it has changed).
        KeyError: ``info`` records no ``model`` or ``preprocess``.
    """
    spec = Preprocessing(**info["preprocess"])
    model = resolve_model(info["model"], preprocess=spec, storage=storage)
    if info.get("model_sha256") and model.sha256 != info["model_sha256"]:
        raise CheckpointError(
            f"the checkpoint {model.source} has changed since {what} was built "
            f"(sha256 {model.sha256[:12] if model.sha256 else None} != {info['model_sha256'][:12]}); re-embed the table"
        )
    model.preprocess = spec
    return model
