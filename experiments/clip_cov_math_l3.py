"""Clip-Cov (arXiv 2505.22617; verl `compute_policy_loss_clip_cov`) with APO's budget on MATH
Level 3: GRPO advantages, token-mean, the recipe's ratio clip [0, 2] (ε 1 / 1) and the gradient
of r = 0.02 % of each update's tokens cut, drawn among those with covariance in (1, 5). Model,
data, G, batch, lengths, lr and evaluation as apo_math_l3.py; no dynamic sampling (the paper's
recipe also filters all-correct / all-wrong groups: add --config.rollout.dynamic_sampling=True).

    python -m apo_jax.main --config=experiments/clip_cov_math_l3.py \\
        --workdir=runs/clip_cov_math_l3 --config.model.hf_dir=/path/to/Qwen3-1.7B
"""

from configs import base

ARGS = ("debug",)  # config arguments this file accepts (`FILE:debug`)


def get_config(arg=None):
    c = base.get_config()
    c.optim.packing = "packed"  # padding-free update passes (benchmarks/README.md, issue 21)
    # Memory (issue 16, benchmarks/README.md): 6 micro-batches per update and 48 decode rows
    # at a time (slots; static: chunks of 8 prompts x G 6) fit a TPU v5e-8 (README); the
    # results do not change.
    c.optim.micro_batches = 6
    c.rollout.rows_per_chunk = 48
    c.loss.name = "clip_cov"
    c.loss.clip_cov.clip_eps_low = c.loss.clip_cov.clip_eps_high = 1.0  # recipe/dapo/7b_clip_cov.sh
    c.loss.clip_cov.clip_cov_ratio = 2e-4
    c.loss.clip_cov.clip_cov_lb, c.loss.clip_cov.clip_cov_ub = 1.0, 5.0
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
