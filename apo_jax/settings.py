"""Every core config key of apo_jax, declared once: its default, type, valid range and meaning.

A block of the config (`config.rollout`, `config.optim`, ...) is a frozen dataclass below and a
field made by `key(default, valid, doc)` is one of its keys. configs/base.py builds its ConfigDict
from these defaults (`default_config`); `trainer/build.plan` reads each block with `read`, and
constructing a block checks every key (type, finiteness, range, choices: errors name the key, as
`config.optim.lr=nan: must be a finite number`) and the block's own rule between its keys
(`check`). Rules that span blocks are trainer/validate.py's. The loss and task plug-ins declare
their blocks (`config.loss.<name>.*`, `config.task.<name>.*`) in their own modules.

Ranges are written as in maths, "[1, inf)". Upper bounds are those a dtype or memory imposes:
step counters and schedule boundaries are int32 on device, seeds int64.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax.numpy as jnp
import ml_collections

from apo_jax.models import attention, decoder
from apo_jax.models import lora as lora_lib

INT32_MAX = 2**31 - 1  # device step counters (optimizer count, TrainState.step) are int32
INT64_MAX = 2**63 - 1  # seeds: jax.random.key and the toy task's hash take an int64
DTYPES = ("float32", "bfloat16")
SCHEDULE_MODES = ("legacy", "ess", "fixed")
SCHEDULE_SCOPES = ("group", "batch")
# loss.rollout_correction (trainer/rollout_correction.py implements them)
ROLLOUT_CORRECTIONS = ("none", "tis_token", "tis_sequence", "mis_sequence", "reject_sequence")
MAX_TAG = 64  # characters of a W&B tag (W&B refuses longer ones; infra/tracking.py shortens)


def fail(key: str, value, why: str):
    raise ValueError(f"config.{key}={value!r}: {why}")


class Range:
    """A closed/open interval written as in maths, e.g. Range("(0, 1]"), Range("[1, inf)")."""

    def __init__(self, text: str):
        lo, hi = (_number(x.strip()) for x in text[1:-1].split(","))
        self.text, self.lo, self.hi = text, lo, hi
        self.lo_open, self.hi_open = text[0] == "(", text[-1] == ")"

    def __contains__(self, x) -> bool:
        above = x > self.lo if self.lo_open else x >= self.lo
        below = x < self.hi if self.hi_open else x <= self.hi
        return above and below


def _number(text: str) -> int | float:
    """An int bound stays an int: 2**63 - 1 as a float would round up to 2**63."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def check_value(key: str, value, kind: type, valid: str | Range | None = None, why: str = ""):
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
        fail(key, value, f"must be a {kind.__name__}" + (f" ({why})" if why else ""))
    if kind is float and not math.isfinite(value):
        fail(key, value, "must be a finite number")
    valid = Range(valid) if isinstance(valid, str) else valid
    if valid and value not in valid:
        fail(key, value, f"must lie in {valid.text}" + (f": {why}" if why else ""))


class Spec(NamedTuple):
    doc: str  # the key's meaning (units, what 0 means)
    kind: type  # bool | int | float (an int is accepted) | str | object (any: `check` decides)
    range: Range | None
    choices: tuple | Callable[[], tuple] | None  # a callable: read when checked (import order)
    check: Callable[[Any], str | None] | None  # value -> why it is refused, or None
    parse: Callable[[Any], Any] | None  # the checked value -> what the run uses (a jnp dtype)


def key(default, valid, doc: str, *, kind=None, check=None, parse=None):
    """A config key: a dataclass field holding its default, with in its metadata its `valid`
    values (a range "[0, 1)", a tuple of choices or a function giving them, or None), meaning,
    type (default: the default's; `parse`d keys: any), extra `check` and `parse`."""
    choices = None if valid is None or isinstance(valid, str) else valid
    kind = kind or (object if parse else type(default))
    spec = Spec(doc, kind, Range(valid) if isinstance(valid, str) else None, choices, check, parse)
    return dataclasses.field(default=default, metadata={"key": spec})


def keys(cls) -> tuple[dataclasses.Field, ...]:
    """The fields of a block that are config keys (others are filled by the build)."""
    return tuple(f for f in dataclasses.fields(cls) if "key" in f.metadata)


