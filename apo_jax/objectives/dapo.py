"""DAPO (arXiv 2503.14476; spec §4.3): GRPO with clip-higher and a token-level loss.

Token arrays are [P, G, T], rewards [P, G].
"""

from jaxtyping import Array, Float

from apo_jax.objectives import grpo, registry
from apo_jax.objectives.common import LossOutput

# config.loss.dapo.* (the DAPO paper's; the author's DAPO baseline used clip_eps_low = 0, §3.3)
DEFAULTS = dict(
    clip_eps_low=0.2,  # lower ratio clip
    clip_eps_high=0.28,  # upper ratio clip ("clip-higher")
    dual_clip=0.0,  # dual-clip constant for A < 0 (0 = off; the recipe uses 10)
    scale_adv=True,  # divide group advantages by the group std
)


def dapo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    clip_eps_low: float = DEFAULTS["clip_eps_low"],
    clip_eps_high: float = DEFAULTS["clip_eps_high"],
    dual_clip: float = DEFAULTS["dual_clip"],
    scale_adv: bool = DEFAULTS["scale_adv"],
) -> LossOutput:
    """DAPO (arXiv 2503.14476; spec §4.3): clip-higher (0.2, 0.28), no KL, token-mean:

        L = (1/Σ_i|o_i|) Σ_i Σ_t max(−Â_i ρ_{i,t}, −Â_i clip(ρ_{i,t}, 1−ε_low, 1+ε_high))

    with the dual clip (`dual_clip` = c > 1, Â_i < 0 only) capping each token's loss at −c·Â_i,
    as in GRPO (`common.clipped_surrogate`).

    Overlong shaping (`rollout.overlong_buffer`) goes into the reward and dynamic sampling
    (`rollout.dynamic_sampling`) is a rollout-loop filter: both are rollout keys, usable with any
    loss.
    """
    return grpo.grpo_loss(
        logp,
        logp_old,
        mask,
        rewards,
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        dual_clip=dual_clip,
        scale_adv=scale_adv,
        agg_mode="token-mean",
    )


def _loss(logp, b, ctx, **params) -> LossOutput:
    return dapo_loss(
        logp,
        b.old_logp,
        b.completion_mask,
        b.rewards,
        **params,
    )


OBJECTIVE = registry.Objective(
    name="dapo",
    loss=_loss,
    defaults=DEFAULTS,
    check=lambda p: grpo.check_ppo_clip("dapo", p),
    doc="DAPO: clip-higher, token-mean aggregation, no KL",
)
