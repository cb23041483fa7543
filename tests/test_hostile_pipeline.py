"""Hostile inputs through the whole embedding pipeline (Ray, random:test_cnn:0, small generated inputs).

Properties of every run: rows in = rows embedded + rows in errors, every id once; the same pixels give the same
vector whatever the container; a re-run with other settings is refused before any work (run.json and the
resolved config untouched) or, with ``on_mismatch: replace``, replaces every row; a repeated row left by
another writer is repaired by the next run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile
from hostile_inputs import (
    binary_mask,
    folder_with_system_files,
    gappy_plate,
    image,
    multichannel,
    write_container,
    write_multi_series_tiff,
)
from typer.testing import CliRunner

from msnoop.cli import app
from msnoop.core import parts
from msnoop.core.rundir import OutputMismatchError, RunDir
from msnoop.job_kinds import build_config
from msnoop.job_kinds import run_embed_job as run_embed

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # 7 small pipeline runs (about a minute on 2 cores)

ID = "Metadata_ImageID"
runner = CliRunner()


def _cfg(out, source: dict, *, channels, runtime=None, **extra):
    return build_config(
        {
            "job": "embed",
            "input": {"channels": channels, **source},
            "model": "random:test_cnn:0",
            "output": {"dir": str(out), "index": "none", **extra.pop("output", {})},
            "runtime": {"images_per_block": 2, "batch_size": 8, "progress": False, **(runtime or {})},
            **extra,
        }
    )


def _rows(out):
    emb = parts.read_frame(RunDir(out).embeddings)
    err = parts.read_frame(RunDir(out).errors)
    return emb, (err if len(err) else pd.DataFrame({ID: [], "reason": []}))


def _accounted(out, n_in):
    emb, err = _rows(out)
    assert emb[ID].is_unique and err[ID].is_unique and not set(emb[ID]) & set(err[ID])
    assert len(emb) + len(err) == n_in
    return emb.set_index(ID), err.set_index(ID)


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    """One two-channel image in six containers, and hostile files beside them, in one manifest."""
    root = tmp_path_factory.mktemp("containers")
    rng = np.random.default_rng(0)
    planes, _ = multichannel(rng, dtype=np.uint16)
    planes = planes[:2]
    rows = []
    for c in ("tiff_chw", "tiff_hwc", "tiff_hwc_axes", "imagej", "npy_hwc", "zarr_v05_nosuffix"):
        layout = write_container(root / c, planes, ["a", "b"], c)
        rows.append({"path": layout["a"][0], "Metadata_Container": c})
    write_multi_series_tiff(root / "series.tif", rng)
    tifffile.imwrite(root / "strips.tif", image(rng, (64, 70, 12)))  # which axes are the image's?
    rows += [{"path": str(root / n), "Metadata_Container": n} for n in ("series.tif", "strips.tif", "missing.tif")]
    pd.DataFrame(rows).to_csv(root / "m.csv", index=False)
    return root, len(rows)


@pytest.fixture(scope="module")
def container_run(containers, tmp_path_factory, ray_cluster):
    root, _ = containers
    out = tmp_path_factory.mktemp("out_containers")
    cfg = _cfg(out, {"manifest": str(root / "m.csv"), "channel_index": {"dna": 0, "gfp": 1}}, channels=["dna", "gfp"])
    return cfg, run_embed(cfg)


def test_same_pixels_same_vector_in_every_container_and_bad_files_are_error_rows(containers, container_run):
    _, n = containers
    cfg, result = container_run
    emb, err = _accounted(cfg.output.dir, n)
    assert result.n_input == n and (result.n_rows_total, result.n_errors_total) == (6, 3)
    vectors = emb.filter(like="emb_").to_numpy()
    np.testing.assert_array_equal(vectors, np.repeat(vectors[:1], len(vectors), axis=0))
    reasons = {i.rsplit("/", 1)[-1]: r for i, r in err["reason"].items()}
    assert "found 2 series" in reasons["series"]
    assert "cannot tell which axes are the image's" in reasons["strips"]
    assert "file not found" in reasons["missing"]


def test_a_rerun_with_other_settings_is_refused_before_any_work_or_replaces_every_row(container_run, containers):
    cfg, _ = container_run
    run = RunDir(cfg.output.dir)
    before = {f: (run.location / f).read_bytes() for f in (RunDir.RUN_FILE, RunDir.CONFIG_FILE)}
    data = cfg.model_dump(mode="json")
    for setting, value in (("z", "max"), ("channel_index", {"dna": 1, "gfp": 0})):
        changed = json.loads(json.dumps(data))
        changed["input"][setting] = value
        with pytest.raises(OutputMismatchError, match=rf"input.{setting}: .* there, .* now"):
            run_embed(build_config(changed))
        assert {f: (run.location / f).read_bytes() for f in before} == before
    # the same from the command line, with the folder's own resolved config: one error line, nothing rewritten
    res = runner.invoke(app, ["embed", str(run.config_file), "--set", "cells={segmentation: {backend: builtin}}"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "it holds a whole-image mode run" in lines[0], res.output
    assert {f: (run.location / f).read_bytes() for f in before} == before
    changed["output"]["on_mismatch"] = "replace"
    old_ids = set(_rows(run.location)[0][ID])
    again = run_embed(build_config(changed))
    assert again.n_skipped == 0 and again.n_embedded + again.n_errors == containers[1]
    emb, _ = _accounted(run.location, containers[1])
    assert set(emb.index) == old_ids
    assert run.read_info()["identity"]["input.channel_index"] == {"dna": 1, "gfp": 0}
    # a stale writer left a copy of a part behind: the next run keeps one row per id
    first = parts.part_files(run.embeddings)[0]
    shutil.copy(first, first.with_name("part-0000copy.parquet"))
    third = run_embed(build_config(changed))
    assert third.n_embedded == 0 and third.n_rows_total + third.n_errors_total == containers[1]
    _accounted(run.location, containers[1])


def test_cells_from_label_masks_binary_blank_mismatched_or_missing(tmp_path, ray_cluster):
    rng = np.random.default_rng(1)
    rows = []
    n_objects = {}
    for k in range(6):
        img = image(rng, (64, 64))
        path = tmp_path / f"img{k}.tif"
        tifffile.imwrite(path, img)
        mask, n = binary_mask(rng, (64, 64)) if k != 3 else binary_mask(rng, (32, 32))
        mpath = tmp_path / f"mask{k}.tif"
        tifffile.imwrite(mpath, mask)
        n_objects[f"img{k}"] = n
        mask_cell = {0: str(mpath), 1: str(mpath), 2: "", 3: str(mpath), 4: "gone.tif", 5: str(mpath)}[k]
        rows.append({"dna": str(path), "mask_path": mask_cell})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    cfg = _cfg(
        tmp_path / "out",
        {"manifest": str(tmp_path / "m.csv")},
        channels=["dna"],
        cells={"segmentation": {"backend": "mask", "column": "mask_path"}},
    )
    result = run_embed(cfg)
    emb, err = _accounted(tmp_path / "out", 6)
    assert sorted(err.index) == ["img2", "img3", "img4"]
    assert "blank" in err.loc["img2", "reason"] and "mask has shape (32, 32)" in err.loc["img3", "reason"]
    assert "mask file not found" in err.loc["img4", "reason"]
    for image_id, row in emb.iterrows():
        assert row["Metadata_CellsFound"] == n_objects[image_id]  # every object of a binary mask is a cell
    assert result.n_cells_total == sum(n_objects[i] for i in emb.index)


def test_a_published_plate_with_gaps_and_no_suffix(tmp_path, ray_cluster):
    path, ok, bad = gappy_plate(tmp_path / "plate_as_published", np.random.default_rng(2), ["DNA", "GFP"])
    cfg = _cfg(tmp_path / "out", {"ome_zarr": str(path)}, channels=["DNA", "GFP"])
    run_embed(cfg)
    emb, err = _accounted(tmp_path / "out", len(ok) + len(bad))
    assert set(emb.index) == ok and set(err.index) == bad


def test_folder_inputs_never_embed_system_files(tmp_path, ray_cluster):
    """From the command line, with the LanceDB table elsewhere: the summary names where the table is."""
    n_sites, n_junk = folder_with_system_files(tmp_path / "imgs", np.random.default_rng(3), ["dna"])
    pattern = "{Metadata_Plate}/{Metadata_Well}_s{Metadata_Site}_{channel}.tif"
    elsewhere = tmp_path / "tables"
    args = ["embed", "--folder", str(tmp_path / "imgs"), "--pattern", pattern, "--channels", "dna"]
    args += ["--model", "random:test_cnn:0", "--out", str(tmp_path / "out"), "--set", f"output.lancedb={elsewhere}"]
    args += ["--set", "runtime.progress=false", "--set", "output.index=none"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"in {elsewhere}" in res.output and f"{tmp_path / 'out'}/lancedb" not in res.output
    _accounted(tmp_path / "out", n_sites)
    assert RunDir(tmp_path / "out").read_info()["ignored_files"] == n_junk


def test_manifests_of_any_width(tmp_path, ray_cluster):
    """A Parquet manifest of 6,000 columns and a CSV whose header is over 64 KiB embed with their metadata."""
    rng = np.random.default_rng(4)
    paths = []
    for k in range(3):
        tifffile.imwrite(tmp_path / f"i{k}.tif", image(rng))
        paths.append(str(tmp_path / f"i{k}.tif"))
    wide = {f"Metadata_Feature_{j:05d}": [f"v{j}_{k}" for k in range(3)] for j in range(6000)}
    pq.write_table(pa.table({"dna": paths, **wide}), tmp_path / "wide.parquet")
    long_names = {f"Metadata_{'x' * 40}_{j:04d}": [str(j)] * 3 for j in range(2000)}
    pd.DataFrame({"dna": paths, **long_names}).to_csv(tmp_path / "wide.csv", index=False)
    assert len((tmp_path / "wide.csv").read_text().splitlines()[0]) > 64 * 1024
    for name, probe in (("wide.parquet", "Metadata_Feature_05999"), ("wide.csv", f"Metadata_{'x' * 40}_1999")):
        out = tmp_path / f"out_{name}"
        cfg = _cfg(out, {"manifest": str(tmp_path / name)}, channels=["dna"], output={"write_lance": False})
        result = run_embed(cfg)
        assert (result.n_rows_total, result.n_errors_total) == (3, 0)
        emb, _ = _accounted(out, 3)
        assert emb[probe].notna().all()
