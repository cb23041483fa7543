"""Full-field "cells" mode: segment the nucleus channel, crop every cell, embed, mean per image (Microsnoop's cell-region pipeline)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from msnoop.core.rundir import RunDir
from msnoop.core.config import ConfigError
from msnoop.job_kinds import build_config
from msnoop.embed.embedder import Embedder
from msnoop.embed.cells import CELL_COLUMNS
from msnoop.embed.cells import cells_spec as _cells_spec
from msnoop.embed.dataset import read_and_prepare
from msnoop.embed.pipeline import prepare_model
from msnoop.job_kinds import run_embed_job as run_embed
from msnoop.io.manifest import load_image_table
from msnoop.preprocess.crop import crop_cells, crop_windows
from msnoop.preprocess.presets import prepare_channel
from msnoop.segment import segment
from msnoop.segment.config import SegmentationConfig
from msnoop.core import parts
from msnoop.store.lance import open_table

pytestmark = pytest.mark.ray

SHAPE = (160, 160)
RADIUS = 8
# nucleus centres per image; (5, 80) and (158, 20) touch the border and are skipped
LAYOUTS = {
    "img0": [(30, 30), (30, 100), (80, 60), (120, 30), (125, 120)],
    "img1": [(40, 40), (40, 120), (110, 80), (5, 80)],
    "empty": [],
    "img2": [(30, 50), (80, 80), (130, 40), (60, 130), (130, 130), (158, 20)],
}
EXPECTED_CELLS = {"img0": 5, "img1": 3, "img2": 5}
CELLS_SECTION = {"segmentation": {"channel": "dna", "diameter": 16}, "ratio": 2.0}


def _field(centres, rng):
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    dna = rng.normal(100, 5, SHAPE)
    gfp = rng.normal(20, 3, SHAPE)
    for cy, cx in centres:
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        dna[d2 <= RADIUS**2] += 800
        gfp[(d2 > RADIUS**2) & (d2 <= (2 * RADIUS) ** 2)] += rng.uniform(40, 120)  # a cytoplasm ring
    return np.clip(dna, 0, None).astype(np.uint16), np.clip(gfp, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("fullfield")
    rng = np.random.default_rng(0)
    rows = []
    for name, centres in LAYOUTS.items():
        dna, gfp = _field(centres, rng)
        tifffile.imwrite(root / f"{name}_dna.tif", dna)
        tifffile.imwrite(root / f"{name}_gfp.tif", gfp)
        rows.append({"dna": f"{name}_dna.tif", "gfp": f"{name}_gfp.tif", "Metadata_Well": name})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def make_cfg(dataset, out, cells=None, **runtime):
    data = {
        "job": "embed",
        "name": "ff",
        "input": {"manifest": str(dataset / "manifest.csv"), "channels": ["dna", "gfp"]},
        "model": "random:test_cnn:0",
        "output": {"dir": str(out)},
        "runtime": {"images_per_block": 2, "batch_size": 16, "progress": False, **runtime},
    }
    if cells is not False:
        data["cells"] = {**CELLS_SECTION, **(cells or {})}
    return build_config(data)


@pytest.fixture(scope="module")
def first_run(dataset, tmp_path_factory, ray_cluster):
    cfg = make_cfg(dataset, tmp_path_factory.mktemp("out"), {"save_masks": True})
    return cfg, run_embed(cfg)


def _frames(cfg):
    images = parts.read_frame(cfg.output.dir / "embeddings").set_index("Metadata_ImageID").sort_index()
    cells = parts.read_frame(cfg.output.dir / RunDir.CELLS)
    return images, cells, [c for c in images.columns if c.startswith("emb_")]


def _labels(dataset, name):
    return segment(tifffile.imread(dataset / f"{name}_dna.tif"), diameter=16)


def test_rows_in_equal_images_embedded_plus_errors(first_run):
    cfg, result = first_run
    assert (result.n_input, result.n_embedded, result.n_errors) == (4, 3, 1)
    assert result.n_rows_total + result.n_errors_total == result.n_input
    reason = parts.read_frame(cfg.output.dir / "errors").set_index("Metadata_ImageID")["reason"]["empty_dna"]
    assert "empty_dna.tif: no cell to embed: segmentation found no nucleus in channel 'dna'" in reason
    assert "cells.empty: zero" in reason


def test_cell_rows_equal_non_border_nuclei(first_run, dataset):
    cfg, result = first_run
    images, cells, emb_cols = _frames(cfg)
    assert len(emb_cols) == 64  # 2 channels x 32 (test_cnn)
    per_image = cells.groupby("Metadata_ImageID").size()
    for name, n in EXPECTED_CELLS.items():
        labels = _labels(dataset, name)
        assert len(crop_windows(labels, ratio=2.0, size=224)) == n == per_image[f"{name}_dna"]
        assert labels.max() == len(LAYOUTS[name])  # border nuclei were found, then skipped
        assert images.loc[f"{name}_dna", "Metadata_CellCount"] == n == images.loc[f"{name}_dna", "Metadata_CellsFound"]
    assert result.n_cells == result.n_cells_total == len(cells) == sum(EXPECTED_CELLS.values())
    assert set(CELL_COLUMNS) | {"Metadata_Well"} <= set(cells.columns)
    assert "Metadata_CellCount" not in cells.columns
    assert not cells.duplicated(["Metadata_ImageID", "Metadata_CellID"]).any()
    centre = cells[cells.Metadata_ImageID == "img0_dna"].sort_values("Metadata_CellID").iloc[2]
    assert abs(centre.Metadata_CentroidY - 80) < 1 and abs(centre.Metadata_CentroidX - 60) < 1
    assert 150 < centre.Metadata_Area < 260  # a radius-8 disk has 197 pixels


def test_image_embedding_is_the_mean_of_its_cells(first_run):
    cfg, _ = first_run
    images, cells, emb_cols = _frames(cfg)
    means = cells.groupby("Metadata_ImageID")[emb_cols].mean().sort_index()
    assert list(means.index) == list(images.index)
    assert np.abs(means.to_numpy() - images[emb_cols].to_numpy()).max() < 1e-5
    assert (np.abs(images[emb_cols].to_numpy()).sum(axis=1) > 0).all()


def test_crops_equal_crop_cells_and_normalisation_directly(first_run, dataset):
    cfg, _ = first_run
    model, spec = prepare_model(cfg)
    row = load_image_table(cfg.input).set_index("Metadata_ImageID").loc[["img1_dna"]].reset_index()
    out = read_and_prepare(row, channels=["dna", "gfp"], spec=spec.model_dump(), strict=True, cells=_cells_spec(cfg))
    image = np.stack([tifffile.imread(dataset / "img1_dna.tif"), tifffile.imread(dataset / "img1_gfp.tif")])
    crops, table = crop_cells(image, _labels(dataset, "img1"), ratio=2.0, size=224, skip_border=True)
    direct = np.stack([prepare_channel(crop[c], spec)[0] for crop in crops for c in range(2)])
    assert out["tiles"][0].shape == (3 * 2, 224, 224)
    np.testing.assert_array_equal(out["tiles"][0], direct)
    np.testing.assert_array_equal(out["cell_table"][0][:, 0], table["cell_id"])
    # and the stored cell vectors are the model's embeddings of exactly these tiles
    _, cells, emb_cols = _frames(cfg)
    stored = cells[cells.Metadata_ImageID == "img1_dna"].sort_values("Metadata_CellID")[emb_cols].to_numpy()
    assert np.abs(stored - Embedder(model).embed_tiles(direct).reshape(3, 64)).max() < 1e-5


def test_max_cells_per_image_is_a_fixed_random_subset(first_run):
    cfg, _ = first_run
    _, spec = prepare_model(cfg)
    rows = load_image_table(cfg.input)
    full = read_and_prepare(rows, channels=["dna", "gfp"], spec=spec.model_dump(), strict=False, cells=_cells_spec(cfg))
    capped_cfg = make_cfg(dataset=cfg.input.manifest.parent, out=cfg.output.dir, cells={"max_cells_per_image": 2})
    kw = {"channels": ["dna", "gfp"], "spec": spec.model_dump(), "strict": False, "cells": _cells_spec(capped_cfg)}
    a, b = read_and_prepare(rows, **kw), read_and_prepare(rows, **kw)
    for i in (0, 1, 3):  # images with cells
        assert a["Metadata_CellCount"][i] == 2 and a["Metadata_CellsFound"][i] == full["Metadata_CellCount"][i]
        np.testing.assert_array_equal(a["tiles"][i], b["tiles"][i])  # same cells every run
        ids = list(full["cell_table"][i][:, 0])
        for k, cell in enumerate(a["cell_table"][i][:, 0]):
            j = ids.index(cell)
            np.testing.assert_array_equal(a["tiles"][i][2 * k : 2 * k + 2], full["tiles"][i][2 * j : 2 * j + 2])


def test_masks_run_info_and_lancedb(first_run, dataset):
    cfg, _ = first_run
    out = cfg.output.dir
    np.testing.assert_array_equal(tifffile.imread(out / "masks" / "img0_dna.tif"), _labels(dataset, "img0"))
    assert (out / "masks" / "empty_dna.tif").is_file()  # written before the image was found empty
    info = RunDir(out).read_info()
    assert info["cells"]["nucleus_channel"] == "dna" and info["cells"]["ratio"] == 2.0
    assert info["cells"]["segmentation"]["diameter"] == 16 and info["last_run"]["cells"] == 13
    assert open_table(str(out / "lancedb"), "ff").count_rows() == 3
    assert open_table(str(out / "lancedb"), "ff_cells").count_rows() == 13


def test_resume_adds_no_duplicates(first_run):
    cfg, _ = first_run
    again = run_embed(cfg)
    assert (again.n_embedded, again.n_errors, again.n_skipped, again.n_cells) == (0, 0, 4, 0)
    # lose one block's image means: its cells part is now orphaned, removed, and the block redone
    lost_part = parts.part_files(cfg.output.dir / "embeddings")[0]
    lost = len(pd.read_parquet(lost_part))
    lost_part.unlink()
    redo = run_embed(cfg)
    assert redo.n_embedded == lost and redo.n_errors == 0
    images, cells, _ = _frames(cfg)
    assert len(images) == 3 and images.index.is_unique
    assert len(cells) == redo.n_cells_total == 13
    assert not cells.duplicated(["Metadata_ImageID", "Metadata_CellID"]).any()


def test_whole_image_job_refuses_a_cells_output(first_run, dataset):
    cfg, _ = first_run
    with pytest.raises(ValueError, match="cells mode run; this job is in whole-image mode"):
        run_embed(make_cfg(dataset, cfg.output.dir, cells=False))


def test_empty_zero_writes_a_zero_vector(dataset, tmp_path, ray_cluster):
    cfg = make_cfg(dataset, tmp_path / "zero", {"empty": "zero"}, images_per_block=1)
    result = run_embed(cfg)
    assert (result.n_embedded, result.n_errors, result.n_cells) == (4, 0, 13)
    images, cells, emb_cols = _frames(cfg)
    assert images.loc["empty_dna", "Metadata_CellCount"] == 0
    assert not images.loc["empty_dna", emb_cols].to_numpy().any()
    assert "empty_dna" not in set(cells.Metadata_ImageID)


def test_mask_shape_mismatch_is_an_error_for_that_image(first_run, monkeypatch):
    cfg, _ = first_run
    _, spec = prepare_model(cfg)
    monkeypatch.setattr(SegmentationConfig, "run", lambda self, image: np.zeros((10, 10), np.int32))
    out = read_and_prepare(
        load_image_table(cfg.input).head(1),
        channels=["dna", "gfp"],
        spec=spec.model_dump(),
        strict=False,
        cells=_cells_spec(cfg),
    )
    assert "segmentation mask has shape (10, 10) but the image is (160, 160)" in out["error"][0]


def test_nucleus_channel_must_be_an_input_channel(dataset, tmp_path):
    msg = r"cells.segmentation.channel 'DAPI' is not one of input.channels \['dna', 'gfp'\]"
    with pytest.raises(ConfigError, match=msg):
        make_cfg(dataset, tmp_path, {"segmentation": {"channel": "DAPI"}})
    with pytest.raises(ConfigError, match="preprocess.mode must be 'native'"):
        build_config({**make_cfg(dataset, tmp_path).model_dump(mode="json"), "preprocess": {"mode": "tile"}})
    assert make_cfg(dataset, tmp_path, {"segmentation": {"channel": 1}}).nucleus_channel == "gfp"
