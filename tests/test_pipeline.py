"""The Ray Data embedding pipeline on the shared 2-CPU local cluster."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from msnoop.core import parts
from msnoop.core.rundir import RunDir
from msnoop.embed.embedder import Embedder
from msnoop.embed.pipeline import OutputMismatchError, StrictModeError, prepare_model
from msnoop.io.readers import read_image
from msnoop.job_kinds import build_config
from msnoop.job_kinds import run_embed_job as run_embed
from msnoop.store.lance import open_table

pytestmark = pytest.mark.ray

N_GOOD = 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """10 good two-channel images (one large enough to be tiled) and 7 bad ones, one per failure."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(N_GOOD):
        shape = (300, 260) if i == 0 else (48, 40)
        for ch, dtype in (("dna", np.uint16), ("gfp", np.uint8)):
            tifffile.imwrite(root / f"img{i}_{ch}.tif", rng.integers(0, 200, shape).astype(dtype))
        rows.append(
            {"dna": f"img{i}_dna.tif", "gfp": f"img{i}_gfp.tif", "Metadata_Well": f"W{i:02d}", "Metadata_Class": i % 2}
        )

    def bad(name, dna_writer):
        dna_writer(root / f"{name}_dna.tif")
        tifffile.imwrite(root / f"{name}_gfp.tif", rng.integers(0, 200, (48, 40)).astype(np.uint8))
        rows.append({"dna": f"{name}_dna.tif", "gfp": f"{name}_gfp.tif", "Metadata_Well": name, "Metadata_Class": -1})

    bad("missing", lambda p: None)
    bad("corrupt", lambda p: p.write_bytes(b"not a tiff at all"))
    good_bytes = (root / "img1_dna.tif").read_bytes()
    bad("truncated", lambda p: p.write_bytes(good_bytes[: len(good_bytes) // 2]))
    bad(
        "threeplanes",
        lambda p: tifffile.imwrite(p, rng.integers(0, 9, (3, 48, 40)).astype(np.uint16), photometric="minisblack"),
    )
    bad("constant", lambda p: tifffile.imwrite(p, np.full((48, 40), 5, np.uint16)))
    bad("nan", lambda p: tifffile.imwrite(p, np.full((48, 40), np.nan, np.float32)))
    bad("shape", lambda p: tifffile.imwrite(p, rng.integers(0, 9, (40, 40)).astype(np.uint16)))
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def make_cfg(dataset, out, **runtime):
    return build_config(
        {
            "job": "embed",
            "name": "cells",
            "input": {"manifest": str(dataset / "manifest.csv"), "channels": ["dna", "gfp"]},
            "model": "random:test_cnn:0",
            "output": {"dir": str(out)},
            "runtime": {"images_per_block": 4, "batch_size": 8, "progress": False, **runtime},
        }
    )


@pytest.fixture(scope="module")
def first_run(dataset, tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("out")
    cfg = make_cfg(dataset, out)
    return cfg, run_embed(cfg)


def test_rows_in_equal_rows_embedded_plus_errors(first_run):
    cfg, result = first_run
    assert result.n_input == N_GOOD + 7
    assert (result.n_embedded, result.n_errors) == (N_GOOD, 7)
    assert result.n_rows_total + result.n_errors_total == result.n_input
    errors = parts.read_frame(cfg.output.dir / "errors").set_index("Metadata_ImageID")["reason"]
    assert "file not found" in errors["missing_dna"]
    assert "could not decode" in errors["corrupt_dna"]
    assert "truncated_dna.tif" in errors["truncated_dna"]
    assert "found an array of shape (3, 48, 40)" in errors["threeplanes_dna"]
    assert "is constant" in errors["constant_dna"]
    assert "NaN/inf" in errors["nan_dna"]
    assert "channels differ in shape: dna=(40, 40), gfp=(48, 40)" in errors["shape_dna"]


def test_embeddings_equal_calling_the_model_directly(first_run, dataset):
    cfg, _ = first_run
    df = parts.read_frame(cfg.output.dir / "embeddings").set_index("Metadata_ImageID").sort_index()
    emb_cols = [c for c in df.columns if c.startswith("emb_")]
    assert len(emb_cols) == 64  # 2 channels x 32 (test_cnn)
    model, _ = prepare_model(cfg)
    embedder = Embedder(model)
    images = [
        [read_image(df.loc[i, "Metadata_Path_dna"]), read_image(df.loc[i, "Metadata_Path_gfp"])] for i in df.index
    ]
    direct = embedder.embed_images(images)
    assert np.abs(df[emb_cols].to_numpy() - direct).max() < 1e-5
    norms = np.linalg.norm(df[emb_cols].to_numpy()[:, :32], axis=1)
    small = df.index != "img0_dna"
    np.testing.assert_allclose(norms[small], 1.0, atol=1e-5)  # one tile -> unit norm per channel
    assert df.loc["img3_dna", "Metadata_Well"] == "W03"


def test_outputs_lancedb_resolved_config_and_run_info(first_run):
    cfg, _ = first_run
    out = cfg.output.dir
    assert (out / "resolved_config.yaml").is_file()
    info = RunDir(out).read_info()
    assert (
        info["channels"] == ["dna", "gfp"] and info["embed_dim"] == 64 and info["preprocess"]["preset"] == "microsnoop"
    )
    assert info["amp"] == "auto"  # bf16 autocast on GPUs and on CPUs with native bf16
    table = open_table(str(out / "lancedb"), "cells")
    assert table.count_rows() == N_GOOD
    assert table.schema.field("vector").type.list_size == 64


def test_ray_data_memory_advice_is_not_repeated_every_30_s(first_run):
    import ray.data

    detectors = ray.data.DataContext.get_current().issue_detectors_config
    assert detectors.high_memory_detector_config.detection_time_interval_s == 600


def test_rerun_resumes_without_duplicates(first_run, dataset):
    cfg, _ = first_run
    again = run_embed(cfg)
    assert (again.n_embedded, again.n_errors, again.n_skipped) == (0, 0, N_GOOD + 7)
    # lose some finished work: delete one part file, the re-run redoes exactly those images
    first_part = parts.part_files(cfg.output.dir / "embeddings")[0]
    lost = len(pd.read_parquet(first_part))
    first_part.unlink()
    redo = run_embed(cfg)
    assert redo.n_embedded == lost and redo.n_errors == 0
    ids = parts.read_frame(cfg.output.dir / "embeddings", columns=["Metadata_ImageID"])["Metadata_ImageID"]
    assert len(ids) == N_GOOD and ids.is_unique
    assert open_table(str(cfg.output.dir / "lancedb"), "cells").count_rows() == N_GOOD


def test_another_model_or_preprocessing_is_refused_and_the_folder_kept(first_run, dataset):
    cfg, _ = first_run
    info_before = (cfg.output.dir / "run.json").read_text()
    rows_before = parts.count_rows(cfg.output.dir / "embeddings")
    other_model = cfg.model_copy(update={"model": "random:test_cnn:1"})
    with pytest.raises(OutputMismatchError, match=r'model: "random:test_cnn:0" there, "random:test_cnn:1" now'):
        run_embed(other_model)
    data = cfg.model_dump(mode="json") | {"preprocess": {"mode": "rescale"}}
    with pytest.raises(OutputMismatchError, match=r'preprocess: .*"native".* there, .*"rescale".* now'):
        run_embed(build_config(data))
    data = cfg.model_dump(mode="json")
    data["runtime"]["amp"] = "off"  # float32 on GPUs too, where the default 'auto' gives bf16: other vectors
    with pytest.raises(
        OutputMismatchError,
        match=r'precision: \{"cpu": "\w+", "gpu": "bf16"\} there, \{"cpu": "float32", "gpu": "float32"\} now',
    ):
        run_embed(build_config(data))
    assert (cfg.output.dir / "run.json").read_text() == info_before
    assert parts.count_rows(cfg.output.dir / "embeddings") == rows_before


def test_tight_canvas_blocks_mixing_canvases_give_the_embedder_vectors(dataset, tmp_path, ray_cluster):
    """Blocks of 4 images hold a tiled 300 x 260 image (224 px tiles) beside 48 x 40 ones (64 px canvases)."""
    data = make_cfg(dataset, tmp_path / "tight", batch_size="auto").model_dump(mode="json")
    cfg = build_config(data | {"preprocess": {"mode": "tight"}})
    result = run_embed(cfg)
    assert (result.n_embedded, result.n_errors) == (N_GOOD, 7)
    assert RunDir(cfg.output.dir).read_info()["preprocess"]["mode"] == "tight"
    df = parts.read_frame(cfg.output.dir / "embeddings").set_index("Metadata_ImageID").sort_index()
    emb_cols = [c for c in df.columns if c.startswith("emb_")]
    model, spec = prepare_model(cfg)
    assert spec.mode == "tight"
    images = [
        [read_image(df.loc[i, "Metadata_Path_dna"]), read_image(df.loc[i, "Metadata_Path_gfp"])] for i in df.index
    ]
    embedder = Embedder(model)
    assert [t.shape[-1] for t, _ in (embedder.prepare(img) for img in images[:2])] == [224, 64]  # img0, img1
    assert np.abs(df[emb_cols].to_numpy() - embedder.embed_images(images)).max() < 1e-5


def test_on_mismatch_replace_embeds_everything_again_with_the_new_model(dataset, tmp_path, ray_cluster):
    first = make_cfg(dataset, tmp_path / "out")
    run_embed(first)
    before = parts.read_frame(first.output.dir / "embeddings").set_index("Metadata_ImageID").sort_index()
    data = first.model_dump(mode="json")
    data["model"] = "random:test_cnn:1"
    data["output"]["on_mismatch"] = "replace"
    again = run_embed(build_config(data))
    after = parts.read_frame(first.output.dir / "embeddings").set_index("Metadata_ImageID").sort_index()
    assert again.n_embedded == len(before) == len(after) and after.index.is_unique
    emb = [c for c in after.columns if c.startswith("emb_")]
    assert not np.allclose(after[emb].to_numpy(), before[emb].to_numpy())
    assert RunDir(first.output.dir).read_info()["model_source"] == "random:test_cnn:1"


def test_strict_mode_stops_with_the_image_message(dataset, tmp_path, ray_cluster):
    cfg = make_cfg(dataset, tmp_path / "strict", strict=True)
    with pytest.raises(StrictModeError, match=r"_dna.tif: "):
        run_embed(cfg)
