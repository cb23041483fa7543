"""pycytominer on msnoop tables: the documented calls, with msnoop's ``emb_*`` features named explicitly.

pycytominer infers CellProfiler features (``Cells_``/``Cytoplasm_``/``Nuclei_``/``Image_`` prefixes) and
finds none in an msnoop table (``Metadata_*`` + ``emb_0000``...), so ``features=`` must be given:
``msnoop.core.tables.feature_columns(df)`` returns them. These tests run the calls a user would copy and
check the numbers against their definitions, over generated tables (dtypes, row orders, plates).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pycytominer  # the dev extra, like pytest itself
import pytest

from msnoop.core.parts import emb_columns
from msnoop.core.tables import feature_columns

DMSO = "Metadata_Compound == 'DMSO'"


def msnoop_table(seed: int, dtype: type, n_plates: int, dim: int = 6) -> pd.DataFrame:
    """An embedding table as msnoop writes it: Metadata_* columns, then emb_0000... (shuffled rows)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_plates):
        for w in range(24):
            rows.append(
                {
                    "Metadata_Plate": f"P{p}",
                    "Metadata_Well": f"{'AB'[w // 12]}{w % 12 + 1:02d}",
                    "Metadata_Compound": "DMSO" if w % 3 == 0 else f"cmp{w % 4}",
                    "Metadata_ImageID": f"P{p}_{w}",
                }
            )
    meta = pd.DataFrame(rows)
    shift = meta["Metadata_Plate"].str[1:].astype(int).to_numpy()[:, None] * 3.0  # a plate effect
    X = (rng.normal(size=(len(meta), dim)) * rng.uniform(0.5, 4, size=dim) + shift).astype(dtype)
    df = pd.concat([meta, pd.DataFrame(X, columns=emb_columns(dim))], axis=1)
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


CASES = [(seed, dtype, plates) for seed in range(3) for dtype in (np.float32, np.float64) for plates in (1, 3)]


def test_inference_finds_no_emb_features() -> None:
    df = msnoop_table(0, np.float32, 1)
    with pytest.raises(ValueError, match="CellProfiler"):
        pycytominer.normalize(profiles=df, samples=DMSO, method="standardize")
    assert feature_columns(df) == emb_columns(6)  # msnoop's helper names them


@pytest.mark.parametrize(("seed", "dtype", "n_plates"), CASES)
def test_normalize_standardises_controls(seed, dtype, n_plates) -> None:
    df = msnoop_table(seed, dtype, n_plates)
    feats = feature_columns(df)
    meta = [c for c in df.columns if c.startswith("Metadata_")]
    out = pycytominer.normalize(profiles=df, features=feats, meta_features=meta, samples=DMSO, method="standardize")
    # same rows in the same order, metadata untouched
    assert list(out.columns) == meta + feats
    pd.testing.assert_frame_equal(out[meta], df[meta])
    ctrl = df.query(DMSO)
    mu, sd = ctrl[feats].mean(), ctrl[feats].std(ddof=0)  # scikit-learn StandardScaler: population std
    expected = (df[feats].astype(np.float64) - mu) / sd
    np.testing.assert_allclose(out[feats].to_numpy(np.float64), expected.to_numpy(), rtol=1e-4, atol=1e-4)
    z = out.loc[df.eval(DMSO), feats].astype(np.float64)
    np.testing.assert_allclose(z.mean(), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(ddof=0), 1, atol=1e-4)

    # per plate (removes the plate effect): the same call on each plate's rows
    per_plate = pd.concat(
        pycytominer.normalize(profiles=g, features=feats, meta_features=meta, samples=DMSO, method="standardize")
        for _, g in df.groupby("Metadata_Plate", sort=False)
    ).loc[df.index]
    for _, g in per_plate[per_plate.eval(DMSO)].groupby("Metadata_Plate"):
        np.testing.assert_allclose(g[feats].astype(np.float64).mean(), 0, atol=1e-5)


@pytest.mark.parametrize(("seed", "dtype", "n_plates"), CASES[:4])
def test_aggregate_to_well_treatment_profiles(seed, dtype, n_plates) -> None:
    df = msnoop_table(seed, dtype, n_plates)
    feats = feature_columns(df)
    strata = ["Metadata_Plate", "Metadata_Compound"]
    out = pycytominer.aggregate(population_df=df, strata=strata, features=feats, operation="median")
    expected = df.groupby(strata)[feats].median().reset_index()
    got = out.sort_values(strata).reset_index(drop=True)
    assert list(got.columns) == strata + feats and len(got) == len(expected)
    pd.testing.assert_frame_equal(got[strata], expected[strata])
    np.testing.assert_allclose(got[feats].to_numpy(np.float64), expected[feats].to_numpy(np.float64), rtol=1e-6)


def test_feature_select_keeps_metadata_and_drops_constant_and_duplicate_features() -> None:
    df = msnoop_table(1, np.float32, 2)
    df["emb_0006"] = np.float32(1.0)  # constant
    df["emb_0007"] = df["emb_0000"] * 2 + 1  # correlated with emb_0000
    feats = feature_columns(df)
    out = pycytominer.feature_select(
        profiles=df, features=feats, operation=["variance_threshold", "correlation_threshold"]
    )
    kept = feature_columns(out)
    assert "emb_0006" not in kept and len({"emb_0000", "emb_0007"} & set(kept)) == 1
    assert set(kept) <= set(feats) and len(kept) == len(feats) - 2
    pd.testing.assert_frame_equal(out.filter(like="Metadata_"), df.filter(like="Metadata_"))
