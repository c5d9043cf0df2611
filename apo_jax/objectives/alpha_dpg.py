"""α-DPG (Kruszewski et al., "Whatever Remains Must Be True: Filtering Drives Reasoning in LLMs,
Shaping Diversity", ICLR 2026; definition as naver/alpha-dpg's `compute_fcdpg_advantage` and
`compute_policy_loss_fcdpg`, its Lean recipe examples/lean/alpha-dpg.sh for the defaults):
REINFORCE on a sequence-level pseudo-reward −f′(π/p) that fits the policy to the filtered
reference p(x) ∝ π_ref(x)·R(x) under the Amari α-divergence. As the reference's verifier, the
objective filters on correctness (R = LossBatch.correct, before any reward shaping), so it works
with any `task.*.reward`.

Token arrays are [P, G, T], rewards [P, G].
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from apo_jax.objectives import registry
from apo_jax.objectives.common import (
    LossOutput,
    aggregate,
    float_dtype,
    kl_old_new,
    masked_mean,
    scalar_metrics,
    sg,
)

# config.loss.alpha_dpg.* (the reference recipe's values)
DEFAULTS = dict(
    alpha=0.25,  # α of the Amari α-divergence: 0 = forward KL(p‖π), → 1 = reverse KL(π‖p)
    pseudo_reward_clip=10.0,  # upper clip of the pseudo-reward (0 = off)
    use_baseline=True,  # subtract the leave-one-out mean of the group's pseudo-rewards
)


def pseudo_rewards(
    logp_old: Float[Array, "P G T"],
    logp_ref: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    alpha: float,
    pseudo_reward_clip: float,
) -> tuple[Float[Array, "P G"], Float[Array, " P"]]:
    """(pseudo-rewards [P, G], log Ẑ [P], 0 where no completion passes the filter); see
    `alpha_dpg_loss`. Stop-gradient: computed from the rollout's and the reference's log-probs
    only, in log space (the reference exponentiates sequence log-ratios, which overflow float32
    beyond ~88 nats)."""
    dt = float_dtype(logp_old)
    m = mask.astype(dt)
    r = sg(rewards.astype(dt))
    # log p̃ − log π_old = Σ_t (log π_ref − log π_old) + log R; R = 0 → −∞ (outside the filter).
    log_w = (sg(logp_ref.astype(dt) - logp_old.astype(dt)) * m).sum(-1)  # [P, G]
    kept = r > 0
    log_w = jnp.where(kept, log_w + jnp.log(jnp.where(kept, r, 1.0)), -jnp.inf)
    g = rewards.shape[-1]
    # Ẑ = min(mean_i e^{log w_i}, 1). A group where nothing passes has no estimate (Ẑ = 0; the
    # reference substitutes z_default) and needs none: every t_i is ∞ there, whatever Ẑ.
    any_kept = kept.any(-1)  # [P]
    lse = jax.nn.logsumexp(jnp.where(any_kept[:, None], log_w, 0.0), axis=-1)  # [P]
    log_z = jnp.where(any_kept, jnp.minimum(lse - jnp.log(g), 0.0), 0.0)
    # −f′(t) = t^(α−1) − 1 with t = π_old / p, log t = −(log w − log Ẑ); t = ∞ (R = 0) → −1.
    a = jnp.where(kept, (1.0 - alpha) * (log_w - log_z[:, None]), -jnp.inf)
    pr = jnp.expm1(a)  # [P, G]
    if pseudo_reward_clip:
        pr = jnp.minimum(pr, pseudo_reward_clip)
    return pr, log_z


def alpha_dpg_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    logp_ref: Float[Array, "P G T"],
    max_len: int,
    alpha: float = DEFAULTS["alpha"],
    pseudo_reward_clip: float = DEFAULTS["pseudo_reward_clip"],
    use_baseline: bool = DEFAULTS["use_baseline"],
) -> LossOutput:
    """α-DPG (naver/alpha-dpg `compute_fcdpg_advantage`, α member; `compute_policy_loss_fcdpg`,
    seq-mean-token-sum-norm), minimised. With sequence log-probs log π(y) = Σ_t log π(y_t) and
    `rewards` R_i >= 0 as the filter (the objective passes R = 1[correct]):

        p̃_i = π_ref(y_i)·R_i,   Ẑ = min((1/G) Σ_j p̃_j/π_old(y_j), 1)
        t_i = π_old(y_i) / (p̃_i/Ẑ)                                      (∞ where R_i = 0)
        c_i = min(−f′(t_i), clip),   −f′(t) = t^(α−1) − 1                (= −1 where R_i = 0)
        A_i = c_i − (1/(G−1)) Σ_{j≠i} c_j                                (use_baseline)
        L = (1/G) Σ_i −A_i · Σ_t log π_θ(y_{i,t}) / max_len

    f′ is the derivative of the Amari α-divergence's generator (up to the factor 1/(1−α)):
    α → 0 is forward KL(p‖π) (mass-covering), α → 1 reverse KL(π‖p) (mode-seeking, excluded
    here: the reference's α = 1 branch is log t − 1, −∞ off the filter). The divergence rests on
    Σ_x π^α p^(1−α): in APO's D_α(target‖policy), built on Σ target^α policy^(1−α), this is
    α_APO = 1 − α (α-DPG's 0.25 is APO's 0.75). Ẑ is the reference's per-prompt partition
    estimate with `reset_z` (the mean over this batch's completions of the prompt, capped at
    1); its `z_default` (for Ẑ = 0) has no counterpart: in log space Ẑ > 0 whenever a
    completion passes, and where none does every c_i = −1 whatever Ẑ. The pseudo-reward uses
    π_old (the rollout policy, no importance ratio), so it is exact only for the first update
    of a rollout batch (the reference makes one). metrics:
    pseudo_reward, pseudo_reward_clip_frac, log_z.
    """
    dt = float_dtype(logp)
    logp, m = logp.astype(dt), mask.astype(dt)
    pr, log_z = pseudo_rewards(
        logp_old,
        logp_ref,
        m,
        rewards,
        alpha=alpha,
        pseudo_reward_clip=pseudo_reward_clip,
    )
    g = pr.shape[-1]
    adv = pr - (pr.sum(-1, keepdims=True) - pr) / (g - 1) if use_baseline else pr  # [P, G]
    tok = -sg(adv)[..., None] * logp  # [P, G, T]
    total, denom = aggregate(tok, m, "seq-mean-token-sum-norm", max_len)
    valid = (m.sum(-1) > 0).astype(dt)  # [P, G]
    clipped = (pr >= pseudo_reward_clip) if pseudo_reward_clip else jnp.zeros_like(pr, bool)
    metrics = dict(
        pseudo_reward=masked_mean(pr, valid),
        pseudo_reward_clip_frac=masked_mean(clipped.astype(dt), valid),
        log_z=masked_mean(log_z, (rewards > 0).any(-1).astype(dt)),  # groups with an estimate
        kl_old_new=kl_old_new(logp_old, logp, m),
    )
    return LossOutput(total, denom, scalar_metrics(**metrics))


def _check(p) -> None:
    if not 0.0 <= p["alpha"] < 1.0:
        registry.fail(
            "alpha_dpg.alpha", p["alpha"], "must lie in [0, 1) (α → 1 is unbounded off the filter)"
        )
    if not p["pseudo_reward_clip"] >= 0.0:
        registry.fail("alpha_dpg.pseudo_reward_clip", p["pseudo_reward_clip"], "must be >= 0")


def _loss(logp, b, ctx, **params) -> LossOutput:
    return alpha_dpg_loss(
        logp,
        b["old_logp"],
        b["completion_mask"],
        b["correct"],  # the filter: verified answers, whatever the reward's shaping
        logp_ref=b["ref_logp"],
        max_len=ctx.max_new_tokens,
        **params,
    )


OBJECTIVE = registry.Objective(
    name="alpha_dpg",
    loss=_loss,
    defaults=DEFAULTS,
    reference=lambda p: True,  # the target is the reference model filtered by correctness
    check=_check,
    reads=("completion_mask", "old_logp", "ref_logp", "correct"),
    doc="α-DPG: REINFORCE on the α-divergence pseudo-reward to π_ref filtered by correctness",
)
