"""mAP: average precision vs a brute-force ranking, pair rules, nulls, p-values, BH, fraction retrieved."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import false_discovery_control

from msnoop.evaluate.map import (
    average_precision,
    benjamini_hochberg,
    fraction_retrieved,
    mean_average_precision,
    null_distribution,
    ranked_average_precision,
    retrieval_summary,
)

RULES = {
    "pos_sameby": ["Metadata_moa"],
    "pos_diffby": ["Metadata_Compound"],
    "neg_sameby": ["Metadata_Plate"],
    "neg_diffby": ["Metadata_moa"],
}


@pytest.fixture
def profiles() -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 70
    meta = pd.DataFrame(
        {
            "Metadata_moa": rng.choice(["A", "B", "C", "D"], n),
            "Metadata_Compound": rng.choice([f"c{i}" for i in range(20)], n),
            "Metadata_Plate": rng.choice(["p1", "p2"], n).astype(object),
        }
    )
    meta.loc[4, "Metadata_Plate"] = None  # missing: never "same" nor "different"
    X = rng.normal(size=(n, 6))
    X[:, 0] += meta["Metadata_moa"].map({"A": 2.0, "B": 0.0, "C": -2.0, "D": 0.5}).to_numpy()
    # exact similarity ties between a positive (row 7) and a negative (row 8) of every moa-A, plate-p1 query
    meta.loc[7, ["Metadata_moa", "Metadata_Compound", "Metadata_Plate"]] = ["A", "c0", "p1"]
    meta.loc[8, ["Metadata_moa", "Metadata_Compound", "Metadata_Plate"]] = ["B", "c1", "p1"]
    X[7] = X[8]
    return meta, X


def _same(a, b) -> bool:
    return a is not None and b is not None and a == b


def _diff(a, b) -> bool:
    return a is not None and b is not None and a != b


def _brute_force_ap(meta: pd.DataFrame, X: np.ndarray, rules: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Explicit pair lists and a full ranking per row (positives first on exact ties)."""
    recs = meta.astype(object).where(meta.notna(), None).to_dict("records")
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    ap, npos, ntot = [], [], []
    for i, ri in enumerate(recs):
        ranked = []
        for j, rj in enumerate(recs):
            if i == j:
                continue
            sim = float(Xn[i] @ Xn[j])
            if all(_same(ri[c], rj[c]) for c in rules["pos_sameby"]) and all(
                _diff(ri[c], rj[c]) for c in rules["pos_diffby"]
            ):
                ranked.append((sim, 1))
            if all(_same(ri[c], rj[c]) for c in rules["neg_sameby"]) and all(
                _diff(ri[c], rj[c]) for c in rules["neg_diffby"]
            ):
                ranked.append((sim, 0))
        ranked.sort(key=lambda t: (-t[0], -t[1]))
        hits, precisions = 0, []
        for rank, (_, rel) in enumerate(ranked, start=1):
            if rel:
                hits += 1
                precisions.append(hits / rank)
        npos.append(hits)
        ntot.append(len(ranked))
        ap.append(np.mean(precisions) if precisions else np.nan)
    return np.array(ap), np.array(npos), np.array(ntot)


def test_average_precision_equals_brute_force(profiles) -> None:
    meta, X = profiles
    res = average_precision(meta, X, **RULES)
    ap, npos, ntot = _brute_force_ap(meta, X, RULES)
    np.testing.assert_array_equal(res["n_pos_pairs"].to_numpy(), npos)
    np.testing.assert_array_equal(res["n_total_pairs"].to_numpy(), ntot)
    np.testing.assert_allclose(res["average_precision"].to_numpy(), ap, rtol=1e-12, equal_nan=True)
    assert res.loc[4, "n_total_pairs"] == res.loc[4, "n_pos_pairs"]  # missing plate: no negatives
    assert list(res.columns[:3]) == list(meta.columns)


def test_block_size_does_not_change_results(profiles) -> None:
    meta, X = profiles
    a = average_precision(meta, X, **RULES)
    b = average_precision(meta, X, block_size=7, **RULES)
    pd.testing.assert_frame_equal(a, b)


