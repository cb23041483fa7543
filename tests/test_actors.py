"""runtime.actors settings -> ActorPoolStrategy bounds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

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
