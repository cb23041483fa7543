"""``msnoop bench``: models and baselines over one dataset config, one results table."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from msnoop.cli import app
from msnoop.core import parts
from msnoop.core.config import ConfigError
from msnoop.data.synthetic import CHANNELS, write_dataset
from msnoop.evaluate.bench import BenchJob, dataset_job, run_bench, slug
from msnoop.job_kinds import load_config


def _configs(tmp_path, manifest, models=("random:test_cnn:0",)):
    dataset = tmp_path / "dataset.yaml"
    dataset.write_text(
        yaml.safe_dump(
            {
                "job": "embed",
                "name": "synthetic",
                "input": {"manifest": str(manifest), "channels": list(CHANNELS)},
                "model": "default",
                "output": {"dir": str(tmp_path / "unused")},
                "runtime": {"images_per_block": 8, "batch_size": 16, "progress": False},
            }
        )
    )
    bench = tmp_path / "bench.yaml"
    bench.write_text(
        yaml.safe_dump(
            {
                "job": "bench",
                "name": "synthetic",
                "dataset": str(dataset),
                "models": list(models),
                "baselines": ["pixels_pca", "intensity"],
                "pca_components": 8,
                "tasks": [{"name": "class", "label": "Metadata_Class", "k": 3, "cv": "kfold:3"}],
                "output": {"dir": str(tmp_path / "bench")},
            }
        )
    )
    return dataset, bench


def test_dataset_job_takes_the_model_and_a_folder_inside_the_bench(tmp_path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("x\n")
    _, bench = _configs(tmp_path, manifest)
    job = load_config(bench)
    assert isinstance(job, BenchJob)
    cfg = dataset_job(job, "random:microsnoop_cnn:0")
    assert cfg.model == "random:microsnoop_cnn:0" and cfg.input.channels == list(CHANNELS)
    assert cfg.output.dir == tmp_path / "bench" / "embeddings" / "random_microsnoop_cnn_0"
    assert slug("/w/models/my model.pt") == "my_model"
    with pytest.raises(ConfigError, match="tasks"):
        load_config(bench, overrides=[("tasks", [])])


@pytest.mark.parametrize("dataset_amp", [None, "auto", "cuda", "off"])
@pytest.mark.parametrize("bench_amp", [None, "auto", "cuda", "off"])
def test_every_model_of_a_bench_is_embedded_in_the_bench_precision(tmp_path, dataset_amp, bench_amp) -> None:
    """The bench's runtime.amp (float32 unless it says otherwise) replaces the dataset config's, so that every row is
    embedded in one precision whatever the dataset config used for its own jobs."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("x\n")
    dataset, bench = _configs(tmp_path, manifest)
    if dataset_amp is not None:
        data = yaml.safe_load(dataset.read_text())
        data["runtime"]["amp"] = dataset_amp
        dataset.write_text(yaml.safe_dump(data))
    job = load_config(bench, overrides=[("runtime", {"amp": bench_amp})] if bench_amp is not None else [])
    for model in ("default", "random:microsnoop_cnn:0"):
        cfg = dataset_job(job, model)
        assert cfg.runtime.amp == (bench_amp or "off")
        assert cfg.runtime.images_per_block == 8 and cfg.runtime.batch_size == 16  # the rest of the dataset's runtime


def test_absent_dataset_is_skipped_with_its_path(tmp_path) -> None:
    _, bench = _configs(tmp_path, tmp_path / "nowhere" / "manifest.csv")
    rec = run_bench(load_config(bench))
    assert "skipped" in rec and "nowhere" in rec["skipped"]
    assert not (tmp_path / "bench" / "results.csv").exists()


@pytest.mark.ray
def test_bench_embeds_evaluates_and_writes_the_table(tmp_path, ray_cluster) -> None:
    manifest = write_dataset(tmp_path / "data", n_per_class=6, seed=0)
    _, bench = _configs(tmp_path, manifest)
    res = CliRunner().invoke(app, ["bench", str(bench), "--summary", str(tmp_path / "all.md")])
    assert res.exit_code == 0, res.output
    out = tmp_path / "bench"
    table = pd.read_csv(out / "results.csv")
    assert table["features"].tolist() == ["random:test_cnn:0", "pixels PCA8 (dna+protein)", "intensity statistics"]
    assert table["kind"].tolist() == ["embedding", "baseline", "baseline"]
    assert table.loc[0, "dim"] == 2 * 32 and table.loc[1, "dim"] == 8 and table.loc[0, "n"] == 24
    assert ((table["class_balanced_accuracy"] >= 0) & (table["class_balanced_accuracy"] <= 1)).all()
    assert (table["class_chance"] == 0.25).all()
    rec = json.loads((out / "results.json").read_text())
    assert rec["protocol"][0]["cv"] == "kfold:3" and "git" in rec["provenance"]
    md = (out / "results.md").read_text()
    assert "| random:test_cnn:0 | 64 |" in md and "class bal. acc." in md
    assert (out / "resolved_config.yaml").is_file() and "### synthetic" in (tmp_path / "all.md").read_text()
    # a second run reuses the embeddings (the pipeline resumes) and gives the same numbers
    again = run_bench(load_config(bench))
    assert [r["class_balanced_accuracy"] for r in again["rows"]] == table["class_balanced_accuracy"].tolist()


@pytest.mark.ray
def test_bench_embeds_again_when_its_cached_embeddings_come_from_another_model(tmp_path, ray_cluster) -> None:
    from msnoop.job_kinds import run_embed_job as run_embed

    manifest = write_dataset(tmp_path / "data", n_per_class=6, seed=0)
    _, bench = _configs(tmp_path, manifest)
    job = load_config(bench)
    cached = dataset_job(job, "random:test_cnn:0")
    # what a retrained model leaves behind: the bench's folder for this model holds other embeddings
    run_embed(cached.model_copy(update={"model": "random:test_cnn:1"}))
    stale = parts.read_frame(cached.output.dir / "embeddings").sort_values("Metadata_ImageID")
    run_bench(job)
    fresh = parts.read_frame(cached.output.dir / "embeddings").sort_values("Metadata_ImageID")
    assert json.loads((cached.output.dir / "run.json").read_text())["model_source"] == "random:test_cnn:0"
    assert len(fresh) == len(stale) == 24
    emb = [c for c in fresh.columns if c.startswith("emb_")]
    assert not np.allclose(fresh[emb].to_numpy(), stale[emb].to_numpy())


def test_bench_refuses_other_job_kinds(tmp_path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("x\n")
    dataset, _ = _configs(tmp_path, manifest)
    res = CliRunner().invoke(app, ["bench", str(dataset)])
    assert res.exit_code != 0 and "job: bench" in res.output
