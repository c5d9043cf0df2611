"""CISPO (MiniMax-M1, arXiv 2506.13585; verl `compute_policy_loss_cispo`) with APO's budget on
MATH Level 3: REINFORCE with the stop-gradient IS weight clip(ρ, 0, 1.2) (no lower bound, verl's
example ε_high 0.2), GRPO advantages, token-mean over the update's tokens, no KL. Model, data,
G, batch, lengths, lr and evaluation as apo_math_l3.py.

    python -m apo_jax.main --config=experiments/cispo_math_l3.py --workdir=runs/cispo_math_l3 \\
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
    c.loss.name = "cispo"
    c.loss.cispo.clip_eps_low = 1.0  # no lower bound on the weight (the paper's choice)
    c.loss.cispo.clip_eps_high = 0.2
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
