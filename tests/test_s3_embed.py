"""`msnoop embed` with output.dir on S3 (moto's server on 127.0.0.1), then info / search / knn on that output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from typer.testing import CliRunner

from msnoop.core.rundir import RunDir
from msnoop.core import parts, storage
from msnoop.job_kinds import build_config, run_embed_job

pytest.importorskip("lance", reason="pylance writes the LanceDB table on object storage from Ray tasks")
pytestmark = pytest.mark.ray

N_GOOD = 9
runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Local two-channel images (3 classes x 3) and one unreadable image, with a local manifest."""
    root = tmp_path_factory.mktemp("s3data")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(N_GOOD):
        for ch in ("dna", "gfp"):
            tifffile.imwrite(root / f"img{i}_{ch}.tif", rng.integers(0, 200, (40, 36)).astype(np.uint16))
        rows.append({"dna": f"img{i}_dna.tif", "gfp": f"img{i}_gfp.tif", "Metadata_Class": f"c{i % 3}"})
    (root / "bad_dna.tif").write_bytes(b"not a tiff")
    tifffile.imwrite(root / "bad_gfp.tif", rng.integers(0, 200, (40, 36)).astype(np.uint16))
    rows.append({"dna": "bad_dna.tif", "gfp": "bad_gfp.tif", "Metadata_Class": "c0"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def make_cfg(images, out, s3, **output):
    return build_config(
        {
            "job": "embed",
            "name": "s3run",
            "input": {"manifest": str(images / "manifest.csv"), "channels": ["dna", "gfp"]},
            "model": "random:test_cnn:0",
            "output": {"dir": out, **output},
            "storage": {"endpoint_url": s3.endpoint_url, "region": "us-east-1"},
            # the session's Ray cluster may have started before the test's dummy keys were set
            "runtime": {"images_per_block": 3, "batch_size": 8, "progress": False, "worker_env": sorted(s3.env)},
        }
    )


@pytest.fixture(scope="module")
def s3_run(images, s3, ray_cluster):
    out = s3.uri("run1")
    cfg = make_cfg(images, out, s3)
    return out, cfg, run_embed_job(cfg)


def test_config_keeps_the_uri_and_the_hash_ignores_storage(images, s3, tmp_path):
    cfg = make_cfg(images, "s3://bucket/prefix/run", s3)
    assert cfg.output.dir == "s3://bucket/prefix/run"  # not pydantic's Path("s3:/bucket/...")
    assert cfg.lancedb_uri == "s3://bucket/prefix/run/lancedb"
    local = make_cfg(images, str(tmp_path / "o"), s3)
    assert local.output.dir == tmp_path / "o"
    from msnoop.core.config import config_hash

    without = local.model_copy(update={"storage": None})
    assert config_hash(local) == config_hash(without)


def test_embed_to_s3_rows_parts_and_table(s3_run, s3):
    out, cfg, result = s3_run
    assert result.n_input == N_GOOD + 1
    assert (result.n_embedded, result.n_errors) == (N_GOOD, 1)
    assert (result.n_rows_total, result.n_errors_total) == (N_GOOD, 1)
    assert result.table == "s3run"
    cfgs = s3.config
    assert storage.exists(storage.join(out, "run.json"), cfgs)
    assert storage.exists(storage.join(out, "resolved_config.yaml"), cfgs)
    emb = parts.part_files(storage.join(out, RunDir.EMBEDDINGS), storage=cfgs)
    assert emb and all(str(f).startswith(out + "/embeddings/part-") for f in emb)
    ids = parts.read_frame(storage.join(out, RunDir.EMBEDDINGS), [parts.ID_COLUMN], storage=cfgs)[parts.ID_COLUMN]
    assert sorted(ids) == sorted(f"img{i}_dna" for i in range(N_GOOD))
    # part names are the blocks' id keys (a retried write task replaces its part)
    for f in emb:
        fs, path = storage.resolve(f, cfgs)
        import pyarrow.parquet as pq

        block_ids = pq.read_table(path, filesystem=fs, columns=[parts.ID_COLUMN]).column(0).to_pylist()
        assert str(f).endswith(f"part-{parts.block_key(block_ids)}.parquet")
    from msnoop.store.lance import open_table

    table = open_table(cfg.lancedb_uri, "s3run", storage_options=storage.storage_options(out, cfgs))
    assert table.count_rows() == N_GOOD
    assert json.loads(storage.read_text(storage.join(out, "run.json"), cfgs))["lancedb"] == out + "/lancedb"


def test_cli_info_search_knn_on_s3_output(s3_run, s3, monkeypatch):
    from msnoop.cli import app

    out, _, _ = s3_run
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)  # the CLI takes the endpoint from the environment
    res = runner.invoke(app, ["info", out])
    assert res.exit_code == 0, res.output
    assert f"rows       {N_GOOD}" in res.output
    assert "errors     1" in res.output
    res = runner.invoke(app, ["search", out, "--id", "img0_dna", "--k", "3", "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.output)
    assert len(hits) == 3 and "img0_dna" not in {h["Metadata_ImageID"] for h in hits}
    res = runner.invoke(app, ["knn", out, "--label", "Metadata_Class", "--k", "1"])
    assert res.exit_code == 0, res.output
    assert f"n={N_GOOD}" in res.output


def test_rerun_resumes_without_duplicates(s3_run, images, s3, tmp_path):
    """``msnoop embed`` again on the same s3:// output: everything is skipped, no id twice."""
    from msnoop.cli import app
    from msnoop.core.config import config_to_yaml

    out, cfg, _ = s3_run
    path = tmp_path / "job.yaml"
    path.write_text(config_to_yaml(cfg))
    res = runner.invoke(app, ["embed", str(path)])
    assert res.exit_code == 0, res.output
    assert f"Embedded 0 images (0 errors, {N_GOOD + 1} already done)" in res.output
    assert f"Output: {out}  " in res.output
    ids = parts.read_frame(storage.join(out, RunDir.EMBEDDINGS), [parts.ID_COLUMN], storage=s3.config)
    assert len(ids) == N_GOOD == ids[parts.ID_COLUMN].nunique()
    assert parts.count_rows(storage.join(out, RunDir.ERRORS), storage=s3.config) == 1


def test_missing_bucket_fails_before_any_work(images, s3, tmp_path, monkeypatch):
    from msnoop.cli import app

    cfg = make_cfg(images, "s3://no-such-bucket-msnoop/run1", s3)
    path = tmp_path / "job.yaml"
    from msnoop.core.config import config_to_yaml

    path.write_text(config_to_yaml(cfg))
    calls = []
    from msnoop.embed import pipeline as job

    monkeypatch.setattr(job, "prepare_model", lambda c: calls.append(c) or (_ for _ in ()).throw(AssertionError))
    res = runner.invoke(app, ["embed", str(path)])
    assert res.exit_code == 2, res.output
    assert "s3://no-such-bucket-msnoop/run1" in res.output
    assert "bucket does not exist" in res.output
    assert not calls  # nothing was started: no model loaded, no image read


def test_images_in_the_bucket(images, s3, s3_run, tmp_path):
    """Images read from s3:// URIs in a local manifest (one object missing: an error row naming it)."""
    cfgs, base = s3.config, s3.fresh()
    rows = []
    for i in range(4):
        uris = {ch: storage.join(base, "img", f"im{i}_{ch}.tif") for ch in ("dna", "gfp")}
        for ch, uri in uris.items():
            if i < 3:  # im3's objects are never uploaded
                storage.write_bytes(uri, (images / f"img{i}_{ch}.tif").read_bytes(), cfgs)
        rows.append({**uris, "Metadata_Class": f"c{i}"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    cfg = make_cfg(tmp_path, storage.join(base, "out"), s3)
    result = run_embed_job(cfg)
    assert (result.n_embedded, result.n_errors) == (3, 1)
    err = parts.read_frame(storage.join(base, "out", RunDir.ERRORS), storage=cfgs)
    assert err["reason"].str.contains("file not found").all() and err["path"].str.contains("im3_dna.tif").all()
    got = parts.read_frame(storage.join(base, "out", RunDir.EMBEDDINGS), storage=cfgs)
    assert sorted(got[parts.ID_COLUMN]) == [storage.join(base, "img", f"im{i}_dna") for i in range(3)]
    # the same vectors as the local copies of these files got in the first run
    before = parts.read_frame(storage.join(s3_run[0], RunDir.EMBEDDINGS), storage=cfgs).set_index(parts.ID_COLUMN)
    emb = [c for c in got.columns if c.startswith(parts.EMB_PREFIX)]
    np.testing.assert_array_equal(
        got.sort_values(parts.ID_COLUMN)[emb].to_numpy(), before.loc[[f"img{i}_dna" for i in range(3)], emb].to_numpy()
    )


def test_manifest_and_images_in_the_bucket(images, s3, s3_run):
    """Manifest and images both in the bucket, paths relative to the manifest: ids as for a local manifest."""
    cfgs, base = s3.config, s3.fresh()
    rows = []
    for i in range(3):
        for ch in ("dna", "gfp"):
            storage.write_bytes(
                storage.join(base, "img", f"img{i}_{ch}.tif"), (images / f"img{i}_{ch}.tif").read_bytes(), cfgs
            )
        rows.append({"dna": f"img/img{i}_dna.tif", "gfp": f"img/img{i}_gfp.tif", "Metadata_Class": f"c{i}"})
    storage.write_text(storage.join(base, "manifest.csv"), pd.DataFrame(rows).to_csv(index=False), cfgs)
    cfg = make_cfg(images, storage.join(base, "out"), s3)
    cfg = cfg.model_copy(
        update={"input": cfg.input.model_copy(update={"manifest": storage.join(base, "manifest.csv")})}
    )
    result = run_embed_job(cfg)
    assert (result.n_embedded, result.n_errors) == (3, 0)
    got = parts.read_frame(storage.join(base, "out", RunDir.EMBEDDINGS), storage=cfgs).set_index(parts.ID_COLUMN)
    assert sorted(got.index) == [f"img/img{i}_dna" for i in range(3)]
    before = parts.read_frame(storage.join(s3_run[0], RunDir.EMBEDDINGS), storage=cfgs).set_index(parts.ID_COLUMN)
    emb = [c for c in got.columns if c.startswith(parts.EMB_PREFIX)]
    np.testing.assert_array_equal(
        got.loc[[f"img/img{i}_dna" for i in range(3)], emb].to_numpy(),
        before.loc[[f"img{i}_dna" for i in range(3)], emb].to_numpy(),
    )
    assert got["Metadata_Path_dna"].tolist() == sorted(storage.join(base, "img", f"img{i}_dna.tif") for i in range(3))


def test_model_checkpoint_in_the_bucket(images, s3, tmp_path):
    """``model: s3://.../model.pt``: the same network, hash and vectors as the local file; a missing object is named."""
    from msnoop.models.checkpoint import CheckpointError, load_checkpoint, resolve_model, save_checkpoint
    from msnoop.models.registry import create_model
    from msnoop.preprocess.presets import Preprocessing

    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    local = save_checkpoint(tmp_path / "m.pt", create_model("test_cnn"), arch="test_cnn", preprocess=Preprocessing())
    uri = storage.join(s3.fresh(), "models", "m.pt")
    storage.write_bytes(uri, local.read_bytes(), s3.config)
    a, b = load_checkpoint(local), resolve_model(uri, storage=s3.config)
    assert b.sha256 == a.sha256 and b.source == uri and b.arch == "test_cnn"
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(b.net.embed(x), a.net.embed(x))
    with pytest.raises(CheckpointError, match="m2.pt"):
        resolve_model(uri.replace("m.pt", "m2.pt"), storage=s3.config)
