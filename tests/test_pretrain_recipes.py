"""Pretraining recipe options: skips dropped over masked patches, the VICReg agreement term, CPU budgets, source filters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from msnoop.core.filters import FilterError
from msnoop.job_kinds import build_config
from msnoop.models.cnn import MicrosnoopCNN, style_vector
from msnoop.train.config import PretrainJob
from msnoop.train.data import ChannelPool
from msnoop.train.loop import build_state, make_batch, second_view, train_step, vicreg_terms


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 48x48 images from two 'sources' in one manifest (a ``source`` column)."""
    root = tmp_path_factory.mktemp("recipes")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        img = rng.gamma(2.0, 20.0, (48, 48)).astype(np.uint16)
        tifffile.imwrite(root / f"i{i}.tif", img)
        rows.append({"path": f"i{i}.tif", "source": "a" if i < 5 else "b"})
    pd.DataFrame(rows).to_csv(root / "m.csv", index=False)
    return root


def _job(root: Path, out: Path, **over: Any) -> PretrainJob:
    data = {
        "job": "pretrain",
        "name": "r",
        "data": {
            "crop_size": 32,
            "sources": [
                {
                    "name": s,
                    "where": f"Metadata_source = '{s}'",
                    "input": {"manifest": str(root / "m.csv"), "channels": ["x"], "channel_columns": {"x": "path"}},
                }
                for s in ("a", "b")
            ],
        },
        "model": {"arch": "test_cnn"},
        "train": {"steps": 4, "batch_size": 4, "log_every": 2, "checkpoint_every": 1000},
        "output": {"dir": str(out), "figure_images": 1, "bn_recalibration_batches": 1},
        "runtime": {"num_workers": 0, "use_gpu": "no"},
    }
    for key, value in over.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    job = build_config(data)
    assert isinstance(job, PretrainJob)
    return job


@pytest.mark.parametrize("seed", range(3))
def test_forward_options_reduce_to_the_plain_network(seed: int) -> None:
    """Keep-all skips = plain forward; keep-none = decoder fed only the deepest map; view2 = encoder of view 2."""
    g = torch.Generator().manual_seed(seed)
    n, side = int(torch.randint(1, 4, (1,), generator=g)), 16 * int(torch.randint(1, 4, (1,), generator=g))
    torch.manual_seed(seed)
    net = MicrosnoopCNN(depths=(4, 8, 16, 32)).eval()
    x, x2 = torch.randn(n, 1, side, side, generator=g), torch.randn(n, 1, side, side, generator=g)
    with torch.no_grad():
        plain = net(x)
        assert torch.equal(net(x, skip_keep=torch.ones(n, 1, side, side)), plain)
        maps = net.encoder(x)
        only_deep = net.decoder([torch.zeros_like(m) for m in maps[:-1]] + [maps[-1]], style_vector(maps[-1]))
        torch.testing.assert_close(net(x, skip_keep=torch.zeros(n, 1, side, side)), only_deep)
        pred, z1, z2 = net(x, view2=x2)
        torch.testing.assert_close(pred, plain)
        torch.testing.assert_close(z1, maps[-1].mean(dim=(-2, -1)))
        torch.testing.assert_close(z2, net.encoder(x2)[-1].mean(dim=(-2, -1)))


def test_dropped_skips_cut_the_masked_region_off_the_fine_skips() -> None:
    """With a patch's skips dropped, changing the finest skip there does not change the output (gradient 0)."""
    torch.manual_seed(0)
    net = MicrosnoopCNN(depths=(4, 8, 16, 32)).eval()
    x = torch.randn(2, 1, 32, 32)
    keep = torch.ones(2, 1, 32, 32)
    keep[:, :, :16, :16] = 0  # one 16 px patch dropped
    maps = [m.detach().requires_grad_(True) for m in net.encoder(x)]
    k0 = keep  # level 0 has the input's resolution
    out = net.decoder([maps[0] * k0, *maps[1:]], style_vector(maps[-1]))
    out.sum().backward()
    assert maps[0].grad is not None
    assert torch.all(maps[0].grad[:, :, :16, :16] == 0) and torch.any(maps[0].grad[:, :, 16:, 16:] != 0)


def test_vicreg_terms() -> None:
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(256, 8, generator=g)
    same = vicreg_terms(z, z)
    assert same["invariance"] == 0 and same["variance"] == 0  # sd 3 > 1: no hinge
    collapsed = vicreg_terms(torch.ones(16, 8), torch.ones(16, 8))
    assert collapsed["variance"] > 0.9 and collapsed["covariance"] == 0
    corr = torch.randn(256, 1, generator=g).repeat(1, 8)  # every dimension the same: large covariance
    indep = torch.randn(256, 8, generator=g)  # same scale, independent dimensions
    assert vicreg_terms(corr, corr)["covariance"] > 50 * vicreg_terms(indep, indep)["covariance"]


def test_second_view_is_a_deterministic_rotated_jittered_masked_copy(pool_dir: Path, tmp_path: Path) -> None:
    job = _job(pool_dir, tmp_path, data__augment={"intensity_jitter": 0.0})
    crops = torch.rand(6, 1, 32, 32)
    a = second_view(crops, job, torch.Generator().manual_seed(1))
    b = second_view(crops, job, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == crops.shape
    for i in range(6):  # every view is one of the 8 symmetries of its crop, with a quarter of the patches zeroed
        kept = a[i] != 0
        assert any(
            torch.equal(
                a[i][kept],
                (torch.flip(torch.rot90(crops[i], r, (-2, -1)), (-1,)) if f else torch.rot90(crops[i], r, (-2, -1)))[
                    kept
                ],
            )
            for r in range(4)
            for f in (False, True)
        )
        assert 0.2 < float((~kept).float().mean()) < 0.3


@pytest.mark.parametrize(
    "over",
    [
        {"mask__skips": "drop_masked"},
        {"agreement__weight": 0.01},
        {"mask__skips": "drop_masked", "agreement__weight": 1.0},
    ],
)
def test_recipe_steps_train(pool_dir: Path, tmp_path: Path, over: dict[str, Any]) -> None:
    job = _job(pool_dir, tmp_path, **over)
    pool = ChannelPool.from_config(job.data)
    state = build_state(job)
    before = [p.detach().clone() for p in state.net.parameters()]
    for step in range(2):
        crops, gen = make_batch(pool, job, rank=0, step=step)
        assert np.isfinite(train_step(state, crops, job, generator=gen))
    assert any(not torch.equal(a, b) for a, b in zip(before, state.net.parameters(), strict=True))


def test_sources_filtered_by_where(pool_dir: Path, tmp_path: Path) -> None:
    pool = ChannelPool.from_config(_job(pool_dir, tmp_path).data)
    assert [s.n_samples for s in pool.stats] == [5, 3]
    bad = _job(pool_dir, tmp_path)
    src = bad.data.sources[0].model_copy(update={"where": "Metadata_source = 'zzz'"})
    with pytest.raises(FilterError, match=r"data.sources\[a\].where"):
        ChannelPool([src], crop_size=32)


def test_cpu_budget_stops_cleanly(pool_dir: Path, tmp_path: Path) -> None:
    from msnoop.train.pretrain import run_pretrain

    job = _job(pool_dir, tmp_path / "out", train__steps=100_000, train__max_cpu_minutes=0.02)
    res = run_pretrain(job)
    assert res.stop_reason == "time budget" and 0 < res.steps < 100_000
    log = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    assert log and '"cpu_s"' in log[-1]
