"""GSPO as the APO author ran it (`gspo_qwen3_math_fair.yaml`; spec §3.3) — AUTHOR VARIANT:
clip range [1 − 0.2, 1 + 0.28] instead of the GSPO paper's (3e-4, 4e-4). Everything else is
APO's budget (G = 6, 48 prompts per step in 2 mini-batches of 24, lr 1e-6, 2 epochs, no KL).

    python -m apo_jax.main --config=experiments/gspo_author_math_l3.py \\
        --workdir=runs/gspo_author_math_l3 --config.model.hf_dir=/path/to/Qwen3-1.7B
"""

from configs import base


def get_config(arg=None):
    c = base.get_config()
    c.loss.name = "gspo"
    c.loss.gspo.clip_eps_low = 0.2
    c.loss.gspo.clip_eps_high = 0.28
    c.loss.gspo.scale_adv = True
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if arg and "debug" in arg.split(","):
        base.apply_debug(c)
    return c
