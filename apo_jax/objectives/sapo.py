"""SAPO (Gao et al., "Soft Adaptive Policy Optimization", arXiv 2511.20347; definition as
verl's core_algos `compute_policy_loss_sapo`): a smooth sigmoid gate with sign-dependent
temperatures in place of the ratio clip.

Token arrays are [P, G, T], rewards [P, G].
"""

import jax
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

# config.loss.sapo.* (the paper's values for Qwen3-30B-A3B-Base, also verl's defaults)
DEFAULTS = dict(
    tau_pos=1.0,  # gate temperature τ_pos for tokens with Â > 0
    tau_neg=1.05,  # gate temperature τ_neg for tokens with Â <= 0 (faster decay off-policy)
    scale_adv=True,  # GRPO advantages: divide by the group std
)


def sapo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    tau_pos: float = DEFAULTS["tau_pos"],
    tau_neg: float = DEFAULTS["tau_neg"],
    scale_adv: bool = DEFAULTS["scale_adv"],
) -> LossOutput:
    """SAPO (arXiv 2511.20347), minimised, with ρ_{i,t} = π_θ/π_old and GRPO advantages Â_i:

        f_τ(ρ) = (4/τ)·σ(τ(ρ − 1)),   τ_{i,t} = τ_pos if Â_i > 0 else τ_neg
        L = −(1/G) Σ_i (1/|o_i|) Σ_t f_{τ_{i,t}}(ρ_{i,t}) · Â_i          (seq-mean-token-mean)

    ∇_θ f_τ(ρ) = 4σ(τ(ρ−1))(1 − σ(τ(ρ−1)))·ρ·∇log π_θ: weight 1 on-policy (ρ = 1, the plain
    policy gradient), decaying smoothly as ρ leaves 1, faster for larger τ. metrics:
    gate_weight (mean of 4σ(1 − σ)·ρ, the gradient's weight relative to on-policy).
    """
    dt = float_dtype(logp)
    logp, m = logp.astype(dt), mask.astype(dt)
    log_ratio = jnp.clip(logp - sg(logp_old.astype(dt)), -LOG_RATIO_GUARD, LOG_RATIO_GUARD)
    ratio = jnp.exp(log_ratio)  # [P, G, T]
    adv = group_advantages(rewards, scale_by_std=scale_adv)[..., None]  # [P, G, 1]
    tau = jnp.where(adv > 0, tau_pos, tau_neg).astype(dt)  # [P, G, 1]
    gate = jax.nn.sigmoid(tau * (ratio - 1.0))
    total, denom = aggregate(-(4.0 / tau) * gate * adv, m, "seq-mean-token-mean")
    weight = sg(4.0 * gate * (1.0 - gate) * ratio)
    metrics = dict(
        gate_weight=masked_mean(weight, m),
        kl_old_new=kl_old_new(logp_old, logp, m),
    )
    return LossOutput(total, denom, scalar_metrics(**metrics))


def _check(p) -> None:
    for key in ("tau_pos", "tau_neg"):
        if not p[key] > 0.0:
            registry.fail(f"sapo.{key}", p[key], "must be > 0")


OBJECTIVE = registry.Objective(
    name="sapo",
    loss=registry.plain_loss(sapo_loss),
    defaults=DEFAULTS,
    check=_check,
    doc="SAPO: soft sigmoid gate with sign-dependent temperatures instead of a clip",
)
