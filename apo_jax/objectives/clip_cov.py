"""Clip-Cov (Cui et al., "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models", arXiv 2505.22617; definition as verl's core_algos `compute_policy_loss_clip_cov`):
the PPO clipped surrogate with the gradient of a few randomly chosen high-covariance tokens cut.
Also the token covariance and the exact token counts that kl_cov shares.

Token arrays are [P, G, T], rewards [P, G].
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from apo_jax.objectives import registry
from apo_jax.objectives.common import (
    LossOutput,
    aggregate,
    clipped_surrogate,
    float_dtype,
    group_advantages,
    kl_old_new,
    masked_mean,
    scalar_metrics,
    sg,
)

# config.loss.clip_cov.* (the paper's recipe, recipe/dapo/7b_clip_cov.sh and 32b_clip_cov.sh)
DEFAULTS = dict(
    # Ratio clip: the recipe sets both to 1 (ratio in [0, 2]), leaving the trust region to the
    # covariance cut; verl's generic default is 0.2 / 0.2.
    clip_eps_low=1.0,  # lower ratio clip ε_low (1 = no lower clip: the ratio is > 0)
    clip_eps_high=1.0,  # upper ratio clip ε_high
    clip_cov_ratio=2e-4,  # r: fraction of the batch's valid tokens whose gradient is cut
    clip_cov_lb=1.0,  # ω_low: tokens with covariance in (ω_low, ω_high) may be cut
    clip_cov_ub=5.0,  # ω_high
    scale_adv=True,  # GRPO advantages: divide by the group std
)


def token_covariance(
    adv: Float[Array, "P G T"], logp: Float[Array, "P G T"], mask: Float[Array, "P G T"]
) -> Float[Array, "P G T"]:
    """Cov_{i,t} = (A_{i,t} − Ā)·(log π(y_{i,t}) − mean log π), means over the batch's valid
    tokens (the paper's per-token covariance; verl centres both factors by masked token means).
    Stop-gradient: it only chooses tokens."""
    logp = sg(logp)
    return (adv - masked_mean(adv, mask)) * (logp - masked_mean(logp, mask))


def fraction_count(n: Int[Array, ""], ratio: float, n_max: int) -> Int[Array, ""]:
    """max(⌊ratio·n⌋, 1) for a traced token count 0 <= n <= n_max, exactly as verl's float64
    `int(ratio * n)`: the counts at which ⌊ratio·n⌋ steps up are found on the host in float64
    (float32 would be off by one whenever ratio·n is an integer, e.g. 2e-4 · 5000)."""
    m = np.arange(1, int(ratio * n_max) + 1, dtype=np.float64)  # every value ⌊ratio·n⌋ reaches
    t = np.ceil(m / ratio)  # first n with ratio·n >= m, up to one float64 rounding either way
    t -= np.floor(ratio * (t - 1)) >= m
    t += np.floor(ratio * t) < m
    steps = jnp.asarray(t, jnp.int32)  # [⌊ratio·n_max⌋], ascending
    return jnp.maximum(jnp.searchsorted(steps, n.astype(jnp.int32), side="right"), 1)


def take_first(
    priority: Float[Array, "P G T"], eligible: Bool[Array, "P G T"], k: Int[Array, ""]
) -> Bool[Array, "P G T"]:
    """The min(k, #eligible) eligible tokens of smallest priority (ties: lowest flat index, the
    order of verl's [rows, T] layout with rows grouped by prompt)."""
    flat = jnp.where(eligible, priority, jnp.inf).reshape(-1)  # [P·G·T]
    order = jnp.argsort(flat, stable=True)  # [P·G·T]
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(order.size))  # [P·G·T]
    return eligible & (rank.reshape(priority.shape) < k)


def cut_mask(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    key: Array,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    clip_cov_ratio: float,
    clip_cov_lb: float,
    clip_cov_ub: float,
    scale_adv: bool,
) -> tuple[Bool[Array, "P G T"], Bool[Array, "P G T"], Bool[Array, "P G T"]]:
    """(cut, eligible, clipped): the tokens Clip-Cov cuts, those it could have cut (valid, not
    already clipped by the ratio clip, ω_low < Cov < ω_high) and the ratio clip's own tokens."""
    dt = float_dtype(logp)
    m = mask.astype(dt)
    adv = jnp.broadcast_to(group_advantages(rewards, scale_by_std=scale_adv)[..., None], m.shape)
    _, clipped = clipped_surrogate(
        sg(logp.astype(dt)) - logp_old.astype(dt), adv, clip_eps_low, clip_eps_high, None
    )
    clipped = clipped & (m > 0)
    cov = token_covariance(adv, logp.astype(dt), m)  # [P, G, T]
    eligible = (m > 0) & ~clipped & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    # verl draws torch.randperm over the eligible tokens and cuts the first k; uniform random
    # priorities from the update's key pick a uniformly random k-subset the same way.
    k = fraction_count(m.sum(), clip_cov_ratio, m.size)
    cut = take_first(jax.random.uniform(key, m.shape), eligible, k)
    return cut, eligible, clipped


def clip_cov_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    key: Array,
    clip_eps_low: float = DEFAULTS["clip_eps_low"],
    clip_eps_high: float = DEFAULTS["clip_eps_high"],
    clip_cov_ratio: float = DEFAULTS["clip_cov_ratio"],
    clip_cov_lb: float = DEFAULTS["clip_cov_lb"],
    clip_cov_ub: float = DEFAULTS["clip_cov_ub"],
    scale_adv: bool = DEFAULTS["scale_adv"],
) -> LossOutput:
    """Clip-Cov (arXiv 2505.22617; verl `compute_policy_loss_clip_cov`), minimised, with
    ρ_{i,t} = π_θ/π_old, GRPO advantages Â_i on every token and N valid tokens:

        Cov_{i,t} = (Â_i − Ā)(log π_θ(y_{i,t}) − mean log π_θ)          (batch token means, sg)
        I = k tokens drawn uniformly among {ω_low < Cov < ω_high, not clipped by ε},
            k = max(⌊r·N⌋, 1)
        L = (1/N) Σ_{i,t} 1[(i,t) ∉ I] · max(−Â_i ρ_{i,t}, −Â_i clip(ρ_{i,t}, 1−ε_l, 1+ε_h))

    A cut token contributes neither value nor gradient but stays in N (verl multiplies its loss
    by 0). The draw uses `key` (the trainer passes one per update, `Context.key`), where verl
    calls torch.randperm per micro-batch; the covariance, its means and k run over the whole
    update batch (verl: each micro-batch of each device), so the result does not depend on how
    the batch is split. metrics: clip_frac (cut tokens, as verl's pg_clipfrac), ppo_clip_frac
    (the ratio clip), cov_eligible_frac.
    """
    dt = float_dtype(logp)
    logp, m = logp.astype(dt), mask.astype(dt)
    logp_old = sg(logp_old.astype(dt))
    cut, eligible, clipped = cut_mask(
        logp,
        logp_old,
        m,
        rewards,
        key,
        clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high,
        clip_cov_ratio=clip_cov_ratio,
        clip_cov_lb=clip_cov_lb,
        clip_cov_ub=clip_cov_ub,
        scale_adv=scale_adv,
    )
    adv = group_advantages(rewards, scale_by_std=scale_adv)[..., None]  # [P, G, 1]
    tok, _ = clipped_surrogate(logp - logp_old, adv, clip_eps_low, clip_eps_high, None)
    tok = jnp.where(cut, 0.0, tok)  # [P, G, T]
    total, denom = aggregate(tok, m, "token-mean")
    metrics = dict(
        clip_frac=masked_mean(cut.astype(dt), m),
        ppo_clip_frac=masked_mean(clipped.astype(dt), m),
        cov_eligible_frac=masked_mean(eligible.astype(dt), m),
        kl_old_new=kl_old_new(logp_old, logp, m),
    )
    return LossOutput(total, denom, scalar_metrics(**metrics))


