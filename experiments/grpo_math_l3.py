"""GRPO (canonical, DeepSeekMath; spec §4.1) with APO's budget on MATH Level 3: same model, data,
G = 6, 48 prompts per step in 2 mini-batches, lengths, lr and evaluation as apo_math_l3.py.
Symmetric clip 0.2, group-std advantages, per-sequence token mean then mean over sequences.
No KL (the paper's setup; DeepSeekMath itself used beta = 0.04: add --config.loss.kl_coef=0.04).

    python -m apo_jax.main --config=experiments/grpo_math_l3.py --workdir=runs/grpo_math_l3 \\
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
    c.loss.name = "grpo"
    c.loss.grpo.clip_eps_low = c.loss.grpo.clip_eps_high = 0.2
    c.loss.grpo.agg_mode = "seq-mean-token-mean"  # 1/|o_i| per sequence, then mean (the paper's)
    c.loss.grpo.scale_adv = True
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
