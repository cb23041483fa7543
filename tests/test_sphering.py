"""Sphering: whitening math, Microsnoop's exact ZCA-cor, knee rule, table wrapper, bad input, command."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import typer
from kneed import KneeLocator
from typer.testing import CliRunner

from msnoop.cli.profiles import profile_command
from msnoop.correct.sphering import spherize_profiles
from msnoop.vectors.sphering import Spherize, knee_regulariser


def _correlated(n: int, d: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    return (rng.normal(size=(n, d)) @ A + rng.normal(size=d) * 3) * scale


def _table(n_plates: int = 3, per_plate: int = 40, d: int = 6, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_plates):
        for i in range(per_plate):
            rows.append({"Metadata_Plate": f"P{p}", "Metadata_Compound": "DMSO" if i % 2 == 0 else f"c{i % 5}"})
    df = pd.DataFrame(rows)
    X = _correlated(len(df), d, seed) + np.repeat(rng.normal(size=(n_plates, d)) * 2, per_plate, axis=0)
    for j in range(d):
        df[f"emb_{j:04d}"] = X[:, j]
    return df


@pytest.mark.parametrize("method", ["ZCA", "ZCA-cor", "PCA", "PCA-cor"])
def test_sphered_controls_have_identity_covariance(method: str) -> None:
    X = _correlated(400, 8, seed=1)
    out = Spherize(method, epsilon=1e-12, variance_floor=0.0).fit_transform(X)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.cov(out, rowvar=False), np.eye(8), atol=1e-6)


@pytest.mark.parametrize("method", ["ZCA", "ZCA-cor"])
def test_zca_equals_independent_svd_computation(method: str) -> None:
    X = _correlated(300, 7, seed=2)
    Xnew = _correlated(50, 7, seed=3)
    eps = 0.05
    mean = X.mean(axis=0)
    sd = X.std(axis=0, ddof=1) if method == "ZCA-cor" else np.ones(7)
    # independent route: SVD of the centred (standardised) data matrix
    _, S, Vt = np.linalg.svd((X - mean) / sd, full_matrices=False)
    eig = S**2 / (len(X) - 1)
    W = Vt.T @ np.diag(1.0 / np.sqrt(eig + eps)) @ Vt
    expected = ((Xnew - mean) / sd) @ W
    got = Spherize(method, epsilon=eps, variance_floor=0.0).fit(X).transform(Xnew)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


def test_pca_is_a_rotation_of_zca() -> None:
    X = _correlated(200, 5, seed=4)
    zca = Spherize("ZCA", epsilon=1e-3).fit_transform(X)
    pca = Spherize("PCA", epsilon=1e-3).fit_transform(X)
    # same Gram matrix (both whiten; they differ by an orthogonal rotation), but not equal
    np.testing.assert_allclose(zca @ zca.T, pca @ pca.T, rtol=1e-8, atol=1e-8)
    assert not np.allclose(zca, pca)


def _microsnoop_zca_corr(X: np.ndarray, Xq: np.ndarray) -> tuple[np.ndarray, float]:
    """Microsnoop's ZCA-cor sphering, written out as in microsnoop-publish postprocess/spherize.ZCA_corr."""
    mean_ = X.mean(axis=0)
    V = np.diag(np.cov(X, rowvar=False))
    corr = np.nan_to_num(pd.DataFrame(X - mean_).corr().to_numpy())
    G, T, _ = scipy.linalg.svd(corr)
    kl = KneeLocator(range(len(T)), T, S=1.0, curve="convex", direction="decreasing")
    reg = T[kl.knee] / 10
    t = np.sqrt(T.clip(reg))
    sphere_ = G @ np.diag(1.0 / t) @ G.T @ np.diag(1.0 / np.sqrt(V.clip(1e-3)))
    return (Xq - mean_) @ sphere_.T, float(reg)


