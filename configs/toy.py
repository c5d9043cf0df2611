"""The embedded default run (`make run`): APO on the toy copy-a-set task with a tiny random
Qwen3 on CPU, a few minutes on 2 cores. No downloads."""

from configs import base

ARGS = ("debug",)  # config arguments this file accepts (`FILE:debug`)


def get_config(arg=None):
    c = base.get_config()
    c.total_steps = 300
    c.task.name = "toy"
    c.model.preset = "tiny"
    c.model.vocab_size = -1  # the task's vocabulary
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.model.scan_layers = False  # 2 layers: compile time is small, per-layer weights decode faster
    c.rollout.prompts_per_step = 16
    c.rollout.group_size = 8
    c.rollout.max_prompt_len = 8
    c.rollout.max_new_tokens = 6
    c.optim.lr = 3e-3
    c.optim.mini_batches = 2
    c.checkpoint.every_steps = 50
    c.eval.num_prompts = 64
    c.eval.every_steps = 50
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