class Block:
    """A config block: constructing one checks each key, then `check` (rules between keys)."""

    PATH: ClassVar[str] = ""  # the keys' prefix in the config ("rollout.")

    def __post_init__(self):
        for f in keys(self):
            value = _checked(self.PATH + f.name, getattr(self, f.name), f.metadata["key"])
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        pass


def _checked(name: str, value, spec: Spec):
    check_value(name, value, spec.kind, spec.range, spec.doc)
    choices = spec.choices() if callable(spec.choices) else spec.choices
    if choices is not None and value not in choices:
        fail(name, value, f"valid: {', '.join(map(str, choices))}")
    if spec.check and (why := spec.check(value)):
        fail(name, value, why)
    return spec.parse(value) if spec.parse else value


def read(cls, node, **derived):
    """Block `cls` from its config node (a ConfigDict or a saved record): each of its keys, a key
    the node lacks (a record written before the key existed) at its default; `derived`: the
    block's fields that are not keys."""
    return cls(**{f.name: node[f.name] for f in keys(cls) if f.name in node}, **derived)


def _remat_error(value) -> str | None:
    try:
        decoder.check_remat(value)
    except ValueError:
        return f"valid: {', '.join(decoder.REMAT_POLICIES)}, or True / False (= block / none)"


def _greedy_error(t) -> str | None:
    if t == 0:
        return (
            "greedy sampling makes the G completions of a group identical: every objective "
            "here compares completions within a group, so the advantage and the gradient would "
            "be 0 at every step; use a temperature > 0 (held-out evaluation is greedy anyway)"
        )


def _tags_error(tags) -> str | None:
    if not isinstance(tags, list | tuple) or not all(
        isinstance(t, str) and 1 <= len(t) <= MAX_TAG for t in tags
    ):
        return f"must be a tuple of strings of 1-{MAX_TAG} characters"


# --- the blocks: key(default, valid range or choices, meaning, ...) ---------------------------
# A table, one key per line (or two or three for a long meaning): not reflowed by the formatter.
# fmt: off
I32, I64 = f"{INT32_MAX}]", f"{INT64_MAX}]"


@dataclasses.dataclass(frozen=True)
class Run(Block):
    seed: int = key(0, "[0, " + I64, "one seed for init, data order, rollout sampling")
    total_steps: int = key(66, "[1, " + I32,
        "rollout steps (each: sample a batch, then optim.mini_batches updates)")
    allow_unused_keys: bool = key(False, None,
        "a value that differs from its default in a loss or task block that loss.name / "
        "task.name does not select is an error (it would be ignored); True keeps such values")


@dataclasses.dataclass(frozen=True)
class Model(Block):
    PATH: ClassVar[str] = "model."
    preset: str = key("qwen3_1p7b", None, "preset of any family (models/registry.py), random init")
    vocab_size: int = key(0, "[-1, inf)",
        "random init only: 0 = the preset's, -1 = the task's vocabulary size")
    hf_dir: str = key("", None, "HF model dir (family read from config.json); overrides preset")
    param_dtype: Any = key("float32", DTYPES, "learner parameter dtype", parse=jnp.dtype)
    dtype: Any = key("bfloat16", DTYPES,
        "matmul compute dtype (accumulation is always float32)", parse=jnp.dtype)
    remat: str = key("block", None,
        "none | block | a policy of models/decoder.py REMAT_POLICIES (dots_saveable, ...): block "
        "keeps only each block's input for the backward pass (True / False = block / none)",
        check=_remat_error, parse=decoder.check_remat)
    attention: str = key("auto", attention.IMPLS,
        "models/attention.py. auto: cuDNN flash on GPU, splash on TPU, blockwise online-softmax "
        "XLA elsewhere; naive: dense [T, S] scores")
    scan_layers: bool = key(True, None,
        "layers as one [L, ...] stack under lax.scan (compile time independent of depth; remat "
        "effective); the rollout loops over layer slices. False: per-layer weights, a Python loop")
    logprob_precision: str = key("default", ("default", "float32"),
        "scoring (anchor, reference, train step)")
    # Filled by the build from model.lora.* (not keys of this block).
    lora: lora_lib.LoRAConfig | None = None  # None: rank 0, full fine-tune
    base_dtype: Any = None  # model.lora.base_dtype: the frozen base's dtype under LoRA
    peft_dir: str = ""  # model.lora.peft_dir


