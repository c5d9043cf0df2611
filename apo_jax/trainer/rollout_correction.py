"""Sampler/trainer mismatch correction (`config.loss.rollout_correction`, cap C > 1).

The completions are drawn by the sampler (its kernels, its bf16 KV cache): their distribution is
π_s, while every loss treats them as draws of the anchor π_old (the trainer's scoring of the same
parameters, `old_logp`). With per-token log-ratios δ_t = log π_old(y_t) − log π_s(y_t) (masked
completion tokens only) the modes are:

  none             nothing changes.
  tis_token        Token-TIS: w_t = min(exp δ_t, C) per token.
  tis_sequence     Seq-TIS: w_i = min(ρ_i, C) for every token of sequence i, ρ_i = exp Σ_t δ_t.
  mis_sequence     Seq-MIS: sequence i is dropped (its completion_mask row zeroed before the
                   loss) when ρ_i ∉ [1/C, C]; kept sequences are weighted by min(ρ_i, C) (= ρ_i).
  reject_sequence  rejection only: dropped as in mis_sequence, kept sequences unweighted.

These are verl's rollout-correction estimators (verl/trainer/ppo/rollout_corr_helper.py) with one
cap C: tis_token = `rollout_is=token`, tis_sequence = `rollout_is=sequence`, mis_sequence =
`rollout_is=sequence` + `rollout_rs=seq_sum_k1` (its `decoupled_seq_is_rs` preset, "Seq-MIS"),
reject_sequence = `rollout_rs=seq_sum_k1` alone; thresholds `rollout_is_threshold = C`,
`rollout_rs_threshold = "{1/C}_{C}"`. As in verl, a dropped sequence leaves the loss's denominators
(its mask is zero) and the weights scale the policy-gradient term only: an objective with a
KL-to-reference term (GRPO's kl_coef) applies them to its clipped surrogate and not to the KL
(it reads `LossBatch.is_weight`); for the others the trainer weights every log-prob's gradient,
which is the policy-gradient term.

Sequence ratios use the *sum* of token log-ratios (the product of token ratios): that is the
likelihood ratio π_old(y_i)/π_s(y_i) of the whole sampled sequence, the weight that makes a
sequence-level expectation under π_s equal the one under π_old (verl's sequence level, TRL's
sequence mask). A length-normalised mean would be bounded for long sequences but is not an
importance weight of anything; truncation at C (TIS) or the [1/C, C] mask (MIS, rejection) is
what bounds the variance here.

The weights are applied to the gradient, not the value (verl multiplies the policy loss by them,
which has the same gradient): the loss sees `scale_grad(logp, w)`,
which is logp in the forward pass and multiplies the cotangent of every token log-prob by w in the
backward pass. Since every objective's gradient is Σ_t (∂L/∂log π_θ(y_t)) ∇_θ log π_θ(y_t), this
weights each sampled token's (or sequence's) contribution to the policy gradient by w: the
IS-corrected gradient, for every objective alike and without touching any loss module. Loss values
and metrics stay those of the uncorrected objective.

APO (objectives/apo.py): its gradient is Σ_i (∂L/∂ℓ_i) ∇_θ ℓ_i over the group's sampled
completions, ℓ_i the per-sequence mean log-prob. The ratio corrected is the *sampling* ratio
π_old(y_i)/π_s(y_i) of each completion, which weights sequence i's term ∇ℓ_i (tis_sequence: the
same w_i on all of its tokens, i.e. exactly the weight of ∇ℓ_i; tis_token weights its tokens
inside ℓ_i). The anchored log-ratio ℓ_i − ℓ_i^old inside APO's scores is *not* reweighted: both
of its terms are trainer log-probs, computed exactly; only the fact that y_i was drawn from π_s
rather than π_old is corrected. With mis_sequence / reject_sequence a dropped completion keeps
its place in the group's softmax with a constant score 0 (ℓ_i = ℓ_i^old = 0 over an empty mask)
and gets no gradient.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from apo_jax import settings
from apo_jax.objectives import common

MODES = settings.ROLLOUT_CORRECTIONS
_LOG_GUARD = 30.0  # exp() overflow guard on log-ratios (weights are capped at C anyway)


scale_grad = common.scale_grad  # identity forward, cotangent × w backward


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
    if mode not in MODES:
        raise ValueError(f"config.loss.rollout_correction={mode!r}: valid: {', '.join(MODES)}")
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
