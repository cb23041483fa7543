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


@pytest.mark.parametrize("seed", range(6))
def test_equals_copairs(seed) -> None:
    """Our AP (kept for speed, see map.py) equals copairs' on generated tables; the mAP is copairs'."""
    import tempfile

    import copairs.map as copairs_map

    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 90))
    meta = pd.DataFrame(
        {
            "Metadata_moa": rng.choice(list("ABCDE")[: int(rng.integers(2, 6))], n),
            "Metadata_Compound": rng.choice([f"c{i}" for i in range(int(rng.integers(3, 25)))], n),
            "Metadata_Plate": rng.choice(["p1", "p2", "p3"], n),
        }
    ).sample(frac=1.0, random_state=seed)  # shuffled index
    X = rng.normal(size=(n, int(rng.integers(2, 40)))).astype(rng.choice([np.float32, np.float64]))
    rules = RULES if seed % 2 else {**RULES, "neg_sameby": []}
    ours = average_precision(meta, X, **rules)
    ref = copairs_map.average_precision(meta, X, progress_bar=False, **rules)
    for col in ("average_precision", "normalized_average_precision"):
        np.testing.assert_allclose(ours[col], ref[col], rtol=1e-5, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(ours["n_pos_pairs"], ref["n_pos_pairs"])
    np.testing.assert_array_equal(ours["n_total_pairs"], ref["n_total_pairs"])
    got = mean_average_precision(ours, sameby=["Metadata_moa"], null_size=300, seed=seed)
    with tempfile.TemporaryDirectory() as cache:
        want = copairs_map.mean_average_precision(
            ours, sameby=["Metadata_moa"], null_size=300, threshold=0.05, seed=seed, progress_bar=False, cache_dir=cache
        ).sort_values("Metadata_moa")
    for col in ("mean_average_precision", "p_value", "corrected_p_value", "below_corrected_p"):
        np.testing.assert_array_equal(got[col].to_numpy(), want[col].to_numpy())
    assert got["n_profiles"].tolist() == want["indices"].map(len).tolist()


def test_mean_average_precision_does_not_depend_on_earlier_runs(profiles, monkeypatch, tmp_path) -> None:
    """copairs' default cache (~/.copairs) would hand a later run nulls drawn with an earlier run's seeds."""
    meta, X = profiles
    ap = average_precision(meta, X, **RULES)
    monkeypatch.setenv("HOME", str(tmp_path / "fresh"))
    fresh = mean_average_precision(ap, sameby=["Metadata_moa"], null_size=200, seed=3)
    monkeypatch.setenv("HOME", str(tmp_path / "used"))
    # an earlier run on a subset: other (n_pos, n_total) configurations, so other per-configuration seeds
    mean_average_precision(ap.iloc[::2].reset_index(drop=True), sameby=["Metadata_moa"], null_size=200, seed=3)
    later = mean_average_precision(ap, sameby=["Metadata_moa"], null_size=200, seed=3)
    pd.testing.assert_frame_equal(fresh, later)
    assert not list(tmp_path.rglob(".copairs"))
