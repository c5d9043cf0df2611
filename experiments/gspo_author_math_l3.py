"""GSPO as the APO author ran it (`gspo_qwen3_math_fair.yaml`; spec §3.3) — AUTHOR VARIANT:
clip range [1 − 0.2, 1 + 0.28] instead of the GSPO paper's (3e-4, 4e-4). Everything else is
APO's budget (G = 6, 48 prompts per step in 2 mini-batches of 24, lr 1e-6, 2 epochs, no KL).

    python -m apo_jax.main --config=experiments/gspo_author_math_l3.py \\
        --workdir=runs/gspo_author_math_l3 --config.model.hf_dir=/path/to/Qwen3-1.7B
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
    c.loss.name = "gspo"
    c.loss.gspo.clip_eps_low = 0.2
    c.loss.gspo.clip_eps_high = 0.28
    c.loss.gspo.scale_adv = True
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
