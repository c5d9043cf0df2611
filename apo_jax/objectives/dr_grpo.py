"""Dr.GRPO (arXiv 2503.20783; spec §4.4): GRPO without the std and the 1/|o_i| normalisers.

Token arrays are [P, G, T], rewards [P, G].
"""

from jaxtyping import Array, Float

from apo_jax.objectives import grpo, registry
from apo_jax.objectives.common import LossOutput

# config.loss.dr_grpo.* (one symmetric clip, as in the paper)
DEFAULTS = dict(
    clip_eps=0.2,  # ratio clip ε (both sides)
)


def dr_grpo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    max_len: int,
    clip_eps: float = DEFAULTS["clip_eps"],
) -> LossOutput:
    """Dr.GRPO (arXiv 2503.20783; spec §4.4): GRPO without std scaling and without 1/|o_i|:

    L = (1/G) Σ_i (1/max_len) Σ_t max(−A_i ρ_{i,t}, −A_i clip(ρ_{i,t}, 1−ε, 1+ε)),  A_i = r_i − r̄
    """
    return grpo.grpo_loss(
        logp,
        logp_old,
        mask,
        rewards,
        clip_eps_low=clip_eps,
        clip_eps_high=clip_eps,
        scale_adv=False,
        agg_mode="seq-mean-token-sum-norm",
        max_len=max_len,
    )


OBJECTIVE = registry.Objective(
    name="dr_grpo",
    loss=lambda logp, b, ctx, **params: dr_grpo_loss(
        logp, b.old_logp, b.completion_mask, b.rewards, max_len=ctx.max_new_tokens, **params
    ),
    defaults=DEFAULTS,
    check=lambda p: grpo.check_ppo_clip("dr_grpo", p),
    doc="Dr.GRPO: unnormalised advantages, token sums over a fixed length",
)
