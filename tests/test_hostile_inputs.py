"""Every input surface reads exactly what it is given or refuses it in one line naming the file (no Ray).

Properties over generated hostile inputs (``hostile_inputs.py``): the same pixels give the same planes, and the
same vectors, in every container and layout; planes that are not images, several series and repeated channel
names are refused; label masks are read as objects; published plates with gaps give one row per listed field;
folders ignore system files; every kind of input also works on object storage (moto on 127.0.0.1), with keys
taken literally; config files name keys written twice.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from hostile_inputs import (
    CONTAINERS,
    SYSTEM_FILES,
    binary_mask,
    folder_with_system_files,
    gappy_plate,
    image,
    multichannel,
    write_container,
    write_multi_series_tiff,
    write_ome_tiff,
    write_ome_zarr_image,
    yaml_with_a_repeat,
)
from typer.testing import CliRunner

from msnoop.cli import app
from msnoop.core import storage as st
from msnoop.core.config import ConfigError, read_yaml
from msnoop.io.config import InputConfig
from msnoop.io.manifest import load_image_table
from msnoop.io.readers import ImageReadError, read_channels, read_labels
from msnoop.io.table_stream import plan_image_table, scan_ids

runner = CliRunner()


def _read(layout: dict, names: list[str], storage=None) -> list[np.ndarray]:
    return [read_channels(layout[n][0], [layout[n][1]], storage=storage)[0] for n in names]


@pytest.mark.parametrize("seed", range(4))
def test_the_same_pixels_read_the_same_in_every_container(tmp_path, seed):
    rng = np.random.default_rng(seed)
    planes, names = multichannel(rng)
    expected = planes.astype(np.float32)
    for container in CONTAINERS:
        layout = write_container(tmp_path / container, planes, names, container)
        got = _read(layout, names)
        for k, plane in enumerate(got):
            np.testing.assert_array_equal(plane, expected[k], err_msg=f"{container}, channel {names[k]}")


def test_the_same_pixels_give_the_same_vector_in_every_container(tmp_path):
    from msnoop.embed.embedder import Embedder
    from msnoop.models.loading import load_for_embedding
    from msnoop.preprocess.config import PreprocessConfig

    model, _ = load_for_embedding("random:test_cnn:0", PreprocessConfig())
    embedder = Embedder(model, device="cpu")
    planes, names = multichannel(np.random.default_rng(11), dtype=np.uint16)
    vectors = {
        c: embedder.embed_images([_read(write_container(tmp_path / c, planes, names, c), names)]) for c in CONTAINERS
    }
    ref = vectors[CONTAINERS[0]]
    for container, vec in vectors.items():
        np.testing.assert_array_equal(vec, ref, err_msg=container)


@pytest.mark.parametrize("seed", range(3))
def test_planes_that_are_not_images_are_never_read_as_strips(tmp_path, seed):
    """A bare (H, W, C) array is channel-last; a long last axis shorter than both others cannot be told apart and
    is refused naming the file, never read as H planes of W x C."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(20, 60, 2))
    for c in (2, 5, 8):
        arr = image(rng, (h, w, c))
        for suffix in (".tif", ".npy"):
            path = tmp_path / f"hwc{c}{suffix}"
            tifffile.imwrite(path, arr) if suffix == ".tif" else np.save(path, arr)
            got = read_channels(path, list(range(c)))
            assert all(p.shape == (h, w) for p in got)
            np.testing.assert_array_equal(got[c - 1], arr[..., c - 1])
    odd = image(rng, (64, 70, 12))  # 64 planes of 70 x 12, or 12 channels of 64 x 70?
    tifffile.imwrite(tmp_path / "odd.tif", odd)
    with pytest.raises(ImageReadError, match=r"odd.tif: cannot tell which axes are the image's: .*\(64, 70, 12\)"):
        read_channels(tmp_path / "odd.tif", [0])


def test_several_series_and_repeated_channel_names_are_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(3)
    path = write_multi_series_tiff(tmp_path / "two.tif", rng)
    with pytest.raises(ImageReadError, match=r"two.tif: expected one image per file, found 2 series: \(20, 18\)"):
        read_channels(path, [None])
    planes = np.stack([image(rng, (16, 16)) for _ in range(3)])
    ome = write_ome_tiff(tmp_path / "dup.ome.tif", planes, ["DNA", "GFP", "DNA"])
    with pytest.raises(ImageReadError, match=r"dup.ome.tif: 2 channels are named 'DNA' \(planes \[0, 2\]"):
        read_channels(ome, ["DNA"])
    np.testing.assert_array_equal(read_channels(ome, ["GFP"])[0], planes[1])  # a name used once is fine
    np.testing.assert_array_equal(read_channels(ome, [2])[0], planes[2])  # and indices always are
    zarr = write_ome_zarr_image(tmp_path / "nolabels.zarr", planes, "cyx", None)
    with pytest.raises(ImageReadError, match=r"no channel named 'DNA': this OME-Zarr image has no channel labels"):
        read_channels(zarr, ["DNA"])


