"""GSPO (arXiv 2507.18071; spec §4.2): the clipped surrogate on the length-normalised sequence
ratio, and its GSPO-token variant.

Token arrays are [P, G, T], rewards [P, G].
"""

from jaxtyping import Array, Float

from apo_jax.objectives import grpo, registry
from apo_jax.objectives.common import (
    LossOutput,
    aggregate,
    clipped_surrogate,
    float_dtype,
    group_advantages,
    kl_old_new,
    masked_mean,
    scalar_metrics,
    sequence_logp,
    sg,
)

# config.loss.gspo.* (the GSPO paper's §5.1 clip range)
DEFAULTS = dict(
    clip_eps_low=3e-4,  # lower clip of the sequence ratio
    clip_eps_high=4e-4,  # upper clip of the sequence ratio
    scale_adv=True,  # divide group advantages by the group std
    token_level=False,  # the GSPO-token variant
)
AUTHOR_CLIP = (0.2, 0.28)  # the author's GSPO baseline (gspo_qwen3_math_fair.yaml, spec §3.3)


def gspo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    clip_eps_low: float = DEFAULTS["clip_eps_low"],
    clip_eps_high: float = DEFAULTS["clip_eps_high"],
    scale_adv: bool = DEFAULTS["scale_adv"],
    token_level: bool = DEFAULTS["token_level"],
) -> LossOutput:
    """GSPO (arXiv 2507.18071; spec §4.2), mean over sequences:

        s_i = exp((1/|o_i|) Σ_t log ρ_{i,t})
        L = (1/G) Σ_i max(−Â_i s_i, −Â_i clip(s_i, 1−ε_l, 1+ε_h))

    `token_level` is GSPO-token: s_{i,t} = sg[s_i]·π_θ(o_{i,t})/sg[π_θ(o_{i,t})] with
    seq-mean-token-mean; same value and gradient when Â is constant per sequence. The author's
    runs used a 0.2/0.28 clip instead (AUTHOR_CLIP).
    """
    dt = float_dtype(logp)
    logp, m = logp.astype(dt), mask.astype(dt)
    adv = group_advantages(rewards, scale_by_std=scale_adv)  # [P, G]
    log_s = sequence_logp(logp - sg(logp_old.astype(dt)), m)  # [P, G]
    if token_level:
        log_s_t = sg(log_s)[..., None] + logp - sg(logp)  # [P, G, T]
        tok, active = clipped_surrogate(log_s_t, adv[..., None], clip_eps_low, clip_eps_high, None)
        total, denom = aggregate(tok, m, "seq-mean-token-mean")
        clip_frac = masked_mean(active.astype(dt), m)
    else:
        seq, active = clipped_surrogate(log_s, adv, clip_eps_low, clip_eps_high, None)  # [P, G]
        valid = (m.sum(-1) > 0).astype(dt)
        total, denom = (seq * valid).sum(), valid.sum()
        clip_frac = masked_mean(active.astype(dt), valid)
    metrics = scalar_metrics(clip_frac=clip_frac, kl_old_new=kl_old_new(logp_old, logp, m))
    return LossOutput(total, denom, metrics)


OBJECTIVE = registry.Objective(
    name="gspo",
    loss=registry.plain_loss(gspo_loss),
    defaults=DEFAULTS,
    check=lambda p: grpo.check_ppo_clip("gspo", p),
    doc="GSPO: clipped length-normalised sequence ratios",
)
