"""Config checks between keys, before any model is built (`check_plan`, called by `build.plan`,
which training, the evaluation CLI and the dry run all go through); every error names its key.
One key's type, range and choices, and the rules within one block, are apo_jax/settings.py's.

The blocks of unselected objectives and tasks (loss.<other>.*, task.<other>.*) are checked like
the selected one, and a value that differs from its default there is an error
(`check_unused_blocks`: it would be silently ignored) unless `allow_unused_keys=True`. Keys
that some settings ignore are not refused: model.preset / vocab_size under model.hf_dir,
schedule.* without a schedule (apo, fdiv use one), rollout.max_refill_rounds without dynamic
sampling, eval.every_steps / rows_per_chunk without eval.num_prompts (or under the continuous
engine), rollout.slots under the static engine, loss.rollout_correction_cap without a
correction, loss.entropy_coef_delta/_min/_max without loss.entropy_target; an objective declares
its own (`Objective.inert`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from apo_jax.infra import tracking
from apo_jax.settings import INT32_MAX, check_value
from apo_jax.settings import fail as _fail
from apo_jax.trainer.plan import Plan


def check_block(prefix: str, params: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """An objective's or task's block (`config.<prefix>.*`): each value has its default's type
    (int where the default is an int, any number where it is a float) and numbers are finite.
    Ranges are the block owner's `check`."""
    for key, default in defaults.items():
        if type(default) in (bool, int, float, str):
            check_value(f"{prefix}.{key}", params[key], type(default))


def check_rows_per_chunk(rows_per_chunk: int, group_size: int, prompts: int, procs: int) -> None:
    """rollout.rows_per_chunk (> 0) must hold whole groups and split each process's rows of a
    step (prompts * group_size / procs) evenly: every process makes the same number of sampler
    calls, which are collective in a multi-process run."""
    mine = prompts * group_size // procs
    where = f" on each of {procs} processes" if procs > 1 else ""
    if rows_per_chunk % group_size or mine % rows_per_chunk:
        _fail(
            "rollout.rows_per_chunk",
            rows_per_chunk,
            f"must be a multiple of rollout.group_size={group_size} and divide the {mine} rows "
            f"of a step{where} (rollout.prompts_per_step * rollout.group_size); 0 = all rows",
        )


def check_plan(p: Plan) -> None:
    """Raises ValueError on the first rule between keys that the plan's values break."""
    r, o = p.rollout, p.optim
    if p.total_steps * o.mini_batches > INT32_MAX:
        _fail(
            "total_steps",
            p.total_steps,
            f"total_steps * optim.mini_batches = {p.total_steps * o.mini_batches} optimizer "
            f"updates: the device step counter is int32 (at most {INT32_MAX})",
        )
    tokens = r.prompts_per_step * r.group_size * (r.max_prompt_len + r.max_new_tokens)
    if tokens > INT32_MAX:
        _fail(
            "rollout.prompts_per_step",
            r.prompts_per_step,
            f"a step's token batch [prompts_per_step * group_size = "
            f"{r.prompts_per_step * r.group_size} rows, max_prompt_len + max_new_tokens = "
            f"{r.max_prompt_len + r.max_new_tokens}] has {tokens} > 2**31 - 1 elements (its "
            "arrays are indexed in int32, and each int32 copy alone would take "
            f"{tokens * 4 / 2**30:.0f} GiB): lower rollout.prompts_per_step, "
            "rollout.group_size or the lengths",
        )
    grid = p.schedule.ess_candidates * r.prompts_per_step * r.group_size
    if grid > INT32_MAX:
        _fail(
            "schedule.ess_candidates",
            p.schedule.ess_candidates,
            f"the ESS rule scores every candidate alpha on every completion: a [candidates, "
            f"prompts, G] array of {grid} > 2**31 - 1 elements per update",
        )
    if r.overlong_buffer >= r.max_new_tokens:
        _fail(
            "rollout.overlong_buffer",
            r.overlong_buffer,
            f"must be < rollout.max_new_tokens={r.max_new_tokens} (0 = off): a buffer as long "
            "as the completion penalises every completion",
        )
    if r.prompts_per_step % o.mini_batches:
        _fail(
            "optim.mini_batches",
            o.mini_batches,
            f"must divide rollout.prompts_per_step={r.prompts_per_step}",
        )
    rows = r.prompts_per_step * r.group_size // o.mini_batches
    if rows % o.micro_batches:
        _fail(
            "optim.micro_batches",
            o.micro_batches,
            f"must divide the {rows} rows of each update "
            "(rollout.prompts_per_step * rollout.group_size / optim.mini_batches)",
        )
    if r.rows_per_chunk:
        check_rows_per_chunk(r.rows_per_chunk, r.group_size, r.prompts_per_step, 1)
    longest = r.max_prompt_len + r.max_new_tokens
    if o.packing == "packed" and o.pack_len and o.pack_len < longest:
        _fail(
            "optim.pack_len",
            o.pack_len,
            f"a packed row must hold the longest sequence, rollout.max_prompt_len + "
            f"rollout.max_new_tokens = {longest} tokens (0 = the batch's own longest)",
        )
    # loss.anchor=sampler only where the sampler and the trainer compute alike (step.py `score`)
    m = p.model
    alike = (str(m.dtype), m.logprob_precision, r.cache_dtype) == ("float32",) * 3
    if p.loss.anchor == "sampler" and not alike and p.loss.rollout_correction == "none":
        _fail(
            "loss.anchor",
            p.loss.anchor,
            "the sampler's log-probs stand in for π_old only where sampler and trainer compute "
            "alike: model.dtype, model.logprob_precision and rollout.cache_dtype all float32 "
            f"(here {m.dtype}, {m.logprob_precision}, {r.cache_dtype}), or with a "
            "loss.rollout_correction that corrects the gap",
        )
    if p.logging.wandb:  # an optional extra: the error gives the install line
        tracking.check_installed()


