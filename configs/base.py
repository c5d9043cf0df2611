"""The default config of apo_jax. Other config files override a few keys each.

Every core key is declared once, with its default, type, valid range and meaning, in
apo_jax/settings.py (one dataclass per block); the loss and task plug-ins declare their blocks in
their own modules. This file assembles them and shrinks them for `debug`.

Defaults follow the APO paper's setup (../shared/docs/APO_SPEC.md §3, §6): Qwen3-1.7B on MATH
Level 3, G = 6, 48 prompts per step in 2 mini-batches, lengths 1024 / 1280, temperature 1,
AdamW lr 1e-6, no KL, APO with the reward- and confidence-guarded alpha schedule.

APO_JAX_DATA_DIR defaults to ../shared/data beside the checkout (see apo_jax/tasks/datasets.py).
Usage: --config=configs/base.py[:debug]  (the `debug` arg shrinks everything for a CPU smoke run)
"""

import ml_collections

from apo_jax import objectives, settings, tasks
from apo_jax.config_file import ConfigArgError, config_args  # noqa: F401 (for other files)

ARGS = ("debug",)  # the config arguments this file accepts (`FILE:debug`); others are errors


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_args(arg, ARGS, __file__)
    # The core keys: apo_jax/settings.py (Run for the top level, then Model, Lora, Rollout,
    # Loss, Schedule, Optim, Mesh, Checkpoint, Eval, Logging).
    c = settings.default_config(
        # Tasks are plug-ins (apo_jax/tasks/): each registered task brings its block of keys,
        # config.task.<name>.*, with defaults and meanings in its module (e.g. tasks/math.py).
        task=tasks.default_config("math"),  # task.name: math | toy | toy_sorted
        # Losses are plug-ins (apo_jax/objectives/): each registered objective brings its block,
        # config.loss.<name>.*, with the family's canonical defaults (GSPO 3e-4 / 4e-4, DAPO
        # 0.2 / 0.28, ...) and their meanings in its module (e.g. objectives/gspo.py).
        # loss.name: apo | fdiv | grpo | dapo | dr_grpo | gspo | clip_cov | kl_cov | cispo |
        # sapo | alpha_dpg | tpo (objectives.names(): all registered)
        loss=objectives.default_config("apo"),
    )
    if "debug" in args:
        apply_debug(c)
    return c


def apply_debug(c: ml_collections.ConfigDict) -> None:
    """Shrinks a config to a random tiny model and a few short steps (CPU, seconds)."""
    c.model.preset, c.model.hf_dir = "tiny", ""
    c.model.vocab_size = -1  # the task's vocabulary (the real Qwen3 one for math tasks)
    c.model.dtype, c.model.param_dtype, c.model.remat = "float32", "float32", "none"
    c.total_steps = 2
    c.rollout.prompts_per_step = 4
    c.rollout.group_size = 2
    c.rollout.max_prompt_len = 64
    c.rollout.max_new_tokens = 8
    c.rollout.rows_per_chunk = 0  # the memory settings of a large run do not fit these shapes
    c.optim.lr = 1e-3
    c.optim.micro_batches = 1
    c.checkpoint.every_steps = 0
    c.logging.tensorboard = False
    c.logging.plots = False
    c.logging.progress = False
    if c.eval.num_prompts:
        c.eval.num_prompts = 4
