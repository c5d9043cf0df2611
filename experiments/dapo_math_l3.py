"""DAPO (canonical; spec §4.3) on MATH Level 3 with APO's model, data, G, batch, lengths and lr:
clip-higher (0.2 / 0.28), token-mean loss, no KL, dynamic sampling (groups with all-equal
rewards are dropped and refilled, at most 10 extra rounds: this spends MORE generation than
APO's budget, reported as rollout/refill_rounds) and overlong shaping with a 256-token buffer
(the recipe's 4096 / 20480 ratio applied to 1280 tokens).

    python -m apo_jax.main --config=experiments/dapo_math_l3.py --workdir=runs/dapo_math_l3 \\
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
    c.loss.name = "dapo"
    c.loss.dapo.clip_eps_low = 0.2
    c.loss.dapo.clip_eps_high = 0.28
    c.loss.dapo.scale_adv = True
    c.rollout.dynamic_sampling = True
    c.rollout.overlong_buffer = 256
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
        c.rollout.max_refill_rounds = 1  # a random tiny model is rarely right at all
        c.rollout.overlong_buffer = c.rollout.max_new_tokens // 2  # must fit the debug length
    return c
