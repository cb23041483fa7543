"""Post-processing of embeddings before any distance: per-dimension standardisation fitted without labels.

Microsnoop's readout (the average-pooled deepest ReLU map, L2-normalised per channel, channels concatenated) is
non-negative and shares one large common direction: between yeast cells the median cosine distance of the raw
readout is about 0.002, so cosine neighbours are decided by small differences on top of that direction. Like
pycytominer's ``normalize(method="standardize")`` on all samples, :class:`Standardizer` subtracts each dimension's
mean and divides by its standard deviation over the table itself (no labels), after which cosine distances vary
between neighbours and every dimension counts. The same post-processing applies to every feature set compared
(msnoop embeddings, a random network, pixel and intensity baselines), so comparisons stay fair.

``"raw"`` keeps Microsnoop's readout as it is (what the paper's kNN used; documented, never the default silently).
The choice and its measurements on every dev set are in docs/RESULTS.md (``jobs/bench_postprocess.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Postprocess = Literal["standardize", "raw"]
#: Post-processing applied before distances unless a command is told otherwise.
DEFAULT_POSTPROCESS: Postprocess = "standardize"
POSTPROCESS_CHOICES: tuple[str, ...] = ("standardize", "raw")
#: Standard deviations below this are treated as a constant dimension (scaled by 1, i.e. only centred).
MIN_STD = 1e-8


@dataclass(frozen=True)
class Standardizer:
    """Per-dimension centre and scale: ``(X - mean) / scale``.

    Attributes:
        mean: ``[D]`` float64 means.
        scale: ``[D]`` float64 standard deviations (population, ddof 0), 1 where a dimension is constant.
        n: Rows it was fitted on.
    """

    mean: np.ndarray
    scale: np.ndarray
    n: int

    @classmethod
    def fit(cls, X: np.ndarray) -> Standardizer:
        """Fit on ``X`` ``[N, D]`` (any float dtype; N >= 1).

        Raises:
            ValueError: ``X`` is not 2-D, is empty, or holds NaN/inf.
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) == 0:
            raise ValueError(f"standardisation needs an [N, D] matrix with N >= 1, found shape {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("standardisation needs finite features; found NaN/inf values")
        std = X.std(axis=0)
        return cls(mean=X.mean(axis=0), scale=np.where(std < MIN_STD, 1.0, std), n=len(X))

    @classmethod
    def from_moments(cls, n: int, total: np.ndarray, total_sq: np.ndarray) -> Standardizer:
        """From streamed sums: ``n`` rows, ``total = sum(X)``, ``total_sq = sum(X**2)`` (float64, ``[D]``)."""
        mean = total / n
        var = np.maximum(total_sq / n - mean**2, 0.0)
        std = np.sqrt(var)
        return cls(mean=mean, scale=np.where(std < MIN_STD, 1.0, std), n=int(n))

    def transform(self, X: np.ndarray) -> np.ndarray:
        """``[N, D]`` -> ``[N, D]`` float32 standardised rows (``D`` must match the fit)."""
        X = np.asarray(X)
        if X.shape[-1] != len(self.mean):
            raise ValueError(f"standardizer fitted on {len(self.mean)} dimensions, found {X.shape[-1]}")
        return ((X - self.mean) / self.scale).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable record (stored with tables and results)."""
        return {"method": "standardize", "n": self.n, "mean": self.mean.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Standardizer:
        return cls(mean=np.asarray(d["mean"], dtype=np.float64), scale=np.asarray(d["scale"], dtype=np.float64), n=int(d["n"]))


def postprocess(X: np.ndarray, method: str = DEFAULT_POSTPROCESS) -> tuple[np.ndarray, dict[str, Any]]:
    """Apply ``method`` to a feature matrix fitted on itself (no labels).

    Args:
        X: ``[N, D]`` features.
        method: ``"standardize"`` (per-dimension z-score over the rows of ``X``) or ``"raw"`` (unchanged).

    Returns:
        ``([N, D]`` float32, a record of what was done: ``{"method": ..., "n": ...}``).

    Raises:
        ValueError: Unknown method, or (standardize) non-finite values.
    """
    if method == "raw":
        return np.asarray(X, dtype=np.float32), {"method": "raw"}
    if method == "standardize":
        st = Standardizer.fit(X)
        return st.transform(X), {"method": "standardize", "n": st.n}
    raise ValueError(f"unknown post-processing {method!r}; expected one of {', '.join(POSTPROCESS_CHOICES)}")


__all__ = ["DEFAULT_POSTPROCESS", "POSTPROCESS_CHOICES", "Postprocess", "Standardizer", "postprocess"]
