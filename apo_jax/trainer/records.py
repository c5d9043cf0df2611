"""The two records of a training step.

`Rollout`: what the sampler and the task's scorer produce, host arrays of this process's rows
(group-major: the G completions of a prompt are consecutive rows). `Batch`: what the jitted step
consumes, device arrays whose rows are split over the data axes; the step fills in the anchor
and reference log-probs (trainer/step.py `score`).

Shapes: B rows (P prompts × G), Tp the prompt bucket (left-padded), Tc completion tokens
(rollout.max_new_tokens, right-padded), M mini-batches.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import numpy as np
from jaxtyping import Array, Float, Int

from apo_jax.infra import sharding as sharding_lib
from apo_jax.trainer import packing


@dataclasses.dataclass(frozen=True)
class Rollout:
    prompt_ids: np.ndarray  # [B, Tp] int32, left-padded with the task's pad id
    prompt_mask: np.ndarray  # [B, Tp] int32, 1 on real prompt tokens
    completion_ids: np.ndarray  # [B, Tc] int32, pad id after a row's end
    completion_mask: np.ndarray  # [B, Tc] float32, 1 up to and including the stop token
    sampler_logp: np.ndarray  # [B, Tc] float32, the sampler's log π(y_t | ·) (0 on padding)
    rewards: np.ndarray  # [B] float32, shaped (overlong penalty included)
    correct: np.ndarray  # [B] float32, verified answer before any shaping
    lengths: np.ndarray  # [B] float32, generated tokens
    truncated: np.ndarray  # [B] float32, 1 when a row hit max_new_tokens

    def take(self, rows: np.ndarray) -> Rollout:
        return Rollout(**{f: getattr(self, f)[rows] for f in _ROLLOUT_FIELDS})

    def take_groups(self, groups: np.ndarray, g: int) -> Rollout:
        """The rows of prompts `groups` (indices of groups of g consecutive rows)."""
        return self.take((np.asarray(groups)[:, None] * g + np.arange(g)).reshape(-1))

    @staticmethod
    def concat(parts: list[Rollout], pad_id: int) -> Rollout:
        """Rows of `parts` in order; prompts of different buckets are left-padded to the widest
        (padding is masked, so a row's log-probs do not change)."""
        width = max(r.prompt_ids.shape[1] for r in parts)
        widen = lambda x, fill: np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=fill)
        fields = {f: np.concatenate([getattr(r, f) for r in parts]) for f in _ROLLOUT_FIELDS[2:]}
        fields["prompt_ids"] = np.concatenate([widen(r.prompt_ids, pad_id) for r in parts])
        fields["prompt_mask"] = np.concatenate([widen(r.prompt_mask, 0) for r in parts])
        return Rollout(**fields)

    def to_batch(self, mini: int, mesh) -> Batch:
        """This process's rows [M·r, ...] -> a Batch of global [M, R, ...] arrays, R split over
        the data-parallel axes (each process contributes its r rows of every mini-batch)."""
        sharding = sharding_lib.named(mesh, None, sharding_lib.TRAIN_RULES["batch"])

        def to_global(local: np.ndarray) -> jax.Array:
            local = local.reshape(mini, -1, *local.shape[1:])
            return jax.make_array_from_process_local_data(sharding, local)

        return Batch(**{f: to_global(getattr(self, f)) for f in DEVICE_FIELDS})


_ROLLOUT_FIELDS = tuple(f.name for f in dataclasses.fields(Rollout))


@flax.struct.dataclass
class Batch:
    """One update's rows on the device ([B, ...], or [M, B, ...] before `mini`)."""

    prompt_ids: Int[Array, "B Tp"]
    prompt_mask: Int[Array, "B Tp"]
    completion_ids: Int[Array, "B Tc"]
    completion_mask: Float[Array, "B Tc"]
    rewards: Float[Array, " B"]
    sampler_logp: Float[Array, "B Tc"] | None = None  # rollout correction, logp gap metric
    correct: Float[Array, " B"] | None = None  # objectives that read LossBatch.correct
    old_logp: Float[Array, "B Tc"] | None = None  # anchor π_old: filled by step.score
    ref_logp: Float[Array, "B Tc"] | None = None  # frozen reference (zeros without one)
    pack: packing.PackPlan | None = None  # optim.packing=packed: this mini-batch's pack plan

    def __getitem__(self, name: str) -> Array:
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name, default)

    def mini(self, k: int) -> Batch:
        """Mini-batch k of a [M, B, ...] batch."""
        return jax.tree.map(lambda x: x[k], self)

    def present(self) -> tuple[str, ...]:
        """Names of the fields this batch carries."""
        return tuple(f for f in FIELDS if getattr(self, f) is not None)


FIELDS = tuple(f.name for f in dataclasses.fields(Batch))
# What a Rollout sends to the device: the fields both records have (old_logp and ref_logp are
# scored there, pack is planned per mini-batch).
DEVICE_FIELDS = tuple(f for f in FIELDS if f in _ROLLOUT_FIELDS)
