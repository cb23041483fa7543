"""Sphering (whitening) fitted on control rows: :class:`Spherize`, a :class:`~msnoop.vectors.postprocess.PostProcessor`.

Two regularisation rules are available:

* a fixed ``epsilon`` added to every eigenvalue of the control covariance/correlation matrix
  (the pycytominer convention, ``1 / sqrt(lambda + epsilon)``), or
* ``epsilon="knee"``: Microsnoop's rule. The eigenvalues ``T`` (descending) get a knee from
  ``kneed.KneeLocator(range(D), T, S=1.0, curve="convex", direction="decreasing")`` and every eigenvalue
  is floored at ``reg = T[knee] / 10``.

``Spherize(method="ZCA-cor", epsilon="knee", variance_floor=1e-3)`` (the defaults) reproduces
Microsnoop's ``postprocess/spherize.ZCA_corr`` exactly::

    mean_ = X.mean(0); V = diag(cov(X)); corr = nan_to_num(corr(X - mean_))
    G, T = svd(corr); t = sqrt(clip(T, reg)); sphere_ = G diag(1/t) G^T diag(1 / sqrt(clip(V, 1e-3)))
    transform(X) = (X - mean_) @ sphere_.T

Note the Microsnoop quirk kept by ``variance_floor=1e-3``: features whose control variance is below
``1e-3`` are divided by ``sqrt(1e-3)`` rather than by their own standard deviation, so the sphered
controls are white only where every variance is above the floor. Set ``variance_floor=0`` for textbook
ZCA-cor whitening.

Applying it to a feature table (fit on the rows a SQL condition selects, per batch or globally) is
:func:`msnoop.correct.sphering.spherize_profiles`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Literal

import numpy as np

from msnoop.core.tables import check_finite
from msnoop.vectors.postprocess import SPHERIZE_METHODS, PostProcessor, SpherizeMethod

logger = logging.getLogger(__name__)


def knee_regulariser(
    eigenvalues: np.ndarray, *, sensitivity: float = 1.0, divisor: float = 10.0
) -> tuple[float, int | None]:
    """Microsnoop's eigenvalue floor: ``eigenvalues[knee] / divisor``.

    The knee is located on the numerically non-zero eigenvalues (those above
    ``eigenvalues[0] * D * machine epsilon``). With a full-rank control matrix (Microsnoop's case) this is
    exactly Microsnoop's rule; with fewer controls than features it keeps the knee out of the numerically
    zero tail, whose ``1e-15``-sized values would otherwise become the floor and blow up the null space.

    Args:
        eigenvalues: ``[D]`` eigenvalues sorted in decreasing order.
        sensitivity: ``S`` of ``kneed.KneeLocator``.
        divisor: The knee eigenvalue is divided by this (Microsnoop: 10).

    Returns:
        ``(reg, knee_index)``. When no knee is found (a flat or too short spectrum), ``knee_index`` is
        ``None`` and ``reg`` is the smallest non-zero eigenvalue (logged), so non-zero directions are left
        as they are and zero directions are raised to it.

    Raises:
        ValueError: If every eigenvalue is 0 (the controls do not vary at all).
    """
    from kneed import KneeLocator

    T = np.asarray(eigenvalues, dtype=np.float64)
    if T.size == 0 or T[0] <= 0:
        raise ValueError(
            "expected a covariance with at least one positive eigenvalue, found all eigenvalues 0: "
            "the control profiles are identical; check the control query"
        )
    nonzero = T[T > T[0] * T.size * np.finfo(np.float64).eps]
    knee: int | None = None
    if nonzero.size >= 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kneed warns "No knee/elbow found"; handled below
            found = KneeLocator(
                range(len(nonzero)), nonzero, S=sensitivity, curve="convex", direction="decreasing"
            ).knee
        knee = None if found is None else int(found)
    if knee is not None:
        return float(nonzero[knee] / divisor), knee
    reg = float(nonzero[-1])
    logger.warning(
        "knee rule found no knee in %d non-zero eigenvalues; flooring eigenvalues at the smallest non-zero one "
        "(%.3g) instead",
        nonzero.size,
        reg,
    )
    return reg, None


class Spherize(PostProcessor):
    """Whitening transform fitted on control profiles (sklearn-like ``fit``/``transform``).

    ``transform(X) = (X - mean_) @ matrix_`` where, with ``C`` the control covariance (``ZCA``, ``PCA``)
    or correlation (``-cor``) matrix and ``C = U diag(lambda) U^T`` its eigendecomposition (``lambda``
    decreasing), the regularised eigenvalues are ``lambda + epsilon`` or ``max(lambda, reg_knee)``, and

    * ``ZCA``:  ``matrix_ = diag(1/s) U diag(lambda_reg^-1/2) U^T``
    * ``PCA``:  ``matrix_ = diag(1/s) U diag(lambda_reg^-1/2)`` (columns ordered by decreasing variance,
      each eigenvector's largest-magnitude entry made positive),

    with ``s = 1`` for ``ZCA``/``PCA`` and ``s = sqrt(max(var, variance_floor))`` for the ``-cor``
    variants. Covariances use ``ddof=1``.

    Args:
        method: ``"ZCA"``, ``"ZCA-cor"``, ``"PCA"`` or ``"PCA-cor"``.
        epsilon: A positive float added to every eigenvalue, or ``"knee"`` for Microsnoop's rule.
        variance_floor: ``-cor`` methods only: variances are clipped at this before taking the square
            root (Microsnoop: ``1e-3``).
        knee_sensitivity: ``S`` of the knee locator.
        knee_divisor: The knee eigenvalue is divided by this to give the floor.

    Attributes:
        mean_: ``[D]`` control mean.
        scale_: ``[D]`` per-feature divisor (ones for ``ZCA``/``PCA``).
        eigenvalues_: ``[D]`` eigenvalues of the control covariance/correlation, decreasing.
        reg_: The eigenvalue floor (knee rule) or ``epsilon``.
        knee_index_: Index of the knee eigenvalue, ``None`` for a fixed epsilon or no knee.
        matrix_: ``[D, D]`` sphering matrix applied to centred rows.
        n_samples_: Number of control rows used in ``fit``.
    """

    def __init__(
        self,
        method: SpherizeMethod = "ZCA-cor",
        epsilon: float | Literal["knee"] = "knee",
        *,
        variance_floor: float = 1e-3,
        knee_sensitivity: float = 1.0,
        knee_divisor: float = 10.0,
    ) -> None:
        if method not in SPHERIZE_METHODS:
            raise ValueError(f"expected method in {SPHERIZE_METHODS}, found {method!r}")
        if isinstance(epsilon, str):
            if epsilon != "knee":
                raise ValueError(f"expected epsilon to be a positive number or 'knee', found {epsilon!r}")
        elif not (np.isfinite(epsilon) and epsilon > 0):
            raise ValueError(
                f"expected epsilon > 0 (it keeps zero-variance directions finite), found {epsilon!r}; "
                "use a small value such as 1e-6 or 'knee'"
            )
        if variance_floor < 0:
            raise ValueError(f"expected variance_floor >= 0, found {variance_floor!r}")
        self.method = method
        self.epsilon = epsilon
        self.variance_floor = float(variance_floor)
        self.knee_sensitivity = float(knee_sensitivity)
        self.knee_divisor = float(knee_divisor)

    @property
    def correlation(self) -> bool:
        """Whether the method standardises features first (``-cor``)."""
        return self.method.endswith("-cor")

    def fit(self, X: np.ndarray) -> Spherize:
        """Fit the transform on control profiles.

        Args:
            X: ``[N, D]`` control profiles, ``N >= 2``, all finite.

        Returns:
            ``self``.

        Raises:
            ValueError: On a wrong shape, non-finite values, fewer than 2 rows, or (``-cor`` methods) a
                feature that is constant over the rows.
        """
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"expected a 2-D [N, D] array, found shape {X.shape}")
        n, d = X.shape
        if n < 2:
            raise ValueError(f"expected at least 2 control rows to estimate a covariance, found {n}")
        check_finite(X, [f"feature {i}" for i in range(d)], what="control profiles")
        mean = X.mean(axis=0)
        if self.correlation:
            constant = np.flatnonzero(np.ptp(X, axis=0) == 0)
            if constant.size:
                raise ValueError(
                    f"{self.method} cannot standardise features that are constant over the controls, found "
                    f"{constant.size} at indices {constant[:10].tolist()}; drop them first "
                    "(spherize_profiles does this and records it) or use method='ZCA'"
                )
            var = X.var(axis=0, ddof=1)
            C = np.atleast_2d(np.nan_to_num(np.corrcoef(X, rowvar=False)))
            scale = np.sqrt(np.clip(var, self.variance_floor, None))
            n_below = int(np.sum(var < self.variance_floor))
            if n_below:
                logger.info(
                    "%d of %d control variances are below variance_floor=%.3g and are clipped (Microsnoop's rule); "
                    "those features are not scaled to unit variance",
                    n_below,
                    d,
                    self.variance_floor,
                )
        else:
            C = np.atleast_2d(np.cov(X, rowvar=False, ddof=1))
            scale = np.ones(d)
            n_below = 0
        w, U = np.linalg.eigh(C)
        w, U = np.clip(w[::-1], 0.0, None), U[:, ::-1]
        if self.epsilon == "knee":
            reg, knee = knee_regulariser(w, sensitivity=self.knee_sensitivity, divisor=self.knee_divisor)
            lam = np.clip(w, reg, None)
        else:
            reg, knee = float(self.epsilon), None
            lam = w + reg
        rank = int(np.sum(w > w[0] * d * np.finfo(np.float64).eps)) if w[0] > 0 else 0
        n_raised = int(np.sum(lam > w * (1 + 1e-12))) if self.epsilon == "knee" else d
        if n <= d or rank < d:
            logger.info(
                "sphering on %d rows x %d features: the %s matrix has rank %d < %d; the %d smallest directions "
                "are set by the regulariser (%s, eigenvalue floor/offset %.3g), so no NaN is produced",
                n,
                d,
                "correlation" if self.correlation else "covariance",
                rank,
                d,
                d - rank,
                "knee rule" if self.epsilon == "knee" else f"epsilon={self.epsilon}",
                reg,
            )
        if self.method.startswith("PCA"):
            # deterministic signs: the largest-magnitude entry of each eigenvector is positive
            signs = np.sign(U[np.abs(U).argmax(axis=0), np.arange(d)])
            signs[signs == 0] = 1.0
            U = U * signs
            W = U / np.sqrt(lam)
        else:
            W = (U / np.sqrt(lam)) @ U.T
        self.mean_ = mean
        self.scale_ = scale
        self.eigenvalues_ = w
        self.eigenvectors_ = U
        self.reg_ = float(reg)
        self.knee_index_ = knee
        self.rank_ = rank
        self.n_regularised_ = n_raised
        self.matrix_ = W / scale[:, None]
        self.n_samples_ = n
        self.n_features_in_ = d
        self.n_below_floor_ = n_below
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Sphere profiles with the fitted transform.

        Args:
            X: ``[M, D]`` profiles.

        Returns:
            ``[M, D]`` sphered profiles, float32 for float32 input, else float64.

        Raises:
            RuntimeError: If called before :meth:`fit`.
            ValueError: If ``D`` differs from the fitted feature count.
        """
        if not hasattr(self, "matrix_"):
            raise RuntimeError("Spherize.transform called before fit; call fit(X_controls) first")
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"expected a [M, {self.n_features_in_}] array (as in fit), found shape {X.shape}")
        out_dtype = np.float32 if X.dtype == np.float32 else np.float64
        out = (X.astype(np.float64, copy=False) - self.mean_) @ self.matrix_
        return out.astype(out_dtype, copy=False)

    @property
    def n(self) -> int:  # type: ignore[override]
        """Control rows the transform was fitted on (0 before fitting)."""
        return int(getattr(self, "n_samples_", 0))

    def to_dict(self) -> dict[str, Any]:
        """The fitted transform: parameters, ``mean`` ``[D]`` and ``matrix`` ``[D, D]`` (applied to centred rows).

        Raises:
            RuntimeError: Called before :meth:`fit`.
        """
        if not hasattr(self, "matrix_"):
            raise RuntimeError("Spherize.to_dict called before fit")
        return {
            **self.describe(),
            "knee_sensitivity": self.knee_sensitivity,
            "knee_divisor": self.knee_divisor,
            "mean": self.mean_.tolist(),
            "matrix": self.matrix_.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spherize:
        """A fitted transform from its :meth:`to_dict` record (it transforms as the original did).

        Raises:
            KeyError: The record lacks ``mean`` or ``matrix``.
        """
        floor = d.get("variance_floor")
        sph = cls(
            d["method"],
            d["epsilon"],
            variance_floor=1e-3 if floor is None else float(floor),
            knee_sensitivity=float(d.get("knee_sensitivity", 1.0)),
            knee_divisor=float(d.get("knee_divisor", 10.0)),
        )
        sph.mean_ = np.asarray(d["mean"], dtype=np.float64)
        sph.matrix_ = np.asarray(d["matrix"], dtype=np.float64)
        sph.n_features_in_ = len(sph.mean_)
        sph.n_samples_ = int(d.get("n_samples", 0))
        sph.reg_, sph.knee_index_ = float(d.get("reg", 0.0)), d.get("knee_index")
        return sph

    def summary(self) -> dict[str, Any]:
        """:meth:`describe`: what was fitted on how many controls."""
        return self.describe()

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary of the fitted transform (for recording with results)."""
        if not hasattr(self, "matrix_"):
            raise RuntimeError("Spherize.describe called before fit")
        return {
            "method": self.method,
            "epsilon": self.epsilon if isinstance(self.epsilon, str) else float(self.epsilon),
            "variance_floor": self.variance_floor if self.correlation else None,
            "reg": self.reg_,
            "knee_index": self.knee_index_,
            "n_samples": int(self.n_samples_),
            "n_features": int(self.n_features_in_),
            "rank": self.rank_,
            "n_eigenvalues_regularised": self.n_regularised_,
            "n_variances_below_floor": self.n_below_floor_,
        }
