"""Sphering a feature table on its negative controls: :func:`spherize_profiles`.

The transform itself (ZCA / PCA whitening, optionally of the correlation matrix, with Microsnoop's knee rule or a
fixed epsilon) is :class:`msnoop.vectors.sphering.Spherize`; here it is fitted on the rows a SQL condition selects
(all controls of all batches, Microsnoop's behaviour, or one fit per batch) and applied to every row.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from msnoop.core.filters import filter_mask
from msnoop.core.tables import check_finite, feature_columns
from msnoop.vectors.postprocess import SpherizeMethod
from msnoop.vectors.sphering import Spherize

logger = logging.getLogger(__name__)

__all__ = ["spherize_profiles"]


def _batch_values(df: pd.DataFrame, batch_column: str | None, per_batch: bool) -> np.ndarray | None:
    """Each row's batch (``None`` without a batch column).

    Raises:
        ValueError: ``per_batch`` without a batch column, or the column is missing or has missing values.
    """
    if per_batch and batch_column is None:
        raise ValueError("per_batch=True needs batch_column (the column naming each row's batch)")
    if batch_column is None:
        return None
    if batch_column not in df.columns:
        raise ValueError(f"batch column {batch_column!r} is not in the table; columns: {list(df.columns)[:20]}")
    if df[batch_column].isna().any():
        raise ValueError(
            f"batch column {batch_column!r} has {int(df[batch_column].isna().sum())} missing value(s); "
            "expected every row to name its batch"
        )
    return df[batch_column].to_numpy()


def _fits(
    batches: np.ndarray | None, ctrl: np.ndarray, *, batch_column: str | None, control_query: str, per_batch: bool
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, rows to transform, control rows)`` of every fit: one on all controls, or one per batch.

    Raises:
        ValueError: ``per_batch`` and a batch without control rows.
    """
    if not per_batch:
        return [("all", np.ones(len(ctrl), dtype=bool), ctrl)]
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
    return fits


def _kept_features(
    X: np.ndarray,
    fits: list[tuple[str, np.ndarray, np.ndarray]],
    feats: list[str],
    *,
    method: str,
    per_batch: bool,
    control_query: str,
) -> np.ndarray:
    """``[D]`` bool: the features a ``-cor`` method can standardise (not constant over any fit's controls).

    Raises:
        ValueError: Every feature is constant over the controls.
    """
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
    return keep


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
    batches = _batch_values(df, batch_column, per_batch)
    fits = _fits(batches, ctrl, batch_column=batch_column, control_query=control_query, per_batch=per_batch)
    keep = _kept_features(X, fits, feats, method=method, per_batch=per_batch, control_query=control_query)
    dropped = [f for f, k in zip(feats, keep, strict=True) if not k]
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
