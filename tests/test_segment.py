"""Nucleus segmentation (built-in and cellpose backends) and AP at IoU thresholds."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from pydantic import ValidationError

from msnoop.segment.metrics import (
    average_precision,
    evaluate_segmentation,
    iou_matrix,
    match_instances,
    read_mask,
    read_pair,
    summarize_ap,
)
from msnoop.models import checkpoint
from msnoop.segment import segment
from msnoop.segment.config import SegmentationConfig
from msnoop.segment import cellpose_backend as cpb
from msnoop.segment.builtin import estimate_diameter, segment_nuclei

# ---------------------------------------------------------------------------------------------------
# synthetic nuclei


def disc_image(
    centres: list[tuple[int, int]],
    radius: float,
    shape: tuple[int, int] = (128, 128),
    *,
    intensities: list[float] | None = None,
    background: float = 10.0,
    noise: float = 2.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Float image of bright discs on a noisy background, and the ground-truth labels (1..N)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, background, dtype=np.float64)
    gt = np.zeros(shape, dtype=np.int32)
    for k, (cy, cx) in enumerate(centres, start=1):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        img[inside] += 100.0 if intensities is None else intensities[k - 1]
        gt[inside] = k
    img += np.random.default_rng(seed).normal(0.0, noise, shape)
    return img, gt


GRID = [(24, 24), (24, 70), (24, 110), (70, 30), (72, 80), (110, 20), (108, 64), (106, 106)]


def as_dtype(img: np.ndarray, dtype: type) -> np.ndarray:
    img = np.clip(img, 0, None)
    if dtype is np.uint8:
        return np.clip(img, 0, 255).astype(np.uint8)
    if dtype is np.uint16:
        return (img * 200).astype(np.uint16)
    if dtype is np.int32:
        return img.astype(np.int32)
    return (img / 255.0).astype(dtype)


# ---------------------------------------------------------------------------------------------------
# AP at IoU thresholds


class TestAveragePrecision:
    def test_iou_matrix_known_values(self):
        gt = np.zeros((4, 10), np.int32)
        gt[:, 0:4] = 1  # 16 px
        gt[:, 6:10] = 2  # 16 px
        pred = np.zeros_like(gt)
        pred[:, 0:2] = 5  # inside gt 1: IoU 8/16
        pred[:, 5:10] = 9  # gt 2 fully inside: IoU 16/20
        iou = iou_matrix(gt, pred)
        np.testing.assert_allclose(iou, [[0.5, 0.0], [0.0, 0.8]])

    def test_counts_and_ap(self):
        gt = np.zeros((10, 40), np.int32)
        gt[:, 0:8] = 1
        gt[:, 10:18] = 2
        gt[:, 20:28] = 3
        pred = np.zeros_like(gt)
        pred[:, 0:8] = 1  # perfect
        pred[:, 10:17] = 2  # IoU 7/8
        pred[:, 20:23] = 3  # IoU 3/8 < 0.5: gt 3 is a false negative, pred 3 a false positive
        pred[:, 32:38] = 4  # nothing there: false positive
        r = match_instances(gt, pred, 0.5)
        assert (r.tp[0], r.fp[0], r.fn[0], r.n_true, r.n_pred) == (2, 2, 1, 3, 4)
        assert r.ap[0] == pytest.approx(2 / 5)
        assert r.precision[0] == pytest.approx(2 / 4)
        assert r.recall[0] == pytest.approx(2 / 3)

    def test_iou_exactly_at_threshold_matches(self):
        gt = np.zeros((2, 8), np.int32)
        gt[:, 0:4] = 1
        pred = np.zeros_like(gt)
        pred[:, 0:2] = 1  # IoU exactly 0.5
        assert average_precision(gt, pred, 0.5)[0] == 1.0
        assert average_precision(gt, pred, 0.51)[0] == 0.0

    def test_optimal_not_greedy_matching(self):
        # A-P1 has the highest IoU, but matching A-P2 and B-P1 gives two pairs (threshold 0.15).
        gt = np.zeros((1, 20), np.int32)
        gt[0, 0:10] = 1  # A
        gt[0, 10:14] = 2  # B
        pred = np.zeros_like(gt)
        pred[0, 3:12] = 1  # P1: IoU(A) 7/12, IoU(B) 2/11
        pred[0, 0:3] = 2  # P2: IoU(A) 3/10
        iou = iou_matrix(gt, pred)
        assert iou[0, 0] > iou[0, 1] >= 0.15 and iou[1, 0] >= 0.15 and iou[1, 1] == 0
        r = match_instances(gt, pred, [0.15, 0.5])
        assert r.tp.tolist() == [2, 1]
        np.testing.assert_allclose(r.ap, [1.0, 1 / 3])

    def test_label_values_need_not_be_consecutive(self):
        gt = np.zeros((6, 6), np.int64)
        gt[:3, :3] = 1000
        gt[3:, 3:] = 7
        pred = np.zeros((6, 6), np.uint16)
        pred[:3, :3] = 2
        pred[3:, 3:] = 65535
        assert average_precision(gt, pred)[0] == 1.0

    def test_empty_cases(self):
        z = np.zeros((5, 5), np.int32)
        one = z.copy()
        one[1:3, 1:3] = 1
        assert average_precision(z, z)[0] == 1.0
        assert average_precision(z, one)[0] == 0.0
        assert average_precision(one, z)[0] == 0.0

    def test_evaluate_segmentation_mean_and_pooled(self):
        a = np.zeros((4, 4), np.int32)
        a[:2, :2] = 1
        b = np.zeros((4, 4), np.int32)
        b[:2, :2] = 1
        b[2:, 2:] = 2
        # image 1 perfect (AP 1); image 2: one of two found (AP 1/2)
        res = evaluate_segmentation([(a, a), (b, a)])
        np.testing.assert_allclose(res["per_image"][:, 0], [1.0, 0.5])
        assert res["mean"][0] == pytest.approx(0.75)
        assert res["pooled"][0] == pytest.approx(2 / 3)
        with pytest.raises(ValueError, match="at least one"):
            evaluate_segmentation([])

    def test_summarize_ap_by_hand(self):
        rows = [
            {"image": "a/1.png", "ap": [1.0, 0.5], "tp": [2, 1], "fp": [0, 1], "fn": [0, 1], "n_true": 2, "n_pred": 2},
            {"image": "a/2.png", "ap": [0.5, 0.0], "tp": [1, 0], "fp": [0, 0], "fn": [1, 2], "n_true": 2, "n_pred": 1},
            {"image": "b/1.png", "ap": [0.0, 0.0], "tp": [0, 0], "fp": [1, 1], "fn": [0, 0], "n_true": 0, "n_pred": 1},
        ]
        out = summarize_ap(rows, (0.5, 0.75))
        assert out["n_images"] == 3 and out["n_true"] == 4 and out["n_pred"] == 4
        assert out["mean_ap@0.5"] == pytest.approx(0.5) and out["mean_ap@0.75"] == pytest.approx(0.1667)
        assert out["pooled_ap@0.5"] == pytest.approx(0.6) and out["pooled_ap@0.75"] == pytest.approx(1 / 6, abs=1e-4)
        assert out["min_ap@0.5"] == 0.0
        assert out["mean_ap@0.5_by_folder"] == {"a": 0.75, "b": 0.0}
        # rows without counts (segtrain's) get means only; a threshold count that does not match is an error
        bare = summarize_ap([{"image": "x.png", "ap": [0.25, 0.5]}], (0.5, 0.75))
        assert "pooled_ap@0.5" not in bare and bare["mean_ap@0.75"] == 0.5
        with pytest.raises(ValueError, match="one per threshold"):
            summarize_ap(rows, (0.5,))
        assert summarize_ap([], (0.5,)) == {"n_images": 0}

    def test_read_mask_rejects_an_intensity_image(self, tmp_path):
        from PIL import Image

        img = np.full((8, 8), 0.5, np.float32)
        np.save(tmp_path / "soft.npy", img)
        with pytest.raises(ValueError, match=r"soft\.npy.*instance label image"):
            read_mask(tmp_path / "soft.npy")
        labels = np.zeros((8, 8), np.uint8)
        labels[2:5, 2:5] = 3
        Image.fromarray(labels).save(tmp_path / "m.png")
        Image.fromarray((labels * 40).astype(np.uint8)).save(tmp_path / "i.png")
        img2, gt = read_pair(tmp_path / "i.png", tmp_path / "m.png")
        assert gt.dtype == np.int32 and gt.max() == 3 and img2.shape == gt.shape
        Image.fromarray(np.zeros((4, 8), np.uint8)).save(tmp_path / "small.png")
        with pytest.raises(ValueError, match=r"small\.png.*\(4, 8\).*i\.png"):
            read_pair(tmp_path / "i.png", tmp_path / "small.png")

    @pytest.mark.parametrize(
        ("true", "pred", "match"),
        [
            (np.zeros((3, 3), np.int32), np.zeros((3, 4), np.int32), r"same shape.*\(3, 3\).*\(3, 4\)"),
            (np.zeros((3, 3), np.float32), np.zeros((3, 3), np.int32), "integer dtype"),
            (np.zeros((2, 3, 3), np.int32), np.zeros((2, 3, 3), np.int32), "2-D"),
            (-np.ones((3, 3), np.int32), np.zeros((3, 3), np.int32), "negative"),
        ],
    )
    def test_invalid_inputs(self, true, pred, match):
        with pytest.raises(ValueError, match=match):
            match_instances(true, pred)

    def test_invalid_threshold(self):
        z = np.zeros((3, 3), np.int32)
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            match_instances(z, z, 1.5)


# ---------------------------------------------------------------------------------------------------
# built-in segmenter


class TestBuiltin:
    @pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32, np.float64])
    def test_separate_discs_all_found(self, dtype):
        img, gt = disc_image(GRID, radius=9)
        labels = segment_nuclei(as_dtype(img, dtype), diameter=18)
        assert labels.dtype == np.int32 and labels.shape == img.shape
        assert sorted(np.unique(labels)) == list(range(len(GRID) + 1))  # consecutive 1..N
        assert average_precision(gt, labels, 0.5)[0] == 1.0
        assert average_precision(gt, labels, 0.75)[0] == 1.0

    def test_diameter_is_estimated(self):
        img, gt = disc_image(GRID, radius=9)
        labels = segment_nuclei(img)  # diameter=None
        assert average_precision(gt, labels, 0.5)[0] == 1.0
        d = estimate_diameter(gt > 0)
        assert d == pytest.approx(18, rel=0.1)

    def test_touching_pair_is_split(self):
        img, gt = disc_image([(40, 34), (40, 58), (90, 60)], radius=13)
        # the first two discs overlap by 2 px: one connected blob with a neck
        assert len(np.unique(gt)) == 4
        labels = segment_nuclei(img, diameter=26)
        assert labels.max() == 3
        assert average_precision(gt, labels, 0.5)[0] == 1.0

    def test_large_nuclei_use_the_downsampled_path(self):
        centres = [(70, 70), (70, 210), (200, 80), (210, 220)]
        img, gt = disc_image(centres, radius=40, shape=(283, 301))  # shape not a multiple of the factor
        labels = segment_nuclei(img, diameter=80)  # working factor 3
        assert labels.shape == img.shape
        assert labels.max() == 4
        assert average_precision(gt, labels, 0.75)[0] == 1.0

    def test_dim_nuclei_next_to_very_bright_ones(self):
        # two saturated blobs would pull a plain Otsu threshold above the six dim nuclei
        intens = [1000.0, 1000.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0]
        img, gt = disc_image(GRID, radius=9, intensities=intens, noise=1.0)
        labels = segment_nuclei(img, diameter=18)
        assert average_precision(gt, labels, 0.5)[0] == 1.0

    def test_border_nuclei_are_kept(self):
        img, gt = disc_image([(0, 40), (64, 64), (100, 127)], radius=10)
        labels = segment_nuclei(img, diameter=20)
        assert average_precision(gt, labels, 0.5)[0] == 1.0

    def test_small_debris_is_dropped(self):
        img, gt = disc_image(GRID, radius=9)
        img[60:62, 50:52] += 100.0  # a 4-px speck, far below the size floor
        labels = segment_nuclei(img, diameter=18)
        assert labels.max() == len(GRID)
        assert labels[60, 50] == 0

    def test_min_area_override_in_pixels(self):
        img, _ = disc_image(GRID, radius=9)
        assert segment_nuclei(img, diameter=18, min_area=300).max() == 0  # discs are ~254 px
        assert segment_nuclei(img, diameter=18, max_area=200).max() == 0

    def test_deterministic(self):
        img, _ = disc_image(GRID, radius=9, seed=3)
        np.testing.assert_array_equal(segment_nuclei(img), segment_nuclei(img))

    @pytest.mark.parametrize("value", [0.0, 7.0])
    def test_flat_image_gives_no_nuclei(self, value):
        labels = segment_nuclei(np.full((50, 60), value, np.float32))
        assert labels.dtype == np.int32 and labels.shape == (50, 60) and labels.max() == 0

    def test_noise_only_gives_few_objects(self):
        rng = np.random.default_rng(1)
        labels = segment_nuclei(rng.normal(100, 5, (128, 128)), diameter=18)
        assert labels.max() <= 2

    @pytest.mark.parametrize(
        ("image", "match"),
        [
            (np.zeros((2, 32, 32)), r"one channel \[H, W\]; found shape \(2, 32, 32\).*image\[c\]"),
            (np.zeros(32), r"found shape \(32,\)"),
            (np.zeros((0, 5)), "non-empty"),
            (np.zeros((8, 8), bool), "integer or float"),
            (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN"),
        ],
    )
    def test_invalid_images(self, image, match):
        with pytest.raises(ValueError, match=match):
            segment_nuclei(image)

    @pytest.mark.parametrize("kwargs", [{"diameter": 0}, {"diameter": -3.0}, {"seed_h": -0.1}, {"work_diameter": 0}])
    def test_invalid_parameters(self, kwargs):
        with pytest.raises(ValueError):
            segment_nuclei(np.zeros((16, 16)), **kwargs)


# ---------------------------------------------------------------------------------------------------
# dispatcher and config


class TestDispatch:
    def test_builtin_is_default(self):
        img, _ = disc_image(GRID, radius=9)
        np.testing.assert_array_equal(segment(img, diameter=18), segment_nuclei(img, diameter=18))

    def test_unknown_backend_and_option(self):
        img = np.zeros((16, 16))
        with pytest.raises(ValueError, match="unknown segmentation backend 'stardist'"):
            segment(img, backend="stardist")
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['diam'\]"):
            segment(img, diam=10)

    def test_config(self):
        cfg = SegmentationConfig(diameter=18, params={"min_solidity": 0.5})
        img, gt = disc_image(GRID, radius=9)
        assert cfg.kwargs() == {"backend": "builtin", "diameter": 18.0, "min_solidity": 0.5}
        assert average_precision(gt, cfg.run(img))[0] == 1.0

    @pytest.mark.parametrize(
        ("data", "match"),
        [
            ({"backend": "builtin", "diametre": 5}, "diametre"),
            ({"backend": "cellpose"}, "model is required"),
            ({"backend": "builtin", "model": "nuclei"}, "apply to backend .cellpose. only"),
            ({"params": {"bogus": 1}}, r"unknown segmentation.params \['bogus'\]"),
            ({"params": {"diameter": 3}}, "not inside segmentation.params"),
            ({"diameter": 0}, "greater than 0"),
            ({"backend": "cellpose", "model": "x", "params": {"min_solidity": 0.5}}, "min_solidity"),
        ],
    )
    def test_config_errors(self, data, match):
        with pytest.raises(ValidationError, match=match):
            SegmentationConfig(**data)

    def test_cellpose_config_kwargs(self):
        cfg = SegmentationConfig(backend="cellpose", model="nuclei", params={"flow_threshold": 0.5})
        assert cfg.kwargs() == {
            "backend": "cellpose",
            "diameter": None,
            "flow_threshold": 0.5,
            "model": "nuclei",
            "gpu": False,
        }


# ---------------------------------------------------------------------------------------------------
# cellpose backend


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    folder = tmp_path / "cp_models"
    folder.mkdir()
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(folder))
    cpb._cached_model.cache_clear()
    yield folder
    cpb._cached_model.cache_clear()


class TestCellposeBackend:
    def test_missing_weights_file_is_named(self, tmp_path, model_dir):
        missing = tmp_path / "weights" / "my_nuclei_model"
        with pytest.raises(FileNotFoundError, match="my_nuclei_model") as err:
            segment(np.zeros((32, 32)), backend="cellpose", model=str(missing))
        assert str(missing) in str(err.value)
        assert "model=/path/to/weights" in str(err.value)

    def test_missing_named_model_lists_cache_paths(self, model_dir):
        with pytest.raises(FileNotFoundError) as err:
            cpb.resolve_cellpose_weights("nuclei")
        msg = str(err.value)
        assert str(model_dir / "nucleitorch_0") in msg and str(model_dir / "nuclei") in msg
        assert "never downloads" in msg

    def test_weights_resolution(self, tmp_path, model_dir, monkeypatch):
        shipped = tmp_path / "pkg_weights"
        shipped.mkdir()
        (shipped / "msnoop_nuclei_coelho").write_bytes(b"x")
        (model_dir / "msnoop_nuclei_coelho").write_bytes(b"x")
        monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", shipped)
        # a name that ships with msnoop wins over a file of the same name in cellpose's folder
        assert cpb.resolve_cellpose_weights("msnoop_nuclei_coelho") == shipped / "msnoop_nuclei_coelho"
        with pytest.raises(FileNotFoundError, match=str(shipped / "nuclei")):
            cpb.resolve_cellpose_weights("nuclei")  # not yet in either folder: both places are listed
        (model_dir / "nucleitorch_0").write_bytes(b"x")
        (model_dir / "cyto3").write_bytes(b"x")
        own = tmp_path / "own.pth"
        own.write_bytes(b"x")
        assert cpb.resolve_cellpose_weights("nuclei") == model_dir / "nucleitorch_0"
        assert cpb.resolve_cellpose_weights("cyto3") == model_dir / "cyto3"
        assert cpb.resolve_cellpose_weights(own) == own
        with pytest.raises(FileNotFoundError):
            cpb.resolve_cellpose_weights(str(tmp_path))  # a folder is not a weights file

    def test_cellpose_not_importable(self, tmp_path, model_dir, monkeypatch):
        weights = tmp_path / "w"
        weights.write_bytes(b"x")
        monkeypatch.setitem(sys.modules, "cellpose", None)  # makes `import cellpose` raise ImportError
        with pytest.raises(ImportError, match=r"pip install 'msnoop\[cellpose\]'"):
            segment(np.zeros((32, 32)), backend="cellpose", model=str(weights))

    @pytest.mark.parametrize("version", ["4.0.6", types.SimpleNamespace(version="4.0.6")], ids=["str", "module"])
    def test_cellpose_4_is_refused(self, tmp_path, model_dir, monkeypatch, version):
        weights = tmp_path / "w"
        weights.write_bytes(b"x")
        fake = types.ModuleType("cellpose")
        fake.version = version  # cellpose 3.x/4.x expose the version string as `cellpose.version`
        fake.models = types.SimpleNamespace()
        monkeypatch.setitem(sys.modules, "cellpose", fake)
        monkeypatch.setitem(sys.modules, "cellpose.models", fake.models)
        with pytest.raises(ImportError, match=r"3\.1 API only"):
            cpb.load_cellpose_model(weights)

    def test_invalid_image(self, model_dir):
        with pytest.raises(ValueError, match=r"found shape \(2, 8, 8\)"):
            cpb.segment_cellpose(np.zeros((2, 8, 8)), model="nuclei")

    @pytest.mark.cellpose
    def test_real_eval_with_local_weights(self, tmp_path, model_dir):
        pytest.importorskip("cellpose", reason="cellpose 3.1 not installed (pip install 'msnoop[cellpose]')")
        from cellpose import models

        net = models.CellposeModel(gpu=False, pretrained_model=False, mkldnn=False)  # random weights, no download
        weights = tmp_path / "random_cp3"
        net.net.save_model(str(weights))
        img, _ = disc_image(GRID, radius=9)
        labels = segment(img, backend="cellpose", model=str(weights), diameter=18)
        assert labels.shape == img.shape and labels.dtype == np.int32
        assert cpb.load_cellpose_model(weights) is cpb.load_cellpose_model(weights)  # cached

    def test_shipped_nucleus_model_is_found_by_name(self, model_dir):
        weights = cpb.resolve_cellpose_weights("msnoop_nuclei_coelho")
        assert weights == checkpoint.WEIGHTS_DIR / "msnoop_nuclei_coelho"
        card = weights.with_name(weights.name + ".md").read_text()
        assert "Shipped: yes" in card and "| cellpose (this model) |" in card

    @pytest.mark.slow
    @pytest.mark.cellpose
    def test_shipped_nucleus_model_segments_discs(self, model_dir):
        pytest.importorskip("cellpose", reason="cellpose 3.1 not installed (pip install 'msnoop[cellpose]')")
        img, gt = disc_image(GRID, radius=9)
        labels = segment(img, backend="cellpose", model="msnoop_nuclei_coelho", diameter=18)
        assert average_precision(gt, labels, 0.5)[0] >= 7 / 8  # trained on Hoechst nuclei, it finds bright discs


# ---------------------------------------------------------------------------------------------------
# real data


@pytest.mark.data
def test_coelho_real_images_ap(shared_data):
    from PIL import Image

    root = shared_data("coelho2009_nuclei")
    aps = []
    for name in ("gnf/dna-0.png", "gnf/dna-14.png", "ic100/dna-0.png"):
        img = np.array(Image.open(root / "images" / name))
        gt = np.array(Image.open(root / "masks" / name))
        aps.append(average_precision(gt, segment_nuclei(img), 0.5)[0])
    assert min(aps) > 0.6 and np.mean(aps) > 0.75, aps


@pytest.mark.data
def test_bbbc013_dna_channel(shared_data):
    import tifffile

    img = tifffile.imread(shared_data("bbbc013") / "images" / "Channel2-01-A-01.tif")
    labels = segment_nuclei(img)
    areas = np.bincount(labels.ravel())[1:]
    assert 150 < labels.max() < 600  # a dense U2OS field
    assert 100 < np.median(areas) < 600  # nuclei ~ 12-25 px across
