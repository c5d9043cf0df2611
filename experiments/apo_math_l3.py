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
    # Memory (README "Will my config fit?", benchmarks/README.md): 6 micro-batches per update
    # and 48 decode rows at a time (rollout.rows_per_chunk: the continuous engine's slots;
    # static's chunks of 8 prompts x G 6) fit a TPU v5e-8 by the TPU compiler, evaluation
    # included (peak 9.3 of 16 GiB); the results do not change. The evaluation decodes through
    # the same 48 slots (eval.rows_per_chunk = 0: the rollout's).
    c.optim.micro_batches = 6
    c.rollout.rows_per_chunk = 48
    c.eval.num_prompts = 256  # held-out L3 test prompts: greedy + G samples each
    c.eval.every_steps = 22  # 66 steps = 2 epochs of the 1,592 L3 problems: evals at 22/44/66
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
