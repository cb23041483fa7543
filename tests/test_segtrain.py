"""``job: segtrain``: image/mask pairing, the split by image, config validation, and (with cellpose 3.1
installed) a real tiny training run whose weights the cellpose backend then uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from msnoop.core.config import ConfigError
from msnoop.job_kinds import build_config
from msnoop.segment.segtrain import SegTrainJob, find_pairs, split_pairs


def _discs(seed: int, shape=(128, 128), n=7, radius=9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 10.0)
    gt = np.zeros(shape, np.uint16)
    k = 0
    while k < n:
        cy, cx = rng.integers(radius + 2, shape[0] - radius - 2, size=2)
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        if gt[inside].any():
            continue
        k += 1
        gt[inside] = k
        img[inside] += 120.0
    img += rng.normal(0, 3, shape)
    return np.clip(img, 0, 255).astype(np.uint8), gt


def _dataset(root, sets=("a", "b"), per_set=4, missing_mask=None):
    for s in sets:
        (root / "images" / s).mkdir(parents=True)
        (root / "masks" / s).mkdir(parents=True)
        for i in range(per_set):
            img, gt = _discs(seed=hash((s, i)) % 1000)
            Image.fromarray(img).save(root / "images" / s / f"dna-{i}.png")
            if (s, i) != missing_mask:
                Image.fromarray(gt).save(root / "masks" / s / f"dna-{i}.png")
    return root / "images", root / "masks"


def test_pairs_split_by_image_within_each_folder(tmp_path):
    images, masks = _dataset(tmp_path, missing_mask=("b", 3))
    pairs, unmatched = find_pairs(images, masks)
    assert [p.relative_to(images).as_posix() for p in unmatched] == ["b/dna-3.png"]
    assert all(m == masks / p.relative_to(images) for p, m in pairs)
    train, held = split_pairs(pairs)
    names = lambda ps: [p.relative_to(images).as_posix() for p, _ in ps]
    assert names(train) == ["a/dna-0.png", "a/dna-2.png", "b/dna-0.png", "b/dna-2.png"]
    assert names(held) == ["a/dna-1.png", "a/dna-3.png", "b/dna-1.png"]
    assert not set(names(train)) & set(names(held))
    limited, _ = find_pairs(images, masks, limit=2)
    assert len(limited) == 4  # two per folder


def test_missing_masks_and_folders_are_named(tmp_path):
    images, _ = _dataset(tmp_path)
    empty = tmp_path / "no_masks"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"none of the 8 images .*\(expected e\.g\. .*no_masks/a/dna-0\.png"):
        find_pairs(images, empty)
    with pytest.raises(FileNotFoundError, match="masks folder .*nowhere does not exist"):
        find_pairs(images, tmp_path / "nowhere")
    with pytest.raises(ValueError, match="at least 2"):
        split_pairs(find_pairs(images, tmp_path / "masks", limit=None)[0][:1])


def test_config_is_validated_before_work(tmp_path):
    cfg = {"job": "segtrain", "data": {"images": "i", "masks": "m"}, "output": {"dir": str(tmp_path)}}
    job = build_config(cfg)
    assert isinstance(job, SegTrainJob) and job.train.epochs == 100 and job.output.half
    with pytest.raises(ConfigError, match="epochs"):
        build_config(cfg, overrides=[("train.epochs", 0)])
    with pytest.raises(ConfigError, match="epoch"):
        build_config(cfg, overrides=[("train.epoch", 3)])


def test_cellpose_absent_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from msnoop.segment.segtrain import run_segtrain

    images, masks = _dataset(tmp_path)
    monkeypatch.setitem(sys.modules, "cellpose", None)
    job = build_config({"job": "segtrain", "data": {"images": images, "masks": masks}, "output": {"dir": tmp_path}})
    with pytest.raises(ImportError, match=r"pip install 'msnoop\[cellpose\]'"):
        run_segtrain(job)


@pytest.mark.slow
@pytest.mark.cellpose
def test_real_training_run_writes_weights_the_backend_uses(tmp_path):
    pytest.importorskip("cellpose", reason="cellpose 3.1 not installed (pip install 'msnoop[cellpose]')")
    from msnoop.segment import cellpose_backend as cpb
    from msnoop.segment import segment
    from msnoop.segment.segtrain import run_segtrain

    images, masks = _dataset(tmp_path / "data")
    ship = tmp_path / "pkg" / "nuclei"
    job = build_config(
        {
            "job": "segtrain",
            "name": "tiny",
            "data": {"images": images, "masks": masks},
            "train": {"epochs": 2, "batch_size": 4, "bsize": 64, "min_train_masks": 1},
            "output": {"dir": tmp_path / "run", "ship_to": ship},
            "use_gpu": "no",
        }
    )
    rec = run_segtrain(job)
    out = tmp_path / "run"
    weights = out / "tiny"
    assert weights.is_file() and (out / "loss_curve.png").is_file() and (out / "resolved_config.yaml").is_file()
    assert not (out / "models").exists()
    saved = json.loads((out / "segtrain.json").read_text())
    assert saved["n_train"] == 4 and saved["n_holdout"] == 4 and len(saved["losses"]) == 2
    assert {r["backend"] for r in saved["holdout_images"]} == {"cellpose", "builtin"}
    for backend in ("cellpose", "builtin"):
        assert 0.0 <= rec["holdout"][backend]["mean_ap@0.5"] <= 1.0
    # shipped only when better than the built-in backend on the held-out images
    assert ship.is_file() == rec["beats_builtin"] == (ship.parent / "nuclei.md").is_file()
    assert "cellpose" in (out / "SEGMENTATION_CARD.md").read_text()
    cpb._cached_model.cache_clear()
    img = np.asarray(Image.open(images / "a" / "dna-1.png"))
    labels = segment(img, backend="cellpose", model=str(weights))  # float16 file, loaded by cellpose
    assert labels.shape == img.shape and labels.dtype == np.int32
