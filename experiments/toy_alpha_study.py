"""Reward vs diversity across alpha on the embedded toy task, on CPU: a sweep definition.

The toy task (copy a 3-set in any order) has 3! = 6 correct answers per prompt, so coverage is
measurable. Five arms of short APO runs: fixed alpha 0.35, 0.5, 0.9, 1.0 and the reward- and
confidence-guarded schedule (the baseline, listed first); each run evaluates 8 samples at T = 1
on 64 held-out prompts every 25 steps.

    python -m apo_jax.sweep --config=experiments/toy_alpha_study.py \\
        --sweep=experiments/toy_alpha_study.py --seeds=0,1,2,3 --workdir=runs/alpha_study --jobs=2

As a config file alone it is the schedule arm (add `:debug` for a smoke run).
"""

from configs import base, toy

ALPHAS = (0.35, 0.5, 0.9, 1.0)  # the fixed-alpha arms


ARGS = ("debug",)  # config arguments this file accepts (`FILE:debug`)


def get_config(arg=None):
    c = toy.get_config()
    c.total_steps = 300
    c.eval.num_prompts = 64  # held-out prompts, k = group_size = 8 samples each
    c.eval.every_steps = 25
    c.checkpoint.every_steps = 50  # a killed run resumes from its last multiple of 50
    c.logging.tensorboard = c.logging.plots = c.logging.progress = False
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c


def get_sweep(arg=None):
    """Override dicts, one per arm; seeds come from `--seeds`."""
    del arg
    schedule = [{"schedule.mode": "legacy"}]  # the baseline: spec §2's schedule
    return schedule + [{"schedule.mode": "fixed", "schedule.alpha": a} for a in ALPHAS]
