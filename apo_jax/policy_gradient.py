"""Token-ratio (PPO-style) baselines: GRPO, DAPO, Dr.GRPO, GSPO (spec §4), and LossOutput.

Shapes as in `losses.py`: token arrays [P, G, T], rewards [P, G]. Losses are minimised and return
`LossOutput(loss_sum, denom, metrics)`, so micro-batches and shards combine by summing both.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

sg = jax.lax.stop_gradient

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
# Clip ranges: canonical papers, and the author's (wk222/verlm) baseline configs (spec §3.3).
GSPO_CLIP_LOW, GSPO_CLIP_HIGH = 3e-4, 4e-4  # GSPO paper §5.1
GSPO_AUTHOR_CLIP_LOW, GSPO_AUTHOR_CLIP_HIGH = 0.2, 0.28  # gspo_qwen3_math_fair.yaml
DAPO_CLIP_LOW, DAPO_CLIP_HIGH = 0.2, 0.28  # DAPO clip-higher
DAPO_AUTHOR_CLIP_LOW = 0.0  # author's DAPO: ratio clipped to [1.0, 1.28]
GRPO_PAPER_KL_COEF = 0.04  # DeepSeekMath β
_LOG_RATIO_GUARD = 20.0  # exp() overflow guard on token log-ratios (verl's clamp)


class LossOutput(NamedTuple):
    """A loss as (sum, denominator) plus float32 metrics; `mean()` is the batch loss."""

    loss_sum: Float[Array, ""]
    denom: Float[Array, ""]
    metrics: dict[str, Float[Array, ""]]

    def mean(self) -> Float[Array, ""]:
        return self.loss_sum / jnp.maximum(self.denom, 1.0)


def float_dtype(x) -> jnp.dtype:
    """float32 at least: bf16 log-probs are upcast, float64 (tests) is kept."""
    return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def masked_mean(x: Array, m: Array) -> Float[Array, ""]:
    """Σ x·m / max(Σ m, 1)."""
    return (x * m).sum() / jnp.maximum(m.sum(), 1.0)


def scalar_metrics(**kw) -> dict[str, Float[Array, ""]]:
    """Metrics as stop-gradient float32 scalars."""
    return {k: sg(jnp.asarray(v, jnp.float32)) for k, v in kw.items()}


def sequence_logp(logp: Float[Array, "P G T"], mask: Float[Array, "P G T"]) -> Float[Array, "P G"]:
    """ℓ_i = (1/|y_i|) Σ_t mask·log π(y_t), with |y_i| clamped at ≥ 1 (spec §1.1)."""
    dt = float_dtype(logp)
    m = mask.astype(dt)
    return (logp.astype(dt) * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)  # [P, G]


def group_advantages(
    rewards: Float[Array, "P G"], *, scale_by_std: bool, std_eps: float = 1e-6
) -> Float[Array, "P G"]:
    """Â_i = (r_i − mean_G r)/(std_G r + ε) (unbiased std, as verl) or r_i − mean_G r. Stop-grad."""
    r = sg(rewards.astype(float_dtype(rewards)))
    a = r - r.mean(-1, keepdims=True)  # [P, G]
    return a / (r.std(-1, ddof=1, keepdims=True) + std_eps) if scale_by_std else a


def kl_estimate(logp: Array, logp_ref: Array, kind: str) -> Array:
    """Per-token estimators of KL(π‖π_ref) from samples of π (Schulman's k1/k2/k3), with
    log_r = log π_ref − log π:  k1 = −log_r,  k2 = log_r²/2,  k3 = e^{log_r} − 1 − log_r ≥ 0.
    k3 is verl's `low_var_kl`: log_r clamped to ±20 and the result to ≤ 10."""
    log_r = logp_ref - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        log_r = jnp.clip(log_r, -20.0, 20.0)
        return jnp.clip(jnp.exp(log_r) - 1.0 - log_r, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_TYPES}")


def clipped_surrogate(
    log_ratio: Array, adv: Array, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Array, Bool[Array, "..."]]:
    """PPO clipped loss, elementwise: max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), ρ = e^{log_ratio};
    with dual clip c (A < 0 only) capped at −c·A. Returns (loss, clip-active indicator)."""
    ratio = jnp.exp(jnp.clip(log_ratio, -_LOG_RATIO_GUARD, _LOG_RATIO_GUARD))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    active = clipped > unclipped
    if dual_clip is not None:
        capped = -adv * dual_clip
        active = active | ((adv < 0) & (capped < loss))
        loss = jnp.where(adv < 0, jnp.minimum(loss, capped), loss)
    return loss, active


def aggregate(
    token_loss: Float[Array, "P G T"], mask: Array, agg_mode: str, max_len: int | None = None
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(sum, denom) of a [P, G, T] token loss; mean = sum/denom:
    token-mean               Σ_{i,t} l / Σ_{i,t} 1                       (DAPO, verl default)
    seq-mean-token-mean      Σ_i (Σ_t l / |o_i|) / #seqs                 (GRPO paper, GSPO)
    seq-mean-token-sum-norm  Σ_i (Σ_t l / max_len) / #seqs               (Dr.GRPO)
    Sequences without valid tokens are not counted."""
    m = mask.astype(token_loss.dtype)
    tok_sum = (token_loss * m).sum(-1)  # [P, G]
    n_tok = m.sum(-1)  # [P, G]
    valid_seq = (n_tok > 0).astype(m.dtype)
    if agg_mode == "token-mean":
        return tok_sum.sum(), n_tok.sum()
    if agg_mode == "seq-mean-token-mean":
        return (tok_sum / jnp.maximum(n_tok, 1.0)).sum(), valid_seq.sum()
    if agg_mode == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError("seq-mean-token-sum-norm needs max_len (the fixed generation length)")
        return tok_sum.sum() / max_len, valid_seq.sum()
    raise ValueError(f"unknown agg_mode {agg_mode!r}; expected one of {AGG_MODES}")


def grpo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    dual_clip: float | None = None,
    scale_adv: bool = True,
    agg_mode: str = "seq-mean-token-mean",
    max_len: int | None = None,
    kl_coef: float = 0.0,
    logp_ref: Float[Array, "P G T"] | None = None,
    kl_type: str = "k3",
) -> LossOutput:
    """GRPO (DeepSeekMath eq. 3; spec §4.1), minimised, with ρ_{i,t} = π_θ/π_old per token:

        L = agg_{i,t}[ max(−Â_i ρ_{i,t}, −Â_i clip(ρ_{i,t}, 1−ε_l, 1+ε_h)) + β·KL̂_{i,t}(π_θ‖π_ref) ]

    Â_i = (r_i − r̄)/(std + 1e-6) (or r_i − r̄ without `scale_adv`); `agg_mode` is one of
    AGG_MODES (the paper's is seq-mean-token-mean); KL̂ is `kl_type` from `kl_estimate`.
    """
    if agg_mode not in AGG_MODES or kl_type not in KL_TYPES:
        raise ValueError(f"agg_mode must be in {AGG_MODES} and kl_type in {KL_TYPES}")
    if kl_coef and logp_ref is None:
        raise ValueError("kl_coef > 0 needs logp_ref (frozen reference log-probs)")
    if agg_mode == "seq-mean-token-sum-norm" and max_len is None:
        raise ValueError("seq-mean-token-sum-norm needs max_len (the fixed generation length)")
    dt = float_dtype(logp)
    logp, m = logp.astype(dt), mask.astype(dt)
    logp_old = sg(logp_old.astype(dt))
    adv = group_advantages(rewards, scale_by_std=scale_adv)  # [P, G]
    tok_loss, active = clipped_surrogate(
        logp - logp_old, adv[..., None], clip_eps_low, clip_eps_high, dual_clip
    )  # [P, G, T]
    metrics = dict(
        clip_frac=masked_mean(active.astype(dt), m),
        kl_old_new=masked_mean(kl_estimate(logp_old, sg(logp), "k3"), m),
    )
    if kl_coef:
        kl = kl_estimate(logp, sg(logp_ref.astype(dt)), kl_type)  # [P, G, T]
        tok_loss = tok_loss + kl_coef * kl
        metrics["kl_ref"] = masked_mean(kl, m)
    total, denom = aggregate(tok_loss, m, agg_mode, max_len)
    return LossOutput(total, denom, scalar_metrics(**metrics))


def dapo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    clip_eps_low: float = DAPO_CLIP_LOW,
    clip_eps_high: float = DAPO_CLIP_HIGH,
    dual_clip: float | None = None,
    scale_adv: bool = True,
) -> LossOutput:
    """DAPO (arXiv 2503.14476; spec §4.3): clip-higher (0.2, 0.28), no KL, token-mean:

        L = (1/Σ_i|o_i|) Σ_i Σ_t max(−Â_i ρ_{i,t}, −Â_i clip(ρ_{i,t}, 1−ε_low, 1+ε_high))

    Overlong shaping (`dapo_overlong_penalty`) goes into the reward; dynamic sampling
    (`dynamic_sampling_keep`) is a rollout-loop filter.
    """
    return grpo_loss(
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


def dr_grpo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    max_len: int,
    clip_eps: float = 0.2,
) -> LossOutput:
    """Dr.GRPO (arXiv 2503.20783; spec §4.4): GRPO without std scaling and without 1/|o_i|:

    L = (1/G) Σ_i (1/max_len) Σ_t max(−A_i ρ_{i,t}, −A_i clip(ρ_{i,t}, 1−ε, 1+ε)),  A_i = r_i − r̄
    """
    return grpo_loss(
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


def gspo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    clip_eps_low: float = GSPO_CLIP_LOW,
    clip_eps_high: float = GSPO_CLIP_HIGH,
    scale_adv: bool = True,
    token_level: bool = False,
) -> LossOutput:
    """GSPO (arXiv 2507.18071; spec §4.2), mean over sequences:

        s_i = exp((1/|o_i|) Σ_t log ρ_{i,t})
        L = (1/G) Σ_i max(−Â_i s_i, −Â_i clip(s_i, 1−ε_l, 1+ε_h))

    `token_level` is GSPO-token: s_{i,t} = sg[s_i]·π_θ(o_{i,t})/sg[π_θ(o_{i,t})] with
    seq-mean-token-mean; same value and gradient when Â is constant per sequence. The author's
    0.2/0.28 clip is GSPO_AUTHOR_CLIP_LOW/HIGH.
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
    k3 = kl_estimate(sg(logp_old.astype(dt)), sg(logp), "k3")
    return LossOutput(
        total, denom, scalar_metrics(clip_frac=clip_frac, kl_old_new=masked_mean(k3, m))
    )


def dapo_overlong_penalty(lengths: Array, max_len: int, cache_len: int, factor: float = 1.0):
    """DAPO overlong reward shaping (spec §4.3), added to the reward:
    0 if |y| ≤ L_max − L_cache;  ((L_max − L_cache) − |y|)/L_cache up to L_max;  −1 beyond."""
    n = jnp.asarray(lengths, jnp.float32)
    soft = max_len - cache_len
    ramp = (soft - n) / max(cache_len, 1)
    return factor * jnp.where(n <= soft, 0.0, jnp.where(n <= max_len, ramp, -1.0))


def dynamic_sampling_keep(rewards: Float[Array, "P G"]) -> Bool[Array, " P"]:
    """DAPO dynamic sampling: keep groups whose rewards are not all equal (0 < #correct < G)."""
    return rewards.max(-1) > rewards.min(-1)
