"""Config checks that run before any model is built or compiled (called by `build.plan`):
every error names its key."""

from __future__ import annotations

import ml_collections

from apo_jax.objectives.schedule import MODES, SCOPES
from apo_jax.trainer import rollout_correction

_DTYPES = ("float32", "bfloat16")
_PRECISIONS = ("default", "float32")


def _fail(key: str, value, why: str):
    raise ValueError(f"config.{key}={value!r}: {why}")


def check_config(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError on the first key whose value cannot work."""
    if c.total_steps < 1:
        _fail("total_steps", c.total_steps, "must be >= 1")
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
    if not 0 < c.schedule.tau_min <= c.schedule.tau_max:
        _fail("schedule.tau_min", c.schedule.tau_min, "need 0 < tau_min <= tau_max")

    r, o = c.rollout, c.optim
    if r.group_size < 2:
        _fail("rollout.group_size", r.group_size, "group-relative losses need >= 2 completions")
    if r.prompts_per_step < 1:
        _fail("rollout.prompts_per_step", r.prompts_per_step, "must be >= 1")
    if r.max_new_tokens < 1 or r.max_prompt_len < 1:
        _fail("rollout.max_new_tokens", r.max_new_tokens, "lengths must be >= 1")
    if r.temperature < 0 or r.top_k < 0 or not 0 < r.top_p <= 1:
        _fail(
            "rollout.temperature",
            (r.temperature, r.top_k, r.top_p),
            "need temperature >= 0, top_k >= 0, 0 < top_p <= 1",
        )
    if o.mini_batches < 1 or r.prompts_per_step % o.mini_batches:
        _fail(
            "optim.mini_batches",
            o.mini_batches,
            f"must divide rollout.prompts_per_step={r.prompts_per_step}",
        )
    rows = r.prompts_per_step * r.group_size // o.mini_batches
    if o.micro_batches < 1 or rows % o.micro_batches:
        _fail(
            "optim.micro_batches",
            o.micro_batches,
            f"must divide the {rows} rows of each update "
            "(rollout.prompts_per_step * rollout.group_size / optim.mini_batches)",
        )
    if c.loss.rollout_correction not in rollout_correction.MODES:
        _fail(
            "loss.rollout_correction",
            c.loss.rollout_correction,
            f"valid: {', '.join(rollout_correction.MODES)}",
        )
    if not c.loss.rollout_correction_cap > 1.0:
        _fail("loss.rollout_correction_cap", c.loss.rollout_correction_cap, "must be > 1")
    if o.decay not in ("constant", "cosine"):
        _fail("optim.decay", o.decay, "valid: constant, cosine")
    if o.lr <= 0:
        _fail("optim.lr", o.lr, "must be > 0")
    for key in ("param_dtype", "dtype"):
        if c.model[key] not in _DTYPES:
            _fail(f"model.{key}", c.model[key], f"valid: {', '.join(_DTYPES)}")
    if c.model.logprob_precision not in _PRECISIONS:
        _fail("model.logprob_precision", c.model.logprob_precision, "valid: default, float32")


def check_lengths(max_prompt_len: int, max_new_tokens: int, model_cfg) -> None:
    total = max_prompt_len + max_new_tokens
    if total > model_cfg.max_position_embeddings:
        _fail(
            "rollout.max_new_tokens",
            max_new_tokens,
            f"max_prompt_len + max_new_tokens = {total} exceeds the model's "
            f"max_position_embeddings = {model_cfg.max_position_embeddings}",
        )


def check_vocab(model_vocab: int, task_vocab: int, key: str = "model.preset") -> None:
    if model_vocab < task_vocab:
        raise ValueError(
            f"config.{key}: the model's vocabulary ({model_vocab}) is smaller than "
            f"the task's ({task_vocab})"
        )
