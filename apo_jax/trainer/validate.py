"""Config checks that run before any model is built or compiled (called by `build.plan`, which
training, the evaluation CLI and the dry run all go through): every error names its key.

`KEYS` states the type and valid range of every key of configs/base.py (objective and task
blocks are checked by their own `check`, after `check_block` has checked their types and that
their numbers are finite). Keys that some settings ignore are documented here, not refused:
model.preset / model.vocab_size (ignored when model.hf_dir is set), schedule.* (used only by
objectives with a schedule: apo, fdiv), rollout.max_refill_rounds (only with
rollout.dynamic_sampling), eval.every_steps and eval.rows_per_chunk (only with
eval.num_prompts > 0), loss.<other>.* and task.<other>.* (only the chosen block is read).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_collections

from apo_jax.infra import tracking
from apo_jax.models import attention, decoder
from apo_jax.objectives.schedule import MODES, SCOPES
from apo_jax.trainer import rollout_correction

_DTYPES = ("float32", "bfloat16")
_INF = math.inf
_PRECISIONS = ("default", "float32")


def _fail(key: str, value, why: str):
    raise ValueError(f"config.{key}={value!r}: {why}")


class Range:
    """A closed/open interval written as in maths, e.g. Range("(0, 1]"), Range("[1, inf)")."""

    def __init__(self, text: str):
        lo, hi = text[1:-1].split(",")
        self.text, self.lo, self.hi = text, float(lo), float(hi)
        self.lo_open, self.hi_open = text[0] == "(", text[-1] == ")"

    def __contains__(self, x) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below


# key -> (type, valid range or None, meaning). Floats must also be finite (no nan/inf).
KEYS: dict[str, tuple[type, str | None, str]] = {
    "seed": (int, "[0, inf)", "seeds numpy and JAX generators, which need a non-negative int"),
    "total_steps": (int, "[1, inf)", "rollout steps"),
    "model.preset": (str, None, "random-init preset (ignored when model.hf_dir is set)"),
    "model.vocab_size": (int, "[-1, inf)", "0 = the preset's, -1 = the task's (random init)"),
    "model.hf_dir": (str, None, "Hugging Face model directory"),
    "model.param_dtype": (str, None, "float32 | bfloat16"),
    "model.dtype": (str, None, "float32 | bfloat16"),
    "model.remat": (object, None, "none | block | a remat policy (checked below)"),
    "model.scan_layers": (bool, None, "stack layers under lax.scan"),
    "model.attention": (str, None, "auto | xla_blockwise | cudnn | splash | naive"),
    "model.logprob_precision": (str, None, "default | float32 (scoring in float32, highest)"),
    "rollout.prompts_per_step": (int, "[1, inf)", "prompts per rollout step"),
    "rollout.group_size": (int, "[2, inf)", "group-relative losses need >= 2 completions"),
    "rollout.max_prompt_len": (int, "[1, inf)", "tokens"),
    "rollout.max_new_tokens": (int, "[1, inf)", "tokens"),
    "rollout.temperature": (float, "[0, inf)", "0 = greedy"),
    "rollout.top_k": (int, "[0, inf)", "0 = off"),
    "rollout.top_p": (float, "(0, 1]", "nucleus mass, 1 = off"),
    "rollout.cache_dtype": (str, None, "auto | float32 | bfloat16"),
    "rollout.dynamic_sampling": (bool, None, "DAPO dynamic sampling"),
    "rollout.max_refill_rounds": (int, "[0, inf)", "extra rounds (only with dynamic_sampling)"),
    # < max_new_tokens is checked below: a buffer as long as the completion penalises them all.
    "rollout.overlong_buffer": (int, "[0, inf)", "tokens, 0 = off"),
    "rollout.rows_per_chunk": (int, "[0, inf)", "rows per sampler call, 0 = all"),
    "loss.rollout_correction": (str, None, "none | tis_token | tis_sequence | mis_sequence"),
    "loss.rollout_correction_cap": (float, "(1, inf)", "importance-weight cap C"),
    "schedule.mode": (str, None, "legacy | ess | fixed"),
    "schedule.scope": (str, None, "group | batch"),
    "schedule.alpha": (float, "(0, 1]", "alpha must lie in (0, 1] (1 = forward KL)"),
    "schedule.alpha_max": (float, "(0, 1]", "alpha must lie in (0, 1] (1 = forward KL)"),
    "schedule.alpha_min": (float, "(0, 1]", "alpha must lie in (0, 1] (1 = forward KL)"),
    "schedule.adaptive_tau": (bool, None, "tau rule of spec §2"),
    "schedule.tau0": (float, "(0, inf)", "anchoring temperature"),
    "schedule.a_tau": (float, "[0, inf)", "weight of H_stat in tau (spec §2)"),
    "schedule.b_tau": (float, "[0, inf)", "weight of -confidence * signal in tau (spec §2)"),
    "schedule.tau_min": (float, "(0, inf)", "lower clip of tau"),
    "schedule.tau_max": (float, "(0, inf)", "upper clip of tau"),
    "schedule.use_ema": (bool, None, "legacy-mode EMA"),
    "schedule.ema_momentum": (float, "[0, 1)", "EMA momentum (1 would freeze alpha)"),
    "schedule.ess_target_frac": (float, "(0, 1]", "target ESS as a fraction of G"),
    "schedule.ess_candidates": (int, "[2, inf)", "alpha grid size (both ends at least)"),
    "schedule.ess_warmup_calls": (int, "[0, inf)", "updates at alpha_max first"),
    "schedule.ess_momentum": (float, "[0, 1)", "momentum (1 would freeze alpha)"),
    "schedule.ess_max_step": (float, "(0, 1]", "largest change of alpha per update"),
    "optim.lr": (float, "(0, inf)", "peak learning rate"),
    "optim.warmup_steps": (int, "[0, inf)", "optimizer updates"),
    "optim.decay": (str, None, "constant | cosine"),
    "optim.b1": (float, "[0, 1)", "Adam moment decay (1 never forgets)"),
    "optim.b2": (float, "[0, 1)", "Adam moment decay (1 never forgets; bias correction / 0)"),
    "optim.weight_decay": (float, "[0, inf)", "decoupled weight decay (< 0 grows weights)"),
    "optim.grad_clip": (float, "[0, inf)", "global-norm clip, 0 = off"),
    "optim.mini_batches": (int, "[1, inf)", "updates per rollout step"),
    "optim.micro_batches": (int, "[1, inf)", "gradient accumulation steps"),
    "optim.logprob_chunk": (int, "[1, inf)", "vocabulary chunk of the log-prob kernel"),
    "mesh.data": (int, "[-1, inf)", "-1 = the devices left over (0 is refused below)"),
    "mesh.fsdp": (int, "[1, inf)", "FSDP axis size"),
    "mesh.tensor": (int, "[1, inf)", "tensor-parallel axis size"),
    "checkpoint.every_steps": (int, "[0, inf)", "0 = only at the end / on a signal"),
    "checkpoint.keep": (int, "[1, inf)", "0 would delete every checkpoint, the final one too"),
    "eval.every_steps": (int, "[0, inf)", "0 = only at the end (if eval.num_prompts)"),
    "eval.num_prompts": (int, "[0, inf)", "0 = no evaluation"),
    "eval.rows_per_chunk": (int, "[0, inf)", "rows per sampler call, 0 = the rollout's"),
    "logging.tensorboard": (bool, None, "TensorBoard events"),
    "logging.plots": (bool, None, "PNG plots"),
    "logging.progress": (bool, None, "progress bar"),
    "logging.wandb": (bool, None, "Weights & Biases run (the wandb extra)"),
    "logging.wandb_project": (str, None, "W&B project"),
    "logging.wandb_entity": (str, None, "W&B entity, '' = the API key's default"),
    "logging.wandb_mode": (str, None, "online | offline"),
    "logging.wandb_group": (str, None, "W&B group, '' = none"),
    "logging.wandb_tags": (object, None, "W&B tags (checked below)"),
}
_RANGES = {key: Range(spec[1]) for key, spec in KEYS.items() if spec[1]}


def _get(c, key: str):
    node = c
    for part in key.split("."):
        node = node[part]
    return node


def check_value(key: str, value, kind: type, valid: str | None = None, why: str = "") -> None:
    """Type (bool is not a number; an int is a valid float), finiteness and range of one key."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        _fail(key, value, f"must be a {kind.__name__}" + (f" ({why})" if why else ""))
    if kind is float and not math.isfinite(value):
        _fail(key, value, "must be a finite number")
    if valid and value not in (_RANGES.get(key) or Range(valid)):
        _fail(key, value, f"must lie in {valid}" + (f": {why}" if why else ""))


