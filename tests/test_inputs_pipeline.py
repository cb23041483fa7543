"""Pipeline-level properties over hostile inputs (Ray, random:test_cnn:0; few runs, many cases per run).

For every run: rows in = rows embedded + rows in errors; metadata out equals metadata in (values and string
form); every part has the run's one schema. Across runs: the output sorted by id is the same whatever
images_per_block and row order; a re-run after adding rows embeds only the new rows; --retry-errors embeds
the fixed images again without duplicating anything.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tifffile
from hostile_inputs import image, sparse_text_manifest, write_ome_zarr_plate, write_tiff, written_text
from typer.testing import CliRunner

from msnoop.cli import app
from msnoop.job_kinds import build_config
from msnoop.embed.totals import check_totals
from msnoop.job_kinds import run_embed_job as run_embed
from msnoop.core.rundir import RunDir
from msnoop.core import parts
from msnoop.store.lance import open_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # ~10 Ray pipeline runs in all (about 2 minutes on 2 cores)

ID = "Metadata_ImageID"
META = ["Metadata_Gene", "Metadata_Plate", "Metadata_Site", "Metadata_Barcode", "Metadata_Note", "Metadata_Dose"]
runner = CliRunner()


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """9 good images with sparse text metadata, plus hostile rows: LZW, planar grey RGB, 8x8, missing, constant."""
    root = tmp_path_factory.mktemp("screen")
    rng = np.random.default_rng(0)
    df = sparse_text_manifest(root, 9, rng)
    extra = {
        "lzw": lambda p: write_tiff(p, image(rng), "lzw"),
        "planar": lambda p: tifffile.imwrite(
            p, np.stack([image(rng, (24, 20), np.uint8)] * 3), photometric="minisblack"
        ),
        "tiny": lambda p: tifffile.imwrite(p, image(rng, (8, 8))),
        "missing": lambda p: None,
        "constant": lambda p: tifffile.imwrite(p, np.full((24, 20), 7, np.uint16)),
    }
    rows = []
    for name, writer in extra.items():
        writer(root / "images" / f"{name}.tif")
        rows.append(
            {**df.iloc[0].to_dict(), "dna": f"images/{name}.tif", "Metadata_Gene": "", "Metadata_Barcode": name}
        )
    df = pd.concat([df, pd.DataFrame(rows)], ignore_index=True)
    return root, df


def _cfg(manifest, out, block, **extra):
    runtime = {"images_per_block": block, "batch_size": 8, "progress": False, **extra.pop("runtime", {})}
    return build_config(
        {
            "job": "embed",
            "name": "screen",
            "input": {"manifest": str(manifest), "channels": ["dna"], **extra.pop("input", {})},
            "model": "random:test_cnn:0",
            "output": {"dir": str(out), "index": "none", **extra.pop("output", {})},
            "runtime": runtime,
            **extra,
        }
    )


def _outputs(out):
    emb, err = (parts.read_frame(out / sub) for sub in (RunDir.EMBEDDINGS, RunDir.ERRORS))
    err = err if len(err) else pd.DataFrame({ID: [], "path": [], "reason": []})
    return emb.sort_values(ID).reset_index(drop=True), err.sort_values(ID).reset_index(drop=True)


@pytest.fixture(scope="module")
def runs(screen, tmp_path_factory, ray_cluster):
    """The same screen embedded with blocks of 1, 2, 3 and all rows, rows shuffled differently each time."""
    root, df = screen
    results = {}
    for k, block in enumerate([1, 2, 3, len(df)]):
        manifest = root / f"manifest_{k}.csv"
        df.sample(frac=1, random_state=k).to_csv(manifest, index=False)
        out = tmp_path_factory.mktemp(f"out{k}")
        cfg = _cfg(manifest, out, block, output={"write_lance": k == 0})
        results[block] = (cfg, run_embed(cfg))
    return results


def test_every_row_is_embedded_or_an_error_with_its_metadata_as_written(screen, runs):
    _, df = screen
    expected = written_text(df.drop(columns=["dna"]))
    expected[ID] = [p.removesuffix(".tif") for p in df["dna"]]
    expected = expected.set_index(ID).sort_index()
    for cfg, result in runs.values():
        out = cfg.output.dir
        assert result.n_input == len(df) == result.n_rows_total + result.n_errors_total
        assert (result.n_rows_total, result.n_errors_total) == (len(df) - 2, 2)
        assert check_totals(RunDir(out), pd.Series(expected.index)) == (len(df) - 2, 2)
        emb, err = _outputs(out)
        assert sorted(err[ID]) == ["images/constant", "images/missing"]
        got = emb.set_index(ID)[META]
        pd.testing.assert_frame_equal(got.astype(object), expected.loc[got.index, META].astype(object))
        assert got.loc["images/tiny"].notna().any() and np.isfinite(emb.filter(like="emb_").to_numpy()).all()
        stored = json.loads((out / RunDir.RUN_FILE).read_text())["metadata_schema"]
        run_schema = parts.schema_from_json(stored)
        assert all(stored["fields"][c] == "string" for c in META)
        for f in parts.part_files(out / RunDir.EMBEDDINGS):
            schema = pq.read_schema(f).remove_metadata()
            assert schema.names[: len(run_schema)] == run_schema.names
            assert all(schema.field(n).type == run_schema.field(n).type for n in run_schema.names)
        for f in parts.part_files(out / RunDir.ERRORS):
            assert pq.read_schema(f).remove_metadata() == parts.ERRORS_SCHEMA
        assert all(p.startswith("/") for p in emb["Metadata_Path_dna"])  # stored absolute


def test_output_is_the_same_whatever_the_block_size_and_row_order(runs):
    frames = {block: _outputs(cfg.output.dir) for block, (cfg, _) in runs.items()}
    (emb0, err0), *rest = frames.values()
    feats = [c for c in emb0.columns if c.startswith("emb_")]
    for emb, err in rest:
        meta = [c for c in emb0.columns if not c.startswith("emb_")]
        pd.testing.assert_frame_equal(emb[meta], emb0[meta])
        np.testing.assert_allclose(emb[feats].to_numpy(), emb0[feats].to_numpy(), atol=1e-5)
        pd.testing.assert_frame_equal(err[[ID, "path"]], err0[[ID, "path"]])


def test_lancedb_table_keeps_blanks_as_nulls(runs):
    cfg, _ = runs[1]
    table = open_table(cfg.lancedb_uri, cfg.table_name).to_arrow()
    gene = table.column("Metadata_Gene").to_pylist()
    assert gene.count("TP53") == 1 and gene.count(None) == len(gene) - 1 and "nan" not in gene
    assert set(table.column("Metadata_Plate").to_pylist()) == {"0001"}


def test_growing_manifest_embeds_only_new_rows_then_retry_errors(screen, runs, tmp_path):
    root, df = screen
    cfg, _ = runs[2]
    out = cfg.output.dir
    before_ids = set(_outputs(out)[0][ID])
    rng = np.random.default_rng(7)
    plate2 = sparse_text_manifest(root / "plate2", 4, rng, prefix="p2_")  # another folder: a deeper common root
    plate2["dna"] = "plate2/" + plate2["dna"]
    (root / "images" / "missing.tif").write_bytes((root / "images" / "img000.tif").read_bytes())  # fixed
    grown = pd.concat([plate2, df], ignore_index=True).sample(frac=1, random_state=3)
    grown.to_csv(root / "manifest_grown.csv", index=False)
    again = run_embed(_cfg(root / "manifest_grown.csv", out, 2))
    assert (again.n_embedded, again.n_errors, again.n_skipped) == (4, 0, len(df))
    assert again.n_rows_total + again.n_errors_total == len(grown)
    emb, err = _outputs(out)
    assert before_ids <= set(emb[ID]) and len(emb) == len(set(emb[ID])) == len(before_ids) + 4
    assert "images/missing" in set(err[ID])  # not retried without asking

    retried = run_embed(_cfg(root / "manifest_grown.csv", out, 2, runtime={"retry_errors": True}))
    assert (retried.n_embedded, retried.n_errors) == (1, 1)  # missing.tif now exists; constant.tif still constant
    emb, err = _outputs(out)
    assert err[ID].tolist() == ["images/constant"] and "images/missing" in set(emb[ID])
    assert len(emb) + len(err) == len(grown) and len(emb) == len(set(emb[ID]))


def test_ome_zarr_plate_through_the_pipeline(tmp_path, ray_cluster):
    rng = np.random.default_rng(11)
    fields = {(r, c): [image(rng, (2, 3, 20, 20)) for _ in range(2)] for r in "AB" for c in ("1", "2")}
    plate = write_ome_zarr_plate(tmp_path / "P9.zarr", fields, ["DNA", "GFP"], name="P9", axes="czyx")
    # a z-stack per field: refused by default, embedded with z: max
    cfg = build_config(
        {
            "job": "embed",
            "input": {"ome_zarr": str(plate), "channels": ["GFP", "DNA"], "z": "max"},
            "model": "random:test_cnn:0",
            "output": {"dir": str(tmp_path / "out"), "write_lance": False},
            "runtime": {"images_per_block": 3, "batch_size": 8, "progress": False},
        }
    )
    result = run_embed(cfg)
    assert (result.n_embedded, result.n_errors) == (8, 0), result.errors_preview
    emb, _ = _outputs(tmp_path / "out")
    assert emb[ID].iloc[0] == "P9.zarr/A/1/0"
    assert emb.groupby("Metadata_Well").size().to_dict() == {"A1": 2, "A2": 2, "B1": 2, "B2": 2}
    assert set(emb["Metadata_Plate"]) == {"P9"} and set(emb["Metadata_Site"]) == {"0", "1"}


def test_cells_mode_with_existing_masks(tmp_path, ray_cluster):
    rng = np.random.default_rng(12)
    rows = []
    for i in range(3):
        img = image(rng, (64, 64)) // 8
        labels = np.zeros((64, 64), np.uint16)
        for k, (y, x) in enumerate([(16, 16), (16, 44), (44, 30)][: i + 1], start=1):
            labels[y - 5 : y + 5, x - 5 : x + 5] = k
            img[y - 5 : y + 5, x - 5 : x + 5] += 300
        tifffile.imwrite(tmp_path / f"im{i}.tif", img)
        tifffile.imwrite(tmp_path / f"im{i}_mask.tif", labels)
        rows.append({"dna": f"im{i}.tif", "mask_path": f"im{i}_mask.tif"})
    rows.append({"dna": "im0.tif", "mask_path": "nope.tif", "Metadata_Well": "x"})
    rows[-1]["dna"] = "im_copy.tif"
    tifffile.imwrite(tmp_path / "im_copy.tif", image(rng, (64, 64)))
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    cfg = build_config(
        {
            "job": "embed",
            "input": {"manifest": str(tmp_path / "m.csv"), "channels": ["dna"]},
            "model": "random:test_cnn:0",
            "cells": {"segmentation": {"backend": "mask", "column": "mask_path"}, "skip_border": False},
            "preprocess": {"input_size": 32},
            "output": {"dir": str(tmp_path / "out"), "write_lance": False},
            "runtime": {"images_per_block": 2, "batch_size": 8, "progress": False},
        }
    )
    result = run_embed(cfg)
    assert (result.n_embedded, result.n_errors) == (3, 1)
    emb, err = _outputs(tmp_path / "out")
    assert emb.set_index(ID)["Metadata_CellCount"].to_dict() == {"im0": 1, "im1": 2, "im2": 3}
    assert "nope.tif: mask file not found" in err["reason"].iloc[0]
    assert result.n_cells_total == 6


def test_cli_user_errors_are_one_line(runs, screen, tmp_path):
    cfg, _ = runs[1]  # the run with a LanceDB table
    out = str(cfg.output.dir)
    res = runner.invoke(app, ["search", out, "--id", "images/img000", "--where", "Metadata_Gene = 'nope'"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "matches --where" in res.output
    res = runner.invoke(app, ["map", out, "--positive", "Metadata_Plate"])
    assert res.exit_code != 0 and res.output.startswith("error: mAP on") and "Traceback" not in res.output
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text(json.dumps({"lancedb": str(unfinished / "lancedb"), "table": "x"}))
    res = runner.invoke(app, ["search", str(unfinished), "--id", "a"])
    assert res.exit_code == 2 and "Re-run `msnoop embed" in res.output and "tables: []" not in res.output
    root, _ = screen
    moved = root / "images" / "img001.tif"
    moved.rename(moved.with_suffix(".bak"))
    try:
        res = runner.invoke(
            app,
            ["report", out, "--label", "Metadata_Plate", "--out", str(tmp_path / "rep"), "-k", "1", "--queries", "8"],
        )
    finally:
        moved.with_suffix(".bak").rename(moved)
    assert res.exit_code == 1 and "gallery image(s) could not be read" in res.output and "img001.tif" in res.output
