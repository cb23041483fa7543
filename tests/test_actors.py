"""runtime.actors settings -> ActorPoolStrategy bounds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from msnoop.core.rundir import RunDir
from msnoop.core.actors import ActorRange, actor_pool, parse_actors, pool_bounds


@pytest.mark.parametrize(
    ("setting", "resources", "kw", "expected"),
    [
        (3, {"CPU": 2}, {}, (3, 3)),
        ({"min": 1, "max": 8}, {"CPU": 2}, {}, (1, 8)),  # may exceed the cluster now: an autoscaler adds nodes
        ({"max": 4}, {"CPU": 2}, {}, (1, 4)),
        ("auto", {"CPU": 2}, {"cpus_per_actor": 0.5}, (1, 4)),
        ("auto", {"CPU": 3}, {"cpus_per_actor": 1.0}, (1, 3)),
        ("auto", {"CPU": 64, "GPU": 4}, {"gpus_per_actor": 1.0}, (1, 4)),
        ("auto", {"CPU": 64, "GPU": 4}, {"gpus_per_actor": 0.5}, (1, 8)),
        ("auto", {"CPU": 0.5}, {}, (1, 1)),
        ("auto", {}, {"gpus_per_actor": 1.0}, (1, 1)),
    ],
)
def test_pool_bounds(setting, resources, kw, expected):
    assert pool_bounds(setting, resources, **kw) == expected
    strategy = actor_pool(setting, resources, **kw)
    assert (strategy.min_size, strategy.max_size) == expected


@pytest.mark.parametrize(
    "bad", [0, -1, "many", {"min": 3, "max": 2}, {"min": 1, "max": 2, "step": 1}, {"min": 0, "max": 2}, 1.5]
)
def test_bad_settings_rejected(bad):
    with pytest.raises((ValidationError, ValueError)):
        parse_actors(bad)


def test_parse_keeps_types():
    assert parse_actors(2) == 2
    assert parse_actors("auto") == "auto"
    assert parse_actors({"min": 2, "max": 5}) == ActorRange(min=2, max=5)


# --- runtime.actors in the embed config, and the pool the job builds -------------------------------------------


def _expected_valid(value) -> bool:
    """The rule, written independently of the implementation: N >= 1, 'auto', or {min >= 1 (default 1), max}."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1
    if value == "auto":
        return True
    if isinstance(value, dict):
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in value.values())
        lo, hi = value.get("min", 1), value.get("max")
        return set(value) <= {"min", "max"} and "max" in value and ints and 1 <= lo <= hi
    return False


def _generated_settings(n: int = 300) -> list:
    import random

    rng = random.Random(18)
    pool: list = [0, -1, 1, 2, 64, True, False, None, 1.5, "auto", "AUTO", "many", "", [1, 2], {"min": 1}]
    for _ in range(n):
        kind = rng.randrange(4)
        if kind == 0:
            pool.append(rng.randint(-3, 40))
        elif kind == 1:
            d = {k: rng.choice([rng.randint(-1, 9), True, 2.0, "3"]) for k in ("min", "max") if rng.random() < 0.85}
            pool.append(d)
        elif kind == 2:
            d = {"min": rng.randint(1, 4), "max": rng.randint(1, 9)}
            if rng.random() < 0.3:
                d[rng.choice(["step", "initial", "size"])] = 1
            pool.append(d)
        else:
            pool.append(rng.choice(["auto", "Auto", "auto ", "4", "1:8", 3.0, 0.5]))
    return pool


def _embed(actors, **runtime):
    from msnoop.job_kinds import build_config

    data = {
        "job": "embed",
        "input": {"manifest": "m.csv", "channels": ["dna"]},
        "model": "random:test_cnn:0",
        "output": {"dir": "out"},
        "runtime": {"actors": actors, **runtime},
    }
    return build_config(data)


def test_embed_config_actors_property_over_generated_values():
    """Every generated value is accepted exactly when the rule says so; rejections name runtime.actors."""
    from msnoop.core.config import ConfigError

    accepted = rejected = 0
    for value in _generated_settings():
        # YAML and `--set` give ints, not numeric strings; those strings are out of scope of the rule above
        if isinstance(value, str) and value.isdigit() or isinstance(value, float) and value.is_integer():
            continue
        if _expected_valid(value):
            cfg = _embed(value)
            got = cfg.runtime.actors
            assert got == (ActorRange(**value) if isinstance(value, dict) else value), value
            again = _embed(cfg.model_dump(mode="json")["runtime"]["actors"])  # the saved config reads back the same
            assert again.runtime.actors == got
            accepted += 1
        else:
            with pytest.raises(ConfigError, match=r"runtime\.actors") as err:
                _embed(value)
            assert str(err.value).count("runtime.actors") == 1, str(err.value)  # one line, not one per union arm
            rejected += 1
    assert accepted > 50 and rejected > 50  # both sides of the rule were exercised


@pytest.mark.parametrize(
    ("bad", "says"),
    [({"CPU": 1}, "actor_cpus"), ({"GPU": 1}, "use_gpu"), ({"node_b": 0}, "> 0"), ({"node_b": -1}, "> 0")],
)
def test_actor_resources_validated(bad, says):
    from msnoop.core.config import ConfigError

    with pytest.raises(ConfigError, match=r"runtime\.actor_resources") as err:
        _embed(1, actor_resources=bad)
    assert says in str(err.value)
    assert _embed(1, actor_resources={"node_b": 1, "accelerator_type:A100": 0.001}).runtime.actor_resources


