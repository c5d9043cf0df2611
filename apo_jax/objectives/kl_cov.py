"""KL-Cov (Cui et al., arXiv 2505.22617; definition as verl's core_algos
`compute_policy_loss_kl_cov`): the unclipped importance-weighted policy gradient with a
|log-ratio| penalty on the top fraction of tokens by covariance.

Token arrays are [P, G, T], rewards [P, G].
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from apo_jax.objectives import clip_cov, registry
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

# config.loss.kl_cov.* (the paper's recipe for 7B models, recipe/dapo/7b_kl_cov.sh: k_percent
# 0.2 %; its 32B recipe and verl's generic default use 0.02 %, verl's generic coefficient 0.1)
DEFAULTS = dict(
    kl_cov_ratio=2e-3,  # k: fraction of the batch's valid tokens that get the penalty
    ppo_kl_coef=1.0,  # β: weight of |log π_θ − log π_old| on those tokens
    scale_adv=True,  # GRPO advantages: divide by the group std
)


def kl_cov_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    kl_cov_ratio: float = DEFAULTS["kl_cov_ratio"],
    ppo_kl_coef: float = DEFAULTS["ppo_kl_coef"],
    scale_adv: bool = DEFAULTS["scale_adv"],
) -> LossOutput:
    """KL-Cov (arXiv 2505.22617; verl `compute_policy_loss_kl_cov`), minimised, with
    ρ_{i,t} = π_θ/π_old, GRPO advantages Â_i on every token and N valid tokens:

        Cov_{i,t} = (Â_i − Ā)(log π_θ(y_{i,t}) − mean log π_θ)   (batch token means, sg)
        I = the max(⌊k·N⌋, 1) valid tokens of largest Cov
        L = (1/N) Σ_{i,t} [ −Â_i ρ_{i,t} + β·1[(i,t) ∈ I]·|log ρ_{i,t}| ]

    No ratio clip (the penalty is the only trust region, on I). Ties in Cov go to the lowest
    flat index (verl: torch.topk's order). The covariance, its means and the count run over the
    whole update batch (verl: each micro-batch of each device). metrics: kl_cov_frac (tokens in
    I), abs_log_ratio (verl's ppo_kl for this loss).
    """
    dt = float_dtype(logp)
    logp, m = logp.astype(dt), mask.astype(dt)
    logp_old = sg(logp_old.astype(dt))
    adv = jnp.broadcast_to(group_advantages(rewards, scale_by_std=scale_adv)[..., None], m.shape)
    cov = clip_cov.token_covariance(adv, logp, m)  # [P, G, T]
    k = clip_cov.fraction_count(m.sum(), kl_cov_ratio, m.size)
    top = clip_cov.take_first(-cov, m > 0, k)  # [P, G, T]
    log_ratio = logp - logp_old
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_GUARD, LOG_RATIO_GUARD))
    # |x| with the subgradient 0 at x = 0 (torch's; jnp.abs has 1 there): on-policy, where every
    # log-ratio is exactly 0, the penalty must not push.
    abs_log_ratio = log_ratio * jnp.sign(sg(log_ratio))
    tok = -adv * ratio + jnp.where(top, ppo_kl_coef * abs_log_ratio, 0.0)  # [P, G, T]
    total, denom = aggregate(tok, m, "token-mean")
    metrics = dict(
        kl_cov_frac=masked_mean(top.astype(dt), m),
        abs_log_ratio=masked_mean(jnp.abs(sg(log_ratio)), m),
        kl_old_new=kl_old_new(logp_old, logp, m),
    )
    return LossOutput(total, denom, scalar_metrics(**metrics))


def _check(p) -> None:
    clip_cov.check_ratio("kl_cov", "kl_cov_ratio", p["kl_cov_ratio"])
    if not p["ppo_kl_coef"] >= 0.0:
        registry.fail("kl_cov.ppo_kl_coef", p["ppo_kl_coef"], "must be >= 0")


OBJECTIVE = registry.Objective(
    name="kl_cov",
    loss=registry.plain_loss(kl_cov_loss),
    defaults=DEFAULTS,
    couples_rows=True,  # the penalised tokens are a batch-wide top-k by covariance
    check=_check,
    doc="KL-Cov: unclipped ratio, |log-ratio| penalty on the top-covariance tokens",
)
