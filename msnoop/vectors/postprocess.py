"""Post-processing of feature rows before any distance: one fit / transform / save / load interface, one registry.

Every method is a :class:`PostProcessor`: constructed with its parameters, fitted on ``[N, D]`` rows
(:meth:`~PostProcessor.fit`, or :meth:`~PostProcessor.fit_batches` over a stream of row blocks), applied to
``[M, D]`` rows (:meth:`~PostProcessor.transform`), saved as a JSON-serialisable record
(:meth:`~PostProcessor.to_dict`) and loaded back (:func:`load_postprocessor`), so that a fitted transform stored
with a table transforms a new query image the same way. The methods, by the rows they are fitted on:

* fitted on every row of a table, without labels (:data:`PostprocessMethod`, the ``output.postprocess`` /
  ``--postprocess`` choices): ``"standardize"`` (:class:`Standardizer`) and ``"raw"`` (:class:`Raw`);
* fitted on a table's negative controls (:data:`SpherizeMethod`, the ``sphering.method`` choices of a profile
  job): ``"ZCA"``, ``"ZCA-cor"``, ``"PCA"``, ``"PCA-cor"`` (:class:`msnoop.vectors.sphering.Spherize`).

The names are typed once, here, and configs take their allowed values from these ``Literal`` types;
:data:`REGISTRY` maps each name to its class. Adding a method: write its :class:`PostProcessor` subclass, add its
name to the ``Literal`` of its family and one :data:`REGISTRY` entry.

Why standardise: Microsnoop's readout (the average-pooled deepest ReLU map, L2-normalised per channel,
channels concatenated) is non-negative and shares one large common direction: between yeast cells the median
cosine distance of the raw readout is about 0.002, so cosine neighbours are decided by small differences on top
of that direction. Like pycytominer's ``normalize(method="standardize")`` on all samples, :class:`Standardizer`
subtracts each dimension's mean and divides by its standard deviation over the table itself (no labels), after
which cosine distances vary between neighbours and every dimension counts. The same post-processing applies to
every feature set compared (msnoop embeddings, a random network, pixel and intensity baselines), so comparisons
stay fair. ``"raw"`` keeps Microsnoop's readout as it is (what the paper's kNN used). The measurements behind the
default are in docs/RESULTS.md (``jobs/bench_postprocess.py``).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, Literal, get_args

import numpy as np

#: Post-processing fitted on all rows of a table without labels (``output.postprocess``, ``--postprocess``).
PostprocessMethod = Literal["standardize", "raw"]
#: Sphering fitted on the negative controls (a profile job's ``sphering.method``).
SpherizeMethod = Literal["ZCA", "ZCA-cor", "PCA", "PCA-cor"]

POSTPROCESS_CHOICES: tuple[str, ...] = get_args(PostprocessMethod)
SPHERIZE_METHODS: tuple[str, ...] = get_args(SpherizeMethod)
#: Post-processing applied before distances unless a table or a command says otherwise.
DEFAULT_POSTPROCESS: PostprocessMethod = "standardize"
#: Standard deviations below this are treated as a constant dimension (scaled by 1, i.e. only centred).
MIN_STD = 1e-8

#: Every method's class as ``"module:Class"`` (imported on first use); one entry per name of the Literals above.
REGISTRY: dict[str, str] = {
    "standardize": "msnoop.vectors.postprocess:Standardizer",
    "raw": "msnoop.vectors.postprocess:Raw",
    **dict.fromkeys(SPHERIZE_METHODS, "msnoop.vectors.sphering:Spherize"),
}


class PostProcessor(ABC):
    """A transform of feature rows fitted on rows: ``fit`` / ``transform`` / ``to_dict`` / ``from_dict``.

    Attributes:
        method: The registry name of the method (for sphering, the instance's own method).
        n: Rows the transform was fitted on (0 before fitting).
    """

    method: str
    n: int = 0

    @abstractmethod
    def fit(self, X: np.ndarray) -> PostProcessor:
        """Fit on ``X`` ``[N, D]`` (any float dtype); returns ``self``.

        Raises:
            ValueError: ``X`` is not a non-empty 2-D matrix of finite values (or too small for the method).
        """

    def fit_batches(self, batches: Iterable[np.ndarray]) -> PostProcessor:
        """Fit on the rows of a stream of ``[n_i, D]`` blocks; returns ``self`` (``n`` stays 0 without rows).

        The default gathers the blocks in memory (``O(N D)``); methods with streamed statistics override it.
        """
        blocks = [np.asarray(b) for b in batches]
        if blocks and sum(len(b) for b in blocks):
            self.fit(np.concatenate(blocks))
        return self

    @abstractmethod
    def transform(self, X: np.ndarray) -> np.ndarray:
        """``[M, D]`` rows -> ``[M, D']`` transformed rows.

        Raises:
            ValueError: ``D`` differs from the fitted dimension.
            RuntimeError: Called before :meth:`fit`.
        """

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        """``fit(X)`` then ``transform(X)``."""
        return self.fit(X).transform(X)

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The fitted transform as a JSON-serialisable record with a ``method`` key (what :meth:`from_dict` reads)."""

    @classmethod
    @abstractmethod
    def from_dict(cls, d: dict[str, Any]) -> PostProcessor:
        """A fitted transform from its :meth:`to_dict` record.

        Raises:
            KeyError: The record lacks a fitted value.
        """

    def summary(self) -> dict[str, Any]:
        """A short record of what was done, for results files: ``{"method": ..., "n": ...}``."""
        return {"method": self.method, "n": int(self.n)}


class Raw(PostProcessor):
    """No post-processing: rows as stored (Microsnoop's readout), returned as float32."""

    method = "raw"

    def fit(self, X: np.ndarray) -> Raw:
        """Nothing to fit; records the row count."""
        self.n = len(X)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """``[M, D]`` -> the same rows as float32."""
        return np.asarray(X, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """``{"method": "raw"}``."""
        return {"method": "raw"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Raw:
        """A :class:`Raw` (the record holds nothing else)."""
        return cls()

    def summary(self) -> dict[str, Any]:
        """``{"method": "raw"}``."""
        return {"method": "raw"}


class Standardizer(PostProcessor):
    """Per-dimension centre and scale over the rows it was fitted on: ``(X - mean) / scale``.

    Attributes:
        mean: ``[D]`` float64 means.
        scale: ``[D]`` float64 standard deviations (population, ddof 0), 1 where a dimension is constant.
        n: Rows it was fitted on.
    """

    method = "standardize"

    def __init__(self, mean: np.ndarray | None = None, scale: np.ndarray | None = None, n: int = 0) -> None:
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64)
        self.scale = None if scale is None else np.asarray(scale, dtype=np.float64)
        self.n = int(n)

    def fit(self, X: np.ndarray) -> Standardizer:
        """Fit on ``X`` ``[N, D]`` (any float dtype; N >= 1); returns ``self``.

        Raises:
            ValueError: ``X`` is not 2-D, is empty, or holds NaN/inf.
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) == 0:
            raise ValueError(f"standardisation needs an [N, D] matrix with N >= 1, found shape {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("standardisation needs finite features; found NaN/inf values")
        std = X.std(axis=0)
        self.mean, self.scale, self.n = X.mean(axis=0), np.where(std < MIN_STD, 1.0, std), len(X)
        return self

    def fit_batches(self, batches: Iterable[np.ndarray]) -> Standardizer:
        """Fit in one streamed pass of float64 sums (memory ``O(D)``); ``n`` stays 0 without rows."""
        n, total, total_sq = 0, None, None
        for block in batches:
            X = np.asarray(block, dtype=np.float64)
            total = X.sum(axis=0) if total is None else total + X.sum(axis=0)
            total_sq = (X**2).sum(axis=0) if total_sq is None else total_sq + (X**2).sum(axis=0)
            n += len(X)
        if n:
            fitted = self.from_moments(n, total, total_sq)  # type: ignore[arg-type]
            self.mean, self.scale, self.n = fitted.mean, fitted.scale, fitted.n
        return self

    @classmethod
    def from_moments(cls, n: int, total: np.ndarray, total_sq: np.ndarray) -> Standardizer:
        """From streamed sums: ``n`` rows, ``total = sum(X)``, ``total_sq = sum(X**2)`` (float64, ``[D]``)."""
        mean = total / n
        var = np.maximum(total_sq / n - mean**2, 0.0)
        std = np.sqrt(var)
        return cls(mean=mean, scale=np.where(std < MIN_STD, 1.0, std), n=int(n))

    def transform(self, X: np.ndarray) -> np.ndarray:
        """``[N, D]`` -> ``[N, D]`` float32 standardised rows (``D`` must match the fit).

        Raises:
            RuntimeError: Called before :meth:`fit`.
            ValueError: ``D`` differs from the fitted dimension.
        """
        if self.mean is None or self.scale is None:
            raise RuntimeError("Standardizer.transform called before fit; call fit(X) first")
        X = np.asarray(X)
        if X.shape[-1] != len(self.mean):
            raise ValueError(f"standardizer fitted on {len(self.mean)} dimensions, found {X.shape[-1]}")
        return ((X - self.mean) / self.scale).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """``{"method": "standardize", "n", "mean", "scale"}`` (stored with tables and results)."""
        if self.mean is None or self.scale is None:
            raise RuntimeError("Standardizer.to_dict called before fit")
        return {"method": "standardize", "n": self.n, "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Standardizer:
        """The fitted standardisation of a :meth:`to_dict` record."""
        return cls(mean=np.asarray(d["mean"]), scale=np.asarray(d["scale"]), n=int(d["n"]))


def postprocessor_class(method: str) -> type[PostProcessor]:
    """The class registered for ``method``.

    Raises:
        ValueError: ``method`` is not registered; the message lists every registered name.
    """
    if method not in REGISTRY:
        raise ValueError(f"unknown post-processing {method!r}; expected one of {', '.join(REGISTRY)}")
    module, _, name = REGISTRY[method].partition(":")
    return getattr(importlib.import_module(module), name)


def create_postprocessor(method: str, **params: Any) -> PostProcessor:
    """An unfitted transform of ``method`` with its parameters (e.g. ``epsilon`` for sphering).

    Raises:
        ValueError: Unknown method, or parameters the method refuses.
    """
    cls = postprocessor_class(method)
    if method in SPHERIZE_METHODS:
        return cls(method, **params)  # type: ignore[call-arg]
    return cls(**params)


def load_postprocessor(record: dict[str, Any] | None) -> PostProcessor:
    """A fitted transform from its :meth:`PostProcessor.to_dict` record; ``None`` (nothing recorded) is :class:`Raw`.

    Raises:
        ValueError: The record names an unknown method.
        KeyError: The record lacks a fitted value.
    """
    record = record or {"method": "raw"}
    return postprocessor_class(str(record.get("method", "raw"))).from_dict(record)


def _recorded(run: Any) -> str | None:
    """The post-processing an output folder's ``run.json`` asks for, or None when it is not an output folder."""
    try:
        if not run.exists():
            return None
        info = run.read_info()
    except (OSError, ValueError):  # unreadable location: nothing recorded
        return None
    if info.get("job") == "profile":
        return "raw"
    return str((info.get("postprocess") or {}).get("method") or DEFAULT_POSTPROCESS)


def table_postprocess(source: Any) -> str:
    """The post-processing a table asks for before distances; a DataFrame or ``None`` gets the default.

    * an ``msnoop embed`` output folder (or its ``embeddings/``, ``cells/``): its run's ``output.postprocess``
      (recorded in ``run.json``; ``standardize`` for folders written before it was recorded);
    * a profile job's output (its folder, or a table in it): ``raw``: the rows are sphered on their controls;
    * a LanceDB table (``.lance``, or a folder standing for one): ``raw``: its vectors were post-processed when
      the table was built;
    * any other table (Parquet, CSV, e.g. CellProfiler profiles), or a DataFrame: :data:`DEFAULT_POSTPROCESS`.

    A folder inside an output folder (``cells/``, ``lancedb/``) is judged as the table it holds
    (:func:`msnoop.core.tables.resolve_table`).
    """
    import pandas as pd

    from msnoop.core.tables import resolve_table

    if source is None or isinstance(source, pd.DataFrame):
        return DEFAULT_POSTPROCESS
    try:
        resolved = resolve_table(source)
    except (OSError, ValueError):
        return DEFAULT_POSTPROCESS
    if resolved.kind == "lance":  # its vectors were post-processed when the table was built
        return "raw"
    recorded = _recorded(resolved.run) if resolved.run is not None else None
    if resolved.kind == "file" and recorded != "raw":
        return DEFAULT_POSTPROCESS  # a table file beside an embed run's outputs is not its parts
    return recorded or DEFAULT_POSTPROCESS


def postprocess(X: np.ndarray, method: str = DEFAULT_POSTPROCESS) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply a label-free ``method`` to a feature matrix, fitted on its own rows.

    Args:
        X: ``[N, D]`` features.
        method: One of :data:`PostprocessMethod`: ``"standardize"`` (per-dimension z-score over the rows of ``X``)
            or ``"raw"`` (unchanged).

    Returns:
        ``([N, D]`` float32, a record of what was done: ``{"method": ..., "n": ...}``).

    Raises:
        ValueError: Unknown or control-fitted method, or (standardize) non-finite values.
    """
    if method not in POSTPROCESS_CHOICES:
        raise ValueError(f"unknown post-processing {method!r}; expected one of {', '.join(POSTPROCESS_CHOICES)}")
    proc = create_postprocessor(method).fit(X)
    return proc.transform(X), proc.summary()


__all__ = [
    "DEFAULT_POSTPROCESS",
    "POSTPROCESS_CHOICES",
    "REGISTRY",
    "SPHERIZE_METHODS",
    "PostProcessor",
    "PostprocessMethod",
    "Raw",
    "SpherizeMethod",
    "Standardizer",
    "create_postprocessor",
    "load_postprocessor",
    "postprocess",
    "postprocessor_class",
    "table_postprocess",
]
