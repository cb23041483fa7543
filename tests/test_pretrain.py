"""Pretraining: data pool, loss/schedule, loss falls, exact resume, outputs, and a 2-worker Ray Train run."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

import msnoop.core.runtime
from msnoop.core.config import ConfigError
from msnoop.job_kinds import build_config, load_config
from msnoop.models.checkpoint import file_sha256, load_checkpoint
from msnoop.preprocess.geometry import pad_center
from msnoop.preprocess.normalize import normalize99
from msnoop.core.runtime import uses_bf16
from msnoop.train.config import PretrainJob
from msnoop.train.data import ChannelPool, batch_rng, compact, is_binary
from msnoop.train.loop import WarmupCosine, build_state, make_batch, reconstruction_loss, train_steps

REPO = Path(__file__).resolve().parents[1]


def _blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w), 5.0)
    for _ in range(max(2, h * w // 600)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, 7)
        img += rng.uniform(50, 200) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return (img + rng.normal(0, 1, img.shape)).clip(0).astype(np.uint16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two sources: ``cells`` (6 images x 2 channels, 80x80 and 24x24) and ``masks`` (one image + one label mask)."""
    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        side = 80 if i % 2 == 0 else 24
        row = {}
        for ch in ("dna", "gfp"):
            tifffile.imwrite(root / f"c{i}_{ch}.tif", _blobs(rng, side, side))
            row[f"{ch}_path"] = f"c{i}_{ch}.tif"
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "cells.csv", index=False)
    label = np.zeros((40, 40), np.uint16)
    label[5:20, 5:20] = 1
    tifffile.imwrite(root / "m0.tif", _blobs(rng, 40, 40))
    tifffile.imwrite(root / "m1.tif", label)
    pd.DataFrame({"img_path": ["m0.tif", "m1.tif"]}).to_csv(root / "masks.csv", index=False)
    return {"cells": root / "cells.csv", "masks": root / "masks.csv", "root": root}


def _job(synthetic: dict[str, Path], out: Path, **train: Any) -> PretrainJob:
    data = {
        "job": "pretrain",
        "name": "t",
        "data": {
            "crop_size": 32,
            "sources": [
                {"name": "cells", "input": {"manifest": str(synthetic["cells"]), "channels": ["dna", "gfp"]}},
                {"name": "masks", "input": {"manifest": str(synthetic["masks"]), "channels": ["img"]}},
            ],
        },
        "model": {"arch": "test_cnn"},
        "optim": {"lr": 3e-3},
        "train": {"steps": 30, "batch_size": 8, "log_every": 5, "checkpoint_every": 1000, **train},
        "output": {"dir": str(out), "figure_images": 2, "bn_recalibration_batches": 1},
    }
    job = build_config(data)
    assert isinstance(job, PretrainJob)
    return job


