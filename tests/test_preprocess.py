"""Preprocessing against the rules of Microsnoop's extract_embeddings (microsnoop-publish)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from msnoop.preprocess.geometry import make_tiles, pad_center, pad_to_square, resize, tile_starts
from msnoop.preprocess.normalize import normalize99
from msnoop.preprocess.presets import Preprocessing, prepare_channel


def test_normalize99_maps_percentiles_without_clipping():
    x = np.linspace(0, 100, 101 * 99, dtype=np.float32).reshape(101, 99)
    out = normalize99(x)
    p1, p99 = np.percentile(x, [1, 99])
    np.testing.assert_allclose(out, (x - p1) / (p99 - p1), rtol=1e-5, atol=1e-6)
    assert out.min() < 0 and out.max() > 1  # no clipping in the microsnoop preset


def test_normalize99_constant_unchanged_and_equal_percentiles():
    const = np.full((8, 8), 3.0, np.float32)
    np.testing.assert_array_equal(normalize99(const), const)
    spike = np.zeros((20, 20), np.float32)
    spike[0, 0] = 5.0  # p1 == p99 == 0 but ptp > 0: degenerate range -> min-max scaling (not / 1e-6)
    out = normalize99(spike)
    assert out[0, 0] == pytest.approx(1.0) and out[5, 5] == 0


def test_cytoimagenet_clips_to_unit_range():
    x = np.random.default_rng(0).normal(size=(50, 50)).astype(np.float32)
    out = normalize99(x, lower=0.1, upper=99.9, clip=True)
    assert out.min() == 0.0 and out.max() == 1.0


@pytest.mark.parametrize("h,w", [(64, 64), (63, 50), (224, 1), (224, 224)])
def test_pad_center_is_centred_with_extra_pixel_at_end(h, w):
    img = np.ones((h, w), np.float32)
    out = pad_center(img, 224)
    top, left = (224 - h) // 2, (224 - w) // 2
    assert out.shape == (224, 224) and out.sum() == h * w
    assert out[top, left] == 1 and out[top + h - 1, left + w - 1] == 1
    if top:
        assert out[top - 1].sum() == 0


def test_pad_center_refuses_larger_images():
    with pytest.raises(ValueError, match="300x10 does not fit into 224x224"):
        pad_center(np.zeros((300, 10)), 224)


@pytest.mark.parametrize("length,expected", [(224, 1), (100, 1), (225, 2), (640, 4), (1000, 6)])
def test_tile_counts_follow_cellpose_formula(length, expected):
    starts = tile_starts(length, 224, 0.1)
    assert len(starts) == expected
    if length > 224:
        assert len(starts) == math.ceil(1.2 * length / 224)
        assert starts[0] == 0 and starts[-1] == length - 224
        np.testing.assert_array_equal(starts, np.linspace(0, length - 224, expected).astype(int))


def test_tile_overlap_is_clamped():
    assert len(tile_starts(640, 224, 0.0)) == math.ceil(1.1 * 640 / 224)
    assert len(tile_starts(640, 224, 0.9)) == math.ceil(2.0 * 640 / 224)


def test_make_tiles_cover_the_image_and_pad_short_sides():
    img = np.arange(640 * 300, dtype=np.float32).reshape(640, 300)
    tiles = make_tiles(img, 224, 0.1)
    assert tiles.shape == (4 * 2, 224, 224)
    np.testing.assert_array_equal(tiles[0], img[:224, :224])
    np.testing.assert_array_equal(tiles[-1], img[-224:, -224:])
    narrow = make_tiles(np.ones((500, 100), np.float32), 224, 0.1)
    assert narrow.shape == (3, 224, 224) and narrow[0].sum() == 224 * 100  # width padded, centred


def test_pad_to_square_and_resize():
    img = np.ones((100, 50), np.float32)
    sq = pad_to_square(img)
    assert sq.shape == (100, 100) and sq[:, :25].sum() == 0 and sq[:, 25:75].all()
    out = resize(np.ones((448, 448), np.float32), 224)
    assert out.shape == (224, 224) and np.allclose(out, 1.0)


def test_prepare_channel_native_small_image_normalised_after_padding():
    rng = np.random.default_rng(1)
    img = rng.uniform(10, 20, (64, 64)).astype(np.float32)
    out = prepare_channel(img, Preprocessing())
    assert out.shape == (1, 224, 224) and out.dtype == np.float32
    padded = pad_center(img, 224)
    np.testing.assert_allclose(out[0], normalize99(padded), rtol=1e-6)
    # padding takes part in the percentiles: p1 is 0, so the padded border stays exactly 0
    assert out[0, 0, 0] == 0.0


def test_prepare_channel_large_image_switches_to_tiles_each_normalised():
    img = np.random.default_rng(2).uniform(0, 1, (640, 640)).astype(np.float32)
    out = prepare_channel(img, Preprocessing())
    assert out.shape == (16, 224, 224)
    np.testing.assert_allclose(out[5], normalize99(make_tiles(img, 224, 0.1)[5]), rtol=1e-6)


def test_prepare_channel_rescale_and_forced_tile_modes():
    img = np.random.default_rng(3).uniform(0, 1, (300, 200)).astype(np.float32)
    rescaled = prepare_channel(img, Preprocessing(mode="rescale"))
    assert rescaled.shape == (1, 224, 224)
    np.testing.assert_allclose(rescaled[0], normalize99(resize(pad_to_square(img), 224)), rtol=1e-5, atol=1e-6)
    small = prepare_channel(
        np.random.default_rng(4).uniform(size=(50, 50)).astype(np.float32), Preprocessing(mode="tile")
    )
    assert small.shape == (1, 224, 224)


def test_input_size_must_be_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        Preprocessing(input_size=100)
