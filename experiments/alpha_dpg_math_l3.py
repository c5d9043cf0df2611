"""α-DPG (naver/alpha-dpg, ICLR 2026) with APO's budget on MATH Level 3: REINFORCE on the
sequence pseudo-reward (p̃/(Ẑ·π_old))^(1−α) − 1 toward π_ref filtered by correctness, α = 0.25,
clipped at 10, leave-one-out baseline, token sums over the fixed length (the reference recipe's).
The filter is correctness (the loss reads LossBatch.correct), as the reference's verifier, so
the run keeps the shaped `good_accuracy` reward of the other runs for its logs: the loss does
not read it (a filter on it would put wrong answers in the target). Keeps a frozen copy of the
initial policy (one more model in memory). Model, data, G, batch, lengths, lr and evaluation as
apo_math_l3.py.

    python -m apo_jax.main --config=experiments/alpha_dpg_math_l3.py \\
        --workdir=runs/alpha_dpg_math_l3 --config.model.hf_dir=/path/to/Qwen3-1.7B
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
    c.loss.name = "alpha_dpg"
    c.loss.alpha_dpg.alpha = 0.25  # examples/lean/alpha-dpg.sh
    c.loss.alpha_dpg.pseudo_reward_clip = 10.0
    c.loss.alpha_dpg.use_baseline = True
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
