"""CISPO (MiniMax-M1, arXiv 2506.13585; definition as verl's core_algos
`compute_policy_loss_cispo`): REINFORCE weighted by a clipped, stop-gradient importance ratio,
so that no token's gradient is dropped, normalised over all tokens of the batch.

Token arrays are [P, G, T], rewards [P, G].
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from apo_jax.objectives import registry
from apo_jax.objectives.common import (
    LOG_RATIO_GUARD,
    LossOutput,
    aggregate,
    float_dtype,
    group_advantages,
    kl_old_new,
    masked_mean,
    scalar_metrics,
    sg,
)

# config.loss.cispo.* (MiniMax-M1 sets no lower bound and tunes only ε_high without publishing
# it; these are verl's CISPO example, examples/cispo_trainer: clip_ratio_low 10, high 0.2)
DEFAULTS = dict(
    clip_eps_low=1.0,  # lower IS-weight clip ε_low (>= 1: no lower bound, the ratio is > 0)
    clip_eps_high=0.2,  # upper IS-weight clip ε_high: weights are capped at 1 + ε_high
    scale_adv=True,  # GRPO advantages: divide by the group std
)


def cispo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    clip_eps_low: float = DEFAULTS["clip_eps_low"],
    clip_eps_high: float = DEFAULTS["clip_eps_high"],
    scale_adv: bool = DEFAULTS["scale_adv"],
) -> LossOutput:
    """CISPO (MiniMax-M1's J_CISPO), minimised, with ρ_{i,t} = π_θ/π_old and GRPO advantages Â_i:

        r̂_{i,t} = clip(ρ_{i,t}, 1 − ε_low, 1 + ε_high)
        L = −(1/Σ_i |o_i|) Σ_i Σ_t sg[r̂_{i,t}] · Â_i · log π_θ(y_{i,t})

    ∇L = −(1/Σ|o|) Σ sg[r̂]·Â·∇log π_θ: every token keeps its gradient (PPO's clip zeroes the
    clipped ones), only its weight is bounded. The paper's general form adds a mask M_{i,t}
    (PPO's trust region) that its runs do not use; it is not implemented. metrics: clip_frac
    (tokens whose weight was clipped, verl's pg_clipfrac).
    """
    dt = float_dtype(logp)
    logp, m = logp.astype(dt), mask.astype(dt)
    log_ratio = sg(logp - logp_old.astype(dt))
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_GUARD, LOG_RATIO_GUARD))
    weight = jnp.clip(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)  # [P, G, T], no gradient
    adv = group_advantages(rewards, scale_by_std=scale_adv)[..., None]  # [P, G, 1]
    total, denom = aggregate(-weight * adv * logp, m, "token-mean")
    metrics = dict(
        clip_frac=masked_mean((weight != ratio).astype(dt), m),
        kl_old_new=kl_old_new(logp_old, logp, m),
    )
    return LossOutput(total, denom, scalar_metrics(**metrics))


def _check(p) -> None:
    for key in ("clip_eps_low", "clip_eps_high"):
        if not p[key] >= 0.0:
            registry.fail(f"cispo.{key}", p[key], "must be >= 0")


def _inert(p) -> dict[str, str]:
    if p["clip_eps_low"] >= 1.0:
        return {"clip_eps_low": "a lower bound 1 − ε_low <= 0 never binds: the ratio is > 0"}
    return {}


OBJECTIVE = registry.Objective(
    name="cispo",
    loss=registry.plain_loss(cispo_loss),
    defaults=DEFAULTS,
    check=_check,
    inert=_inert,
    doc="CISPO: REINFORCE with clipped stop-gradient IS weights, token-mean",
)