def check_ratio(name: str, key: str, value) -> None:
    if not 0.0 < value <= 1.0:
        registry.fail(f"{name}.{key}", value, "must lie in (0, 1] (a fraction of the tokens)")


def _check(p) -> None:
    for key in ("clip_eps_low", "clip_eps_high"):
        if not p[key] >= 0.0:  # ε_low >= 1 is no lower clip: the ratio is positive
            registry.fail(f"clip_cov.{key}", p[key], "must be >= 0")
    check_ratio("clip_cov", "clip_cov_ratio", p["clip_cov_ratio"])
    if not p["clip_cov_lb"] < p["clip_cov_ub"]:
        registry.fail("clip_cov.clip_cov_lb", p["clip_cov_lb"], "must be < clip_cov_ub")


def _inert(p) -> dict[str, str]:
    if p["clip_eps_low"] >= 1.0:
        return {"clip_eps_low": "a lower clip 1 − ε_low <= 0 never binds: the ratio is > 0"}
    return {}


def _loss(logp, b, ctx, **params) -> LossOutput:
    if ctx.key is None:
        raise ValueError("clip_cov draws tokens at random: the trainer must pass Context.key")
    return clip_cov_loss(
        logp, b["old_logp"], b["completion_mask"], b["rewards"], key=ctx.key, **params
    )


OBJECTIVE = registry.Objective(
    name="clip_cov",
    loss=_loss,
    defaults=DEFAULTS,
    # The cut tokens depend on batch-wide covariance means and a batch-wide draw.
    couples_rows=True,
    check=_check,
    inert=_inert,
    doc="Clip-Cov: PPO clip, gradient cut on random high-covariance tokens",
)
