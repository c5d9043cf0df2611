"""KL-Cov (arXiv 2505.22617; verl `compute_policy_loss_kl_cov`) with APO's budget on MATH
Level 3: GRPO advantages, token-mean, no ratio clip, β·|log π_θ − log π_old| with β = 1 on the
0.2 % of each update's tokens with the largest covariance (the paper's 7B recipe; 0.02 % for
32B). Model, data, G, batch, lengths, lr and evaluation as apo_math_l3.py; no dynamic sampling
(the recipe filters groups: add --config.rollout.dynamic_sampling=True).

    python -m apo_jax.main --config=experiments/kl_cov_math_l3.py --workdir=runs/kl_cov_math_l3 \\
        --config.model.hf_dir=/path/to/Qwen3-1.7B
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
    c.loss.name = "kl_cov"
    c.loss.kl_cov.kl_cov_ratio = 2e-3  # recipe/dapo/7b_kl_cov.sh: k_percent 0.2
    c.loss.kl_cov.ppo_kl_coef = 1.0
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