@dataclasses.dataclass(frozen=True)
class Lora(Block):
    """LoRA (apo_jax/models/lora.py): train adapters B·A beside the chosen projections, the base
    frozen (stored once in base_dtype, shared by scoring, the KL reference and the sampler)."""

    PATH: ClassVar[str] = "model.lora."
    rank: int = key(0, "[0, inf)", "r: 0 = off (full fine-tune)")
    alpha: float = key(32.0, "(0, inf)", "the delta is (alpha / r) · B A x")
    targets: str = key("q,k,v,o,gate,up,down", None,
        "comma-separated subset of the decoder's projections",
        check=lambda t: lora_lib.parse_targets(t) and None)
    base_dtype: str = key("bfloat16", lora_lib.BASE_DTYPES,
        "frozen base weights (adapters: model.param_dtype)")
    peft_dir: str = key("", None,
        'start from this PEFT adapter directory ("" = fresh adapters, B = 0)')

    def check(self) -> None:
        d = self.peft_dir
        if d and not self.rank:
            fail("model.lora.peft_dir", d, "needs model.lora.rank > 0 (LoRA on)")
        if d and not os.path.isfile(os.path.join(d, "adapter_config.json")):
            fail("model.lora.peft_dir", d, "no adapter_config.json there (a PEFT dir)")


@dataclasses.dataclass(frozen=True)
class Rollout(Block):
    PATH: ClassVar[str] = "rollout."
    prompts_per_step: int = key(48, "[1, inf)", "P: prompts sampled per rollout step")
    group_size: int = key(6, "[2, inf)", "G: completions per prompt (group-relative: >= 2)")
    max_prompt_len: int = key(1024, "[1, inf)", "tokens; longer prompts are left-truncated")
    max_new_tokens: int = key(1280, "[1, inf)", "tokens per completion")
    temperature: float = key(1.0, "[0, inf)",
        "sampling temperature, > 0 (greedy would make a group identical)", check=_greedy_error)
    top_k: int = key(0, "[0, inf)", "0 = off; at most the vocabulary size")
    top_p: float = key(1.0, "(0, 1]", "nucleus mass, 1 = off")
    dynamic_sampling: bool = key(False, None, "DAPO: drop groups with all-equal rewards and refill")
    max_refill_rounds: int = key(10, "[0, inf)",
        "dynamic sampling: at most this many extra generation rounds")
    cache_dtype: str = key("auto", ("auto", *DTYPES),
        "KV cache dtype: auto (bfloat16 on GPU/TPU, the compute dtype on CPU)")
    overlong_buffer: int = key(0, "[0, inf)",
        "DAPO overlong shaping buffer L_cache in tokens (0 = off)")
    rows_per_chunk: int = key(0, "[0, inf)",
        "rows (prompts x G) per sampler call, per process: the KV cache holds this many rows at a "
        "time (0 = all of a step's rows in one call). A multiple of G dividing each process's rows")
    engine: str = key("continuous", ("static", "continuous"),
        "decode engine: static batches or continuous batching (slots refilled as rows finish)")
    slots: int = key(0, "[0, inf)",
        "decode rows held at once per process with engine=continuous; 0 = rows_per_chunk or "
        "all rows")


@dataclasses.dataclass(frozen=True)
class Loss(Block):
    """The keys of config.loss that any objective reads (loss.name and the objectives' blocks
    are the plug-ins', apo_jax/objectives/). The entropy bonus (objectives/entropy.py):
    loss − c·(mean token entropy)."""

    PATH: ClassVar[str] = "loss."
    rollout_correction: str = key("none", ROLLOUT_CORRECTIONS,
        "sampler/trainer mismatch correction, any objective (trainer/rollout_correction.py)")
    rollout_correction_cap: float = key(2.0, "(1, inf)",
        "C > 1: TIS weight cap; MIS keeps ratios in [1/C, C]")
    entropy_coef: float = key(0.0, "[0, inf)", "c (0 = off), or the adaptive mode's initial c")
    entropy_target: float = key(0.0, "[0, inf)",
        "> 0: adaptive c steered toward this entropy (Skywork-OR1)")
    entropy_coef_delta: float = key(1e-4, "(0, inf)", "adaptive: change of c per update")
    entropy_coef_min: float = key(0.0, "[0, inf)", "adaptive: lower clip of c")
    entropy_coef_max: float = key(5e-3, "[0, inf)", "adaptive: upper clip of c")
    anchor: str = key("recompute", ("recompute", "sampler"),
        "pi_old from a scoring pass or from the sampler's log-probs (no pass; needs model.dtype, "
        "model.logprob_precision and rollout.cache_dtype float32, or a rollout_correction)")

    def check(self) -> None:
        if self.entropy_coef_min > self.entropy_coef_max:
            fail("loss.entropy_coef_min", self.entropy_coef_min,
                f"must be <= loss.entropy_coef_max={self.entropy_coef_max}")


