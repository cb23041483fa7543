"""``runtime.actors``: a fixed pool size, ``{min, max}`` for an autoscaling pool, or ``auto`` -> ActorPoolStrategy.

Ray Data grows an actor pool between ``min_size`` and ``max_size`` as blocks queue up
(``ray.data.ActorPoolStrategy``); on an autoscaling cluster (KubeRay) the extra actors' resource
requests are what bring new nodes up, so ``max`` may exceed what the cluster has now.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ActorRange(BaseModel):
    """An autoscaling pool: at least ``min`` actors, at most ``max``."""

    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=1, strict=True)  # strict: true/1.0 are typos, not pool sizes
    max: int = Field(..., ge=1, strict=True)

    @model_validator(mode="after")
    def _ordered(self) -> ActorRange:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


#: the type of a ``runtime.actors`` config field
ActorsSetting = int | ActorRange | Literal["auto"]


def parse_actors(value: Any) -> int | ActorRange | Literal["auto"]:
    """Validate a ``runtime.actors`` value: ``4``, ``{"min": 1, "max": 8}`` or ``"auto"``.

    Raises:
        ValueError: Anything else (0, negative, a boolean, a fraction, min > max, unknown keys, other strings),
            in one line that names what was found.
    """
    if isinstance(value, ActorRange) or value == "auto":
        return value
    if isinstance(value, dict):
        try:
            return ActorRange.model_validate(value)
        except ValidationError as err:
            reasons = []
            for e in err.errors():
                msg = e["msg"].removeprefix("Value error, ")
                reasons.append(f"{'.'.join(map(str, e['loc']))}: {msg}" if e["loc"] else msg)
            raise ValueError(f"actors: {'; '.join(reasons)}") from None
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if number is not None and float(number).is_integer() and number >= 1:
        return int(number)
    raise ValueError("actors: expected a pool size >= 1, {min: 1, max: 8} or 'auto'")


def pool_bounds(
    setting: Any,
    resources: dict[str, float],
    *,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    custom: dict[str, float] | None = None,
    reserve_cpus: float = 0.0,
) -> tuple[int, int]:
    """``(min_size, max_size)`` of the actor pool for a setting and ``ray.cluster_resources()``.

    ``auto``: one actor per GPU share (``floor(GPU / gpus_per_actor)``) when actors use GPUs, else per CPU
    share of what is left after ``reserve_cpus`` (``floor((CPU - reserve_cpus) / cpus_per_actor)``); a custom
    resource each actor requests (``custom``, e.g. ``{"node_b": 1}``) caps it at ``floor(have / per_actor)``;
    at least 1. The pool starts at 1 and grows. An int ``n`` is a fixed pool (``(n, n)``); ``{min, max}`` is
    used as given (``max`` may exceed the cluster now: on an autoscaling cluster the pending actors' requests
    bring nodes up).

    Args:
        setting: A ``runtime.actors`` value (see :func:`parse_actors`).
        resources: Resource name -> total in the cluster (``ray.cluster_resources()``; CPU and GPU in units).
        cpus_per_actor: CPUs each actor requests (may be a fraction).
        gpus_per_actor: GPUs each actor requests; 0 = CPU actors.
        custom: Custom resources each actor requests (name -> amount > 0).
        reserve_cpus: CPUs that ``auto`` leaves to the read and write tasks that run beside the actors.

    Raises:
        pydantic.ValidationError, ValueError: An invalid setting (see :func:`parse_actors`).
    """
    value = parse_actors(setting)
    if isinstance(value, int):
        return value, value
    if isinstance(value, ActorRange):
        return value.min, value.max
    if gpus_per_actor > 0:
        fit = math.floor(resources.get("GPU", 0.0) / gpus_per_actor + 1e-9)
    else:
        fit = math.floor(max(0.0, resources.get("CPU", 1.0) - reserve_cpus) / cpus_per_actor + 1e-9)
    for name, amount in (custom or {}).items():
        fit = min(fit, math.floor(resources.get(name, 0.0) / amount + 1e-9))
    return 1, max(1, fit)


def actor_pool(setting: Any, resources: dict[str, float], **kwargs: Any) -> Any:
    """``ray.data.ActorPoolStrategy(min_size=..., max_size=...)`` for :func:`pool_bounds` (same arguments)."""
    from ray.data import ActorPoolStrategy

    lo, hi = pool_bounds(setting, resources, **kwargs)
    return ActorPoolStrategy(min_size=lo, max_size=hi)


__all__ = ["ActorRange", "ActorsSetting", "actor_pool", "parse_actors", "pool_bounds"]
