"""GRPO as the APO author actually ran it (his verl fork; spec §3.3) — AUTHOR VARIANT, not the
canonical GRPO and not APO's budget: G = 8, 64 prompts per step, max prompt 880 tokens,
token-mean per micro-batch of 6 sequences (the fork's scope: agg_mode "token-mean-per-micro" with
agg_rows = 6, then the mean over micro-batches), clip 0.2 with verl's dual clip c = 3 for
negative advantages, lr 1e-6, 2 epochs, no KL. The author's mini-batch of 24 prompts does not
divide 64; we use 2 mini-batches of 32 (verl would run updates of 24, 24 and 16); the 256 rows of
an update make 42 chunks of 6 and one of 4, cut in batch order (verl balances lengths first).

    python -m apo_jax.main --config=experiments/grpo_author_math_l3.py \\
        --workdir=runs/grpo_author_math_l3 --config.model.hf_dir=/path/to/Qwen3-1.7B
"""

from configs import base

ARGS = ("debug",)  # config arguments this file accepts (`FILE:debug`)


def get_config(arg=None):
    c = base.get_config()
    c.optim.packing = "packed"  # padding-free update passes (benchmarks/README.md, issue 21)
    c.loss.name = "grpo"
    c.loss.grpo.clip_eps_low = c.loss.grpo.clip_eps_high = 0.2
    c.loss.grpo.dual_clip = 3.0
    c.loss.grpo.agg_mode = "token-mean-per-micro"  # verl: token-mean per micro-batch, then mean
    c.loss.grpo.agg_rows = 6  # the author's ppo_micro_batch_size_per_gpu
    c.loss.grpo.scale_adv = True
    c.rollout.group_size = 8
    c.rollout.prompts_per_step = 64
    c.rollout.max_prompt_len = 880
    c.optim.mini_batches = 2
    c.total_steps = 50  # 2 epochs of 1,592 problems at 64 per step
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 25
    if "debug" in base.config_args(arg, ARGS, __file__):
        base.apply_debug(c)
    return c
