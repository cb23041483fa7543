"""kNN classification: Microsnoop's vote, protocols vs scikit-learn, duplicates, metrics, command."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import typer
from sklearn.metrics import balanced_accuracy_score, f1_score, matthews_corrcoef
from sklearn.model_selection import LeaveOneOut, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from typer.testing import CliRunner

from msnoop.cli.evaluate import knn_command
from msnoop.evaluate.knn import (
    _loo_neighbors,
    choose_index,
    classification_metrics,
    knn_cross_predict,
    knn_evaluate,
    knn_search,
    microsnoop_vote,
    parse_cv,
)


def _blobs(n_per: int = 40, n_classes: int = 3, d: int = 8, seed: int = 0, spread: float = 1.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, d)) * spread
    y = np.repeat(np.arange(n_classes), n_per)
    X = centres[y] + rng.normal(size=(len(y), d))
    labels = np.array([f"class_{c}" for c in y])
    return X.astype(np.float32), labels


def _sk_loo(X, y, k, metric):
    sk_metric = "cosine" if metric == "cosine" else "euclidean"
    pred = np.empty(len(y), dtype=y.dtype)
    for train, test in LeaveOneOut().split(X):
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric=sk_metric).fit(X[train], y[train])
        pred[test] = clf.predict(X[test])
    return pred


def test_vote_rule() -> None:
    # all distinct -> nearest neighbour (sklearn's majority vote would pick the smallest, 0)
    assert microsnoop_vote(np.array([[2, 1, 0]])).tolist() == [2]
    # a repeated label wins even if it is not the nearest
    assert microsnoop_vote(np.array([[0, 1, 1]])).tolist() == [1]
    # tie between most common labels -> smallest label (scipy.stats.mode), not the nearest
    assert microsnoop_vote(np.array([[2, 0, 2, 0, 1]])).tolist() == [0]
    # k = 1 -> the neighbour
    assert microsnoop_vote(np.array([[4], [1]]), n_classes=5).tolist() == [4, 1]


def test_vote_differs_from_sklearn_majority_where_documented() -> None:
    # query at the origin; neighbours at increasing distance with labels b, c, a (all distinct)
    X = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], dtype=np.float32)
    y = np.array(["b", "c", "a"])
    q = np.array([[0.0, 0.0]], dtype=np.float32)
    sk = KNeighborsClassifier(n_neighbors=3, algorithm="brute").fit(X, y).predict(q)
    _, idx = knn_search(X, q, 3, metric="l2")
    ours = microsnoop_vote(np.searchsorted(np.unique(y), y)[idx])
    assert sk.tolist() == ["a"] and np.unique(y)[ours].tolist() == ["b"]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_loo_k1_equals_sklearn(metric: str) -> None:
    X, y = _blobs(spread=0.8)
    ours = knn_cross_predict(X, y, k=1, cv="loo", metric=metric)
    np.testing.assert_array_equal(ours, _sk_loo(X, y, 1, metric))
    assert (ours != y).any()  # the fixture is not trivially separable


def test_loo_binary_odd_k_equals_sklearn() -> None:
    # two classes and odd k: some label always repeats, so mode == sklearn's majority vote
    X, y = _blobs(n_per=50, n_classes=2, spread=0.6, seed=3)
    ours = knn_cross_predict(X, y, k=5, cv="loo", metric="cosine")
    np.testing.assert_array_equal(ours, _sk_loo(X, y, 5, "cosine"))
    assert 0.5 < (ours == y).mean() < 1.0


def test_loo_drops_the_query_itself_among_exact_duplicates() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4)).astype(np.float32)
    y = np.array(["u"] * 30)
    X[10] = X[11] = X[12] = np.array([50.0, 50.0, 50.0, 50.0])  # three identical far-away rows
    y[10], y[11], y[12] = "a", "b", "c"
    pred = knn_cross_predict(X, y, k=1, cv="loo", metric="l2")
    # each copy must vote with a twin, never with itself
    assert pred[10] in ("b", "c") and pred[11] in ("a", "c") and pred[12] in ("a", "b")
    pred2 = knn_cross_predict(X, y, k=2, cv="loo", metric="l2")
    # the two twins carry distinct labels -> nearest twin's label, never the query's own
    assert all(pred2[i] != y[i] for i in (10, 11, 12))


@pytest.mark.parametrize("index", ["exact", "ivf"])
def test_loo_neighbours_of_a_sample_equal_those_rows_of_the_full_search(index: str) -> None:
    X, _ = _blobs(n_per=300, n_classes=4, seed=3)
    X[7] = X[8]  # a duplicate pair: the query itself must still be the row left out
    rows = np.array([8, 7, 0, 599, 1199])
    full = _loo_neighbors(X, 5, "cosine", index)
    sample = _loo_neighbors(X, 5, "cosine", index, rows=rows)
    np.testing.assert_array_equal(sample, full[rows])
    assert all(r not in nb for r, nb in zip(rows, sample, strict=True))


def test_kfold_equals_sklearn_on_the_same_splits() -> None:
    X, y = _blobs(spread=0.8, seed=1)
    ours = knn_cross_predict(X, y, k=1, cv="kfold:5", metric="cosine", seed=7)
    expected = np.empty_like(y)
    for train, test in StratifiedKFold(5, shuffle=True, random_state=7).split(X, y):
        clf = KNeighborsClassifier(n_neighbors=1, algorithm="brute", metric="cosine").fit(X[train], y[train])
        expected[test] = clf.predict(X[test])
    np.testing.assert_array_equal(ours, expected)


def test_group_out_never_uses_a_neighbour_of_the_same_group() -> None:
    rng = np.random.default_rng(2)
    X, y = _blobs(n_per=30, n_classes=2, spread=0.5, seed=2)
    groups = rng.integers(0, 4, len(y))
    X = X + np.eye(X.shape[1], dtype=np.float32)[groups] * 6.0  # strong group effect: same-group rows are nearest
    ours = knn_cross_predict(X, y, k=3, cv="group:field", groups=groups, metric="l2")
    expected = np.empty_like(y)
    for g in np.unique(groups):
        test = groups == g
        clf = KNeighborsClassifier(n_neighbors=3, algorithm="brute").fit(X[~test], y[~test])
        expected[test] = clf.predict(X[test])
    np.testing.assert_array_equal(ours, expected)
    assert not np.array_equal(ours, knn_cross_predict(X, y, k=3, cv="loo", metric="l2"))


def test_metrics_match_sklearn_and_are_json() -> None:
    X, y = _blobs(spread=0.7, seed=4)
    res = knn_evaluate(X, y, k=11, cv="loo", metric="cosine")
    pred = knn_cross_predict(X, y, k=11, cv="loo", metric="cosine")
    assert res["accuracy"] == pytest.approx((pred == y).mean())
    assert res["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert res["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert res["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    cm = np.array(res["confusion_matrix"])
    assert cm.sum() == len(y) and res["labels"] == ["class_0", "class_1", "class_2"]
    for i, lab in enumerate(res["labels"]):
        assert res["per_class_accuracy"][lab] == pytest.approx(cm[i, i] / cm[i].sum())
    assert res["k"] == 11 and res["n_classes"] == 3 and res["chance"] == pytest.approx(1 / 3)
    json.dumps(res)


def test_metrics_with_unpredicted_class_do_not_warn() -> None:
    res = classification_metrics(["a", "a", "b", "c"], ["a", "a", "a", "a"])
    assert res["per_class_accuracy"] == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert res["macro_f1"] == pytest.approx((2 * 0.5 * 1 / 1.5) / 3)


def test_bad_arguments() -> None:
    X, y = _blobs(n_per=5)
    with pytest.raises(ValueError, match="'loo', 'kfold:<n>'"):
        parse_cv("holdout")
    with pytest.raises(ValueError, match="n >= 2"):
        parse_cv("kfold:1")
    with pytest.raises(ValueError, match="needs groups"):
        knn_cross_predict(X, y, k=1, cv="group:plate")
    with pytest.raises(ValueError, match="at least 16 rows"):
        knn_cross_predict(X, y, k=15, cv="loo")
    with pytest.raises(ValueError, match="one label per row"):
        knn_cross_predict(X, y[:-1], k=1)
    with pytest.raises(ValueError, match="metric"):
        knn_cross_predict(X, y, k=1, metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing labels"):
        knn_cross_predict(X, np.array([None] * len(y), dtype=object), k=1)


def test_knn_command_prints_and_writes_json(tmp_path) -> None:
    X, y = _blobs(n_per=20, spread=2.0)
    df = pd.DataFrame(X, columns=[f"emb_{i:04d}" for i in range(X.shape[1])])
    df.insert(0, "Metadata_Label", y)
    df.insert(1, "Metadata_Field", np.arange(len(y)) % 3)
    path = tmp_path / "emb.parquet"
    df.to_parquet(path)
    app = typer.Typer()
    app.command()(knn_command)
    out = tmp_path / "m.json"
    res = CliRunner().invoke(
        app, [str(path), "--label", "Metadata_Label", "-k", "3", "--cv", "group:Metadata_Field", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "balanced accuracy" in res.output and "class_2" in res.output
    data = json.loads(out.read_text())
    assert data["cv"] == "group:Metadata_Field" and data["n"] == 60 and data["n_features"] == 8
    bad = CliRunner().invoke(app, [str(path), "--label", "Metadata_Nope"])
    assert bad.exit_code == 2 and "Metadata_Nope" in bad.output


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ivf_probing_every_list_is_exact(metric: str) -> None:
    X, _ = _blobs(n_per=60, n_classes=8, spread=0.8, seed=5)
    es, ei = knn_search(X, X[:40], 7, metric=metric, index="exact")
    s, i = knn_search(X, X[:40], 7, metric=metric, index="ivf", nlist=6, nprobe=6)
    np.testing.assert_array_equal(i, ei)
    np.testing.assert_allclose(s, es, rtol=1e-4, atol=1e-3)


def test_ivf_loo_close_to_exact_and_auto_chooses_by_size() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16))
    y = rng.integers(0, 20, 6000)
    X = ((centres[y] + 0.4 * rng.normal(size=(6000, 16))) @ rng.normal(size=(16, 64))).astype(np.float32)
    _, exact = knn_search(X, X[:300], 11, index="exact")
    _, approx = knn_search(X, X[:300], 11, index="ivf")  # default sizes: 153 lists, 8 probed
    recall = np.mean([len(set(a) & set(b)) / 11 for a, b in zip(approx, exact, strict=True)])
    assert 0.9 <= recall <= 1.0
    assert knn_evaluate(X, y, k=11, cv="loo", index="ivf")["accuracy"] == pytest.approx(
        knn_evaluate(X, y, k=11, cv="loo", index="exact")["accuracy"], abs=0.02
    )
    assert choose_index(6000, 6000, 64) == "exact"
    assert choose_index(100_000, 100_000, 768) == "ivf"
    with pytest.raises(ValueError, match="index"):
        choose_index(10, 10, 4, "hnsw")


def test_ivf_fills_short_lists_with_exact_search() -> None:
    X, _ = _blobs(n_per=10, n_classes=4, spread=0.5, seed=2)
    # 40 rows in 1 probed list of 4 (~10 rows each) cannot give 15 neighbours: falls back to exact
    _, i = knn_search(X, X[:5], 15, index="ivf", nlist=4, nprobe=1)
    np.testing.assert_array_equal(i, knn_search(X, X[:5], 15, index="exact")[1])
    assert (i >= 0).all()