def test_ranked_ap_ties_rank_positives_first() -> None:
    assert ranked_average_precision([0.5], [0.5, 0.9]) == pytest.approx(1 / 2)
    assert ranked_average_precision([0.9, 0.1], [0.5]) == pytest.approx((1 + 2 / 3) / 2)


def test_null_distribution_matches_expected_ap() -> None:
    m, total = 3, 12
    null = null_distribution(m, total, 20000, seed=1)
    n = total
    h = sum(1 / k for k in range(1, n + 1))
    expected = (1 / n) * ((m - 1) / (n - 1) * (n - h) + h)  # E[AP] under random ranking
    assert null.dtype == np.float32 and null.mean() == pytest.approx(expected, abs=5e-3)
    np.testing.assert_array_equal(null_distribution(m, total, 100, 5), null_distribution(m, total, 100, 5))
    assert (null_distribution(4, 4, 10, 0) == 1.0).all()


def test_mean_average_precision_p_values_from_documented_nulls(profiles) -> None:
    meta, X = profiles
    ap = average_precision(meta, X, **RULES)
    out = mean_average_precision(ap, sameby=["Metadata_moa"], null_size=500, seed=3)
    valid = ap[ap["average_precision"].notna() & (ap["n_pos_pairs"] > 0)].reset_index(drop=True)
    confs = sorted({(int(a), int(b)) for a, b in valid[["n_pos_pairs", "n_total_pairs"]].to_numpy()})
    seeds = np.random.default_rng(3).integers(8096, size=len(confs))
    nulls = {c: null_distribution(c[0], c[1], 500, int(s)) for c, s in zip(confs, seeds, strict=True)}
    for _, row in out.iterrows():
        grp = valid[valid["Metadata_moa"] == row["Metadata_moa"]]
        score = grp["average_precision"].mean()
        null = np.mean([nulls[(int(a), int(b))] for a, b in grp[["n_pos_pairs", "n_total_pairs"]].to_numpy()], axis=0)
        assert row["mean_average_precision"] == pytest.approx(score)
        assert row["p_value"] == pytest.approx((np.sum(null > score) + 1) / 501)
    np.testing.assert_allclose(out["corrected_p_value"], false_discovery_control(out["p_value"], method="bh"))
    # A and C are strongly separated on feature 0: retrieved; fraction = share of significant groups
    assert out.set_index("Metadata_moa").loc[["A", "C"], "below_corrected_p"].all()
    assert fraction_retrieved(out) == pytest.approx(out["below_corrected_p"].mean())
    summary = retrieval_summary(ap, out)
    assert summary["n_groups"] == 4 and set(summary["per_group"]) == {"A", "B", "C", "D"}


def test_benjamini_hochberg_matches_scipy() -> None:
    p = np.random.default_rng(0).uniform(size=50) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), false_discovery_control(p, method="bh"))
    assert benjamini_hochberg([]).size == 0


def test_rule_errors(profiles) -> None:
    meta, X = profiles
    with pytest.raises(ValueError, match="disjoint"):
        average_precision(
            meta, X, pos_sameby=["Metadata_moa"], pos_diffby=["Metadata_moa"], neg_diffby=["Metadata_moa"]
        )
    with pytest.raises(ValueError, match="Metadata_Target"):
        average_precision(meta, X, pos_sameby=["Metadata_Target"], neg_diffby=["Metadata_moa"])
    with pytest.raises(ValueError, match="no positive pairs"):
        average_precision(
            meta.assign(Metadata_u=np.arange(len(meta))), X, pos_sameby=["Metadata_u"], neg_diffby=["Metadata_moa"]
        )
    with pytest.raises(ValueError, match=r"\[70, D\]"):
        average_precision(meta, X[:-1], **RULES)


def test_equals_copairs_when_installed(profiles) -> None:
    copairs_map = pytest.importorskip("copairs.map")
    meta, X = profiles
    meta = meta.fillna("p1")  # copairs rejects missing metadata
    ours = average_precision(meta, X, **RULES)
    ref = copairs_map.average_precision(meta, X, progress_bar=False, **RULES)
    np.testing.assert_allclose(ours["average_precision"], ref["average_precision"], rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(ours["n_total_pairs"], ref["n_total_pairs"])
