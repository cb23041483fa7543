from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from msnoop.core.config import ConfigError, config_hash, parse_overrides
from msnoop.embed.config import EmbedJob
from msnoop.io.config import InputConfig
from msnoop.job_kinds import load_config
from msnoop.io.manifest import load_image_table, pattern_regex

GOOD = """
job: embed
name: cells
input:
  manifest: m.csv
  channels: [dna, gfp]
model: random:test_cnn
output:
  dir: out
"""


def write(tmp_path, text, name="job.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_valid_config_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, GOOD), overrides=parse_overrides(["runtime.batch_size=8", "preprocess.mode=tile"])
    )
    assert isinstance(cfg, EmbedJob)
    assert cfg.runtime.batch_size == 8 and cfg.preprocess.mode == "tile" and cfg.input.channels == ["dna", "gfp"]
    assert cfg.lancedb_uri.endswith("out/lancedb") and cfg.table_name == "cells"


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, GOOD.replace("  channels:", "  chanels: [x]\n  channels:"))
    with pytest.raises(ConfigError, match=r"job.yaml(.|\n)*unknown key 'input.chanels'"):
        load_config(path)


def test_missing_key_names_key_and_file(tmp_path):
    path = write(tmp_path, GOOD.replace("output:\n  dir: out\n", ""))
    with pytest.raises(ConfigError, match=r"job.yaml(.|\n)*missing key 'output'"):
        load_config(path)


def test_a_job_without_a_model_embeds_with_the_shipped_default(tmp_path):
    assert load_config(write(tmp_path, GOOD.replace("model: random:test_cnn\n", ""))).model == "default"


def test_bad_values_and_sources(tmp_path):
    with pytest.raises(ConfigError, match="runtime.batch_size"):
        load_config(write(tmp_path, GOOD), overrides=[("runtime.batch_size", 0)])
    with pytest.raises(ConfigError, match="exactly one of input.manifest, input.loaddata, input.folder"):
        load_config(write(tmp_path, GOOD), overrides=[("input.folder", "x")])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown job 'train'"):
        load_config(write(tmp_path, "job: train\n"))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["runtime.batch_size"])


def test_config_hash_ignores_runtime(tmp_path):
    a = load_config(write(tmp_path, GOOD))
    b = load_config(write(tmp_path, GOOD), overrides=[("runtime.actors", 3)])
    c = load_config(write(tmp_path, GOOD), overrides=[("model", "random:test_cnn:1")])
    assert config_hash(a) == config_hash(b) != config_hash(c)


def _images(tmp_path, names):
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tmp_path / n, np.ones((4, 4), np.uint8))