@pytest.fixture(scope="module")
def pool(synthetic: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ChannelPool:
    return ChannelPool.from_config(_job(synthetic, tmp_path_factory.mktemp("o")).data)


# -- config ------------------------------------------------------------------------------------


def test_config_registered_and_validated(synthetic: dict[str, Path], tmp_path: Path) -> None:
    job = _job(synthetic, tmp_path)
    assert job.warmup_steps == 2  # 5 % of 30, rounded
    bad = json.loads(job.model_dump_json())
    bad["data"]["crop_size"] = 40
    with pytest.raises(ConfigError, match="multiple of mask.patch_size"):
        build_config(bad)
    bad["data"]["crop_size"] = 32
    bad["train"]["epochs"] = 3
    with pytest.raises(ConfigError, match="unknown key 'train.epochs'"):
        build_config(bad)


@pytest.mark.parametrize("name", ["pretrain_default.yaml", "pretrain_smoke.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    job = load_config(REPO / "configs" / name)
    assert isinstance(job, PretrainJob)
    assert job.data.crop_size % job.mask.patch_size == 0


# -- data pool ---------------------------------------------------------------------------------


def test_pool_counts_and_drops_binary_images(pool: ChannelPool) -> None:
    desc = pool.describe()
    cells, masks = desc["sources"]
    assert (cells["n_images"], cells["n_samples"], cells["n_binary"]) == (6, 12, 0)
    assert (masks["n_samples"], masks["n_binary"]) == (2, 1)
    assert desc["n_samples"] == 13 and desc["preloaded"]
    assert sum(s["probability"] for s in desc["sources"]) == pytest.approx(1.0)
    # sqrt weighting: sqrt(12) : sqrt(1)
    assert cells["probability"] / masks["probability"] == pytest.approx(np.sqrt(12))
    for _ in range(20):  # the label mask is never drawn
        crop, s = pool.crop(np.random.default_rng(_), source=1)
        assert not is_binary(crop)


def test_pool_batches_are_deterministic_and_finite(pool: ChannelPool) -> None:
    a, sa = pool.batch(6, batch_rng(0, 0, 3))
    b, sb = pool.batch(6, batch_rng(0, 0, 3))
    c, _ = pool.batch(6, batch_rng(0, 1, 3))  # another rank: another stream
    assert a.shape == (6, 32, 32) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, b) and np.array_equal(sa, sb)
    assert not np.array_equal(a, c)


def test_small_image_crop_is_inference_padding(pool: ChannelPool) -> None:
    """Without augmentation, a 24 px image becomes exactly what inference feeds the network."""
    i = pool.ids[0].index("1/dna") if "1/dna" in pool.ids[0] else 1
    raw = pool.image(0, i)
    assert raw is not None and raw.shape == (24, 24)
    crop, valid = pool._window(raw, np.random.default_rng(0), augment=False)
    expected = normalize99(pad_center(raw.astype(np.float32), 32))
    np.testing.assert_allclose(normalize99(crop), expected, atol=1e-5)
    assert valid.sum() == 24 * 24


def test_lazy_reading_gives_the_same_crops(synthetic: dict[str, Path], tmp_path: Path, pool: ChannelPool) -> None:
    lazy = ChannelPool.from_config(_job(synthetic, tmp_path).data.model_copy(update={"preload_mb": 0}))
    assert not lazy.preloaded
    rng_a, rng_b = batch_rng(0, 0, 9), batch_rng(0, 0, 9)
    for _ in range(4):
        np.testing.assert_array_equal(lazy.crop(rng_a, source=0)[0], pool.crop(rng_b, source=0)[0])


def test_compact_dtypes() -> None:
    assert compact(np.array([[0.0, 255.0]])).dtype == np.uint8
    assert compact(np.array([[0.0, 4000.0]])).dtype == np.uint16
    assert compact(np.array([[0.5, 1.0]])).dtype == np.float32


# -- loop --------------------------------------------------------------------------------------


def test_schedule_and_losses() -> None:
    fn = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert fn(0) == pytest.approx(0.25) and fn(3) == pytest.approx(1.0)
    assert fn(4) == pytest.approx(1.0) and fn(20) == pytest.approx(0.1)
    assert all(fn(s) >= fn(s + 1) for s in range(4, 20))
    target = torch.zeros(1, 1, 4, 4)
    pred = torch.ones(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    pred[..., :2, :] = 3.0  # error 9 on masked pixels, 1 elsewhere
    assert float(reconstruction_loss(pred, target, mask, "masked")) == pytest.approx(9.0)
    assert float(reconstruction_loss(pred, target, mask, "full")) == pytest.approx(5.0)
    # two images: one with 2 masked pixels of error 1, one with 8 masked pixels of error 4
    target2 = torch.zeros(2, 1, 4, 4)
    pred2 = torch.stack([torch.ones(1, 4, 4), torch.full((1, 4, 4), 2.0)])
    mask2 = torch.zeros(2, 1, 4, 4)
    mask2[0, 0, 0, :2] = 1
    mask2[1, 0, :2, :] = 1
    assert float(reconstruction_loss(pred2, target2, mask2, "masked", "batch")) == pytest.approx((2 + 32) / 10)
    assert float(reconstruction_loss(pred2, target2, mask2, "masked", "image")) == pytest.approx((1 + 4) / 2)
    mask2[0] = 0  # an image with nothing masked does not count
    assert float(reconstruction_loss(pred2, target2, mask2, "masked", "image")) == pytest.approx(4.0)


def _eval_loss(state: Any, batch: torch.Tensor, job: PretrainJob) -> float:
    from msnoop.train.masking import mask_images

    masked, mask = mask_images(batch, job.mask.ratio, job.mask.patch_size, generator=torch.Generator().manual_seed(0))
    state.net.eval()
    with torch.no_grad():
        loss = float(reconstruction_loss(state.net(masked), batch, mask))
    state.net.train()
    return loss


def test_loss_falls_on_a_tiny_pool(synthetic: dict[str, Path], tmp_path: Path, pool: ChannelPool) -> None:
    job = _job(synthetic, tmp_path, steps=40)
    state = build_state(job)
    batch, _ = make_batch(pool, job, rank=0, step=10_000)  # a fixed held-out batch
    before = _eval_loss(state, batch, job)
    logs: list[dict[str, float]] = []
    assert train_steps(state, pool, job, until=40, on_log=logs.append) == "steps"
    after = _eval_loss(state, batch, job)
    assert state.step == 40 and len(logs) == 8 and len(state.history) == 8
    assert after < 0.7 * before, (before, after)
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_amp_setting_picks_bf16_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(msnoop.core.runtime, "cpu_has_native_bf16", lambda: True)
    assert [uses_bf16(a, cpu) for a in ("cuda", "auto", "off")] == [False, True, False]
    assert [uses_bf16(a, cuda) for a in ("cuda", "auto", "off")] == [True, True, False]
    monkeypatch.setattr(
        msnoop.core.runtime, "cpu_has_native_bf16", lambda: False
    )  # emulated bf16 would be slower than fp32
    assert not uses_bf16("auto", cpu)


@pytest.mark.parametrize(("given", "stored"), [(True, "cuda"), (False, "off"), ("auto", "auto")])
def test_amp_accepts_the_old_booleans(synthetic: dict[str, Path], tmp_path: Path, given: Any, stored: str) -> None:
    assert _job(synthetic, tmp_path, amp=given).train.amp == stored
    with pytest.raises(ConfigError, match="amp"):
        _job(synthetic, tmp_path, amp="fp8")


def test_loss_falls_under_cpu_bf16_autocast(
    synthetic: dict[str, Path], tmp_path: Path, pool: ChannelPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bf16 is emulated where the CPU lacks it: the same numerics, only slower
    monkeypatch.setattr(msnoop.core.runtime, "cpu_has_native_bf16", lambda: True)
    seen: list[torch.dtype] = []
    job = _job(synthetic, tmp_path, steps=40, amp="auto")
    state = build_state(job)
    state.net.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    batch, _ = make_batch(pool, job, rank=0, step=10_000)
    before = _eval_loss(state, batch, job)
    assert train_steps(state, pool, job, until=40) == "steps"
    assert set(seen[1:]) == {torch.bfloat16}  # the training forwards ran in bf16 (seen[0] is the fp32 eval)
    assert _eval_loss(state, batch, job) < 0.7 * before


def test_resume_equals_uninterrupted_run(synthetic: dict[str, Path], tmp_path: Path, pool: ChannelPool) -> None:
    job = _job(synthetic, tmp_path, steps=8)
    straight = build_state(job)
    train_steps(straight, pool, job, until=8)

    first = build_state(job)
    train_steps(first, pool, job, until=3)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    del first
    buf.seek(0)
    resumed = build_state(job.model_copy(update={"train": job.train.model_copy(update={"seed": job.train.seed})}))
    torch.manual_seed(123)  # a different global RNG state must not matter
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.step == 3
    train_steps(resumed, pool, job, until=8)

    a, b = straight.net.state_dict(), resumed.net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()


def test_finalize_writes_loadable_model_card_and_figure(
    synthetic: dict[str, Path], tmp_path: Path, pool: ChannelPool
) -> None:
    from msnoop.train.pretrain import finalize

    job = _job(synthetic, tmp_path, steps=4, log_every=2)
    state = build_state(job)
    train_steps(state, pool, job, until=4)
    payload = {
        **state.state_dict(),
        "world_size": 1,
        "config": json.loads(job.model_dump_json()),
        "pool": pool.describe(),
    }
    res = finalize(job, payload, stop_reason="steps", elapsed_s=1.0)
    loaded = load_checkpoint(res.model_path)
    assert loaded.arch == "test_cnn" and loaded.preprocess.input_size == 224
    assert loaded.meta["steps"] == 4 and loaded.meta["data"]["n_samples"] == 13
    # weights as trained (fp16 storage), BatchNorm statistics re-estimated on 224 px crops (crop_size 32)
    trained = dict(state.net.named_parameters())
    for name, p in loaded.net.named_parameters():
        torch.testing.assert_close(p, trained[name], atol=5e-3, rtol=5e-3)
    assert loaded.meta["bn_recalibration"]["crop_size"] == 224 and loaded.meta["bn_recalibration"]["batches"] == 1
    stats = dict(loaded.net.named_buffers())
    assert not torch.allclose(
        stats["encoder.down.0.proj.0.running_mean"],
        dict(state.net.named_buffers())["encoder.down.0.proj.0.running_mean"],
    )
    card = res.card_path.read_text()
    assert file_sha256(res.model_path) in card and "| cells | dna, gfp | 6 | 12 |" in card
    assert "re-estimated at the inference size (224 px" in card
    assert res.figure_path is not None and res.figure_path.read_bytes()[:4] == b"\x89PNG"
    assert res.loss_curve_path is not None and res.loss_curve_path.is_file()


# -- Ray Train ---------------------------------------------------------------------------------


def _local(job: PretrainJob, **updates: Any) -> PretrainJob:
    """Ray Train local mode (``num_workers=0``): the training function runs in this process."""
    train = job.train.model_copy(update=updates)
    return job.model_copy(
        update={"train": train, "runtime": job.runtime.model_copy(update={"num_workers": 0, "use_gpu": "no"})}
    )


def test_driver_resumes_a_run_with_the_same_name(synthetic: dict[str, Path], tmp_path: Path) -> None:
    from msnoop.train.pretrain import latest_checkpoint_dir, load_state_file, run_pretrain

    job = _local(_job(synthetic, tmp_path / "out"), steps=4, log_every=2, checkpoint_every=2)
    first = run_pretrain(job)
    assert first.steps == 4 and first.stop_reason == "steps"
    longer = job.model_copy(update={"train": job.train.model_copy(update={"steps": 6})})
    second = run_pretrain(longer)  # same name and output dir: continues from step 4
    assert second.steps == 6
    payload = load_state_file(latest_checkpoint_dir(longer) / "state.pt")  # type: ignore[operator]
    assert [h["step"] for h in payload["history"]] == [2, 4, 6]
    assert len(list((tmp_path / "out" / "ray" / "t").glob("checkpoint_[0-9]*"))) == job.output.keep_checkpoints
    other = longer.model_copy(update={"model": longer.model.model_copy(update={"arch": "microsnoop_cnn"})})
    with pytest.raises(Exception, match="give the job a new name"):
        run_pretrain(other)


def test_a_compact_state_continues_a_run_in_a_fresh_folder(synthetic: dict[str, Path], tmp_path: Path) -> None:
    """A run resumed from its float16 state (no optimiser moments) in an empty folder goes on from that step, with
    the weights of the checkpoint up to float16 rounding, the schedule where it was and a learning-rate ramp."""
    from msnoop.train.loop import build_state
    from msnoop.train.pretrain import latest_checkpoint_dir, load_state_file, run_pretrain, write_compact_state

    job = _local(_job(synthetic, tmp_path / "a"), steps=4, log_every=2, checkpoint_every=2)
    run_pretrain(job)
    ckpt = latest_checkpoint_dir(job)
    assert ckpt is not None
    full = load_state_file(ckpt / "state.pt")
    compact_path = write_compact_state(ckpt, tmp_path / "kept" / "resume.pt")
    compact = load_state_file(compact_path)
    assert "optimizer" not in compact and compact["step"] == 4
    assert compact_path.stat().st_size < (ckpt / "state.pt").stat().st_size / 3
    for name, tensor in full["model"].items():
        if torch.is_floating_point(tensor):
            assert compact["model"][name].dtype == torch.float16
            torch.testing.assert_close(compact["model"][name].float(), tensor, rtol=1e-3, atol=1e-3)

    # the state loaded: weights, step and schedule; the rate ramps from 1/n of the schedule's over n steps
    fresh = _local(_job(synthetic, tmp_path / "b"), steps=8, log_every=2, checkpoint_every=2, resume_from=compact_path)
    state = build_state(fresh)
    state.load_state_dict(compact, rewarm_steps=4)
    assert state.step == 4 and state.rewarm == (4, 4)
    scheduled = state.scheduler.get_last_lr()[0]
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(scheduled / 4)

    second = run_pretrain(fresh)  # an empty folder: continues from the compact state's step 4
    assert second.steps == 8
    payload = load_state_file(latest_checkpoint_dir(fresh) / "state.pt")  # type: ignore[operator]
    assert [h["step"] for h in payload["history"]] == [2, 4, 6, 8]
    assert payload["cpu_s"] > full["cpu_s"]
    logged = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    scheduled = [float(WarmupCosine(fresh.warmup_steps, 8, fresh.optim.min_lr_ratio)(r["step"])) * 3e-3 for r in logged]
    assert [r["step"] for r in logged] == [6, 8]
    assert logged[0]["lr"] == pytest.approx(scheduled[0] * 3 / 50)  # two steps into a 50-step ramp: 3/50
    assert logged[1]["lr"] == pytest.approx(scheduled[1] * 5 / 50)
    with pytest.raises(FileNotFoundError, match="no compact training state"):
        run_pretrain(_local(_job(synthetic, tmp_path / "c"), resume_from=tmp_path / "missing.pt"))


def test_time_budget_stops_cleanly_and_writes_outputs(synthetic: dict[str, Path], tmp_path: Path) -> None:
    from msnoop.train.pretrain import run_pretrain

    job = _local(_job(synthetic, tmp_path / "out"), steps=100_000, max_minutes=0.03, log_every=5)
    res = run_pretrain(job)
    assert res.stop_reason == "time budget" and 0 < res.steps < 100_000
    assert load_checkpoint(res.model_path).meta["steps"] == res.steps
    assert "stopped by: time budget" in res.card_path.read_text()
    assert res.figure_path is not None and res.figure_path.is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_two_workers_writes_a_loadable_checkpoint(
    synthetic: dict[str, Path], tmp_path: Path, ray_cluster: None
) -> None:
    from msnoop.train.pretrain import run_pretrain

    runtime = {"num_workers": 2, "cpus_per_worker": 0.5, "use_gpu": "no", "max_failures": 0}
    job = _job(synthetic, tmp_path / "out", steps=6, log_every=2, checkpoint_every=3)
    job = job.model_copy(update={"runtime": job.runtime.model_copy(update=runtime)})
    res = run_pretrain(job)
    assert res.steps == 6 and res.stop_reason == "steps"
    loaded = load_checkpoint(res.model_path)
    assert loaded.arch == "test_cnn" and loaded.meta["world_size"] == 2 and loaded.meta["steps"] == 6
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(r["world_size"] == 2 for r in log)
    assert sorted(p.name for p in (tmp_path / "out" / "ray" / "t").glob("checkpoint_[0-9]*")) == [
        "checkpoint_00000003",
        "checkpoint_00000006",
    ]


def test_nearly_uniform_crops_with_outliers_are_redrawn(pool: ChannelPool) -> None:
    flat = np.full((32, 32), 10.0, dtype=np.float32)
    flat[5, 7] = 4000.0  # one hot pixel: normalize99 would map it to ~1e3
    valid = np.ones((32, 32), bool)
    assert not pool._passes(flat, valid)
    assert not pool._passes(np.full((32, 32), 3.0, np.float32), valid)
    rng = np.random.default_rng(0)
    cells = rng.gamma(2.0, 20.0, size=(32, 32)).astype(np.float32)
    assert pool._passes(cells, valid)
    for seed in range(10):  # accepted crops stay within the bound after normalisation
        crop, _ = pool.crop(np.random.default_rng(seed))
        assert float(np.ptp(crop)) <= 1.2 * 50.0


def test_batchnorm_recalibration_averages_inference_size_batches(synthetic: dict[str, Path], tmp_path: Path) -> None:
    from msnoop.models.registry import create_model
    from msnoop.train.recalibrate import recalibrate_batchnorm

    job = _job(synthetic, tmp_path)
    pool64 = ChannelPool.from_config(job.data.model_copy(update={"crop_size": 64}))
    torch.manual_seed(0)
    net = create_model("test_cnn")
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    rec = recalibrate_batchnorm(net, pool64, batches=3, batch_size=4, seed=5)
    assert rec == {"batches": 3, "batch_size": 4, "crop_size": 64, "seed": 5, "layers": 41}
    first = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    crops = np.concatenate([pool64.batch(4, batch_rng(5, 0, b))[0] for b in range(3)])  # the same stream
    # the first BatchNorm sees the input: its running mean is the mean of the 12 crops (equal-size batches)
    assert float(first.running_mean[0]) == pytest.approx(float(crops.mean()), rel=1e-4)
    assert not net.training and first.momentum == 0.1
    after = net.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in weights.items())  # weights untouched


def test_recalibrate_checkpoint_keeps_precision_arch_and_weights(synthetic: dict[str, Path], tmp_path: Path) -> None:
    from msnoop.models.checkpoint import save_checkpoint
    from msnoop.models.registry import create_model
    from msnoop.preprocess.presets import Preprocessing
    from msnoop.train.recalibrate import recalibrate_checkpoint

    job = _job(synthetic, tmp_path)
    torch.manual_seed(0)
    net = create_model("test_cnn")
    src = save_checkpoint(
        tmp_path / "src.pt", net, arch="test_cnn", preprocess=Preprocessing(input_size=64), meta={"run": "t"}, half=True
    )
    rec = recalibrate_checkpoint(src, tmp_path / "dst.pt", job, batches=2, seed=3)
    a, b = load_checkpoint(src), load_checkpoint(tmp_path / "dst.pt")
    assert rec["crop_size"] == 64 and b.half and a.half and b.arch == "test_cnn"
    assert b.meta["run"] == "t" and b.meta["bn_recalibration"] == rec
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "running" not in k and "num_batches" not in k)
    assert not torch.equal(
        sa[next(k for k in sa if k.endswith("running_mean"))], sb[next(k for k in sb if k.endswith("running_mean"))]
    )


def test_model_init_continues_from_a_checkpoint(synthetic: dict[str, Path], tmp_path: Path, pool: ChannelPool) -> None:
    """``model.init`` starts from saved weights (continued pretraining); a checkpoint of another arch is refused."""
    from msnoop.models.checkpoint import save_checkpoint
    from msnoop.preprocess.presets import Preprocessing

    job = _job(synthetic, tmp_path, steps=6)
    trained = build_state(job)
    train_steps(trained, pool, job, until=6)
    ckpt = save_checkpoint(tmp_path / "stage1.pt", trained.net, arch="test_cnn", preprocess=Preprocessing())
    stage2 = build_config(
        job.model_dump(mode="json") | {"model": {"arch": "test_cnn", "init": str(ckpt)}, "name": "stage2"}
    )
    cont = build_state(stage2)
    fresh = build_state(job)
    for k, v in trained.net.state_dict().items():
        assert torch.equal(cont.net.state_dict()[k], v), k
    assert any(not torch.equal(fresh.net.state_dict()[k], v) for k, v in trained.net.state_dict().items())
    assert cont.step == 0 and cont.scheduler.last_epoch == 0  # the optimiser and schedule start fresh
    # a relative path is resolved on the driver (Ray workers run elsewhere); a missing one fails before any work
    from msnoop.train.config import absolutize

    rel = build_config(stage2.model_dump(mode="json") | {"model": {"arch": "test_cnn", "init": "stage1.pt"}})
    assert absolutize(rel, tmp_path).model.init == str(ckpt.resolve())
    with pytest.raises(FileNotFoundError, match="model.init 'nope.pt': no checkpoint at"):
        absolutize(rel.model_copy(update={"model": rel.model.model_copy(update={"init": "nope.pt"})}), tmp_path)
    other = build_config(stage2.model_dump(mode="json") | {"model": {"arch": "microsnoop_cnn", "init": str(ckpt)}})
    with pytest.raises(ValueError, match="is a 'test_cnn' checkpoint; model.arch is 'microsnoop_cnn'"):
        build_state(other)


def test_mask_select_and_average_reach_the_step_and_the_card(
    synthetic: dict[str, Path], tmp_path: Path, pool: ChannelPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import msnoop.train.loop as loop
    from msnoop.train.card import average_text, fidelity_text, mask_text

    seen: list[str | None] = []
    real = loop.mask_images

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("select"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "mask_images", spy)
    plain = _job(synthetic, tmp_path, steps=5)
    job = plain.model_copy(update={"mask": plain.mask.model_copy(update={"select": "content", "average": "image"})})
    state = build_state(job)
    assert train_steps(state, pool, job, until=5) == "steps"
    assert seen == ["content"] * 5
    assert state.history and all(np.isfinite(h["loss"]) for h in state.history)
    assert "not constant" in mask_text(job) and "per image" in average_text(job)
    assert "changes" in fidelity_text(job) and "exactly" in fidelity_text(plain)
    assert "random_masking_keep_shape" in mask_text(plain) and "over the batch" in average_text(plain)
