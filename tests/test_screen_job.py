"""The screen job (job: screen): per-cell classifier readout of a plate, Z', dose response, outputs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from msnoop.cli import app
from msnoop.core.config import ConfigError
from msnoop.job_kinds import build_config
from msnoop.screen.plate import ScreenJob, read_cells_table, run_screen


def _plate(tmp_path: Path, cells: int = 20) -> tuple[Path, Path]:
    """A cells-mode embed output (run.json + cells/) and its plate map: 4 rows x 6 columns.

    Column 01 holds negative controls, 06 positive controls, 02-05 doses 1-4 where dose/5 of the cells respond
    (a shift of the first two features). Rows A-B and C-D are two series.
    """
    rng = np.random.default_rng(0)
    parts, plate = [], []
    for r in "ABCD":
        for c in range(1, 7):
            ctrl, dose = (-1, 0) if c == 1 else (1, 5) if c == 6 else (0, c - 1)
            plate.append({"Row": r, "Column": f"{c:02d}", "Controls": ctrl, "Dose": dose})
            x = rng.normal(size=(cells, 6))
            x[: int(round(dose / 5 * cells)), :2] += 3.0
            part = pd.DataFrame(x, columns=[f"emb_{i:04d}" for i in range(6)])
            part.insert(0, "Metadata_Row", r)
            part.insert(1, "Metadata_Column", f"{c:02d}")
            part.insert(2, "Metadata_CellID", np.arange(cells))
            parts.append(part)
    emb = tmp_path / "emb"
    (emb / "cells").mkdir(parents=True)
    (emb / "run.json").write_text(json.dumps({"job": "embed"}))
    pd.concat(parts, ignore_index=True).to_parquet(emb / "cells" / "part-0.parquet")
    pd.DataFrame(plate).to_csv(tmp_path / "plate.csv", index=False)
    return emb, tmp_path / "plate.csv"


def _job(tmp_path: Path, emb: Path, plate: Path, **changes) -> ScreenJob:
    data = {
        "job": "screen",
        "input": str(emb),
        "metadata": {"table": str(plate), "keys": {"Metadata_Row": "Row", "Metadata_Column": "Column"}},
        "well": ["Metadata_Row", "Metadata_Column"],
        "positive": "Metadata_Controls == 1",
        "negative": "Metadata_Controls == -1",
        "dose": "Metadata_Dose",
        "series": {"A-B": "Metadata_Row in ['A', 'B']", "C-D": "Metadata_Row in ['C', 'D']"},
        "output": {"dir": str(tmp_path / "out")},
    }
    data.update(changes)
    job = build_config(data)
    assert isinstance(job, ScreenJob)
    return job


def test_screen_reads_the_share_of_responding_cells(tmp_path: Path) -> None:
    emb, plate = _plate(tmp_path)
    job = _job(tmp_path, emb, plate)
    rec = run_screen(job)
    out = tmp_path / "out"
    wells = pd.read_parquet(out / "wells.parquet")
    assert len(wells) == 24 and (wells["Metadata_Screen_Cells"] == 20).all()
    assert rec["wells"] == {"total": 24, "positive": 4, "negative": 4, "sample": 16}
    # a well's readout is close to the share of its cells that respond (dose / 5)
    samples = wells[wells["Metadata_Screen_Control"] == "sample"]
    np.testing.assert_allclose(samples["Metadata_Screen_Readout"], samples["Metadata_Dose"] / 5, atol=0.12)
    assert rec["z_prime"] > 0.7
    assert set(rec["rho"]) == {"A-B", "C-D"} and min(rec["rho"].values()) > 0.9
    # the plate map's columns came along; per-cell columns did not
    assert {"Metadata_Well", "Metadata_Row", "Metadata_Dose", "Metadata_Screen_Series"} <= set(wells.columns)
    assert "Metadata_CellID" not in wells.columns
    assert (out / "screen.png").stat().st_size > 0 and (out / "resolved_config.yaml").is_file()
    saved = json.loads((out / "screen.json").read_text())
    assert saved["readout"]["C"] == rec["readout"]["C"] and set(saved["readout"]["cv_log_loss"])


def test_screen_command(tmp_path: Path) -> None:
    emb, plate = _plate(tmp_path, cells=10)
    cfg = tmp_path / "screen.yaml"
    job = _job(tmp_path, emb, plate, series="Metadata_Row", readout={"C": 1.0, "aggregate": "logit"})
    from msnoop.core.config import config_to_yaml

    cfg.write_text(config_to_yaml(job))
    res = CliRunner().invoke(app, ["screen", str(cfg), "--set", "readout.C=0.5"])
    assert res.exit_code == 0, res.output
    assert "Z'" in res.output and "A:" in res.output and "C 0.5" in res.output
    rec = json.loads((tmp_path / "out" / "screen.json").read_text())
    assert rec["readout"] == {"method": "per-cell classifier", "aggregate": "logit", "C": 0.5, "fits": 9}
    assert set(rec["rho"]) == set("ABCD")


def test_screen_errors(tmp_path: Path) -> None:
    emb, plate = _plate(tmp_path, cells=4)
    # a query that selects part of a well
    with pytest.raises(ValueError, match="some but not all cells of 4 well"):
        run_screen(_job(tmp_path, emb, plate, positive="Metadata_Controls == 1 and Metadata_CellID < 2"))
    with pytest.raises(ValueError, match=r"no column\(s\) \['Metadata_Plate'\]"):
        run_screen(_job(tmp_path, emb, plate, well=["Metadata_Plate"]))
    with pytest.raises(ValueError, match="series queries overlap"):
        run_screen(_job(tmp_path, emb, plate, series={"x": "Metadata_Row in ['A', 'B']", "y": "Metadata_Row == 'B'"}))
    with pytest.raises(ValueError, match="'Metadata_CellID' varies within a well"):
        run_screen(_job(tmp_path, emb, plate, dose="Metadata_CellID"))
    with pytest.raises(ValueError, match="series column 'Metadata_Compound' is not in the table"):
        run_screen(_job(tmp_path, emb, plate, series="Metadata_Compound"))
    with pytest.raises(ConfigError, match="readout.C"):
        _job(tmp_path, emb, plate, readout={"C": -1})
    # an image-level embed output: no cells/
    (tmp_path / "tile").mkdir()
    (tmp_path / "tile" / "run.json").write_text("{}")
    with pytest.raises(ValueError, match="without a cells/ folder"):
        read_cells_table(tmp_path / "tile")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_cells_table(tmp_path / "nowhere")
    # nothing was written by the failed runs
    assert not (tmp_path / "out" / "wells.parquet").exists()


def test_screen_without_doses_reads_controls_only(tmp_path: Path) -> None:
    emb, plate = _plate(tmp_path, cells=6)
    rec = run_screen(_job(tmp_path, emb, plate, dose=None, series=None, readout={"C": 1.0}))
    assert "rho" not in rec and rec["z_prime"] > 0
    wells = pd.read_parquet(tmp_path / "out" / "wells.parquet")
    assert "Metadata_Screen_Series" not in wells.columns and (tmp_path / "out" / "screen.png").is_file()
    assert wells["Metadata_Screen_Readout"].between(0, 1).all()