def test_auto_bounds_fit_the_cluster_property():
    """``auto`` over generated clusters: the max pool fits beside the reserve, one more actor would not."""
    import random

    rng = random.Random(7)
    for _ in range(500):
        res = {"CPU": rng.choice([0.5, 1, 2, 3, 8, 64])}
        gpus = rng.choice([0.0, 0.0, 1.0, 0.5, 0.25])
        if gpus or rng.random() < 0.3:
            res["GPU"] = rng.choice([0, 1, 2, 4, 8])
        custom = {}
        if rng.random() < 0.5:
            res["node_b"] = rng.choice([0, 1, 2, 16])
            custom = {"node_b": rng.choice([1, 0.5, 0.01])}
        cpus = rng.choice([0.25, 0.5, 1.0, 2.0])
        reserve = rng.choice([0.0, 0.25, 1.0])
        lo, hi = pool_bounds("auto", res, cpus_per_actor=cpus, gpus_per_actor=gpus, custom=custom, reserve_cpus=reserve)
        assert lo == 1 and hi >= 1
        have = {"GPU": res.get("GPU", 0) / gpus} if gpus else {"CPU": (res["CPU"] - reserve) / cpus}
        have.update({k: res.get(k, 0) / v for k, v in custom.items()})
        room = min(have.values())
        if room >= 1:
            assert hi <= room + 1e-9 < hi + 1, (res, gpus, custom, cpus, reserve, hi)
        else:
            assert hi == 1  # nothing fits now: one actor waits for the cluster to grow
        # a fixed size and {min, max} ignore the cluster
        assert pool_bounds(3, res, cpus_per_actor=cpus, custom=custom) == (3, 3)
        assert pool_bounds({"min": 2, "max": 5}, res, gpus_per_actor=gpus) == (2, 5)


def test_embed_actor_pool_bounds_from_config():
    """The embed job's pool: its per-actor request and the reserve for read/write tasks go into ``auto``."""
    from msnoop.embed.pipeline import actor_pool_bounds

    cpu = {"num_cpus": 0.5}
    assert actor_pool_bounds(_embed("auto"), cpu, {"CPU": 2.0}, 0.25) == (1, 3)  # 4 would leave no CPU to write
    assert actor_pool_bounds(_embed({"min": 1, "max": 2}), cpu, {"CPU": 2.0}, 0.25) == (1, 2)
    assert actor_pool_bounds(_embed(2), cpu, {"CPU": 2.0}, 0.25) == (2, 2)
    gpu = {"num_cpus": 1.0, "num_gpus": 1}
    assert actor_pool_bounds(_embed("auto"), gpu, {"CPU": 64.0, "GPU": 8.0}, 1.0) == (1, 8)
    pinned = {"num_cpus": 0.5, "resources": {"node_b": 1.0}}
    assert actor_pool_bounds(_embed("auto"), pinned, {"CPU": 8.0, "node_b": 2.0}, 1.0) == (1, 2)


@pytest.mark.parametrize(
    ("text", "value"), [("4", 4), ("1:8", {"min": 1, "max": 8}), ("auto", "auto"), ("2:x", "2:x"), ("-1", -1)]
)
def test_cli_actors_option(text, value):
    from msnoop.cli.embed import _actors_option

    assert _actors_option(text) == value


@pytest.mark.ray
def test_local_run_with_an_autoscaling_pool(tmp_path, ray_cluster):
    """A real run with ``actors: {min: 1, max: 2}`` on the 2-CPU cluster: the pool grows to 2 actors, never
    more, and every row comes out once (embedded or in errors)."""
    import numpy as np
    import pandas as pd
    import tifffile
    from ray._private import state

    from msnoop.core import parts
    from msnoop.job_kinds import build_config, run_embed_job

    rng = np.random.default_rng(3)
    rows = []
    for i in range(16):
        tifffile.imwrite(tmp_path / f"i{i}.tif", rng.integers(0, 200, (48, 48)).astype(np.uint16))
        rows.append({"dna": f"i{i}.tif", "Metadata_K": i})
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    rows.append({"dna": "bad.tif", "Metadata_K": -1})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    cfg = build_config(
        {
            "job": "embed",
            "input": {"manifest": str(tmp_path / "m.csv"), "channels": ["dna"]},
            "model": "random:test_cnn:0",
            "output": {"dir": str(tmp_path / "out"), "write_lance": False},
            "runtime": {"images_per_block": 2, "batch_size": 8, "progress": False, "actors": {"min": 1, "max": 2}},
        }
    )
    before = set(state.actors())
    result = run_embed_job(cfg)
    assert (result.n_embedded, result.n_errors) == (16, 1)
    assert (result.n_rows_total + result.n_errors_total) == result.n_input == 17
    emb = parts.read_frame(tmp_path / "out" / RunDir.EMBEDDINGS)
    assert emb["Metadata_ImageID"].is_unique and len(emb) == 16
    pool = [a for k, a in state.actors().items() if k not in before and "EmbedActor" in a["ActorClassName"]]
    # the pool grew from 1 to its max, and not beyond
    assert len(pool) == 2, [(a["ActorClassName"], a["State"], a["StartTime"]) for a in pool]
