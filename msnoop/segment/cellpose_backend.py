"""Nucleus segmentation with cellpose 3.1.x and a local weights file (no download at run time).

cellpose is imported lazily, the first time :func:`segment_cellpose` runs; install it with
``pip install 'msnoop[cellpose]'`` (the extra pins ``cellpose>=3.1,<3.2``: cellpose 3.1 needs no
torchvision; cellpose 4 needs 1.2 GB hub weights and torchvision and is not supported here).

Weights (``model=``):

* a path to a cellpose 3.x model file (e.g. trained with ``cellpose.train.train_seg`` or
  ``python -m cellpose --train``), or
* the name of a model that ships inside msnoop (``msnoop/weights/``): ``"msnoop_nuclei_coelho"``, the nucleus
  model that ``msnoop segtrain configs/segtrain_coelho.yaml`` trained from scratch (see its card there), or
* a name in cellpose's model folder (``$CELLPOSE_LOCAL_MODELS_PATH``, default ``~/.cellpose/models``):
  ``"nuclei"`` -> ``nucleitorch_0``, ``"cyto"``/``"cyto2"`` -> ``<name>torch_0``, any other name
  (``"cyto3"``, a custom model) -> the file of that name.

A missing file raises :class:`FileNotFoundError` naming every path looked for: cellpose itself would
silently fall back to downloading ``cyto3``, which fails without network.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CELLPOSE_REQUIREMENT",
    "cellpose_model_dir",
    "load_cellpose_model",
    "resolve_cellpose_weights",
    "segment_cellpose",
]

CELLPOSE_REQUIREMENT = "cellpose>=3.1,<3.2"
_TORCH_SUFFIX_NAMES = ("cyto", "cyto2", "nuclei")  # cellpose stores these as "<name>torch_0"


def cellpose_model_dir() -> Path:
    """cellpose's model folder: ``$CELLPOSE_LOCAL_MODELS_PATH``, else ``~/.cellpose/models`` (as cellpose 3.1)."""
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env) if env else Path.home() / ".cellpose" / "models"


def _weights_candidates(model: str | os.PathLike[str]) -> list[Path]:
    text = os.fspath(model)
    path = Path(text).expanduser()
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    looks_like_path = any(sep in text for sep in separators) or text.startswith(("~", ".")) or bool(path.suffix)
    if looks_like_path:
        return [path]
    from msnoop.models import checkpoint  # the package's weights folder; torch is needed from here on anyway

    folder = cellpose_model_dir()
    names = [f"{text}torch_0"] if text in _TORCH_SUFFIX_NAMES else []
    # weights that ship inside msnoop come first, then cellpose's model folder
    return [checkpoint.WEIGHTS_DIR / text] + [folder / n for n in names] + [folder / text]


def resolve_cellpose_weights(model: str | os.PathLike[str]) -> Path:
    """The weights file for ``model`` (a path, or a name in :func:`cellpose_model_dir`).

    Raises:
        FileNotFoundError: No such file; the message lists every path looked for and how to provide one.
        ValueError: ``model`` is empty.
    """
    if not os.fspath(model):
        raise ValueError("model must be a cellpose weights file path or a model name; found an empty string")
    candidates = _weights_candidates(model)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"cellpose weights for model={os.fspath(model)!r} not found; looked for: {looked}. msnoop never downloads "
        "weights at run time. Fix: pass model=/path/to/weights (a cellpose 3.x model file, e.g. trained with "
        "cellpose.train.train_seg), or put the file into the cellpose model folder "
        f"{cellpose_model_dir()} (set CELLPOSE_LOCAL_MODELS_PATH to use another folder). On a machine with "
        "network, `python -c \"from cellpose import models; models.CellposeModel(model_type='nuclei')\"` "
        "downloads ~/.cellpose/models/nucleitorch_0, which can then be copied here."
    )


def _cellpose_version(module: Any) -> str | None:
    """cellpose's version: ``cellpose.version`` (a string in 3.x, a submodule with ``.version`` in some builds),
    ``cellpose.__version__``, or the installed distribution's metadata."""
    for candidate in (getattr(module, "version", None), getattr(module, "__version__", None)):
        if isinstance(candidate, str):
            return candidate
        if isinstance(getattr(candidate, "version", None), str):
            return candidate.version
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("cellpose")
    except PackageNotFoundError:
        return None