def check_model(p: Plan, model_cfg, task_vocab: int) -> None:
    """The rollout against the architecture (`build.model_config`, before any weight is read)."""
    r = p.rollout
    if model_cfg.vocab_size < task_vocab:
        raise ValueError(
            f"config.model.preset: the model's vocabulary ({model_cfg.vocab_size}) is smaller "
            f"than the task's ({task_vocab})"
        )
    if r.top_k > model_cfg.vocab_size:  # lax.top_k cannot take more than the axis holds
        _fail(
            "rollout.top_k",
            r.top_k,
            f"exceeds the model's vocabulary ({model_cfg.vocab_size} tokens); 0 = off",
        )
    total = r.max_prompt_len + r.max_new_tokens
    if total > model_cfg.max_position_embeddings:
        _fail(
            "rollout.max_new_tokens",
            r.max_new_tokens,
            f"max_prompt_len + max_new_tokens = {total} exceeds the model's "
            f"max_position_embeddings = {model_cfg.max_position_embeddings}",
        )


def unused_blocks(c) -> tuple[str, ...]:
    """Prefixes ("loss.grpo.", "task.math.", ...) of the objective and task blocks that the
    selected `loss.name` / `task.name` do not read. Works on a ConfigDict or its plain record."""
    out = []
    for group in ("loss", "task"):
        node = c[group]
        out += [
            f"{group}.{name}."
            for name, block in node.items()
            if name != node["name"] and isinstance(block, Mapping | ml_collections.ConfigDict)
        ]
    return tuple(out)


def check_unused_blocks(c, registered: dict[str, tuple[Mapping, Any]]) -> None:
    """The blocks of unselected objectives and tasks: `registered` maps "loss.<name>" /
    "task.<name>" to (defaults, check). Each is type- and range-checked like a selected block;
    a value that differs from its default is an error (it would be ignored without a word)
    unless `allow_unused_keys` is set."""
    for prefix, (defaults, check) in registered.items():
        group, name = prefix.split(".")
        if name == c[group].name or name not in c[group]:  # registered after the config was made
            continue
        params = dict(c[group][name])
        check_block(prefix, params, defaults)
        check(params)
        if c.allow_unused_keys:
            continue
        for key, default in defaults.items():
            if params[key] != default:  # types are checked: 0 == 0.0 is the same setting
                _fail(
                    f"{prefix}.{key}",
                    params[key],
                    f"config.{group}.name={c[group].name!r} does not read config.{prefix}.* "
                    f"(the default here is {default!r}, and this value would be ignored); set "
                    f"config.{group}.name={name!r} to use it, or config.allow_unused_keys=True "
                    "to keep it unused",
                )
