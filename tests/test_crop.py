"""Cell-region crops (Microsnoop ``crop_inst`` with ``rsc_crop=True``, ``mode='bbox'``, microsnoop-publish)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from msnoop.preprocess.crop import CROP_TABLE_COLUMNS, crop_cells, crop_windows

IMAGE_DTYPES = [np.uint8, np.uint16, np.int32, np.float32, np.float64]
LABEL_DTYPES = [np.uint8, np.uint16, np.int32, np.int64, np.uint32]


def coded_image(n_chan: int, h: int, w: int, dtype: type) -> np.ndarray:
    """Pixel values that identify (channel, row, col) and fit every dtype used here (max 3 * 64 + 63 = 255)."""
    c, r, col = np.meshgrid(np.arange(n_chan), np.arange(h), np.arange(w), indexing="ij")
    return ((c * 64 + (r % 8) * 8 + col % 8) + 1).astype(dtype)


def expected_crop(image: np.ndarray, window: tuple[int, int, int, int], size: int) -> np.ndarray:
    r0, c0, r1, c1 = window
    out = np.zeros((image.shape[0], size, size), np.float32)
    h, w = r1 - r0, c1 - c0
    top, left = (size - h) // 2, (size - w) // 2
    out[:, top : top + h, left : left + w] = image[:, r0:r1, c0:c1]
    return out


@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("image_dtype", IMAGE_DTYPES)
def test_hand_computed_window_and_content(image_dtype, label_dtype):
    labels = np.zeros((40, 40), label_dtype)
    labels[10:14, 20:26] = 7  # rows 10..13, cols 20..25 (inclusive)
    image = coded_image(2, 40, 40, image_dtype)
    crops, table = crop_cells(image, labels, ratio=2.0, size=32)
    # extents (reference: max - min) = 3 and 5 -> half = 5 * 2 = 10 (cap 16); centre (10 + 3 // 2, 20 + 5 // 2)
    # = (11, 22) -> rows [1, 21), cols [12, 32); 20 x 20 padded by 6 on each side.
    assert crops.shape == (1, 2, 32, 32) and crops.dtype == np.float32
    row = table.iloc[0]
    assert row["cell_id"] == 7 and row["window"] == (1, 12, 21, 32)
    assert row["bbox"] == (10, 20, 14, 26)
    assert row["area"] == 24
    assert (row["centroid_y"], row["centroid_x"]) == (11.5, 22.5)
    assert not row["resized"]
    np.testing.assert_array_equal(crops[0], expected_crop(image.astype(np.float32), (1, 12, 21, 32), 32))
    assert crops[0, :, :6].max() == 0 and crops[0, :, 26:].max() == 0  # zero padding, centred


def test_half_size_capped_at_size_over_two():
    labels = np.zeros((100, 100), np.int32)
    labels[40:51, 45:50] = 1  # extents 10 and 4 -> half 10 * 2 = 20, capped at 16 // 2 = 8
    crops, table = crop_cells(np.ones((1, 100, 100), np.float32), labels, ratio=2.0, size=16)
    assert table.loc[0, "window"] == (37, 39, 53, 55)  # centre (45, 47) +- 8
    assert crops.shape == (1, 1, 16, 16) and crops.min() == 1.0  # window fills the crop exactly


def test_window_clipped_at_the_image_edge_and_padding_centred():
    labels = np.zeros((30, 30), np.int32)
    labels[2:5, 3:6] = 4  # extents 2 -> half 2 * 3 = 6; centre (3, 4)
    image = coded_image(1, 30, 30, np.float32)
    crops, table = crop_cells(image, labels, ratio=3.0, size=20)
    assert table.loc[0, "window"] == (0, 0, 9, 10)  # (3-6, 4-6) clipped to 0; ends 3+6, 4+6
    exp = expected_crop(image, (0, 0, 9, 10), 20)  # 9 x 10 content at top (20-9)//2 = 5, left 5
    np.testing.assert_array_equal(crops[0], exp)
    assert crops[0, 0, 5, 5] == image[0, 0, 0] and crops[0, 0, 4].max() == 0


def test_fractional_half_size_truncates_like_int():
    labels = np.zeros((50, 50), np.int32)
    labels[20:24, 20:25] = 1  # extents 3, 4 -> half 4 * 1.25 = 5.0; centre (21, 22) -> rows [16, 26), cols [17, 27)
    labels[30:33, 30:33] = 2  # extents 2 -> half 2.5; centre (31, 31) -> [int(28.5), int(33.5)) = [28, 33)
    t = crop_windows(labels, ratio=1.25, size=64)
    assert t.set_index("cell_id").loc[1, "window"] == (16, 17, 26, 27)
    assert t.set_index("cell_id").loc[2, "window"] == (28, 28, 33, 33)


@pytest.mark.parametrize(
    "where",
    [np.s_[0:4, 10:14], np.s_[10:14, 0:4], np.s_[26:30, 10:14], np.s_[10:14, 26:30]],
    ids=["top", "left", "bottom", "right"],
)
def test_border_instances_skipped(where):
    labels = np.zeros((30, 30), np.int32)
    labels[where] = 3
    labels[12:16, 12:16] = 5
    crops, table = crop_cells(np.ones((1, 30, 30)), labels, size=16)
    assert table["cell_id"].tolist() == [5] and len(crops) == 1
    crops, table = crop_cells(np.ones((1, 30, 30)), labels, size=16, skip_border=False)
    assert table["cell_id"].tolist() == [3, 5]


def test_order_non_consecutive_and_huge_label_values():
    labels = np.zeros((60, 60), np.int64)
    labels[10:15, 10:15] = 300
    labels[30:35, 30:35] = 5
    labels[40:45, 10:15] = 2**40  # beyond the direct find_objects range
    _, table = crop_cells(np.ones((1, 60, 60)), labels, ratio=1.0, size=16)
    assert table["cell_id"].tolist() == [5, 300, 2**40]
    assert table.set_index("cell_id").loc[2**40, "window"] == (38, 8, 46, 16)


def test_neighbours_are_kept_in_the_crop():
    labels = np.zeros((40, 40), np.int32)
    labels[15:20, 15:20] = 1
    labels[15:20, 21:24] = 2
    image = (labels * 10).astype(np.float32)[None]
    crops, table = crop_cells(image, labels, ratio=2.0, size=32)
    first = crops[table.index[table["cell_id"] == 1][0], 0]
    assert set(np.unique(first)) == {0.0, 10.0, 20.0}  # 'bbox' mode: the neighbour (20) is not masked


def test_oversize_resize_keeps_aspect_and_fits():
    labels = np.zeros((200, 200), np.int32)
    labels[80:121, 90:111] = 1  # extents 40, 20 -> half 80 (no cap) -> rows [20, 180), cols [20, 180)
    labels[100:103, 30:33] = 2  # small: not resized
    image = np.full((2, 200, 200), 5.0, np.float32)
    image[:, :, :60] = 0.0  # left part dark, so the resized crop has a gradient
    crops, table = crop_cells(image, labels, ratio=2.0, size=32, oversize="resize")
    t = table.set_index("cell_id")
    assert t.loc[1, "window"] == (20, 20, 180, 180) and t.loc[1, "resized"]
    assert not t.loc[2, "resized"]
    big = crops[0]
    assert big.shape == (2, 32, 32)
    assert big[:, :, -1].min() == 5.0 and big[:, :, 0].max() == 0.0  # 160 -> 32: whole window, dark left
    # capped mode: same instance gives a 32 x 32 window of the centre
    crops_c, table_c = crop_cells(image, labels, ratio=2.0, size=32)
    assert table_c.set_index("cell_id").loc[1, "window"] == (84, 84, 116, 116)


def test_oversize_resize_non_square_window_is_padded():
    labels = np.zeros((100, 300), np.int32)
    labels[45:56, 100:200] = 1  # extents 10, 99 -> half 99; centre (50, 149) -> rows [0, 100), cols [50, 248)
    crops, table = crop_cells(np.ones((1, 100, 300)), labels, ratio=1.0, size=50, oversize="resize")
    assert table.loc[0, "window"] == (0, 50, 100, 248)
    # scale 50 / 198 -> 25 x 50 content, padded to rows [12, 37)
    filled = crops[0, 0] > 0
    assert filled.sum() == 25 * 50 and filled[12:37].all() and not filled[:12].any()


def test_no_cells_gives_empty_outputs():
    crops, table = crop_cells(np.ones((3, 20, 20), np.uint16), np.zeros((20, 20), np.int32), size=16)
    assert crops.shape == (0, 3, 16, 16) and crops.dtype == np.float32
    assert isinstance(table, pd.DataFrame) and len(table) == 0 and list(table.columns) == CROP_TABLE_COLUMNS
    only_border = np.zeros((20, 20), np.int32)
    only_border[0:3, 5:8] = 1
    crops, table = crop_cells(np.ones((3, 20, 20)), only_border, size=16)
    assert crops.shape == (0, 3, 16, 16) and len(table) == 0


def test_two_d_image_is_one_channel():
    labels = np.zeros((20, 20), np.int32)
    labels[8:11, 8:11] = 1
    crops, _ = crop_cells(np.ones((20, 20), np.uint8), labels, size=8)
    assert crops.shape == (1, 1, 8, 8)


def test_bool_labels_are_one_instance():
    mask = np.zeros((20, 20), bool)
    mask[8:11, 8:11] = True
    _, table = crop_cells(np.ones((1, 20, 20)), mask, size=8)
    assert table["cell_id"].tolist() == [1]


@pytest.mark.parametrize(
    ("image", "labels", "kwargs", "match"),
    [
        (np.ones((2, 20, 30)), np.zeros((30, 20), np.int32), {}, r"labels shape \(30, 20\).*\(20, 30\).*\(2, 20, 30\)"),
        (np.ones((20, 30, 2)), np.zeros((20, 30), np.int32), {}, r"labels shape \(20, 30\).*\(30, 2\).*moveaxis"),
        (np.ones((1, 1, 8, 8)), np.zeros((8, 8), np.int32), {}, r"\[C, H, W\].*\(1, 1, 8, 8\)"),
        (np.ones((1, 8, 8)), np.zeros((8, 8), np.float32), {}, "integer dtype"),
        (np.ones((1, 8, 8)), -np.ones((8, 8), np.int32), {}, ">= 0"),
        (np.ones((1, 8, 8), bool), np.zeros((8, 8), np.int32), {}, "integer or float"),
        (np.ones((1, 8, 8)), np.zeros((8, 8), np.int32), {"ratio": 0}, "ratio"),
        (np.ones((1, 8, 8)), np.zeros((8, 8), np.int32), {"size": 0}, "size"),
        (np.ones((1, 8, 8)), np.zeros((8, 8), np.int32), {"oversize": "crop"}, "oversize"),
    ],
)
def test_invalid_inputs(image, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        crop_cells(image, labels, **kwargs)


def test_segment_then_crop():
    from msnoop.segment.builtin import segment_nuclei

    yy, xx = np.mgrid[:128, :128]
    img = np.full((128, 128), 10.0)
    for cy, cx in [(40, 40), (40, 90), (90, 64)]:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 81] += 100.0
    labels = segment_nuclei(img, diameter=18)
    crops, table = crop_cells(np.stack([img, img / 2]), labels, ratio=2.0, size=64)
    assert crops.shape == (3, 2, 64, 64)
    np.testing.assert_allclose(table["centroid_y"].to_numpy(), [40, 40, 90], atol=0.5)
    np.testing.assert_allclose(crops[:, 1], crops[:, 0] / 2)