@pytest.mark.parametrize("seed", range(5))
def test_binary_masks_are_split_into_their_objects(tmp_path, seed):
    rng = np.random.default_rng(seed)
    for value in (255, 1, True):
        mask, n = binary_mask(rng, value=value)
        path = tmp_path / f"m{seed}_{value}.tif"
        tifffile.imwrite(path, mask.astype(np.uint8) if value is True else mask)
        labels = read_labels(path)
        assert labels.dtype == np.int32 and len(np.unique(labels[labels > 0])) == n
        assert np.array_equal(labels > 0, mask > 0)
    labelled = np.zeros((20, 20), np.uint16)
    labelled[2:6, 2:6], labelled[10:14, 10:14] = 3, 9  # already labelled: kept as it is
    tifffile.imwrite(tmp_path / "l.tif", labelled)
    np.testing.assert_array_equal(read_labels(tmp_path / "l.tif"), labelled)
    np.save(tmp_path / "neg.npy", -labelled.astype(np.int16))
    with pytest.raises(
        ImageReadError, match=r"neg.npy: expected an integer label mask \(0 = background\), found values"
    ):
        read_labels(tmp_path / "neg.npy")


def test_a_blank_or_mismatched_mask_is_an_error_for_that_image_only(tmp_path):
    from msnoop.embed.cells import prepare_cells
    from msnoop.preprocess.presets import Preprocessing

    rng = np.random.default_rng(0)
    img = image(rng, (64, 64)).astype(np.float32)
    cells = {
        "segmentation": {"backend": "mask", "column": "mask"},
        "channels": ["dna"],
        "nucleus_channel": "dna",
        "ratio": 2.0,
        "skip_border": True,
        "empty": "error",
    }
    pre = Preprocessing()
    for blank in (None, "", float("nan")):
        with pytest.raises(ImageReadError, match=r"no mask file: column 'mask' is blank for this image"):
            prepare_cells([img], "a", cells=cells, pre=pre, path="a.tif", mask_path=blank)
    small, _ = binary_mask(rng, (32, 32))
    tifffile.imwrite(tmp_path / "small.tif", small)
    with pytest.raises(ImageReadError, match=r"small.tif: mask has shape \(32, 32\) but its image a.tif is \(64, 64\)"):
        prepare_cells([img], "a", cells=cells, pre=pre, path="a.tif", mask_path=str(tmp_path / "small.tif"))
    mask, n = binary_mask(rng, (64, 64))
    tifffile.imwrite(tmp_path / "ok.tif", mask)
    _, _, found = prepare_cells([img], "a", cells=cells, pre=pre, path="a.tif", mask_path=str(tmp_path / "ok.tif"))
    assert found == n  # every separate object of the binary mask is a cell


@pytest.mark.parametrize("seed", range(3))
def test_published_plates_with_gaps_give_one_row_per_listed_field(tmp_path, seed):
    rng = np.random.default_rng(seed)
    name = "plate.zarr" if seed % 2 else "plate_without_suffix"
    path, ok, bad = gappy_plate(tmp_path / name, rng, ["DNA", "GFP"])
    t = load_image_table(InputConfig(ome_zarr=path, channels=["DNA", "GFP"]))
    assert set(t["Metadata_ImageID"]) == ok | bad
    for _, row in t.iterrows():
        if row["Metadata_ImageID"] in ok:
            assert len(read_channels(row["Metadata_Path_DNA"], ["DNA", "GFP"])) == 2
        else:
            with pytest.raises(ImageReadError, match="file not found|expected an OME-Zarr image"):
                read_channels(row["Metadata_Path_DNA"], ["DNA", "GFP"])


@pytest.mark.parametrize("seed", range(4))
def test_folder_inputs_ignore_system_files_and_count_them(tmp_path, seed, caplog):
    rng = np.random.default_rng(seed)
    n_sites, n_junk = folder_with_system_files(tmp_path / "imgs", rng, ["dna", "gfp"])
    cfg = InputConfig(
        folder=tmp_path / "imgs",
        pattern="{Metadata_Plate}/{Metadata_Well}_s{Metadata_Site}_{channel}.tif",
        channels=["dna", "gfp"],
    )
    with caplog.at_level("WARNING", logger="msnoop"):
        src = plan_image_table(cfg)
    _, n = scan_ids(src)
    assert n == n_sites and src.ignored_files == n_junk
    assert f"ignored {n_junk} hidden or system file(s)" in caplog.text
    assert not any("._" in str(p) or "MACOSX" in str(p) for p in src.table.column("Metadata_Path_dna").to_pylist())
    assert len(SYSTEM_FILES) >= 5