def check_block(prefix: str, params: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """An objective's or task's block (`config.<prefix>.*`): each value has its default's type
    (int where the default is an int, any number where it is a float) and numbers are finite.
    Ranges are the block owner's `check`."""
    for key, default in defaults.items():
        value = params[key]
        if isinstance(default, bool):
            check_value(f"{prefix}.{key}", value, bool)
        elif isinstance(default, int):
            check_value(f"{prefix}.{key}", value, int)
        elif isinstance(default, float):
            check_value(f"{prefix}.{key}", value, float)
        elif isinstance(default, str):
            check_value(f"{prefix}.{key}", value, str)


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


def check_config(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError on the first key whose value cannot work."""
    for key, (kind, valid, why) in KEYS.items():
        check_value(key, _get(c, key), kind, valid, why)
    if c.schedule.mode not in MODES:
        _fail("schedule.mode", c.schedule.mode, f"valid: {', '.join(MODES)}")
    if c.schedule.scope not in SCOPES:
        _fail("schedule.scope", c.schedule.scope, f"valid: {', '.join(SCOPES)}")
    if c.schedule.alpha_min > c.schedule.alpha_max:
        _fail("schedule.alpha_min", c.schedule.alpha_min, "must be <= schedule.alpha_max")
    if c.schedule.tau_min > c.schedule.tau_max:
        _fail("schedule.tau_min", c.schedule.tau_min, "need tau_min <= tau_max")

    r, o = c.rollout, c.optim
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
    if o.micro_batches < 1 or rows % o.micro_batches:
        _fail(
            "optim.micro_batches",
            o.micro_batches,
            f"must divide the {rows} rows of each update "
            "(rollout.prompts_per_step * rollout.group_size / optim.mini_batches)",
        )
    if r.rows_per_chunk:
        check_rows_per_chunk(r.rows_per_chunk, r.group_size, r.prompts_per_step, 1)
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
    if c.mesh.data == 0:
        _fail("mesh.data", c.mesh.data, "must be >= 1, or -1 for the devices left over")
    if not isinstance(c.model.remat, bool) and c.model.remat not in decoder.REMAT_POLICIES:
        _fail(
            "model.remat", c.model.remat, f"valid: {', '.join(decoder.REMAT_POLICIES)}, or a bool"
        )
    if c.model.attention not in attention.IMPLS:
        _fail("model.attention", c.model.attention, f"valid: {', '.join(attention.IMPLS)}")
    if c.rollout.cache_dtype not in ("auto", *_DTYPES):
        _fail("rollout.cache_dtype", c.rollout.cache_dtype, f"valid: auto, {', '.join(_DTYPES)}")
    for key in ("param_dtype", "dtype"):
        if c.model[key] not in _DTYPES:
            _fail(f"model.{key}", c.model[key], f"valid: {', '.join(_DTYPES)}")
    if c.model.logprob_precision not in _PRECISIONS:
        _fail("model.logprob_precision", c.model.logprob_precision, "valid: default, float32")
    check_wandb(c.logging)


def check_wandb(lg) -> None:
    """The W&B keys; with logging.wandb=True the wandb package must import (an optional extra:
    the error gives the install line)."""
    if lg.wandb_mode not in tracking.MODES:
        _fail("logging.wandb_mode", lg.wandb_mode, f"valid: {', '.join(tracking.MODES)}")
    tags = lg.wandb_tags
    if not isinstance(tags, list | tuple) or not all(
        isinstance(t, str) and 1 <= len(t) <= tracking.MAX_TAG for t in tags
    ):
        why = f"must be a tuple of strings of 1-{tracking.MAX_TAG} characters"
        _fail("logging.wandb_tags", tags, why)
    if lg.wandb and not lg.wandb_project:
        _fail("logging.wandb_project", lg.wandb_project, "must name a W&B project")
    if lg.wandb:
        tracking.check_installed()


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
