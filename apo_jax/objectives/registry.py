"""What an objective declares. Each loss family is one module declaring an `Objective`: its loss,
its config block `config.loss.<name>.*` with the family's canonical defaults, and what it needs
from the trainer. The train step reads these declarations, never loss names.

A loss sees token log-probs [P, G, T] of the current policy, the batch grouped by prompt (a
`LossBatch`, objectives/batch.py: `completion_mask`, `old_logp`, `ref_logp`, `is_weight`
[P, G, T]; `rewards`, `correct` [P, G]) and a `Context` of trainer-provided values; its keyword
arguments are exactly its config block. It declares the LossBatch fields it reads (`reads`: the
train step refuses to build when one is not sent) and the keys of its block that have no effect
under given settings (`inert`: the perturbation test, tests/test_loss_keys.py, checks that every
other key changes the loss, its gradient or a metric).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from apo_jax.objectives import batch as batch_lib
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
    # (logp [P, G, T], LossBatch [P, G, ...], ctx, **config block) -> LossOutput
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
    # LossBatch fields the loss reads (objectives/batch.py); reading `is_weight` means the loss
    # applies the rollout correction to its policy-gradient term itself (else the trainer
    # weights the gradient of every token log-prob).
    reads: tuple[str, ...] = ("completion_mask", "old_logp", "rewards")
    # {key: why} for the keys of the block that cannot change the loss, its gradient or a metric
    # under these settings (e.g. an estimator's type while its coefficient is 0).
    inert: Callable[[Mapping[str, Any]], Mapping[str, str]] = lambda params: {}

    def __post_init__(self):
        unknown = [f for f in self.reads if f not in batch_lib.FIELDS]
        if unknown:
            raise ValueError(
                f"objective {self.name!r} reads {unknown}, not LossBatch fields "
                f"({', '.join(batch_lib.FIELDS)})"
            )


def fail(key: str, value, why: str):
    """The error every objective's `check` raises: names the full config key."""
    raise ValueError(f"config.loss.{key}={value!r}: {why}")


def plain_loss(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
    """`Objective.loss` of a loss fn(logp, old_logp, completion_mask, rewards, **config block)
    that needs nothing else from the batch or the context."""
    return lambda logp, b, ctx, **params: fn(
        logp, b.old_logp, b.completion_mask, b.rewards, **params
    )
