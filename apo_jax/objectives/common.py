"""What every objective shares: `LossOutput`, sequence log-probs, group advantages, KL estimators,
the PPO clipped surrogate and the aggregation modes.

Token arrays are [P, G, T] (P prompts × G completions × T tokens), rewards [P, G]. Losses are
minimised and return `LossOutput(loss_sum, denom, metrics)`, so micro-batches and shards combine
by summing both. float32 throughout, float64 when given float64 (tests).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

sg = jax.lax.stop_gradient

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean-per-micro")
KL_TYPES = ("k1", "k2", "k3")
LOG_RATIO_GUARD = 20.0  # exp() overflow guard on token log-ratios (verl's clamp to ±20)


class LossOutput(NamedTuple):
    """A loss as (sum, denominator) plus float32 metrics; `mean()` is the batch loss."""

    loss_sum: Float[Array, ""]
    denom: Float[Array, ""]
    metrics: dict[str, Float[Array, ""]]

    def mean(self) -> Float[Array, ""]:
        return self.loss_sum / jnp.maximum(self.denom, 1.0)


@jax.custom_vjp
def scale_grad(x: Array, w: Array) -> Array:
    """Identity in the forward pass; the cotangent of x is multiplied by w (no gradient to w).
    Applied to token log-probs it weights each token's policy-gradient contribution by w (the
    rollout correction, trainer/rollout_correction.py) without changing any value."""
    return x


def _scale_fwd(x, w):
    return x, w


def _scale_bwd(w, ct):
    return ct * w.astype(ct.dtype), jnp.zeros_like(w)


scale_grad.defvjp(_scale_fwd, _scale_bwd)


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


def kl_old_new(logp_old: Array, logp: Array, m: Array) -> Float[Array, ""]:
    """The `kl_old_new` metric: mean k3 estimate of KL(π_old‖π_θ) over the tokens of m."""
    k3 = kl_estimate(sg(logp_old.astype(m.dtype)), sg(logp.astype(m.dtype)), "k3")
    return masked_mean(k3, m)


def clipped_surrogate(
    log_ratio: Array, adv: Array, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Array, Bool[Array, "..."]]:
    """PPO clipped loss, elementwise: max(−A·ρ, −A·clip(ρ, 1−ε_low, 1+ε_high)), ρ = e^{log_ratio};
    with dual clip c (A < 0 only) capped at −c·A. Returns (loss, clip-active indicator)."""
    ratio = jnp.exp(jnp.clip(log_ratio, -LOG_RATIO_GUARD, LOG_RATIO_GUARD))
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    active = clipped > unclipped
    if dual_clip:  # 0 or None: off
        capped = -adv * dual_clip
        active = active | ((adv < 0) & (capped < loss))
        loss = jnp.where(adv < 0, jnp.minimum(loss, capped), loss)
    return loss, active


def aggregate(
    token_loss: Float[Array, "P G T"],
    mask: Array,
    agg_mode: str,
    max_len: int | None = None,
    agg_rows: int = 6,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(sum, denom) of a [P, G, T] token loss; mean = sum/denom:
    token-mean               Σ_{i,t} l / Σ_{i,t} 1                       (DAPO, verl default)
    seq-mean-token-mean      Σ_i (Σ_t l / |o_i|) / #seqs                 (GRPO paper, GSPO)
    seq-mean-token-sum-norm  Σ_i (Σ_t l / max_len) / #seqs               (Dr.GRPO)
    token-mean-per-micro     Σ_c (Σ_{i∈c,t} l / Σ_{i∈c,t} 1) / ⌊R/agg_rows⌋  (author's verl)
    Sequences without valid tokens are not counted.

    token-mean-per-micro is "token-mean" as verl computes it per micro-batch and then averages
    the micro-batches: the R rows of the loss call (the whole update batch: the trainer always
    evaluates the loss on all of it, whatever optim.micro_batches), flattened group-major
    (row = prompt·G + completion), are cut into consecutive chunks c of `agg_rows` sequences
    (the last one shorter if `agg_rows` does not divide R) and each chunk is token-averaged on
    its own, so a token's weight is 1/(tokens of its chunk), not 1/(tokens of the batch). The
    sum over chunks is divided by verl's gradient-accumulation count, ⌊R / agg_rows⌋
    (mini-batch // micro-batch size; at least 1), not by the number of chunks: with a shorter
    last chunk the mean over chunks is ⌈R/agg_rows⌉/⌊R/agg_rows⌋ times larger (256 rows in
    chunks of 6: 43 chunks over 42). verl's batch balancing reorders rows before the cut; here
    they are cut in batch order."""
    m = mask.astype(token_loss.dtype)
    tok_sum = (token_loss * m).sum(-1)  # [P, G]
    n_tok = m.sum(-1)  # [P, G]
    valid_seq = (n_tok > 0).astype(m.dtype)
    if agg_mode == "token-mean":
        return tok_sum.sum(), n_tok.sum()
    if agg_mode == "token-mean-per-micro":
        if agg_rows < 1:
            raise ValueError(f"token-mean-per-micro needs agg_rows >= 1, got {agg_rows}")
        rows = tok_sum.size
        chunks = -(-rows // agg_rows)
        pad = chunks * agg_rows - rows
        per_row = jnp.stack([tok_sum.reshape(-1), n_tok.reshape(-1)], -1)  # [B, 2]
        per_row = jnp.pad(per_row, ((0, pad), (0, 0)))  # [chunks·agg_rows, 2]
        per_chunk = per_row.reshape(chunks, agg_rows, 2).sum(1)  # [chunks, 2]
        chunk_mean = per_chunk[:, 0] / jnp.maximum(per_chunk[:, 1], 1.0)  # [chunks]
        return chunk_mean.sum(), jnp.asarray(max(rows // agg_rows, 1), m.dtype)
    if agg_mode == "seq-mean-token-mean":
        return (tok_sum / jnp.maximum(n_tok, 1.0)).sum(), valid_seq.sum()
    if agg_mode == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError("seq-mean-token-sum-norm needs max_len (the fixed generation length)")
        return tok_sum.sum() / max_len, valid_seq.sum()
    raise ValueError(f"unknown agg_mode {agg_mode!r}; expected one of {AGG_MODES}")
