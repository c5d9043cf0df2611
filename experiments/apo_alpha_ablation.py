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


# Config arguments this file accepts, comma-separated; any other is an error.
ARGS = ("debug", "scheduled", "<alpha in (0, 1]>")


def parse_alpha(arg: str | None) -> float | None:
    """The fixed alpha in a comma-separated config arg; None means the schedule. Any other
    argument is an error naming it."""
    alphas = []
    for token in (arg or "").split(","):
        token = token.strip()
        if token and token not in ("debug", "scheduled"):
            try:
                alphas.append(float(token))
            except ValueError:
                alphas.append(None)
            if alphas[-1] is None or not 0.0 < alphas[-1] <= 1.0 or len(alphas) > 1:
                raise base.ConfigArgError(
                    f"{__file__}: config argument {token!r} (in {arg!r}): accepted: "
                    f"{', '.join(ARGS)}, one alpha at most (1 = forward KL)"
                )
    return alphas[0] if alphas else None


def get_config(arg=None):
    c = base.get_config()
    c.optim.packing = "packed"  # padding-free update passes (benchmarks/README.md, issue 21)
    alpha = parse_alpha(arg)
    if alpha is not None:
        c.schedule.mode = "fixed"
        c.schedule.alpha = alpha
    c.eval.num_prompts = 256  # as apo_math_l3.py
    c.eval.every_steps = 22
    if "debug" in [t.strip() for t in (arg or "").split(",")]:
        base.apply_debug(c)
    return c
