"""jobs/bench_cpu.py: its yeast inputs are real, valid embedding inputs, and its FLOP counts are the encoder's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(job_script):
    return job_script("bench_cpu")


def test_the_end_to_end_manifest_is_a_valid_two_channel_input_of_real_cells(bench, tmp_path, shared_data):
    from msnoop.io.config import InputConfig
    from msnoop.io.manifest import load_image_table

    shared_data("yeast")
    path = bench.yeast_manifest(tmp_path, 7, seed=3)
    table = load_image_table(InputConfig(manifest=path, channels=["gfp", "rfp"]))
    assert len(table) == 7 and table["Metadata_ImageID"].is_unique
    for ch in ("gfp", "rfp"):
        paths = [Path(p) for p in table[f"Metadata_Path_{ch}"]]
        assert all(p.is_absolute() and p.is_file() for p in paths)
    assert bench.yeast_manifest(tmp_path / "again", 7, seed=3).read_text() == path.read_text()  # seeded


def test_cells_are_224_px_tiles_today_and_64_px_in_their_tight_canvas(bench, shared_data):
    shared_data("yeast")
    cells = bench.yeast_cells(3, seed=0)
    assert [c.shape for c in cells] == [(64, 64)] * 3
    native, tight = bench.cell_tiles(cells, "native"), bench.cell_tiles(cells, "tight")
    assert native.shape == (3, 224, 224) and tight.shape == (3, 64, 64)
    for a, b in zip(native[:, 80:144, 80:144], tight, strict=True):  # the same cell, centred, other percentiles
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9999


def test_flop_counts_of_the_shipped_encoder(bench):
    assert bench.encoder_gflops(224) == pytest.approx(12.67, abs=0.01)
    assert bench.encoder_gflops(64) == pytest.approx(1.034, abs=0.001)