def test_default_reproduces_microsnoop_zca_corr_exactly() -> None:
    rng = np.random.default_rng(5)
    # low-rank structure + noise gives a clear knee; small scale puts some variances under the 1e-3 floor
    L = rng.normal(size=(120, 3)) @ rng.normal(size=(3, 16))
    X = (L + 0.3 * rng.normal(size=(120, 16))) * np.r_[np.full(8, 0.005), np.ones(8)]
    Xq = X[:30] + 0.01
    expected, reg = _microsnoop_zca_corr(X, Xq)
    sph = Spherize().fit(X)
    np.testing.assert_allclose(sph.transform(Xq), expected, rtol=1e-9, atol=1e-9)
    assert sph.reg_ == pytest.approx(reg, rel=1e-9)
    n_below = int((X.var(axis=0, ddof=1) < 1e-3).sum())
    assert n_below == 8 and sph.describe()["n_variances_below_floor"] == n_below


def test_knee_regulariser_matches_kneed_and_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    T = np.r_[100.0, 50.0, 20.0, 5.0, 1.0, np.linspace(0.5, 0.4, 10)]
    reg, knee = knee_regulariser(T)
    expected = KneeLocator(range(len(T)), T, S=1.0, curve="convex", direction="decreasing").knee
    assert knee == expected and reg == pytest.approx(T[expected] / 10)
    # a straight line has no knee: floor at the smallest non-zero eigenvalue, logged
    with caplog.at_level(logging.WARNING, logger="msnoop.correct.sphering"):
        reg, knee = knee_regulariser(np.r_[np.linspace(10.0, 1.0, 10), 0.0, 0.0])
    assert knee is None and reg == pytest.approx(1.0)
    assert "no knee" in caplog.text
    with pytest.raises(ValueError, match="identical"):
        knee_regulariser(np.zeros(5))


@pytest.mark.parametrize("epsilon", ["knee", 1e-6])
def test_fewer_controls_than_features_is_finite_and_logged(epsilon, caplog: pytest.LogCaptureFixture) -> None:
    df = _table(n_plates=1, per_plate=10, d=30)  # 5 controls, 30 features
    with caplog.at_level(logging.WARNING, logger="msnoop.correct.sphering"):
        out, info = spherize_profiles(
            df, control_query="Metadata_Compound == 'DMSO'", method="ZCA-cor", epsilon=epsilon
        )
    assert np.isfinite(out.filter(like="emb_").to_numpy()).all()
    assert info["models"]["all"]["rank"] < 30
    assert "rank-deficient" in caplog.text and "no NaN" in caplog.text


def test_global_fit_uses_all_controls_even_with_batches() -> None:
    df = _table()
    feats = [c for c in df.columns if c.startswith("emb_")]
    out, info = spherize_profiles(
        df, control_query="Metadata_Compound == 'DMSO'", batch_column="Metadata_Plate", method="ZCA", epsilon=1e-6
    )
    ctrl = (df["Metadata_Compound"] == "DMSO").to_numpy()
    expected = Spherize("ZCA", 1e-6).fit(df.loc[ctrl, feats].to_numpy()).transform(df[feats].to_numpy())
    np.testing.assert_allclose(out[feats].to_numpy(), expected, rtol=1e-10, atol=1e-10)
    assert list(out.columns) == list(df.columns) and out.index.equals(df.index)
    assert info["fit"] == "global" and info["n_controls"] == 60
    assert info["n_controls_by_batch"] == {"P0": 20, "P1": 20, "P2": 20}
    json.dumps(info)


def test_per_batch_fits_each_batch_on_its_own_controls() -> None:
    df = _table()
    feats = [c for c in df.columns if c.startswith("emb_")]
    out, info = spherize_profiles(
        df,
        control_query="Metadata_Compound == 'DMSO'",
        batch_column="Metadata_Plate",
        per_batch=True,
        epsilon=1e-9,
        variance_floor=0.0,
    )
    assert sorted(info["models"]) == ["P0", "P1", "P2"] and info["fit"] == "per_batch"
    for plate in ["P0", "P1", "P2"]:
        ctrl = out[(out["Metadata_Plate"] == plate) & (out["Metadata_Compound"] == "DMSO")]
        np.testing.assert_allclose(np.cov(ctrl[feats].to_numpy(), rowvar=False), np.eye(len(feats)), atol=1e-5)
    glob, _ = spherize_profiles(df, control_query="Metadata_Compound == 'DMSO'", epsilon=1e-9, variance_floor=0.0)
    assert not np.allclose(glob[feats].to_numpy(), out[feats].to_numpy())


