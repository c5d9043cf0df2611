"""DAPO (arXiv 2503.14476; spec §4.3): GRPO with clip-higher and a token-level loss.

Token arrays are [P, G, T], rewards [P, G].
"""

import functools

from apo_jax.objectives import grpo, registry

# config.loss.dapo.* (the DAPO paper's; the author's DAPO baseline used clip_eps_low = 0, §3.3)
DEFAULTS = dict(
    clip_eps_low=0.2,  # lower ratio clip
    clip_eps_high=0.28,  # upper ratio clip ("clip-higher")
    dual_clip=0.0,  # dual-clip constant for A < 0 (0 = off; the recipe uses 10)
    scale_adv=True,  # divide group advantages by the group std
)

# DAPO (arXiv 2503.14476; spec §4.3): clip-higher (0.2, 0.28), no KL, token-mean:
#
#     L = (1/Σ_i|o_i|) Σ_i Σ_t max(−Â_i ρ_{i,t}, −Â_i clip(ρ_{i,t}, 1−ε_low, 1+ε_high))
#
# with the dual clip (`dual_clip` = c > 1, Â_i < 0 only) capping each token's loss at −c·Â_i,
# as in GRPO (`common.clipped_surrogate`). dapo_loss(logp, logp_old, mask, rewards, **DEFAULTS).
#
# Overlong shaping (`rollout.overlong_buffer`) goes into the reward and dynamic sampling
# (`rollout.dynamic_sampling`) is a rollout-loop filter: both are rollout keys, usable with any
# loss.
dapo_loss = functools.partial(grpo.grpo_loss, **DEFAULTS, agg_mode="token-mean")

OBJECTIVE = registry.Objective(
    name="dapo",
    loss=registry.plain_loss(dapo_loss),
    defaults=DEFAULTS,
    check=lambda p: grpo.check_ppo_clip("dapo", p),
    doc="DAPO: clip-higher, token-mean aggregation, no KL",
)
