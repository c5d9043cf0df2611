"""The batch a loss sees: `LossBatch`, a declared, typed record (a pytree), grouped by prompt.

P prompts × G completions × T completion tokens; the G completions of a prompt are consecutive
rows of the trainer's [B, ...] batch (B = P·G). An objective declares the fields it reads
(`Objective.reads`); the train step checks that each of them reaches the device before anything
is compiled, and gives the loss every field it has (None for the others).
"""

from __future__ import annotations

import dataclasses

import flax
from jaxtyping import Array, Float


@flax.struct.dataclass
class LossBatch:
    completion_mask: Float[Array, "P G T"]  # 1 on the completion tokens the loss counts
    old_logp: Float[Array, "P G T"]  # anchor π_old (the rollout policy scored by the trainer)
    rewards: Float[Array, "P G"]  # shaped rewards (overlong penalty included)
    ref_logp: Float[Array, "P G T"] | None = None  # frozen reference (zeros unless asked for)
    correct: Float[Array, "P G"] | None = None  # 1 = verified answer, before any shaping
    # Sampler/trainer mismatch weights for the policy-gradient term (trainer/rollout_correction.py;
    # ones without a correction). An objective that reads it applies it itself, to its
    # policy-gradient term only; for the others the trainer weights every log-prob's gradient.
    is_weight: Float[Array, "P G T"] | None = None

    def __getitem__(self, name: str) -> Array:
        """b["old_logp"] as b.old_logp; a field the batch does not carry is an error naming it."""
        if name not in FIELDS:
            raise KeyError(f"LossBatch has no field {name!r}; fields: {', '.join(FIELDS)}")
        value = getattr(self, name)
        if value is None:
            raise KeyError(
                f"LossBatch.{name} was not sent to the device: declare it in the objective's "
                "`reads` (objectives/registry.py) so the trainer checks it is sent"
            )
        return value


FIELDS = tuple(f.name for f in dataclasses.fields(LossBatch))
# Filled in by the train step itself, not sent with the batch.
COMPUTED = ("is_weight",)


def check_reads(objective_name: str, reads, available) -> None:
    """Every field the objective reads is in `available` (names of [B, ...] batch arrays, plus
    COMPUTED); raises ValueError naming the missing ones."""
    missing = [f for f in reads if f not in available and f not in COMPUTED]
    if missing:
        raise ValueError(
            f"config.loss.name={objective_name!r}: the loss reads LossBatch."
            f"{', LossBatch.'.join(missing)}, which the train step's batch does not carry "
            f"(it has: {', '.join(sorted(available))})"
        )


def from_batch(batch, group_size: int, **extra) -> LossBatch:
    """A LossBatch of the [B, ...] arrays of `batch` (a trainer Batch or a mapping; `.get` by
    name) that are fields, reshaped to [P, G, ...]; `extra` fields ([B, ...]) replace or add."""
    g = group_size
    values = {f: extra[f] if f in extra else batch.get(f) for f in FIELDS}
    return LossBatch(
        **{
            k: v.reshape(v.shape[0] // g, g, *v.shape[1:])
            for k, v in values.items()
            if v is not None
        }
    )