def test_no_controls_raises_naming_the_query() -> None:
    df = _table()
    with pytest.raises(ValueError, match="Metadata_Compound == 'PBS'"):
        spherize_profiles(df, control_query="Metadata_Compound == 'PBS'")
    with pytest.raises(ValueError, match="not a valid SQL condition"):
        spherize_profiles(df, control_query="Metadata_Treatment == 'DMSO'")


def test_batch_without_controls_raises_naming_the_batch() -> None:
    df = _table()
    df = df[~((df["Metadata_Plate"] == "P1") & (df["Metadata_Compound"] == "DMSO"))]
    with pytest.raises(ValueError, match="batch 'P1'"):
        spherize_profiles(
            df, control_query="Metadata_Compound == 'DMSO'", batch_column="Metadata_Plate", per_batch=True
        )
    # the global fit (Microsnoop) still works
    spherize_profiles(df, control_query="Metadata_Compound == 'DMSO'", batch_column="Metadata_Plate")
    with pytest.raises(ValueError, match="needs batch_column"):
        spherize_profiles(df, control_query="Metadata_Compound == 'DMSO'", per_batch=True)


def test_nan_features_raise_naming_columns() -> None:
    df = _table()
    df.loc[3, "emb_0002"] = np.nan
    with pytest.raises(ValueError, match="emb_0002"):
        spherize_profiles(df, control_query="Metadata_Compound == 'DMSO'")


