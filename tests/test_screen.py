"""Screen readouts: Z', leave-one-out control-axis readout, per-cell classifier readout, dose-response rho, errors."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from msnoop.screen.readout import cell_classifier_readout, control_axis_readout, dose_response, z_prime


def test_z_prime_hand_computed():
    # pos: mean 10, sample std 1; neg: mean 0, sample std 1  ->  1 - 3 * 2 / 10 = 0.4
    pos = [9.0, 10.0, 11.0]
    neg = [-1.0, 0.0, 1.0]
    assert z_prime(pos, neg) == pytest.approx(0.4)
    assert z_prime(neg, pos) == pytest.approx(0.4)  # symmetric
    assert z_prime(-np.array(pos) * 5, -np.array(neg) * 5) == pytest.approx(0.4)  # sign and scale invariant
    # population std (ddof=0): std = sqrt(2/3) each
    assert z_prime(pos, neg, ddof=0) == pytest.approx(1 - 3 * 2 * np.sqrt(2 / 3) / 10)
    # overlapping bands give a negative Z'
    assert z_prime([1.0, 2.0, 3.0], [0.0, 1.0, 2.0]) == pytest.approx(1 - 3 * 2 / 1)


def test_z_prime_errors():
    with pytest.raises(ValueError, match="at least 2 positive"):
        z_prime([1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="same mean"):
        z_prime([0.0, 2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="finite"):
        z_prime([np.nan, 1.0], [0.0, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        z_prime(np.ones((2, 2)), [0.0, 1.0])


def test_readout_scale_and_samples():
    neg = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    pos = np.array([[2.0, 0.0], [2.0, 0.0]])
    samples = np.array([[1.0, 5.0], [3.0, -1.0]])
    X = np.vstack([neg, pos, samples])
    is_neg = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    is_pos = np.array([0, 0, 0, 1, 1, 0, 0], bool)
    r = control_axis_readout(X, is_pos, is_neg)
    assert r.shape == (7,)
    # samples: projection onto (2, 0) from the negative mean, in units of the control distance
    np.testing.assert_allclose(r[5:], [0.5, 1.5])
    np.testing.assert_allclose(r[:5], [0, 0, 0, 1, 1])


def test_readout_leaves_the_control_well_out():
    # two positive controls in orthogonal directions: with its own vector in the axis a positive control
    # would score (p . (p1 + p2) / 2) / |(p1 + p2) / 2|^2 = 1; left out, the axis is the other positive
    # control alone, orthogonal to it, so it scores 0
    neg = np.zeros((3, 2))
    p1, p2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    X = np.vstack([neg, p1, p2, [[1.0, 1.0]]])
    is_neg = np.array([1, 1, 1, 0, 0, 0], bool)
    is_pos = np.array([0, 0, 0, 1, 1, 0], bool)
    r = control_axis_readout(X, is_pos, is_neg)
    np.testing.assert_allclose(r[3:5], [0.0, 0.0], atol=1e-12)
    # a sample well uses both positive controls: axis (0.5, 0.5), (1, 1) . a / |a|^2 = 1 / 0.5 = 2
    assert r[5] == pytest.approx(2.0)

    # negative controls: a negative well is scored against the mean of the other negatives only
    Xn = np.array([[0.0, 0.0], [1.0, 0.0], [6.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    is_neg = np.array([1, 1, 1, 0, 0], bool)
    is_pos = np.array([0, 0, 0, 1, 1], bool)
    r = control_axis_readout(Xn, is_pos, is_neg)
    # well 2 left out: mu_n = (0.5, 0), axis (1.5, 0): (6 - 0.5) * 1.5 / 2.25 = 11/3
    assert r[2] == pytest.approx(11 / 3)
    # in-sample it would be mu_n = (7/3, 0), axis (-1/3, 0): (6 - 7/3) * (-1/3) / (1/9) = -11
    in_sample = (6 - 7 / 3) * (-1 / 3) / (1 / 9)
    assert in_sample == pytest.approx(-11.0) and r[2] != pytest.approx(in_sample)
    # well 0 left out: mu_n = (3.5, 0), axis (-1.5, 0): (0 - 3.5) * -1.5 / 2.25 = 7/3
    assert r[0] == pytest.approx(7 / 3)


def test_readout_scalar_feature_and_errors():
    x = np.array([0.0, 1.0, 10.0, 11.0, 5.0])
    is_neg = np.array([1, 1, 0, 0, 0], bool)
    is_pos = np.array([0, 0, 1, 1, 0], bool)
    r = control_axis_readout(x, is_pos, is_neg)  # 1-D input = one feature
    # well 0: mu_n = 1, mu_p = 10.5 -> (0 - 1) / 9.5
    assert r[0] == pytest.approx(-1 / 9.5)
    assert r[4] == pytest.approx((5 - 0.5) / 10)
    with pytest.raises(ValueError, match="at least 2 positive and 2 negative"):
        control_axis_readout(x, np.zeros(5, bool), is_neg)
    with pytest.raises(ValueError, match="at least 2 positive and 2 negative"):
        control_axis_readout(x, np.array([0, 0, 1, 0, 0], bool), is_neg)
    with pytest.raises(ValueError, match="both positive and negative"):
        control_axis_readout(x, np.array([1, 0, 1, 1, 0], bool), is_neg)
    with pytest.raises(ValueError, match="boolean"):
        control_axis_readout(x, is_pos.astype(int), is_neg)
    with pytest.raises(ValueError, match="mask"):
        control_axis_readout(x, is_pos[:4], is_neg)
    with pytest.raises(ValueError, match="finite"):
        control_axis_readout(np.array([0.0, np.nan, 1, 1, 0]), is_pos, is_neg)
    with pytest.raises(ValueError, match="zero length"):
        control_axis_readout(np.ones((5, 3)), is_pos, is_neg)


def test_dose_response_monotone_series():
    dose = np.tile(np.arange(1, 10), 4).astype(float)
    series = np.repeat(["A-D", "E-H"], 18)
    rng = np.random.default_rng(0)
    readout = np.where(series == "A-D", np.exp(dose), -(dose**3))  # monotone up / down
    rho = dose_response(readout, dose, series)
    assert list(rho) == ["A-D", "E-H"]
    assert rho["A-D"] == pytest.approx(1.0)
    assert rho["E-H"] == pytest.approx(-1.0)
    noisy = dose + rng.normal(scale=2.0, size=dose.size)
    rho = dose_response(noisy, dose, series)
    for s in ("A-D", "E-H"):
        m = series == s
        assert rho[s] == pytest.approx(spearmanr(noisy[m], dose[m]).statistic)
        assert 0 < rho[s] < 1


def test_dose_response_errors_and_constant(caplog):
    dose = np.array([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="same length"):
        dose_response([1.0, 2.0, 3.0], dose, ["a"] * 4)
    with pytest.raises(ValueError, match="at least 3"):
        dose_response([1.0, 2.0, 3.0, 4.0], dose, ["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="single dose"):
        dose_response([1.0, 2.0, 3.0, 4.0], [1.0] * 4, ["a"] * 4)
    with pytest.raises(ValueError, match="finite"):
        dose_response([1.0, np.inf, 3.0, 4.0], dose, ["a"] * 4)
    rho = dose_response([1.0, 1.0, 1.0, 1.0], dose, ["a"] * 4)
    assert np.isnan(rho["a"])


def _cell_plate(rng, fractions, n_pos=4, n_neg=6, cells=40, dim=8, shift=3.0):
    """Cells of negative wells, positive wells and sample wells where ``fractions`` of the cells respond."""
    wells, pos, neg, X, cw = [], [], [], [], []
    share = [0.0] * n_neg + [1.0] * n_pos + list(fractions)
    for i, f in enumerate(share):
        wells.append(f"w{i}")
        pos.append(n_neg <= i < n_neg + n_pos)
        neg.append(i < n_neg)
        x = rng.normal(size=(cells, dim))
        x[: int(round(f * cells)), :2] += shift  # responding cells move along two of the features
        X.append(x)
        cw += [f"w{i}"] * cells
    return np.vstack(X), np.array(cw), np.array(wells), np.array(pos), np.array(neg)


def test_cell_classifier_reads_the_share_of_responding_cells():
    fractions = [0.0, 0.25, 0.5, 0.75, 1.0]
    X, cw, wells, pos, neg = _cell_plate(np.random.default_rng(0), fractions)
    r, info = cell_classifier_readout(X, cw, wells, pos, neg)
    samples = r[~(pos | neg)]
    # well separated cells: the mean probability is close to the share of responding cells
    np.testing.assert_allclose(samples, fractions, atol=0.08)
    assert r[pos].min() > 0.9 and r[neg].max() < 0.1
    assert z_prime(r[pos], r[neg]) > 0.7
    assert set(info["cv_log_loss"]) == {1e-3, 1e-2, 1e-1, 1.0, 10.0}
    assert info["C"] == min(info["cv_log_loss"], key=info["cv_log_loss"].get)
    assert info["fits"] == 1 + 10 and info["cells_per_well"] == [40] * 15
    # the logit readout ranks the sample wells the same way; a fixed C is used as given
    r_logit, info_logit = cell_classifier_readout(X, cw, wells, pos, neg, C=0.5, aggregate="logit")
    assert spearmanr(r_logit[~(pos | neg)], fractions).statistic == pytest.approx(1.0)
    assert info_logit["C"] == 0.5 and "cv_log_loss" not in info_logit


def test_cell_classifier_scores_control_wells_out_of_fit():
    # many features, few cells, weak regularisation: a classifier that has seen a well memorises its cells.
    # The last positive control holds cells that look like the negatives (a failed well): scored by a model
    # fitted without it, it reads as negative; a model fitted with it would call its cells positive.
    rng = np.random.default_rng(1)
    X, cw, wells, pos, neg = _cell_plate(rng, [], n_pos=4, n_neg=4, cells=10, dim=60, shift=6.0)
    failed = cw == wells[pos][-1]
    X[failed] = rng.normal(size=(int(failed.sum()), 60))
    r, _ = cell_classifier_readout(X, cw, wells, pos, neg, C=100.0)
    assert r[np.flatnonzero(pos)[-1]] < 0.3
    assert r[np.flatnonzero(pos)[:-1]].mean() > 0.7

    from msnoop.screen.readout import _fit_cells, _logit

    control = np.isin(cw, wells[pos | neg])
    in_fit = _fit_cells(X[control], np.isin(cw, wells[pos])[control].astype(int), 100.0, 1000)
    assert (1 / (1 + np.exp(-_logit(in_fit, X[failed])))).mean() > 0.7  # what leaving it out prevents


def test_cell_classifier_errors():
    X, cw, wells, pos, neg = _cell_plate(np.random.default_rng(2), [0.5], cells=5, dim=3)
    with pytest.raises(ValueError, match="no cells"):
        cell_classifier_readout(X, cw, np.append(wells, "empty"), np.append(pos, False), np.append(neg, False))
    with pytest.raises(ValueError, match="not in wells"):
        cell_classifier_readout(X, np.where(cw == "w0", "zz", cw), wells, pos, neg)
    with pytest.raises(ValueError, match="boolean mask"):
        cell_classifier_readout(X, cw, wells, pos.astype(int), neg)
    with pytest.raises(ValueError, match="both positive and negative"):
        cell_classifier_readout(X, cw, wells, pos | neg, neg)
    only_one = pos & (np.cumsum(pos) == 1)
    with pytest.raises(ValueError, match="at least 2 positive"):
        cell_classifier_readout(X, cw, wells, only_one, neg)
    with pytest.raises(ValueError, match="aggregate"):
        cell_classifier_readout(X, cw, wells, pos, neg, aggregate="median")
    with pytest.raises(ValueError, match="C to be a positive number"):
        cell_classifier_readout(X, cw, wells, pos, neg, C=0)
    with pytest.raises(ValueError, match="distinct"):
        cell_classifier_readout(X, cw, np.append(wells, "w0"), np.append(pos, False), np.append(neg, False))
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN/inf in 1 cell"):
        cell_classifier_readout(bad, cw, wells, pos, neg)
    with pytest.raises(ValueError, match=r"\[M\]"):
        cell_classifier_readout(X, cw[:-1], wells, pos, neg)
