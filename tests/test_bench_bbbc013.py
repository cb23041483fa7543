"""jobs/bench_bbbc013.py's curve of Z' against the number of cells averaged per well, on a synthetic plate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def bench(job_script):
    return job_script("bench_bbbc013")


def _layout(tmp_path: Path) -> Path:
    """BBBC013's layout: A-D negatives in 01-02, positives in 12; E-H positives in 01, negatives in 02 and 12."""
    rows = []
    for r in "ABCDEFGH":
        for c in range(1, 13):
            if r in "ABCD":
                ctrl, dose = (-1, 0) if c <= 2 else (1, 10) if c == 12 else (0, c - 2)
            else:
                ctrl, dose = (1, 10) if c == 1 else (-1, 0) if c in (2, 12) else (0, c - 2)
            rows.append(
                {"ImageNumber": len(rows) + 1, "Row": r, "Column": f"{c:02d}", "SBS_Doses": dose, "SBS_Controls": ctrl}
            )
    pd.DataFrame(rows).to_csv(tmp_path / "1049_Metadata.csv", index=False)
    return tmp_path


def _cells(folder: Path, md: pd.DataFrame, n_cells: int, noise: float, seed: int = 0) -> Path:
    """Per-cell rows: the dose (0-10, scaled to 0-1) on the first feature, plus independent noise per cell."""
    rng = np.random.default_rng(seed)
    parts = []
    for w in md.itertuples(index=False):
        x = rng.normal(0.0, noise, size=(n_cells, 6))
        x[:, 0] += w.SBS_Doses / 10.0
        part = pd.DataFrame(x, columns=[f"emb_{i:04d}" for i in range(6)])
        part.insert(0, "Metadata_Row", w.Row)
        part.insert(1, "Metadata_Column", w.Column)
        parts.append(part)
    (folder / "cells").mkdir(parents=True)
    pd.concat(parts, ignore_index=True).to_parquet(folder / "cells" / "part-0.parquet")
    return folder


def test_z_prime_rises_with_cells_per_well(bench, tmp_path: Path) -> None:
    md = bench.load_layout(_layout(tmp_path))
    folder = _cells(tmp_path / "emb", md, n_cells=64, noise=0.5)
    curve = bench.cells_curve(str(folder), md, "ZCA-cor", "knee", [1, 4, 64, 128], repeats=3, classifier_C=1.0)
    assert curve["cells_per_well"] == {"min": 64, "median": 64.0, "max": 64}
    # one draw of all the cells; 128 is more than any well has, so it is left out
    axis = [p for p in curve["points"] if p["readout"] == "control axis"]
    assert [p["cells"] for p in axis] == [1, 1, 1, 4, 4, 4, 64]
    assert [p["cells"] for p in curve["points"] if p["readout"] == "cell classifier"] == [1, 1, 1, 4, 4, 4, 64]
    for readout in ("control axis", "cell classifier"):
        med = [r for r in curve["median"] if r["readout"] == readout]
        z = {r["cells"]: r["z_prime"] for r in med}
        # the noise of a well mean falls as 1/sqrt(k): Z' = 1 - 3 * 2 * 0.5 / sqrt(k) under ideal conditions
        assert z[1] < 0 < z[64], readout
        assert z[1] < z[4] < z[64], readout
        assert next(r for r in med if r["cells"] == 64)["rho A-D"] > 0.8, readout
    png = bench.plot_cells_curves({"synthetic": curve}, 0.8, tmp_path / "curve.png")
    assert png.stat().st_size > 0


def test_classifier_readouts_of_a_cells_output(bench, tmp_path: Path) -> None:
    md = bench.load_layout(_layout(tmp_path))
    folder = _cells(tmp_path / "emb", md, n_cells=12, noise=0.25)
    cells = bench.read_cells(str(folder), md)
    plate, readouts = bench.classifier_readouts(cells, md)
    assert list(readouts) == ["cell classifier, P(positive)", "cell classifier, logit"]
    assert len(plate) == 96 and list(plate["Well"][:2]) == ["A01", "A02"]
    prob, info = readouts["cell classifier, P(positive)"]
    assert readouts["cell classifier, logit"][1]["C"] == info["C"]  # chosen once
    res = bench.score(prob, plate)
    # dose on one feature, per-cell noise 0.25 (controls 4 sd apart): the dose series orders the wells
    assert res["z_prime"] > 0.5 and min(res["rho"].values()) > 0.9
    assert ((prob >= 0) & (prob <= 1)).all()


def test_cells_of_an_unknown_well_are_an_error(bench, tmp_path: Path) -> None:
    md = bench.load_layout(_layout(tmp_path))
    folder = _cells(tmp_path / "emb", md, n_cells=2, noise=0.5)
    part = pd.read_parquet(folder / "cells" / "part-0.parquet")
    part.loc[0, "Metadata_Row"] = "Z"
    part.to_parquet(folder / "cells" / "part-0.parquet")
    with pytest.raises(SystemExit, match="not in 1049_Metadata.*Z01"):
        bench.read_cells(str(folder), md)


def test_no_curve_without_per_cell_rows(bench, tmp_path: Path) -> None:
    md = bench.load_layout(_layout(tmp_path))
    (tmp_path / "tile").mkdir()
    assert bench.cells_curve(str(tmp_path / "tile"), md, "ZCA-cor", "knee", [1, 2], repeats=2) is None