@pytest.mark.parametrize("seed", range(6))
def test_a_key_written_twice_is_named_with_both_lines(tmp_path, seed):
    rng = np.random.default_rng(seed)
    base = {
        "job": "embed",
        "input": {"manifest": "m.csv", "channels": ["dna", "gfp"], "dtypes": {"Metadata_Dose": "float"}},
        "model": "random:test_cnn:0",
        "output": {"dir": str(tmp_path / "out"), "table": "t"},
        "runtime": {"batch_size": 8, "images_per_block": 4},
        "cells": {"segmentation": {"backend": "builtin"}, "ratio": 2.0},
    }
    text, key, first, second = yaml_with_a_repeat(rng, base)
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(
        ConfigError, match=rf"key '{key}' is written twice in one section \(lines {first} and {second}\)"
    ):
        read_yaml(path)
    res = runner.invoke(app, ["validate", str(path)])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: config") and key in lines[0]
    res = runner.invoke(app, ["validate", str(path), "--set", "runtime={batch_size: 1, batch_size: 2}"])
    assert res.exit_code == 2


def test_every_input_kind_works_on_object_storage_with_keys_taken_literally(tmp_path, s3):
    """Manifest, LoadData, folder and OME-Zarr sources, label masks and images on S3; keys with # ? % ; and spaces."""
    import boto3

    rng = np.random.default_rng(7)
    client = boto3.client("s3", endpoint_url=s3.endpoint_url, region_name="us-east-1")
    base = s3.fresh()
    prefix = base.split("/", 3)[3]

    def put(key: str, local) -> str:
        client.upload_file(str(local), s3.bucket, f"{prefix}/{key}")
        return f"{base}/{key}"

    planes, names = multichannel(rng, dtype=np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", planes, photometric="minisblack")
    odd = ["plate #1/A01?x=1.tif", "plate #1/A02%20;y.tif", "plate #1/a b.tif"]
    uris = [put(k, tmp_path / "a.tif") for k in odd]
    for uri in uris:
        np.testing.assert_array_equal(read_channels(uri, [1], storage=s3.config)[0], planes[1])
    mask, n = binary_mask(rng)
    tifffile.imwrite(tmp_path / "m.tif", mask)
    assert len(np.unique(read_labels(put("masks/m #1.tif", tmp_path / "m.tif"), storage=s3.config))) == n + 1
    # a manifest in the bucket, given on the command line as a URI: // stays //
    pd.DataFrame({"path": odd}).to_csv(tmp_path / "m.csv", index=False)
    manifest = put("m.csv", tmp_path / "m.csv")
    cfg = InputConfig(manifest=manifest, channels=names[:2], channel_index={names[0]: 0, names[1]: 1})
    t = load_image_table(cfg, storage=s3.config)
    assert t["Metadata_Path_" + names[0]].tolist() == uris
    # LoadData in the bucket
    pd.DataFrame({"FileName_DNA": ["A01?x=1.tif"], "PathName_DNA": ["plate #1"]}).to_csv(
        tmp_path / "ld.csv", index=False
    )
    ld = load_image_table(InputConfig(loaddata=put("ld.csv", tmp_path / "ld.csv"), channels=["DNA"]), storage=s3.config)
    assert ld["Metadata_Path_DNA"].tolist() == [uris[0]]
    # a folder input on S3 (system files ignored there too)
    folder_with_system_files(tmp_path / "f", rng, ["dna"])
    for p in (tmp_path / "f").rglob("*"):
        if p.is_file():
            put("f/" + p.relative_to(tmp_path / "f").as_posix(), p)
    src = plan_image_table(
        InputConfig(
            folder=f"{base}/f",
            pattern="{Metadata_Plate}/{Metadata_Well}_s{Metadata_Site}_{channel}.tif",
            channels=["dna"],
        ),
        storage=s3.config,
    )
    paths = src.table.column("Metadata_Path_dna").to_pylist()
    assert paths and all(p.startswith(f"{base}/f/P1/A0") for p in paths) and src.ignored_files > 0
    read_channels(paths[0], [None], storage=s3.config)
    # an OME-Zarr plate on S3, its folder without the .zarr suffix, with gaps
    plate, ok, bad = gappy_plate(tmp_path / "screen", rng, ["DNA", "GFP"])
    for p in plate.rglob("*"):
        if p.is_file():
            put("screen/" + p.relative_to(plate).as_posix(), p)
    t = load_image_table(InputConfig(ome_zarr=f"{base}/screen", channels=["DNA", "GFP"]), storage=s3.config)
    assert set(t["Metadata_ImageID"]) == ok | bad
    row = t[t["Metadata_ImageID"] == min(ok)].iloc[0]
    assert [p.shape for p in read_channels(row["Metadata_Path_DNA"], ["DNA", "GFP"], storage=s3.config)] == [
        (16, 16)
    ] * 2
    assert st.exists(manifest, s3.config)


def test_the_command_line_keeps_uris_as_typed(tmp_path, s3, monkeypatch):
    """Options that name locations take URIs: ``s3://b/k`` is never collapsed to ``s3:/b/k``."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    missing = f"{s3.fresh()}/sub dir/manifest #2.csv"
    res = runner.invoke(
        app,
        [
            "embed",
            "--manifest",
            missing,
            "--channels",
            "dna",
            "--model",
            "random:test_cnn:0",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert f"manifest {missing} does not exist" in lines[0]
