"""Config checks that run before any model is built or compiled: every error names its key."""

from __future__ import annotations

import ml_collections

from apo_jax import train_step as train_step_lib
from apo_jax.alpha_schedule import MODES, SCOPES

_DTYPES = ("float32", "bfloat16")


def _fail(key: str, value, why: str):
    raise ValueError(f"config.{key}={value!r}: {why}")


def check_config(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError on the first key whose value cannot work."""
    if c.total_steps < 1:
        _fail("total_steps", c.total_steps, "must be >= 1")
    if c.loss.name not in train_step_lib.LOSS_NAMES:
        _fail(
            "loss.name", c.loss.name, f"unknown loss; valid: {', '.join(train_step_lib.LOSS_NAMES)}"
        )
    if c.schedule.mode not in MODES:
        _fail("schedule.mode", c.schedule.mode, f"valid: {', '.join(MODES)}")
    if c.schedule.scope not in SCOPES:
        _fail("schedule.scope", c.schedule.scope, f"valid: {', '.join(SCOPES)}")
    for key in ("alpha", "alpha_max", "alpha_min"):
        value = c.schedule[key]
        if not 0.0 < value <= 1.0:
            _fail(f"schedule.{key}", value, "alpha must lie in (0, 1] (1 = forward KL)")
    if c.schedule.alpha_min > c.schedule.alpha_max:
        _fail("schedule.alpha_min", c.schedule.alpha_min, "must be <= schedule.alpha_max")
    if c.schedule.tau0 <= 0:
        _fail("schedule.tau0", c.schedule.tau0, "must be > 0")
    if c.loss.beta_r <= 0:
        _fail("loss.beta_r", c.loss.beta_r, "must be > 0")

    r, o = c.rollout, c.optim
    if r.group_size < 2:
        _fail("rollout.group_size", r.group_size, "group-relative losses need >= 2 completions")
    if r.prompts_per_step < 1:
        _fail("rollout.prompts_per_step", r.prompts_per_step, "must be >= 1")
    if r.max_new_tokens < 1 or r.max_prompt_len < 1:
        _fail("rollout.max_new_tokens", r.max_new_tokens, "lengths must be >= 1")
    if r.temperature < 0:
        _fail("rollout.temperature", r.temperature, "must be >= 0 (0 = greedy)")
    if r.top_k < 0:
        _fail("rollout.top_k", r.top_k, "must be >= 0 (0 = no top-k cut)")
    if not 0 < r.top_p <= 1:
        _fail("rollout.top_p", r.top_p, "must lie in (0, 1] (1 = no nucleus cut)")
    if o.mini_batches < 1 or r.prompts_per_step % o.mini_batches:
        _fail(
            "optim.mini_batches",
            o.mini_batches,
            f"must divide rollout.prompts_per_step={r.prompts_per_step}",
        )
    per_update = r.prompts_per_step // o.mini_batches
    if o.micro_batches < 1 or per_update % o.micro_batches:
        _fail(
            "optim.micro_batches",
            o.micro_batches,
            f"must divide the {per_update} prompts of each mini-batch",
        )
    if o.decay not in ("constant", "cosine"):
        _fail("optim.decay", o.decay, "valid: constant, cosine")
    if o.lr <= 0:
        _fail("optim.lr", o.lr, "must be > 0")
    for key in ("param_dtype", "dtype"):
        if c.model[key] not in _DTYPES:
            _fail(f"model.{key}", c.model[key], f"valid: {', '.join(_DTYPES)}")


def check_lengths(c: ml_collections.ConfigDict, max_positions: int) -> None:
    total = c.rollout.max_prompt_len + c.rollout.max_new_tokens
    if total > max_positions:
        _fail(
            "rollout.max_new_tokens",
            c.rollout.max_new_tokens,
            f"max_prompt_len + max_new_tokens = {total} exceeds the model's "
            f"max_position_embeddings = {max_positions}",
        )


def check_vocab(model_vocab: int, task_vocab: int, key: str = "model.preset") -> None:
    if model_vocab < task_vocab:
        raise ValueError(
            f"config.{key}: the model's vocabulary ({model_vocab}) is smaller than "
            f"the task's ({task_vocab})"
        )