@dataclasses.dataclass(frozen=True)
class Schedule(Block):
    """The alpha/tau schedule, used by objectives that declare schedule=True (apo, fdiv)."""

    PATH: ClassVar[str] = "schedule."
    mode: str = key("legacy", SCHEDULE_MODES,
        "alpha schedule: legacy (spec §2) | ess (Appendix A) | fixed")
    scope: str = key("group", SCHEDULE_SCOPES,
        "schedule statistics per prompt group or over the batch")
    alpha: float = key(0.9, "(0, 1]", "alpha when mode = fixed")
    alpha_max: float = key(0.9, "(0, 1]", "coverage end (forward-KL-like)")
    alpha_min: float = key(0.35, "(0, 1]", "mode-seeking end")
    adaptive_tau: bool = key(True, None, "tau rule of spec §2 (else tau = tau0)")
    tau0: float = key(0.5, "(0, inf)", "base anchoring temperature")
    a_tau: float = key(0.2, "[0, inf)", "tau weight on the anchor's normalised NLL H_stat")
    b_tau: float = key(0.5, "[0, inf)", "tau weight on -confidence * signal")
    tau_min: float = key(0.2, "(0, inf)", "lower clip of tau")
    tau_max: float = key(1.5, "(0, inf)", "upper clip of tau")
    use_ema: bool = key(False, None, "legacy mode: smooth alpha with an EMA")
    ema_momentum: float = key(0.9, "[0, 1)",
        "legacy mode EMA: alpha <- m * alpha_ema + (1 - m) * alpha_t")
    ess_target_frac: float = key(0.5, "(0, 1]", "ess mode: target ESS = frac * G (Appendix A)")
    ess_candidates: int = key(11, "[2, inf)",
        "ess mode: alpha grid size over [alpha_min, alpha_max]")
    ess_warmup_calls: int = key(10, "[0, " + I32,
        "ess mode: alpha = alpha_max for this many first updates")
    ess_momentum: float = key(0.9, "[0, 1)",
        "ess mode: alpha <- clip(m * alpha_prev + (1 - m) * alpha*, ...)")
    ess_max_step: float = key(0.05, "(0, 1]", "ess mode: largest change of alpha per update")

    def check(self) -> None:
        if self.alpha_min > self.alpha_max:
            fail("schedule.alpha_min", self.alpha_min, "must be <= schedule.alpha_max")
        if self.tau_min > self.tau_max:
            fail("schedule.tau_min", self.tau_min, "need tau_min <= tau_max")


@dataclasses.dataclass(frozen=True)
class Optim(Block):
    PATH: ClassVar[str] = "optim."
    lr: float = key(1e-6, "(0, inf)", "peak learning rate")
    warmup_steps: int = key(0, "[0, " + I32, "linear warm-up, in optimizer updates")
    decay: str = key("constant", ("constant", "cosine"), "cosine: to 0 at the last update")
    b1: float = key(0.9, "[0, 1)", "AdamW beta1")
    b2: float = key(0.999, "[0, 1)", "AdamW beta2")
    weight_decay: float = key(0.01, "[0, inf)", "AdamW decoupled weight decay")
    grad_clip: float = key(1.0, "[0, inf)", "global-norm gradient clip (0 = off)")
    mini_batches: int = key(2, "[1, inf)",
        "optimizer updates per rollout step (prompts split evenly)")
    micro_batches: int = key(1, "[1, inf)",
        "gradient accumulation inside each update (exact, any rows; divides them)")
    logprob_chunk: int = key(8192, "[1, inf)", "vocabulary chunk of the fused log-prob kernel")
    packing: str = key("none", ("none", "packed"),
        "scoring/training layout (trainer/packing.py): none = padded rows, the completion axis "
        "trimmed to the batch's longest (rounded up to 64·2^k or 96·2^k); packed = sequences end "
        "to end in rows of pack_len tokens (first-fit decreasing; one process)")
    pack_len: int = key(0, "[0, inf)",
        "tokens per packed row; 0 = the prompt bucket + the trimmed completion length")