def _import_cellpose_models() -> Any:
    """``cellpose.models``, or an ImportError that says how to install the supported version."""
    try:
        import cellpose
        from cellpose import models
    except ImportError as err:
        raise ImportError(
            f"the 'cellpose' segmentation backend needs {CELLPOSE_REQUIREMENT}, which could not be imported "
            f"({err}). Fix: pip install 'msnoop[cellpose]' (install the CPU or CUDA torch build first), "
            "or use backend='builtin'."
        ) from err
    version = _cellpose_version(cellpose)
    if isinstance(version, str) and version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 4:
        raise ImportError(
            f"cellpose {version} is installed, but the 'cellpose' backend supports the 3.1 API only "
            f"(cellpose 4 models are hub downloads). Fix: pip install '{CELLPOSE_REQUIREMENT}'."
        )
    return models


@functools.lru_cache(maxsize=4)
def _cached_model(weights: str, gpu: bool) -> Any:
    models = _import_cellpose_models()
    logger.info("loading cellpose weights %s (gpu=%s)", weights, gpu)
    # mkldnn=False: with MKLDNN, CPU inference converts the weights in place (later training then fails).
    return models.CellposeModel(gpu=gpu, pretrained_model=weights, mkldnn=False)


def load_cellpose_model(model: str | os.PathLike[str], *, gpu: bool = False) -> Any:
    """A ``cellpose.models.CellposeModel`` for local weights, cached per (file, gpu).

    Raises:
        FileNotFoundError: The weights are not on this machine (see :func:`resolve_cellpose_weights`).
        ImportError: cellpose 3.1.x is not installed.
    """
    weights = resolve_cellpose_weights(model)  # before importing cellpose: the clearer error first
    return _cached_model(str(weights.resolve()), bool(gpu))


def segment_cellpose(
    image: np.ndarray,
    *,
    model: str | os.PathLike[str],
    diameter: float | None = None,
    gpu: bool = False,
    flow_threshold: float = 0.4,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    batch_size: int = 8,
    normalize: bool = True,
) -> np.ndarray:
    """Segment one ``[H, W]`` nucleus channel with cellpose 3.1 (``CellposeModel.eval``, ``channels=[0, 0]``).

    Args:
        image: ``[H, W]`` nucleus channel, any integer or float dtype.
        model: Weights file path, or a model name in :func:`cellpose_model_dir` (``"nuclei"``).
        diameter: Nucleus diameter in pixels; the image is rescaled by ``diam_mean / diameter``. ``None``
            keeps the model's own scale (its training ``diam_mean``, 17 for ``nuclei``).
        gpu: Run on the GPU (cellpose falls back to the CPU when none is usable).
        flow_threshold: cellpose flow error threshold (0.4).
        cellprob_threshold: cellpose cell-probability threshold (0.0).
        min_size: Masks smaller than this many pixels are removed by cellpose.
        batch_size: 224x224 tiles per network batch.
        normalize: cellpose's 1st-99th percentile normalisation of the input.

    Returns:
        ``[H, W]`` int32 label image, 0 = background, instances ``1..N``.

    Raises:
        ValueError: ``image`` is not a non-empty 2-D numeric array, or ``diameter <= 0``.
        FileNotFoundError: The weights are not on this machine.
        ImportError: cellpose 3.1.x is not installed.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(
            f"segment_cellpose expects one channel [H, W]; found shape {img.shape}. "
            "Fix: pass the nucleus channel, e.g. image[c] for [C, H, W]."
        )
    numeric = np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)
    if img.size == 0 or img.dtype == bool or not numeric:
        raise ValueError(f"segment_cellpose expects a non-empty integer or float image; found {img.dtype} {img.shape}")
    if diameter is not None and not diameter > 0:
        raise ValueError(f"diameter must be > 0 pixels or None (the model's own scale); found {diameter!r}")
    net = load_cellpose_model(model, gpu=gpu)
    out = net.eval(
        img.astype(np.float32),
        channels=[0, 0],
        diameter=diameter,
        flow_threshold=flow_threshold,
        cellprob_threshold=cellprob_threshold,
        min_size=min_size,
        batch_size=batch_size,
        normalize=normalize,
    )
    masks = np.asarray(out[0])
    if masks.shape != img.shape:
        raise RuntimeError(f"cellpose returned masks of shape {masks.shape} for an image of shape {img.shape}")
    return masks.astype(np.int32, copy=False)
