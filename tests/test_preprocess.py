"""Preprocessing against the rules of Microsnoop's extract_embeddings (microsnoop-publish)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from msnoop.preprocess.geometry import make_tiles, pad_center, pad_to_square, resize, tile_starts
from msnoop.preprocess.normalize import normalize99
from msnoop.preprocess.presets import TIGHT_FLOOR, TIGHT_MULTIPLE, Preprocessing, prepare_channel, tight_canvas


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


# ----------------------------------------------------------------------------------------------- tight canvas
def test_tight_canvas_is_the_smallest_multiple_of_16_that_holds_the_image_and_the_floor():
    # every size from 1 to 300 px on both sides (90,000 pairs): the defining properties, not examples
    sides = np.arange(1, 301)
    for h in sides:
        canvas = np.array([tight_canvas(int(h), int(w)) for w in sides])
        need = np.maximum(np.maximum(h, sides), TIGHT_FLOOR)
        assert (canvas % TIGHT_MULTIPLE == 0).all()
        assert (canvas >= need).all()
        assert (canvas - TIGHT_MULTIPLE < need).all()  # one step smaller would not hold the image or the floor
    assert (TIGHT_MULTIPLE, TIGHT_FLOOR) == (16, 64)
    assert [tight_canvas(64, 64), tight_canvas(65, 3), tight_canvas(1, 1), tight_canvas(200, 90)] == [64, 80, 64, 208]


@pytest.mark.parametrize("floor,multiple", [(0, 8), (32, 16), (100, 16), (64, 32)])
def test_tight_canvas_other_floors_and_multiples(floor, multiple):
    for h, w in np.random.default_rng(floor + multiple).integers(1, 400, size=(200, 2)):
        c = tight_canvas(int(h), int(w), floor=floor, multiple=multiple)
        need = max(h, w, floor)
        assert c % multiple == 0 and need <= c < need + multiple


def _generated_sizes(n: int = 60, seed: int = 0) -> list[tuple[int, int]]:
    """Image sizes around every boundary that matters (the floor, multiples of 16, the input size) plus random ones."""
    edges = [1, 2, 15, 16, 17, 47, 63, 64, 65, 79, 80, 81, 127, 128, 129, 208, 209, 223, 224]
    rng = np.random.default_rng(seed)
    sizes = [(e, int(rng.choice(edges))) for e in edges] + [tuple(map(int, rng.integers(1, 225, 2))) for _ in range(n)]
    return sizes


@pytest.mark.parametrize("h,w", _generated_sizes())
def test_tight_mode_pads_to_the_tight_canvas_centred_and_normalises_after_padding(h, w):
    img = np.random.default_rng(h * 1000 + w).uniform(5, 50, (h, w)).astype(np.float32)
    out = prepare_channel(img, Preprocessing(mode="tight"))
    side = tight_canvas(h, w)
    assert out.shape == (1, side, side) and out.dtype == np.float32 and side <= 224
    # the same rule as native mode, on the small canvas: centred zero padding, then percentiles over the canvas
    np.testing.assert_array_equal(out[0], normalize99(pad_center(img, side)))


def test_tight_mode_tiles_images_larger_than_the_input_size_as_native_does():
    img = np.random.default_rng(5).uniform(0, 1, (300, 100)).astype(np.float32)
    np.testing.assert_array_equal(
        prepare_channel(img, Preprocessing(mode="tight")), prepare_channel(img, Preprocessing())
    )


def test_tight_canvas_never_exceeds_an_input_size_that_is_not_a_multiple_of_16():
    img = np.ones((195, 195), np.float32)
    img[0, 0] = 2
    assert prepare_channel(img, Preprocessing(mode="tight", input_size=200)).shape == (1, 200, 200)  # not 208
    assert prepare_channel(img[:50, :50], Preprocessing(mode="tight", input_size=200)).shape == (1, 64, 64)


@pytest.mark.parametrize("h,w", _generated_sizes(n=20, seed=1))
def test_native_mode_is_unchanged_by_the_tight_option(h, w):
    """The reference path (mode native) still pads every image that fits to the full input size."""
    img = np.random.default_rng(h + 7 * w).uniform(0, 9, (h, w)).astype(np.float32)
    np.testing.assert_array_equal(prepare_channel(img, Preprocessing()), normalize99(pad_center(img, 224))[None])
