from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from msnoop.io.readers import ImageReadError, check_image, read_image


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.int32])
def test_tiff_dtypes_read_as_float32(tmp_path, dtype):
    arr = (np.arange(12 * 10).reshape(12, 10) % 200).astype(dtype)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, arr)
    out = read_image(path)
    assert out.dtype == np.float32 and out.shape == (12, 10)
    np.testing.assert_array_equal(out, arr.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_grey(tmp_path, dtype):
    arr = (np.arange(64).reshape(8, 8) * 3).astype(dtype)
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    np.testing.assert_array_equal(read_image(path), arr.astype(np.float32))


def test_rgb_with_identical_planes_becomes_one_channel(tmp_path):
    grey = (np.arange(64).reshape(8, 8) * 2).astype(np.uint8)
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), grey)


def test_true_colour_and_stacks_are_rejected_with_shape(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(
        ImageReadError, match=r"rgb.png: expected one 2-D channel per file, found an array of shape \(8, 8, 3\)"
    ):
        read_image(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "stack.tif", np.arange(128, dtype=np.uint16).reshape(2, 8, 8))
    with pytest.raises(ImageReadError, match=r"\(2, 8, 8\)"):
        read_image(tmp_path / "stack.tif")


def test_singleton_axes_are_squeezed(tmp_path):
    tifffile.imwrite(tmp_path / "s.tif", np.arange(16, dtype=np.uint16).reshape(1, 4, 4))
    assert read_image(tmp_path / "s.tif").shape == (4, 4)


def test_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.eye(5, dtype=np.float64))
    np.testing.assert_array_equal(read_image(tmp_path / "a.npy"), np.eye(5, dtype=np.float32))


def test_missing_corrupt_truncated_and_unsupported(tmp_path):
    with pytest.raises(ImageReadError, match="nope.tif: file not found"):
        read_image(tmp_path / "nope.tif")
    (tmp_path / "corrupt.tif").write_bytes(b"this is not a tiff")
    with pytest.raises(ImageReadError, match="corrupt.tif: could not decode"):
        read_image(tmp_path / "corrupt.tif")
    tifffile.imwrite(tmp_path / "full.png.tif", np.ones((64, 64), np.uint16))
    data = (tmp_path / "full.png.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="trunc.tif"):
        read_image(tmp_path / "trunc.tif")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(ImageReadError, match="unsupported file type '.gif'"):
        read_image(tmp_path / "x.gif")


def test_check_image_rejects_nan_and_constant():
    with pytest.raises(ImageReadError, match="f.tif: contains 1 NaN/inf pixels"):
        check_image(np.array([[1.0, np.nan], [0.0, 2.0]], np.float32), "f.tif")
    with pytest.raises(ImageReadError, match="is constant"):
        check_image(np.full((4, 4), 7, np.float32), "c.tif")
    check_image(np.arange(4, dtype=np.float32).reshape(2, 2), "ok.tif")