def test_constant_control_feature_is_dropped_for_cor_and_recorded(caplog: pytest.LogCaptureFixture) -> None:
    df = _table()
    df.loc[df["Metadata_Compound"] == "DMSO", "emb_0001"] = 0.5
    with caplog.at_level(logging.WARNING, logger="msnoop.correct.sphering"):
        out, info = spherize_profiles(df, control_query="Metadata_Compound == 'DMSO'", method="ZCA-cor")
    assert "emb_0001" not in out.columns and info["dropped_features"] == ["emb_0001"]
    assert "emb_0001" in caplog.text
    # ZCA (covariance) keeps it: the zero eigenvalue is regularised
    out, info = spherize_profiles(df, control_query="Metadata_Compound == 'DMSO'", method="ZCA", epsilon=1e-6)
    assert "emb_0001" in out.columns and info["dropped_features"] == []
    assert np.isfinite(out["emb_0001"]).all()
    # the array-level class refuses instead of silently dividing by zero
    with pytest.raises(ValueError, match="constant"):
        Spherize("ZCA-cor").fit(np.c_[np.ones(10), np.arange(10.0)])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        Spherize("ZCA", epsilon=0.0)
    with pytest.raises(ValueError, match="method"):
        Spherize("whiten")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="before fit"):
        Spherize().transform(np.zeros((2, 2)))
    sph = Spherize("ZCA", 1e-3).fit(np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(ValueError, match=r"\[M, 3\]"):
        sph.transform(np.zeros((2, 4)))
    assert sph.transform(np.zeros((2, 3), dtype=np.float32)).dtype == np.float32


def _profile_app() -> typer.Typer:
    app = typer.Typer()
    app.command()(profile_command)
    return app


def test_profile_command_writes_profiles_treatments_and_record(tmp_path) -> None:
    df = _table()
    df["Metadata_Well"] = [f"W{i % 20}" for i in range(len(df))]
    src = tmp_path / "cells.csv"
    df.to_csv(src, index=False)
    app = _profile_app()
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        [
            str(src),
            "--control",
            "Metadata_Compound == 'DMSO'",
            "--batch-column",
            "Metadata_Plate",
            "--method",
            "ZCA",
            "--epsilon",
            "1e-4",
            "--treatment-columns",
            "Metadata_Compound",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = pd.read_parquet(out / "profiles.parquet")
    treat = pd.read_parquet(out / "treatments.parquet")
    rec = json.loads((out / "correction.json").read_text())
    assert len(rows) == len(df) and sorted(treat["Metadata_Compound"]) == [f"c{i}" for i in range(5)]
    assert treat["Metadata_Plate"].iloc[0] == "P0,P1,P2"  # batch string joined as Microsnoop does
    assert rec["sphering"]["method"] == "ZCA" and rec["sphering"]["epsilon"] == 1e-4
    assert rec["treatments"]["n_rows"] == 5
    bad = CliRunner().invoke(
        app, [str(src), "--control", "Metadata_Compound == 'DMSO'", "--epsilon", "-1", "--out", str(out)]
    )
    assert bad.exit_code == 2 and "epsilon" in bad.output


def test_profile_tables_answer_treatment_queries(tmp_path) -> None:
    from msnoop.query.search import open_results, search_by_match

    df = _table()
    src = tmp_path / "wells.parquet"
    df.to_parquet(src)
    app = _profile_app()
    out = tmp_path / "out"
    args = [str(src), "--control", "Metadata_Compound == 'DMSO'", "--treatment-columns", "Metadata_Compound"]
    res = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    treat = pd.read_parquet(out / "treatments.parquet")
    ref = open_results(out)  # the treatments table by default, correction recorded
    assert ref.name == "treatments" and ref.table.count_rows() == len(treat)
    assert ref.info["correction"]["sphering"]["n_controls"] == int((df["Metadata_Compound"] == "DMSO").sum())
    hits = search_by_match(ref, "Metadata_Compound = 'c0'", k=10)
    assert hits.attrs["query_rows"] == 1 and "c0" not in set(hits["Metadata_Compound"])
    assert len(hits) == len(treat) - 1 and hits["_distance"].is_monotonic_increasing
    feats = [c for c in treat.columns if not c.startswith("Metadata_")]
    X = treat[feats].to_numpy()
    q = X[treat["Metadata_Compound"] == "c0"][0]
    top = X[treat["Metadata_Compound"] == hits["Metadata_Compound"].iloc[0]][0]
    cos = 1 - q @ top / np.linalg.norm(q) / np.linalg.norm(top)
    assert hits["_distance"].iloc[0] == pytest.approx(cos, abs=1e-4)
    # the well-level table: a treatment's query is the mean of its wells, all of them left out
    wells = open_results(out, "profiles")
    hits = search_by_match(wells, "Metadata_Compound = 'c1'", k=5, where="Metadata_Compound != 'DMSO'")
    assert hits.attrs["query_rows"] == int((df["Metadata_Compound"] == "c1").sum())
    assert not set(hits["Metadata_Compound"]) & {"c1", "DMSO"}
    with pytest.raises(KeyError, match="matches"):
        search_by_match(ref, "Metadata_Compound = 'nope'")


def test_profile_job_config_matches_options_and_is_saved(tmp_path) -> None:
    """A ``job: profile`` YAML runs the same experiment as the options; it is validated and saved."""
    import yaml

    from msnoop.core.config import ConfigError
    from msnoop.job_kinds import load_config
    from msnoop.correct.profile import ProfileJob
    from msnoop.job_kinds import run_profile_job as run_profile

    df = _table()
    src = tmp_path / "wells.parquet"
    df.to_parquet(src)
    app = _profile_app()
    by_opts = tmp_path / "opts"
    res = CliRunner().invoke(
        app,
        [str(src), "--control", "Metadata_Compound == 'DMSO'", "--batch-column", "Metadata_Plate"]
        + ["--treatment-columns", "Metadata_Compound", "--out", str(by_opts)],
    )
    assert res.exit_code == 0, res.output
    cfg = {
        "job": "profile",
        "name": "plate",
        "input": str(src),
        "control": "Metadata_Compound == 'DMSO'",
        "batch_column": "Metadata_Plate",
        "treatments": {"columns": ["Metadata_Compound"]},
        "output": {"dir": str(tmp_path / "cfg")},
    }
    path = tmp_path / "profile.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(app, [str(path)])
    assert res.exit_code == 0, res.output
    a = pd.read_parquet(by_opts / "treatments.parquet")
    b = pd.read_parquet(tmp_path / "cfg" / "treatments.parquet")
    pd.testing.assert_frame_equal(a, b)
    saved = load_config(tmp_path / "cfg" / "resolved_config.yaml")
    assert isinstance(saved, ProfileJob) and saved.sphering.method == "ZCA-cor" and saved.sphering.epsilon == "knee"
    # validated before any work: a typo in a key, then a column the table lacks (named with what exists)
    with pytest.raises(ConfigError, match="sphereing"):
        load_config(path, overrides=[("sphereing", {"method": "ZCA"})])
    job = load_config(path, overrides=[("treatments.columns", ["Metadata_Dose"])])
    with pytest.raises(ValueError, match=r"no column\(s\) \['Metadata_Dose'\].*Metadata_Compound"):
        run_profile(job)


def test_profile_job_joins_a_plate_map(tmp_path) -> None:
    """Embeddings carry only well ids: the plate map adds controls and doses (as text keys, '01' stays '01')."""
    from msnoop.correct.profile import ProfileJob
    from msnoop.job_kinds import run_profile_job as run_profile

    rng = np.random.default_rng(3)
    wells = [(r, f"{c:02d}") for r in "AB" for c in range(1, 13)]
    emb = pd.DataFrame({"Metadata_Row": [w[0] for w in wells], "Metadata_Column": [w[1] for w in wells]})
    for j in range(6):
        emb[f"emb_{j}"] = rng.normal(size=len(wells))
    src = tmp_path / "emb.parquet"
    emb.to_parquet(src)
    plate = pd.DataFrame(
        {
            "Row": [w[0] for w in wells],
            "Column": [w[1] for w in wells],
            "Controls": [-1 if c in ("01", "02", "12") else 0 for _, c in wells],
            "Dose": [int(c) % 12 for _, c in wells],
        }
    )
    plate.to_csv(tmp_path / "plate.csv", index=False)
    spec = {
        "input": str(src),
        "metadata": {
            "table": str(tmp_path / "plate.csv"),
            "keys": {"Metadata_Row": "Row", "Metadata_Column": "Column"},
        },
        "control": "Metadata_Controls == -1",
        "sphering": {"method": "ZCA", "epsilon": 0.1},
        "treatments": {"columns": ["Metadata_Dose"]},
        "output": {"dir": str(tmp_path / "out")},
    }
    rec = run_profile(ProfileJob.model_validate(spec))
    rows = pd.read_parquet(tmp_path / "out" / "profiles.parquet")
    assert {"Metadata_Controls", "Metadata_Dose"} <= set(rows.columns)
    assert [c for c in rows.columns if not c.startswith("Metadata_")] == [f"emb_{j}" for j in range(6)]
    assert rec["sphering"]["n_controls"] == 6 and rec["treatments"]["n_rows"] == 9  # doses 3..11 (controls dropped)
    plate.loc[plate["Column"] == "05", "Column"] = "5"  # a plate map that writes columns differently
    plate.to_csv(tmp_path / "plate.csv", index=False)
    with pytest.raises(ValueError, match=r"2 row\(s\) of .*emb.parquet have no match in .*plate.csv.*'A/05', 'B/05'"):
        run_profile(ProfileJob.model_validate(spec))


def test_run_job_dispatches_profile_jobs(tmp_path) -> None:
    """``msnoop run`` / ``msnoop submit`` entrypoint: a profile job runs and summarises itself."""
    from msnoop.correct.profile import ProfileJob
    from msnoop.job_kinds import run_job

    src = tmp_path / "wells.parquet"
    _table().to_parquet(src)
    job = ProfileJob.model_validate(
        {"input": str(src), "control": "Metadata_Compound == 'DMSO'", "output": {"dir": str(tmp_path / "o")}}
    )
    _, text = run_job(job)
    assert "profiles.parquet" in text and "sphering: ZCA-cor" in text
    assert (tmp_path / "o" / "correction.json").is_file() and not (tmp_path / "o" / "treatments.parquet").exists()
