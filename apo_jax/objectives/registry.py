"""Objectives as plug-ins. Each loss family is one module that declares an `Objective`: its loss,
its config block `config.loss.<name>.*` with the family's canonical defaults, and what it needs
from the trainer. The train step reads these declarations, never loss names.

A loss sees token log-probs [P, G, T] of the current policy, the batch grouped by prompt
(`completion_mask`, `old_logp`, `ref_logp` [P, G, T]; `rewards`, `correct` [P, G]) and a
`Context` of trainer-provided values; its keyword arguments are exactly its config block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_collections

from apo_jax.objectives.common import LossOutput


class Context(NamedTuple):
    """Trainer-provided inputs of a loss (None where the objective did not ask for them)."""

    alpha: Any = None  # [P] α from the schedule (objectives with `schedule=True`)
    tau: Any = None  # [P] anchoring temperature τ from the schedule
    max_new_tokens: int | None = None  # the rollout's fixed generation length
    # A PRNG key, fresh for each update (the same for every micro-batch of one update), for
    # objectives that pick tokens at random (clip_cov).
    key: Any = None


@dataclasses.dataclass(frozen=True)
class Objective:
    """A loss family and what it needs from the trainer."""

    name: str
    # (logp [P, G, T], batch {name: [P, G, ...]}, ctx, **config block) -> LossOutput
    loss: Callable[..., LossOutput]
    defaults: Mapping[str, Any]  # config.loss.<name>.*: the family's canonical values
    schedule: bool = False  # uses the α/τ schedule (ctx.alpha, ctx.tau)
    # Whether the loss needs log-probs of the frozen initial policy (batch["ref_logp"]).
    reference: Callable[[Mapping[str, Any]], bool] = lambda params: False
    # True when a row's loss depends on other rows (a softmax over the group): the trainer then
    # differentiates through per-sequence quantities of the whole update batch.
    couples_rows: bool = False
    # Raises ValueError naming the key (`loss.<name>.<key>`) on a value the loss cannot use.
    check: Callable[[Mapping[str, Any]], None] = lambda params: None
    doc: str = ""  # one line for listings


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Adds an objective (a new loss module calls this once, or a test does)."""
    if objective.name in _REGISTRY and _REGISTRY[objective.name] is not objective:
        raise ValueError(f"an objective named {objective.name!r} is already registered")
    _REGISTRY[objective.name] = objective
    return objective


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Objective:
    if name not in _REGISTRY:
        raise ValueError(f"config.loss.name={name!r}: unknown loss; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def default_config(name: str = "apo") -> ml_collections.ConfigDict:
    """`config.loss`: the chosen name and one block per registered objective."""
    c = ml_collections.ConfigDict()
    c.name = name
    for obj in _REGISTRY.values():
        c[obj.name] = ml_collections.ConfigDict(dict(obj.defaults))
    return c


def fail(key: str, value, why: str):
    """The error every objective's `check` raises: names the full config key."""
    raise ValueError(f"config.loss.{key}={value!r}: {why}")
