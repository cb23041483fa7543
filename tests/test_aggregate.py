"""Profile aggregation: values, kept metadata, counts, joined batch strings, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from msnoop.aggregate.profiles import aggregate_profiles, join_unique


@pytest.fixture
def cells() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 60
    df = pd.DataFrame(
        {
            "Metadata_Plate": np.repeat(["P2", "P1", "P3"], 20),
            "Metadata_Well": np.tile(np.repeat(["A01", "B02"], 10), 3),
            "Metadata_Compound": np.tile(np.repeat(["taxol", "DMSO"], 10), 3),
            "Metadata_Site": rng.integers(0, 4, n),  # varies within wells -> dropped
            "Metadata_Source": "src1",  # constant -> kept
            "note": "x",  # non-numeric, non-Metadata -> not a feature, not kept
        }
    )
    df["emb_0000"] = rng.normal(size=n)
    df["emb_0001"] = rng.normal(size=n).astype(np.float32)
    df["Cells_AreaShape_Area"] = rng.integers(10, 100, n)
    return df


@pytest.mark.parametrize("method", ["mean", "median"])
def test_aggregate_values_match_pandas(cells: pd.DataFrame, method: str) -> None:
    out = aggregate_profiles(cells, ["Metadata_Plate", "Metadata_Well"], method)
    feats = ["emb_0000", "emb_0001", "Cells_AreaShape_Area"]
    expected = cells.groupby(["Metadata_Plate", "Metadata_Well"])[feats].agg(method).reset_index()
    assert len(out) == 6
    pd.testing.assert_frame_equal(
        out[["Metadata_Plate", "Metadata_Well", *feats]].reset_index(drop=True), expected, check_dtype=False
    )
    assert list(out["Metadata_Plate"]) == ["P1", "P1", "P2", "P2", "P3", "P3"]  # sorted by the keys


def test_constant_metadata_kept_varying_dropped_and_count(cells: pd.DataFrame) -> None:
    out = aggregate_profiles(cells, ["Metadata_Plate", "Metadata_Well"])
    assert "Metadata_Compound" in out.columns and "Metadata_Source" in out.columns
    assert "Metadata_Site" not in out.columns and "note" not in out.columns
    assert (out["Metadata_Count"] == 10).all()
    a01 = out[out["Metadata_Well"] == "A01"]
    assert (a01["Metadata_Compound"] == "taxol").all()
    # feature columns keep their order after the metadata
    assert list(out.columns[-3:]) == ["emb_0000", "emb_0001", "Cells_AreaShape_Area"]


def test_join_builds_microsnoop_batch_strings(cells: pd.DataFrame) -> None:
    out = aggregate_profiles(cells, ["Metadata_Compound"], join=["Metadata_Plate"])
    assert list(out["Metadata_Plate"]) == ["P1,P2,P3", "P1,P2,P3"]
    assert list(out["Metadata_Count"]) == [30, 30]
    assert join_unique(pd.Series(["b", "a", None, "b"])) == "a,b"


def test_missing_group_values_form_their_own_group(cells: pd.DataFrame) -> None:
    cells.loc[:4, "Metadata_Compound"] = None
    out = aggregate_profiles(cells, ["Metadata_Compound"])
    assert out["Metadata_Compound"].isna().sum() == 1
    assert out["Metadata_Count"].sum() == len(cells)


def test_existing_count_is_replaced(cells: pd.DataFrame) -> None:
    wells = aggregate_profiles(cells, ["Metadata_Plate", "Metadata_Well"])
    comp = aggregate_profiles(wells, ["Metadata_Compound"])
    assert list(comp["Metadata_Count"]) == [3, 3]  # wells per compound, not cells


def test_errors(cells: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="'mean' or 'median'"):
        aggregate_profiles(cells, ["Metadata_Plate"], "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Metadata_Treatment"):
        aggregate_profiles(cells, ["Metadata_Treatment"])
    with pytest.raises(ValueError, match="at least one"):
        aggregate_profiles(cells, [])
    with pytest.raises(ValueError, match="empty"):
        aggregate_profiles(cells.iloc[:0], ["Metadata_Plate"])
