"""APO alpha ablation on MATH Level 3 (apo_math_l3.py's setup): a fixed alpha, given as the
config arg, against the reward- and confidence-guarded schedule (arg `scheduled`, or no alpha).

    for a in 0.35 0.5 0.9 1.0 scheduled; do
      python -m apo_jax.main --config=experiments/apo_alpha_ablation.py:$a \\
          --workdir=runs/apo_alpha_$a --config.model.hf_dir=/path/to/Qwen3-1.7B
    done

Args are comma-separated: `0.5`, `0.5,debug`, `scheduled,debug`.
"""

from configs import base

ALPHAS = (0.35, 0.5, 0.9, 1.0)  # the ablation grid; other values in (0, 1] also work


def parse_alpha(arg: str | None) -> float | None:
    """The fixed alpha in a comma-separated config arg; None means the schedule."""
    for token in (arg or "").split(","):
        token = token.strip()
        if token and token not in ("debug", "scheduled"):
            alpha = float(token)
            if not 0.0 < alpha <= 1.0:
                raise ValueError(f"alpha must lie in (0, 1] (1 = forward KL), got {token!r}")
            return alpha
    return None


def get_config(arg=None):
    c = base.get_config()
    alpha = parse_alpha(arg)
    if alpha is not None:
        c.schedule.mode = "fixed"
        c.schedule.alpha = alpha
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if arg and "debug" in arg.split(","):
        base.apply_debug(c)
    return c
