"""Sampler/trainer mismatch correction (`config.loss.rollout_correction`, cap C > 1).

The completions are drawn from the sampler's π_s (its kernels, its bf16 KV cache), while every
loss treats them as draws of the anchor π_old (`old_logp`). With per-token log-ratios
δ_t = log π_old(y_t) − log π_s(y_t) over completion tokens and ρ_i = exp Σ_t δ_t:

  none             nothing changes.
  tis_token        Token-TIS: w_t = min(exp δ_t, C) per token.
  tis_sequence     Seq-TIS: w_i = min(ρ_i, C) on every token of sequence i.
  mis_sequence     Seq-MIS: sequence i dropped (mask row zeroed) when ρ_i ∉ [1/C, C], kept ones
                   weighted by ρ_i.
  reject_sequence  dropped as in mis_sequence, kept sequences unweighted.

These are verl's estimators (verl/trainer/ppo/rollout_corr_helper.py) with one cap C:
tis_token = `rollout_is=token`, tis_sequence = `rollout_is=sequence`, mis_sequence = its
`decoupled_seq_is_rs` preset, reject_sequence = `rollout_rs=seq_sum_k1` alone. As in verl a
dropped sequence leaves the denominators, and the weights scale the policy-gradient term only:
an objective with a KL-to-reference term reads `LossBatch.is_weight` and weights its surrogate;
for the others the trainer weights every log-prob's gradient (`common.scale_grad`: identity
forward, cotangent × w backward). Since every objective's gradient is
Σ_t (∂L/∂log π_θ(y_t)) ∇_θ log π_θ(y_t), that is the IS-corrected gradient for every objective
without touching a loss module; loss values and metrics stay uncorrected.

Sequence ratios use the *sum* of token log-ratios: the likelihood ratio of the whole sequence
(verl's sequence level, TRL's sequence mask); a length-normalised mean is not an importance
weight. The cap C (TIS) or the [1/C, C] mask (MIS, rejection) bounds the variance.

APO: the ratio corrected is the *sampling* ratio of each completion, weighting its term ∇ℓ_i;
the anchored log-ratio ℓ_i − ℓ_i^old inside APO's scores is not reweighted (both are trainer
log-probs). A dropped completion keeps its place in the group's softmax with score 0 (empty
mask) and gets no gradient.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from apo_jax import settings

MODES = settings.ROLLOUT_CORRECTIONS
_LOG_GUARD = 30.0  # exp() overflow guard on log-ratios (weights are capped at C anyway)


def correction(
    old_logp: Float[Array, "B T"],
    sampler_logp: Float[Array, "B T"] | None,
    mask: Float[Array, "B T"],
    mode: str,
    cap: float,
) -> tuple[Array | None, Float[Array, "B T"], dict[str, Float[Array, ""]]]:
    """(token weights [B, T] or None, the loss's completion mask [B, T], metrics).

    Metrics: `rollout/is_weight_mean` (mean weight over the completion tokens of the incoming
    mask, dropped sequences counting 0) and `rollout/masked_frac` (fraction of sequences
    dropped). Weights are None for reject_sequence (kept sequences are unweighted)."""
    if mode == "none":
        return None, mask, {}
    if sampler_logp is None:
        raise ValueError(
            f"config.loss.rollout_correction={mode!r} needs the batch's sampler_logp "
            "(the sampler's token log-probs)"
        )
    m = mask.astype(jnp.float32)
    delta = (old_logp.astype(jnp.float32) - sampler_logp.astype(jnp.float32)) * m  # [B, T]
    seq = jnp.clip(delta.sum(-1, keepdims=True), -_LOG_GUARD, _LOG_GUARD)  # [B, 1]
    n_tok = jnp.maximum(m.sum(), 1.0)
    valid_seq = (m.sum(-1) > 0).astype(jnp.float32)  # [B]
    masked_frac = jnp.zeros((), jnp.float32)
    if mode == "tis_token":
        w = jnp.minimum(jnp.exp(jnp.clip(delta, -_LOG_GUARD, _LOG_GUARD)), cap)  # [B, T]
    elif mode == "tis_sequence":
        w = jnp.broadcast_to(jnp.minimum(jnp.exp(seq), cap), m.shape)  # [B, T]
    else:  # mis_sequence, reject_sequence
        log_cap = jnp.log(jnp.float32(cap))
        keep = (jnp.abs(seq) <= log_cap).astype(jnp.float32)  # [B, 1]
        dropped = (1.0 - keep[:, 0]) * valid_seq
        masked_frac = dropped.sum() / jnp.maximum(valid_seq.sum(), 1.0)
        mask = mask * keep.astype(mask.dtype)
        rho = jnp.minimum(jnp.exp(seq), cap) if mode == "mis_sequence" else 1.0
        w = jnp.broadcast_to(keep * rho, m.shape)  # [B, T]
    metrics = {
        "rollout/is_weight_mean": (w * m).sum() / n_tok,
        "rollout/masked_frac": masked_frac,
    }
    return (None if mode == "reject_sequence" else w), mask, metrics
