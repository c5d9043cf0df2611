"""APO on MATH Level 3 as in the paper (spec §3.1): Qwen3-1.7B from an HF directory, G = 6,
48 prompts per step in 2 mini-batches, lengths 1024 / 1280, temperature 1, AdamW lr 1e-6, no KL,
the reward- and confidence-guarded alpha schedule on. These are configs/base.py's defaults; this
file only adds a held-out evaluation on MATH Level-3 test.

    python -m apo_jax.main --config=experiments/apo_math_l3.py --workdir=runs/apo_math_l3 \\
        --config.model.hf_dir=/path/to/Qwen3-1.7B
"""

from configs import base

ARGS = ("debug",)  # config arguments this file accepts (`FILE:debug`)


def get_config(arg=None):
    c = base.get_config()
    c.optim.packing = "packed"  # padding-free update passes (benchmarks/README.md, issue 21)
    # Memory (benchmarks/README.md, README "Will my config fit?"): 6 micro-batches per update
    # and the rollout in chunks of 8 prompts x G 6 fit 4 x 24 GB and 8 x 16 GB; the results do
    # not change. The evaluation samples in the same 48-row calls (eval.rows_per_chunk = 0: the
    # rollout's): 48 prompts per greedy call, 8 x G per sampled call.
    c.optim.micro_batches = 6
    c.rollout.rows_per_chunk = 48
    c.eval.num_prompts = 256  # held-out L3 test prompts: greedy + G samples each
    c.eval.every_steps = 22  # 66 steps = 2 epochs of the 1,592 L3 problems: evals at 22/44/66
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
