"""Plate-screen readouts: Z' between control wells, a control-axis readout, dose-response Spearman rho.

Typical use on one plate with one profile per well (e.g. BBBC013, see ``jobs/bench_bbbc013.py``)::

    r = control_axis_readout(X, is_pos, is_neg)          # [N], 0 ~ negative controls, 1 ~ positive controls
    zp = z_prime(r[is_pos], r[is_neg])                    # assay window between the control wells
    rho = dose_response(r[is_sample], dose[is_sample], series[is_sample])   # {series: Spearman rho}

With one profile per **cell** instead, a classifier trained on the control wells' cells reads each well as
the share of its cells that look like the positive controls (the "percent responding cells" of a
translocation screen, learnt from the controls instead of a hand-made feature)::

    r, info = cell_classifier_readout(cells_X, cells_well, wells, is_pos, is_neg)   # [W] in [0, 1]

The readout's direction is set by the positive controls (higher = more like them); the sign of a rho is
therefore meaningful only relative to where the positive controls sit on the dose axis.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CS", "cell_classifier_readout", "control_axis_readout", "dose_response", "z_prime"]

#: Inverse L2 strengths tried by :func:`cell_classifier_readout` (``C="cv"``).
DEFAULT_CS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _vector(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"expected {name} to be a 1-D array of per-well values, found shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"expected finite {name}, found {int((~np.isfinite(arr)).sum())} NaN/inf value(s)")
    return arr


def z_prime(pos: Any, neg: Any, *, ddof: int = 1) -> float:
    """Z' factor (Zhang, Chung & Oldenburg 1999) between positive and negative control wells.

    ``Z' = 1 - 3 (sigma_p + sigma_n) / |mu_p - mu_n|``. 1 is a perfect assay window, above 0.5 an excellent
    one, 0 means the 3-sigma bands touch, below 0 they overlap. Symmetric in ``pos``/``neg`` and invariant
    to the sign and scale of the readout.

    Args:
        pos: ``[Np]`` readout of the positive control wells, ``Np >= 2``.
        neg: ``[Nn]`` readout of the negative control wells, ``Nn >= 2``.
        ddof: Delta degrees of freedom of the standard deviations (1 = sample std, the usual choice).

    Returns:
        Z' as a float.

    Raises:
        ValueError: If either group is not 1-D, has fewer than ``ddof + 1`` values or non-finite values,
            or the two means are equal (Z' undefined).
    """
    p = _vector(pos, "pos")
    n = _vector(neg, "neg")
    for arr, name in ((p, "positive"), (n, "negative")):
        if arr.size < max(2, ddof + 1):
            raise ValueError(
                f"expected at least {max(2, ddof + 1)} {name} control values to estimate a standard deviation, "
                f"found {arr.size}"
            )
    gap = abs(p.mean() - n.mean())
    if gap == 0:
        raise ValueError("Z' is undefined: the positive and negative controls have the same mean readout")
    return float(1.0 - 3.0 * (p.std(ddof=ddof) + n.std(ddof=ddof)) / gap)


def control_axis_readout(X: Any, is_pos: Any, is_neg: Any) -> np.ndarray:
    """Project every well onto the axis from the negative- to the positive-control mean, leave-one-out.

    With ``a = mu_pos - mu_neg`` the readout of a well ``x`` is ``(x - mu_neg) . a / |a|^2``: 0 at the
    negative-control mean, 1 at the positive-control mean, increasing towards the positive controls. For a
    **control well the means are computed without that well** (a positive control's ``mu_pos`` leaves it
    out, a negative control's ``mu_neg`` leaves it out), so no well helps define the axis it is scored
    on and Z' on this readout is not inflated by self-projection. Sample wells (neither control) use all
    controls.

    Args:
        X: ``[N, D]`` profiles, one per well, finite (``D = 1`` for a scalar feature is fine).
        is_pos: ``[N]`` boolean mask of the positive control wells (at least 2).
        is_neg: ``[N]`` boolean mask of the negative control wells (at least 2, disjoint from ``is_pos``).

    Returns:
        ``[N]`` float64 readout.

    Raises:
        ValueError: On a wrong shape or non-finite values, masks of the wrong length or type, a well that is
            both a positive and a negative control, fewer than 2 positive or negative controls (one is
            needed to leave out and one to keep), or an axis of zero length (the control means coincide).
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise ValueError(f"expected X to be [N, D] (one profile per well), found shape {X.shape}")
    if not np.all(np.isfinite(X)):
        n_bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise ValueError(f"expected finite profiles, found NaN/inf in {n_bad} well(s)")
    n = X.shape[0]
    masks = []
    for m, name in ((is_pos, "is_pos"), (is_neg, "is_neg")):
        arr = np.asarray(m)
        if arr.shape != (n,):
            raise ValueError(f"expected {name} to be a [N]={n} boolean mask, found shape {arr.shape}")
        if arr.dtype != bool:
            raise ValueError(f"expected {name} to be boolean, found dtype {arr.dtype}; use e.g. controls == 1")
        masks.append(arr)
    pos, neg = masks
    both = np.flatnonzero(pos & neg)
    if both.size:
        raise ValueError(f"wells {both[:10].tolist()} are marked both positive and negative control")
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos < 2 or n_neg < 2:
        raise ValueError(
            f"expected at least 2 positive and 2 negative control wells (each control well is scored with the "
            f"axis computed without it), found {n_pos} positive and {n_neg} negative; check the control masks"
        )
    sum_p, sum_n = X[pos].sum(axis=0), X[neg].sum(axis=0)
    # per-well means: all controls, except the well itself for a control well
    mu_p = np.broadcast_to(sum_p / n_pos, X.shape).copy()
    mu_n = np.broadcast_to(sum_n / n_neg, X.shape).copy()
    mu_p[pos] = (sum_p - X[pos]) / (n_pos - 1)
    mu_n[neg] = (sum_n - X[neg]) / (n_neg - 1)
    axis = mu_p - mu_n
    norm2 = np.einsum("ij,ij->i", axis, axis)
    scale = max(float(np.abs(X).max()), 1.0)
    zero = np.flatnonzero(norm2 <= (1e-12 * scale) ** 2)
    if zero.size:
        raise ValueError(
            f"the control axis (mean positive - mean negative) has zero length for {zero.size} well(s) "
            f"(e.g. {zero[:5].tolist()}): the positive and negative controls do not differ"
        )
    return np.einsum("ij,ij->i", X - mu_n, axis) / norm2


def dose_response(readout: Any, dose: Any, series: Any) -> dict[Hashable, float]:
    """Spearman rank correlation of the readout against dose, separately for each series.

    Args:
        readout: ``[N]`` per-well readout (finite).
        dose: ``[N]`` dose of each well (numeric; ordinal indices are fine, only ranks matter).
        series: ``[N]`` series label of each well (e.g. compound or plate half); one rho per distinct label,
            in order of first appearance.

    Returns:
        ``{series label: rho}``. rho is NaN (with a logged warning) when the readout is constant within a
        series. The sign is as measured: with :func:`control_axis_readout` a positive rho means the
        readout moves towards the positive controls as the dose rises.

    Raises:
        ValueError: On lengths that differ, non-finite readout or dose, a series with fewer than 3 wells, or a
            series whose dose does not vary.
    """
    from scipy.stats import spearmanr

    r = _vector(readout, "readout")
    d = _vector(dose, "dose")
    s = np.asarray(series, dtype=object)
    if s.ndim != 1 or not (len(r) == len(d) == len(s)):
        raise ValueError(
            f"expected readout, dose and series of the same length N, found {len(r)}, {len(d)} and shape {s.shape}"
        )
    if len(r) == 0:
        raise ValueError("expected at least one well, found none")
    out: dict[Hashable, float] = {}
    labels = list(dict.fromkeys(s.tolist()))
    for label in labels:
        rows = s == label
        if rows.sum() < 3:
            raise ValueError(
                f"series {label!r} has {int(rows.sum())} well(s); expected at least 3 for a rank correlation"
            )
        if np.ptp(d[rows]) == 0:
            raise ValueError(f"series {label!r} has a single dose ({d[rows][0]}); expected a dose series")
        if np.ptp(r[rows]) == 0:
            logger.warning("readout is constant over series %r; Spearman rho is undefined (NaN)", label)
            out[label] = float("nan")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[label] = float(spearmanr(r[rows], d[rows]).statistic)
    return out


def _fit_cells(X: np.ndarray, y: np.ndarray, C: float, max_iter: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """Standardise on the training cells and fit a class-balanced L2 logistic regression."""
    from sklearn.linear_model import LogisticRegression

    mu = X.mean(axis=0)
    sd = X.std(axis=0)
    sd[sd == 0] = 1.0
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs ConvergenceWarning on separable controls: the fit is still used
        clf.fit((X - mu) / sd, y)
    return mu, sd, clf


def _logit(model: tuple[np.ndarray, np.ndarray, Any], X: np.ndarray) -> np.ndarray:
    mu, sd, clf = model
    return clf.decision_function((X - mu) / sd)


def _choose_c(
    X: np.ndarray, y: np.ndarray, groups: np.ndarray, Cs: tuple[float, ...], folds: int, seed: int, max_iter: int
) -> tuple[float, dict[float, float]]:
    """The C of ``Cs`` with the lowest cell-level log loss under cross-validation grouped by well."""
    from sklearn.model_selection import StratifiedGroupKFold

    well_y = {g: label for g, label in zip(groups.tolist(), y.tolist(), strict=True)}
    n_splits = min(folds, sum(well_y.values()), len(well_y) - sum(well_y.values()))
    if n_splits < 2:
        raise ValueError(f"C='cv' needs at least 2 wells of each control class, found {n_splits}")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    loss = {float(c): 0.0 for c in Cs}
    for train, test in cv.split(X, y, groups):
        for c in Cs:
            z = _logit(_fit_cells(X[train], y[train], float(c), max_iter), X[test])
            # log(1 + exp(-z)) for positives, log(1 + exp(z)) for negatives, weighted like the fit (balanced)
            nll = np.logaddexp(0.0, np.where(y[test] == 1, -z, z))
            w = np.where(y[test] == 1, 0.5 / max(y[test].sum(), 1), 0.5 / max((1 - y[test]).sum(), 1))
            loss[float(c)] += float((w * nll).sum()) / n_splits
    best = min(loss, key=lambda c: (loss[c], -c))  # ties: the stronger regularisation
    return best, loss


def cell_classifier_readout(
    X: Any,
    cell_well: Any,
    wells: Any,
    is_pos: Any,
    is_neg: Any,
    *,
    C: float | str = "cv",
    Cs: tuple[float, ...] = DEFAULT_CS,
    folds: int = 5,
    aggregate: str = "probability",
    seed: int = 0,
    max_iter: int = 1000,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read every well as the mean over its cells of a classifier trained on the control wells' cells.

    A class-balanced L2 logistic regression (features standardised on its training cells) learns positive-
    from negative-control **cells**; a well's readout is the mean over its cells of ``P(positive)``
    (``aggregate="probability"``: the share of cells that respond, in ``[0, 1]``) or of the logit
    (``"logit"``). Nothing about the biology is given: only which wells are controls. A **control well is
    scored by a model fitted without its cells** (one fit per control well), so Z' on this readout is not
    inflated by the classifier having seen the well; sample wells use the model fitted on all controls.

    With ``C="cv"`` the regularisation is chosen once, from ``Cs``, by the cell-level log loss under
    stratified cross-validation grouped by well over all control wells (never by Z' or dose); that single
    number is then used in every fit.

    Args:
        X: ``[M, D]`` per-cell features (finite).
        cell_well: ``[M]`` the well of each cell (any hashable ids matching ``wells``).
        wells: ``[W]`` distinct well ids: the order of the readout.
        is_pos: ``[W]`` boolean mask of the positive control wells (at least 2).
        is_neg: ``[W]`` boolean mask of the negative control wells (at least 2, disjoint from ``is_pos``).
        C: Inverse L2 strength, or ``"cv"`` to choose it from ``Cs``.
        Cs: Candidates for ``C="cv"``.
        folds: Folds of that cross-validation (fewer when there are fewer wells of a class).
        aggregate: ``"probability"`` or ``"logit"``.
        seed: Seed of the fold assignment.
        max_iter: lbfgs iterations per fit.

    Returns:
        ``(readout [W] float64, info)``; ``info`` holds ``C``, ``cv_log_loss`` (``{C: loss}`` when chosen by
        CV), ``fits``, ``cells_per_well`` (``[W]``) and ``aggregate``.

    Raises:
        ValueError: On shapes that disagree, non-finite features, masks that are not boolean, overlap or
            hold fewer than 2 wells, duplicate well ids, a well without cells or cells of an unknown well,
            an unknown ``aggregate`` or a ``C`` that is neither positive nor ``"cv"``.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"expected X to be [M, D] (one row per cell), found shape {X.shape}")
    if not np.all(np.isfinite(X)):
        n_bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise ValueError(f"expected finite cell features, found NaN/inf in {n_bad} cell(s)")
    cw = np.asarray(cell_well, dtype=object)
    if cw.shape != (X.shape[0],):
        raise ValueError(f"expected cell_well to be [M]={X.shape[0]} well ids, found shape {cw.shape}")
    w = np.asarray(wells, dtype=object)
    if w.ndim != 1 or len(set(w.tolist())) != len(w):
        raise ValueError("expected wells to be a 1-D array of distinct well ids")
    masks = []
    for m, name in ((is_pos, "is_pos"), (is_neg, "is_neg")):
        arr = np.asarray(m)
        if arr.shape != w.shape or arr.dtype != bool:
            raise ValueError(f"expected {name} to be a [W]={len(w)} boolean mask, found {arr.dtype} {arr.shape}")
        masks.append(arr)
    pos, neg = masks
    if (pos & neg).any():
        raise ValueError(f"wells {w[pos & neg][:10].tolist()} are marked both positive and negative control")
    if pos.sum() < 2 or neg.sum() < 2:
        raise ValueError(
            f"expected at least 2 positive and 2 negative control wells (each control well is scored by a model "
            f"fitted without it), found {int(pos.sum())} positive and {int(neg.sum())} negative"
        )
    if aggregate not in ("probability", "logit"):
        raise ValueError(f"expected aggregate 'probability' or 'logit', found {aggregate!r}")
    if not (C == "cv" or (isinstance(C, (int, float)) and not isinstance(C, bool) and C > 0)):
        raise ValueError(f"expected C to be a positive number or 'cv', found {C!r}")
    index = {well: i for i, well in enumerate(w.tolist())}
    unknown = sorted({str(x) for x in cw.tolist() if x not in index})
    if unknown:
        raise ValueError(f"{len(unknown)} well id(s) of cell_well are not in wells, e.g. {unknown[:5]}")
    code = np.fromiter((index[x] for x in cw.tolist()), dtype=np.int64, count=len(cw))
    counts = np.bincount(code, minlength=len(w))
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} well(s) have no cells, e.g. {w[counts == 0][:5].tolist()}")

    ctrl_cell = (pos | neg)[code]
    y_cell = pos[code].astype(np.int64)
    info: dict[str, Any] = {"aggregate": aggregate, "cells_per_well": counts.tolist()}
    if C == "cv":
        C, info["cv_log_loss"] = _choose_c(
            X[ctrl_cell], y_cell[ctrl_cell], code[ctrl_cell], tuple(Cs), folds, seed, max_iter
        )
    info["C"] = float(C)

    def well_value(z: np.ndarray) -> float:
        return float((1.0 / (1.0 + np.exp(-z))).mean() if aggregate == "probability" else z.mean())

    readout = np.empty(len(w), dtype=np.float64)
    full = _fit_cells(X[ctrl_cell], y_cell[ctrl_cell], float(C), max_iter)
    for i in np.flatnonzero(~(pos | neg)):
        readout[i] = well_value(_logit(full, X[code == i]))
    for i in np.flatnonzero(pos | neg):
        train = ctrl_cell & (code != i)
        readout[i] = well_value(_logit(_fit_cells(X[train], y_cell[train], float(C), max_iter), X[code == i]))
    info["fits"] = 1 + int((pos | neg).sum())
    return readout, info
