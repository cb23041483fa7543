"""Sphering (whitening) of profiles against negative controls.

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

:func:`spherize_profiles` applies this to a feature table: fit on the rows selected by a SQL condition
(all controls of all batches, Microsnoop's behaviour, or one fit per batch), transform every row.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from msnoop.core.filters import filter_mask
from msnoop.core.tables import check_finite, feature_columns
from msnoop.correct import METHODS

logger = logging.getLogger(__name__)

SpherizeMethod = Literal["ZCA", "ZCA-cor", "PCA", "PCA-cor"]


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


class Spherize:
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
        if method not in METHODS:
            raise ValueError(f"expected method in {METHODS}, found {method!r}")
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

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        """``fit(X)`` then ``transform(X)``."""
        return self.fit(X).transform(X)

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


def spherize_profiles(
    df: pd.DataFrame,
    *,
    control_query: str,
    batch_column: str | None = None,
    per_batch: bool = False,
    method: SpherizeMethod = "ZCA-cor",
    epsilon: float | Literal["knee"] = "knee",
    variance_floor: float = 1e-3,
    features: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Sphere every row of a feature table with a transform fitted on its control rows.

    By default one transform is fitted on all control rows of all batches and applied to every row
    (Microsnoop's behaviour, including its per-plate loop that in fact fits on all DMSO images). With
    ``per_batch=True`` one transform is fitted on the controls of each batch and applied to that batch.

    For ``-cor`` methods, features that are constant over the controls (of any batch, when fitting per
    batch) cannot be standardised: they are **dropped** from the output, listed in a logged warning and
    recorded under ``"dropped_features"``.

    Args:
        df: Feature table (``Metadata_*`` columns plus numeric features), ``N`` rows.
        control_query: SQL condition selecting the control rows, e.g. ``"Metadata_Compound = 'DMSO'"``.
        batch_column: Column naming the batch (plate, week...). Required for ``per_batch``; otherwise only
            used to record the number of controls per batch.
        per_batch: Fit one transform per batch instead of one on all controls.
        method: See :class:`Spherize`.
        epsilon: See :class:`Spherize`.
        variance_floor: See :class:`Spherize`.
        features: Feature columns; default :func:`~msnoop.core.tables.feature_columns`.

    Returns:
        ``(sphered, info)``: a new table with the same rows, index and non-feature columns (dropped
        features removed), and a JSON-serialisable dict describing the correction: ``method``,
        ``epsilon``, ``variance_floor``, ``control_query``, ``fit`` (``"global"``/``"per_batch"``),
        ``batch_column``, ``n_rows``, ``n_controls``, ``n_features``, ``dropped_features``, ``models``
        (one :meth:`Spherize.describe` per fit, keyed ``"all"`` or by batch) and, when a batch column is
        given, ``n_controls_by_batch``.

    Raises:
        ValueError: If the query fails or selects no rows, a batch has no control rows (``per_batch``),
            the batch column is missing or has missing values, or features hold NaN/inf (the message
            names the columns).
    """
    Spherize(method, epsilon, variance_floor=variance_floor)  # validate arguments early
    feats = list(features) if features is not None else feature_columns(df)
    if not feats:
        raise ValueError("expected numeric feature columns to sphere, found none; see msnoop.core.tables")
    missing = [c for c in feats if c not in df.columns]
    if missing:
        raise ValueError(f"feature columns {missing[:10]} are not in the table")
    X = df[feats].to_numpy(dtype=np.float64)
    check_finite(X, feats)
    ctrl = filter_mask(df, control_query)
    n_ctrl = int(ctrl.sum())
    if n_ctrl == 0:
        raise ValueError(
            f"control query {control_query!r} selected no rows out of {len(df)}; expected at least 2 control "
            "rows (check the column name and value, e.g. \"Metadata_Compound == 'DMSO'\")"
        )
    if per_batch and batch_column is None:
        raise ValueError("per_batch=True needs batch_column (the column naming each row's batch)")
    batches: np.ndarray | None = None
    if batch_column is not None:
        if batch_column not in df.columns:
            raise ValueError(f"batch column {batch_column!r} is not in the table; columns: {list(df.columns)[:20]}")
        if df[batch_column].isna().any():
            raise ValueError(
                f"batch column {batch_column!r} has {int(df[batch_column].isna().sum())} missing value(s); "
                "expected every row to name its batch"
            )
        batches = df[batch_column].to_numpy()

    # (name, rows to transform, control rows) for every fit
    if per_batch:
        assert batches is not None
        fits = []
        for b in pd.unique(batches):
            rows = batches == b
            if not (rows & ctrl).any():
                raise ValueError(
                    f"batch {b!r} (column {batch_column!r}) has no rows matching the control query "
                    f"{control_query!r}; expected controls in every batch for per_batch sphering "
                    "(use per_batch=False to fit on all controls)"
                )
            fits.append((str(b), rows, rows & ctrl))
    else:
        fits = [("all", np.ones(len(df), dtype=bool), ctrl)]

    keep = np.ones(len(feats), dtype=bool)
    if method.endswith("-cor"):
        for _, _, c in fits:
            keep &= np.ptp(X[c], axis=0) > 0
    dropped = [f for f, k in zip(feats, keep, strict=True) if not k]
    if dropped:
        logger.warning(
            "%s: dropping %d feature(s) constant over the control rows%s: %s",
            method,
            len(dropped),
            " of some batch" if per_batch else "",
            ", ".join(dropped[:20]) + (" ..." if len(dropped) > 20 else ""),
        )
    if not keep.any():
        raise ValueError(f"every feature is constant over the controls selected by {control_query!r}")
    kept = [f for f, k in zip(feats, keep, strict=True) if k]
    Xk = X[:, keep]

    Y = np.empty_like(Xk)
    models: dict[str, Any] = {}
    for name, rows, c in fits:
        if int(c.sum()) < 2:
            raise ValueError(
                f"{'batch ' + repr(name) if per_batch else 'the table'} has {int(c.sum())} control row(s) for "
                f"{control_query!r}; expected at least 2 to estimate a covariance"
            )
        sph = Spherize(method, epsilon, variance_floor=variance_floor).fit(Xk[c])
        Y[rows] = sph.transform(Xk[rows])
        models[name] = sph.describe()
    deficient = [name for name, m in models.items() if m["rank"] < m["n_features"]]
    if deficient:
        m0 = models[deficient[0]]
        logger.warning(
            "%d of %d sphering fit(s) have a rank-deficient control %s matrix (e.g. %s: %d controls, rank %d < %d "
            "features); the missing directions were regularised (%s, floor/offset %.3g), no NaN produced",
            len(deficient),
            len(models),
            "correlation" if method.endswith("-cor") else "covariance",
            deficient[0],
            m0["n_samples"],
            m0["rank"],
            m0["n_features"],
            "knee rule" if epsilon == "knee" else f"epsilon={epsilon}",
            m0["reg"],
        )

    out_dtype = np.float32 if all(df[f].dtype == np.float32 for f in kept) else np.float64
    other = [c for c in df.columns if c not in set(feats)]
    feat_df = pd.DataFrame(Y.astype(out_dtype), columns=kept, index=df.index)
    order = [c for c in df.columns if c in set(other) or c in set(kept)]
    sphered = pd.concat([df[other], feat_df], axis=1)[order]

    info: dict[str, Any] = {
        "method": method,
        "epsilon": epsilon if isinstance(epsilon, str) else float(epsilon),
        "variance_floor": float(variance_floor) if method.endswith("-cor") else None,
        "control_query": control_query,
        "fit": "per_batch" if per_batch else "global",
        "batch_column": batch_column,
        "n_rows": len(df),
        "n_controls": n_ctrl,
        "n_features": len(kept),
        "dropped_features": dropped,
        "models": models,
    }
    if batches is not None:
        counts = pd.Series(ctrl).groupby(batches).sum()
        info["n_controls_by_batch"] = {str(k): int(v) for k, v in counts.items()}
    logger.info(
        "sphered %d rows x %d features (%s, epsilon=%s, fit %s on %d controls)",
        len(df),
        len(kept),
        method,
        epsilon,
        info["fit"],
        n_ctrl,
    )
    return sphered, info
