"""File formats from real screens: compressed/tiled TIFFs, grey-as-RGB layouts, multi-channel files
(OME-TIFF, ImageJ hyperstacks, plain stacks), z-stacks and time series, OME-Zarr images and plates, and the
normalisation of tiny images. Readers only (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from hostile_inputs import (
    TIFF_COMPRESSIONS,
    image,
    write_ome_tiff,
    write_ome_zarr_image,
    write_ome_zarr_plate,
    write_tiff,
)
from PIL import Image

from msnoop.core.config import ConfigError
from msnoop.io.config import InputConfig
from msnoop.io.manifest import load_image_table
from msnoop.io.readers import ImageReadError, read_channels, read_image
from msnoop.preprocess.geometry import pad_center
from msnoop.preprocess.normalize import normalize99
from msnoop.preprocess.presets import Preprocessing, prepare_channel


@pytest.mark.parametrize("compression", TIFF_COMPRESSIONS)
@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_compressed_and_tiled_tiffs_are_read(tmp_path, compression, tiled, dtype):
    if compression == "jpeg" and dtype != np.uint8:
        pytest.skip("baseline JPEG holds 8-bit samples")
    rng = np.random.default_rng([TIFF_COMPRESSIONS.index(compression), int(tiled)])
    arr = image(rng, (40, 36), dtype)
    path = write_tiff(tmp_path / "x.tif", arr, compression, tiled=tiled)
    out = read_image(path)
    assert out.dtype == np.float32 and out.shape == arr.shape
    tol = 3 if compression == "jpeg" else 0  # lossy at quality 100: off by a grey level or two
    np.testing.assert_allclose(out, arr.astype(np.float32), atol=tol)


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
@pytest.mark.parametrize("fmt", ["tif", "npy", "png"])
def test_grey_as_rgb_is_one_plane_in_either_layout(tmp_path, layout, fmt):
    rng = np.random.default_rng(1)
    grey = image(rng, (16, 12), np.uint8)
    arr = np.stack([grey] * 3, axis=-1 if layout == "HWC" else 0)
    path = tmp_path / f"g.{fmt}"
    if fmt == "png":
        if layout == "CHW":
            pytest.skip("PNG stores samples last")
        Image.fromarray(arr).save(path)
    elif fmt == "npy":
        np.save(path, arr)
    else:
        tifffile.imwrite(path, arr, photometric="rgb" if layout == "HWC" else "minisblack")
    np.testing.assert_array_equal(read_image(path), grey)


@pytest.mark.parametrize("layout", ["HWC", "CHW"])
def test_true_colour_is_refused_naming_shape(tmp_path, layout):
    arr = np.random.default_rng(2).integers(0, 255, (3, 10, 8) if layout == "CHW" else (10, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "c.npy", arr)
    with pytest.raises(ImageReadError, match=r"c.npy: expected one 2-D channel per file, found an array of shape"):
        read_image(tmp_path / "c.npy")


@pytest.mark.parametrize("n_channels", [2, 3, 5])
def test_ome_tiff_channels_by_name_and_index(tmp_path, n_channels):
    rng = np.random.default_rng(n_channels)
    planes = image(rng, (n_channels, 20, 18))
    names = [f"ch{i}" for i in range(n_channels)]
    path = write_ome_tiff(tmp_path / "m.ome.tif", planes, names)
    order = list(rng.permutation(n_channels))
    for got, k in zip(read_channels(path, [names[k] for k in order]), order, strict=True):
        np.testing.assert_array_equal(got, planes[k])
    for got, k in zip(read_channels(path, [int(k) for k in order]), order, strict=True):
        np.testing.assert_array_equal(got, planes[k])
    with pytest.raises(ImageReadError, match=r"no channel named 'GFP'; OME channel names: \['ch0'"):
        read_image(path, channel="GFP")
    with pytest.raises(ImageReadError, match=rf"channel index {n_channels} is out of range"):
        read_image(path, channel=n_channels)
    with pytest.raises(ImageReadError, match=r"pick them with input.channel_index"):
        read_image(path)  # several different planes and no choice: refused


def test_plain_stack_and_imagej_hyperstack(tmp_path):
    rng = np.random.default_rng(3)
    stack = image(rng, (4, 16, 16))
    tifffile.imwrite(tmp_path / "plain.tif", stack)
    assert all(np.array_equal(read_image(tmp_path / "plain.tif", channel=k), stack[k]) for k in range(4))
    hyper = image(rng, (2, 3, 4, 16, 16), np.uint8)  # T Z C Y X
    tifffile.imwrite(tmp_path / "hyper.tif", hyper, imagej=True, metadata={"axes": "TZCYX"})
    with pytest.raises(
        ImageReadError, match=r"shape \(2, 3, 4, 16, 16\) \(axes TZCYX\): it has 2 time points; set input.z"
    ):
        read_image(tmp_path / "hyper.tif", channel=1)
    np.testing.assert_array_equal(
        read_image(tmp_path / "hyper.tif", channel=1, z="max"), hyper[:, :, 1].max(axis=(0, 1))
    )
    np.testing.assert_array_equal(read_image(tmp_path / "hyper.tif", channel=2, z=2), hyper[0, 2, 2])
    with pytest.raises(ImageReadError, match="input.z = 7 is out of range"):
        read_image(tmp_path / "hyper.tif", channel=0, z=7)


@pytest.mark.parametrize("nz", [2, 5])
def test_z_stack_policy(tmp_path, nz):
    rng = np.random.default_rng(nz)
    zs = image(rng, (nz, 12, 10))
    tifffile.imwrite(tmp_path / "z.ome.tif", zs, ome=True, metadata={"axes": "ZYX"})
    with pytest.raises(
        ImageReadError,
        match=rf"z.ome.tif: expected one 2-D plane per channel, found an array of shape \({nz}, 12, 10\) \(axes ZYX\): it has {nz} z-planes",
    ):
        read_image(tmp_path / "z.ome.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "z.ome.tif", z="max"), zs.max(axis=0))
    np.testing.assert_array_equal(read_image(tmp_path / "z.ome.tif", z=nz - 1), zs[nz - 1])
    flat = np.stack([zs[0]] * nz)  # identical planes: not really a stack
    tifffile.imwrite(tmp_path / "flat.ome.tif", flat, ome=True, metadata={"axes": "ZYX"})
    np.testing.assert_array_equal(read_image(tmp_path / "flat.ome.tif"), zs[0])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_image_channels_by_label_and_index(tmp_path, version):
    rng = np.random.default_rng(4)
    arr = image(rng, (3, 2, 14, 12))  # c z y x
    path = write_ome_zarr_image(tmp_path / "img.zarr", arr, "czyx", ["DNA", "GFP", "ER"], version=version)
    np.testing.assert_array_equal(read_image(path, channel="GFP", z="max"), arr[1].max(axis=0))
    np.testing.assert_array_equal(read_image(path, channel=2, z=0), arr[2, 0])
    with pytest.raises(ImageReadError, match="z-planes"):
        read_image(path, channel="DNA")
    t = load_image_table(InputConfig(ome_zarr=path, channels=["GFP", "DNA"]))
    assert len(t) == 1 and t["Metadata_Path_GFP"].iloc[0] == str(path)


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_plate_expands_to_one_row_per_field(tmp_path, version):
    rng = np.random.default_rng(5)
    fields = {
        (r, c): [image(rng, (2, 10, 10)) for _ in range(int(rng.integers(1, 4)))] for r in "AB" for c in ("1", "12")
    }
    path = write_ome_zarr_plate(tmp_path / "plate.ome.zarr", fields, ["DNA", "GFP"], name="0042", version=version)
    t = load_image_table(InputConfig(ome_zarr=path, channels=["DNA", "GFP"]))
    assert len(t) == sum(len(v) for v in fields.values())
    assert set(t["Metadata_Plate"]) == {"0042"}
    assert set(t["Metadata_Well"]) == {"A1", "A12", "B1", "B12"}
    for _, row in t.iterrows():
        r, c = row["Metadata_Well"][0], row["Metadata_Well"][1:]
        k = int(row["Metadata_Site"])
        assert row["Metadata_ImageID"] == f"plate.ome.zarr/{r}/{c}/{k}"
        dna, gfp = read_channels(row["Metadata_Path_DNA"], ["DNA", "GFP"])
        np.testing.assert_array_equal(dna, fields[(r, c)][k][0])
        np.testing.assert_array_equal(gfp, fields[(r, c)][k][1])
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(ConfigError, match="empty.zarr"):
        load_image_table(InputConfig(ome_zarr=tmp_path / "empty.zarr", channels=["DNA"]))


@pytest.mark.parametrize("side", [2, 3, 8, 20])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiny_images_normalise_to_unit_range(side, dtype):
    """A tiny image centred in the 224 canvas: p1 == p99 == 0 (the padding) -> min-max, never ~1e9."""
    rng = np.random.default_rng(side)
    img = image(rng, (side, side), dtype)
    tiles = prepare_channel(img, Preprocessing())
    assert tiles.shape == (1, 224, 224) and np.isfinite(tiles).all()
    assert tiles.min() == 0.0 and tiles.max() == pytest.approx(1.0)
    expected = pad_center(img.astype(np.float32), 224) / float(img.max())
    np.testing.assert_allclose(tiles[0], expected, rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_non_degenerate_range_is_microsnoops_rule(seed):
    """Where p99 > p1 the result is exactly (x - p1) / (p99 - p1), as in Microsnoop's normalize99."""
    x = np.random.default_rng(seed).gamma(2.0, 100.0, (64, 48)).astype(np.float32)
    lo, hi = np.percentile(x, [1, 99])
    np.testing.assert_array_equal(normalize99(x), ((x - lo) / np.float32(hi - lo)).astype(np.float32))
