"""SAPO (arXiv 2511.20347; verl `compute_policy_loss_sapo`) with APO's budget on MATH Level 3:
the soft gate (4/τ)·σ(τ(ρ − 1)) with τ_pos = 1, τ_neg = 1.05 (the paper's) in place of the ratio
clip, GRPO advantages, per-sequence token mean then mean over sequences, no KL. Model, data, G,
batch, lengths, lr and evaluation as apo_math_l3.py.

    python -m apo_jax.main --config=experiments/sapo_math_l3.py --workdir=runs/sapo_math_l3 \\
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
    c.loss.name = "sapo"
    c.loss.sapo.tau_pos, c.loss.sapo.tau_neg = 1.0, 1.05
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