@dataclasses.dataclass(frozen=True)
class Mesh(Block):
    PATH: ClassVar[str] = "mesh."
    data: int = key(-1, "[-1, inf)", "data-parallel axis size (-1 = the devices left over)",
        check=lambda d: "must be >= 1, or -1 for the devices left over" if d == 0 else None)
    fsdp: int = key(1, "[1, inf)", "fully-sharded data-parallel axis size")
    tensor: int = key(1, "[1, inf)", "tensor-parallel axis size")


@dataclasses.dataclass(frozen=True)
class Checkpoint(Block):
    PATH: ClassVar[str] = "checkpoint."
    every_steps: int = key(10, "[0, inf)",
        "save every N rollout steps (and at the end / on SIGTERM)")
    keep: int = key(3, "[1, inf)", "keep the last N checkpoints (0 would delete the final one)")


@dataclasses.dataclass(frozen=True)
class Eval(Block):
    PATH: ClassVar[str] = "eval."
    every_steps: int = key(0, "[0, inf)",
        "held-out evaluation every N steps and at the last step (0 = at the end)")
    num_prompts: int = key(0, "[0, inf)", "held-out prompts per evaluation (0 = no evaluation)")
    rows_per_chunk: int = key(0, "[0, inf)",
        "rows per evaluation sampler call, per process (0 = the rollout's)")


@dataclasses.dataclass(frozen=True)
class Logging(Block):
    """Weights & Biases: README "Tracking"; needs the extra: pip install -e ".[wandb]"."""

    PATH: ClassVar[str] = "logging."
    tensorboard: bool = key(True, None, "write TensorBoard events under workdir/tensorboard")
    plots: bool = key(True, None, "write PNG plots under workdir/plots at the end")
    progress: bool = key(True, None, "tqdm progress bar")
    wandb: bool = key(False, None, "one W&B run per workdir; a resumed run continues it")
    wandb_project: str = key("apo_jax", None, "W&B project")
    wandb_entity: str = key("", None, 'team or user ("" = the API key\'s default entity)')
    wandb_mode: str = key("online", ("online", "offline"),
        "offline: written under workdir/wandb, `wandb sync` later")
    wandb_group: str = key("", None, 'run group ("" = none; apo_jax.sweep sets the sweep\'s name)')
    wandb_tags: tuple = key((), None,
        "run tags, each 1-64 characters (apo_jax.sweep adds arm and seed)",
        kind=object, check=_tags_error)

    def check(self) -> None:
        if self.wandb and not self.wandb_project:
            fail("logging.wandb_project", self.wandb_project, "must name a W&B project")


# fmt: on


# The config's blocks by path ("" = its top level), in configs/base.py's order.
BLOCKS: dict[str, type[Block]] = {
    "": Run, "model": Model, "model.lora": Lora, "rollout": Rollout, "loss": Loss,
    "schedule": Schedule, "optim": Optim, "mesh": Mesh, "checkpoint": Checkpoint, "eval": Eval,
    "logging": Logging,
}  # fmt: skip


def default_config(**plugins: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Every core key at its default; `plugins` adds the plug-ins' keys to a block (loss=...:
    loss.name and the objectives' blocks; task=...: the tasks')."""
    c = ml_collections.ConfigDict(with_defaults({}))
    for path, block in plugins.items():  # a block of BLOCKS, or a new one
        c[path] = c.get(path) or ml_collections.ConfigDict()
        for k, v in block.items():
            c[path][k] = v
    return c


def defaults() -> dict[str, Any]:
    """Every core key's default, flat ({"rollout.engine": "continuous", ...}): what a record written
    before a key existed means by its absence."""
    return {
        (f"{path}." if path else "") + f.name: f.default
        for path, cls in BLOCKS.items()
        for f in keys(cls)
    }


def with_defaults(record: dict) -> dict:
    """A (nested) config record with each core key it lacks at its default: a run recorded
    before the key existed, as it ran (so `--config.KEY=VALUE` can override the key)."""
    out = copy.deepcopy(record)
    for name, value in defaults().items():
        *path, leaf = name.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node.setdefault(leaf, value)
    return out