def test_manifest_columns_metadata_prefix_and_ids(tmp_path):
    pd.DataFrame(
        {
            "dna_path": ["a/1_dna.tif", "a/2_dna.tif"],
            "gfp": ["a/1_gfp.tif", "a/2_gfp.tif"],
            "protein": ["P1", "P2"],
            "Metadata_Well": ["A01", "A02"],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    t = load_image_table(InputConfig(manifest=tmp_path / "m.csv", channels=["dna", "gfp"]))
    assert list(t.columns) == [
        "Metadata_ImageID",
        "Metadata_protein",
        "Metadata_Well",
        "Metadata_Path_dna",
        "Metadata_Path_gfp",
    ]
    assert t["Metadata_ImageID"].tolist() == ["a/1_dna", "a/2_dna"]  # relative to the manifest's folder
    assert t["Metadata_Path_gfp"][0] == str(tmp_path / "a/1_gfp.tif")


def test_manifest_parquet_and_explicit_columns_and_errors(tmp_path):
    pd.DataFrame({"x": ["1.tif", "2.tif"], "id": ["i1", "i1"]}).to_parquet(tmp_path / "m.parquet")
    cfg = InputConfig(manifest=tmp_path / "m.parquet", channels=["dna"], channel_columns={"dna": "x"})
    with pytest.raises(ConfigError, match="image ids are not unique"):
        load_image_table(cfg.model_copy(update={"id_column": "id"}))
    assert load_image_table(cfg)["Metadata_ImageID"].tolist() == ["1", "2"]
    with pytest.raises(ConfigError, match=r"no path column for channel 'gfp'.*found columns \['x', 'id'\]"):
        load_image_table(InputConfig(manifest=tmp_path / "m.parquet", channels=["gfp"]))


def test_loaddata_csv(tmp_path):
    pd.DataFrame(
        {
            "Metadata_Plate": ["P1"],
            "Metadata_Well": ["B03"],
            "FileName_OrigDNA": ["b03_dna.tif"],
            "PathName_OrigDNA": [str(tmp_path / "img")],
            "FileName_OrigER": ["b03_er.tif"],
            "PathName_OrigER": [str(tmp_path / "img")],
        }
    ).to_csv(tmp_path / "load_data.csv", index=False)
    t = load_image_table(InputConfig(loaddata=tmp_path / "load_data.csv", channels=["DNA", "ER"]))
    assert t["Metadata_Path_ER"][0] == str(tmp_path / "img" / "b03_er.tif")
    assert {"Metadata_Plate", "Metadata_Well"} <= set(t.columns)
    with pytest.raises(ConfigError, match=r"no FileName_Mito column; channels present: \['OrigDNA', 'OrigER'\]"):
        load_image_table(InputConfig(loaddata=tmp_path / "load_data.csv", channels=["Mito"]))


def test_folder_pattern_groups_channels_and_reports_missing(tmp_path):
    _images(
        tmp_path, ["P1/A01_w1.tif", "P1/A01_w2.tif", "P1/A02_w1.tif", "P1/A02_w2.tif", "P1/A03_w1.tif", "P1/notes.txt"]
    )
    cfg = InputConfig(
        folder=tmp_path,
        pattern="{Metadata_Plate}/{Metadata_Well}_{channel}.tif",
        channels=["dna", "gfp"],
        channel_values={"dna": "w1", "gfp": "w2"},
    )
    t = load_image_table(cfg).sort_values("Metadata_Well").reset_index(drop=True)
    assert t["Metadata_Well"].tolist() == ["A01", "A02", "A03"] and (t["Metadata_Plate"] == "P1").all()
    assert t["Metadata_Path_gfp"][2] == ""  # missing channel: the pipeline reports it as an error row
    with pytest.raises(ConfigError, match="no file matches pattern"):
        load_image_table(cfg.model_copy(update={"pattern": "{Metadata_Well}-{channel}.png"}))


def test_pattern_needs_channel_and_repeated_fields_must_agree():
    with pytest.raises(ConfigError, match="must contain a {channel} field"):
        pattern_regex("{Metadata_Well}.tif")
    rx = pattern_regex("{p}/{p}_{channel}.tif")
    assert rx.match("AAC1/AAC1_gfp.tif") and not rx.match("AAC1/ACT1_gfp.tif")


@pytest.mark.parametrize(
    "path",
    # configs/kuberay/ holds Kubernetes manifests; the job config inside one is validated by tests/test_submit_env.py
    sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if p.parent.name != "kuberay"),
    ids=lambda p: p.name,
)
def test_every_shipped_config_validates(path: Path) -> None:
    # validation only: paths may point at ../shared data or outputs that do not exist here
    cfg = load_config(path)
    assert cfg.job in {"embed", "pretrain", "bench", "profile", "segtrain", "screen"}


def test_embed_configs_users_copy_use_the_shipped_model():
    """configs/*.yaml are templates users copy: they embed with `default`; reference rows live in benchmark configs."""
    import yaml

    root = Path(__file__).resolve().parents[1] / "configs"
    embeds = {p.name: yaml.safe_load(p.read_text()) for p in sorted(root.glob("*.yaml"))}
    embeds = {name: d for name, d in embeds.items() if d.get("job") == "embed"}
    assert embeds, "expected embed configs under configs/"
    assert {name: d["model"] for name, d in embeds.items() if d["model"] != "default"} == {}
