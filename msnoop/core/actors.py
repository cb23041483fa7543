"""``runtime.actors``: a fixed pool size, ``{min, max}`` for an autoscaling pool, or ``auto`` -> ActorPoolStrategy.

Ray Data grows an actor pool between ``min_size`` and ``max_size`` as blocks queue up
(``ray.data.ActorPoolStrategy``); on an autoscaling cluster (KubeRay) the extra actors' resource
requests are what bring new nodes up, so ``max`` may exceed what the cluster has now.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator


class ActorRange(BaseModel):
    """An autoscaling pool: at least ``min`` actors, at most ``max``."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=1)
    max: int = Field(..., ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> ActorRange:
        if self.min > self.max:
            raise ValueError(f"actors: min ({self.min}) must not exceed max ({self.max})")
        return self


#: the type of a ``runtime.actors`` config field
ActorsSetting = int | ActorRange | Literal["auto"]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(ActorsSetting)


def parse_actors(value: Any) -> int | ActorRange | Literal["auto"]:
    """Validate a ``runtime.actors`` value: ``4``, ``{"min": 1, "max": 8}`` or ``"auto"``.

    Raises:
        pydantic.ValidationError: anything else (0, negative, min > max, unknown keys).
    """
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        raise ValueError(f"actors: expected a pool size >= 1, {{min, max}} or 'auto', found {value}")
    return _ADAPTER.validate_python(value)


def pool_bounds(
    setting: Any, resources: dict[str, float], *, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0
) -> tuple[int, int]:
    """``(min_size, max_size)`` of the actor pool for a setting and ``ray.cluster_resources()``.

    ``auto``: one actor per GPU share (``floor(GPU / gpus_per_actor)``) when actors use GPUs, else
    per CPU share (``floor(CPU / cpus_per_actor)``), at least 1; the pool starts at 1 and grows.
    An int ``n`` is a fixed pool (``(n, n)``); ``{min, max}`` is used as given.
    """
    value = parse_actors(setting)
    if isinstance(value, int):
        return value, value
    if isinstance(value, ActorRange):
        return value.min, value.max
    if gpus_per_actor > 0:
        fit = math.floor(resources.get("GPU", 0.0) / gpus_per_actor + 1e-9)
    else:
        fit = math.floor(resources.get("CPU", 1.0) / cpus_per_actor + 1e-9)
    return 1, max(1, fit)


def actor_pool(
    setting: Any, resources: dict[str, float], *, cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0
) -> Any:
    """``ray.data.ActorPoolStrategy(min_size=..., max_size=...)`` for :func:`pool_bounds`."""
    from ray.data import ActorPoolStrategy

    lo, hi = pool_bounds(setting, resources, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor)
    return ActorPoolStrategy(min_size=lo, max_size=hi)


__all__ = ["ActorRange", "ActorsSetting", "actor_pool", "parse_actors", "pool_bounds"]
