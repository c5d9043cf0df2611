"""TPO (arXiv 2604.06159; JeanKaddour/tpo) with APO's budget on MATH Level 3: cross-entropy from
the group target q ∝ p_old·exp(u/η), u the group z-scored rewards, η = 1, to the policy on the
group simplex of summed sequence log-probs (the paper's). Arg `mean` uses per-token mean
log-probs instead (APO's ℓ; not in the paper): with sums over ~1,000 tokens p_old is close to
one-hot (logged as loss/old_top_mass). Model, data, G, batch, lengths, lr and evaluation as
apo_math_l3.py.

    python -m apo_jax.main --config=experiments/tpo_math_l3.py[:mean] --workdir=runs/tpo_math_l3 \\
        --config.model.hf_dir=/path/to/Qwen3-1.7B

Args are comma-separated: `mean`, `debug`, `mean,debug`.
"""

from configs import base

ARGS = ("mean", "debug")  # config arguments this file accepts (comma-separated)


def get_config(arg=None):
    args = base.config_args(arg, ARGS, __file__)
    c = base.get_config()
    c.optim.packing = "packed"  # padding-free update passes (benchmarks/README.md, issue 21)
    # Memory (issue 16, benchmarks/README.md): 6 micro-batches per update and 48 decode rows
    # at a time (slots; static: chunks of 8 prompts x G 6) fit a TPU v5e-8 (README); the
    # results do not change.
    c.optim.micro_batches = 6
    c.rollout.rows_per_chunk = 48
    c.loss.name = "tpo"
    c.loss.tpo.eta = 1.0
    c.loss.tpo.length_normalize = "mean" in args
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if "debug" in args:
        base.apply_debug(c)
    return c
