"""The anchored group simplex shared by APO and the f-divergence family (spec §1.2–1.5): anchored
scores u, the target q, the α-weights, the closed-form D_α and the effective sample size.

Arrays are [P, G] (P prompts × G completions) unless noted; float32, float64 when given float64.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from apo_jax.objectives import common as pg_lib

sg = jax.lax.stop_gradient
sequence_logp = pg_lib.sequence_logp


def per_prompt(x, p: int, dt) -> Float[Array, "P 1"]:
    """A stop-gradient scalar or [P] hyper-parameter broadcast to [P, 1]."""
    x = sg(jnp.asarray(x, dt))
    return jnp.broadcast_to(x.reshape(-1, 1) if x.ndim else x, (p, 1))


def check_alpha_tau(alpha, tau) -> None:
    if isinstance(alpha, int | float) and not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1] (α = 1 is forward KL), got {alpha}")
    if isinstance(tau, int | float) and not tau > 0.0:
        raise ValueError(f"tau must be > 0, got {tau}")


TARGETS = ("softmax", "linear")
LINEAR_EPS = 1e-3  # linear target: mass floor of the lowest reward (keeps log q finite)


def target_log_q(
    rewards: Float[Array, "P G"], beta_r, scale_rewards: bool, target: str = "softmax"
) -> Float[Array, "P G"]:
    """The target on the group simplex, as log q (stop-gradient):

    softmax (APO, spec §1.3)  q = softmax_G((r − r̄)/β_r); with `scale_rewards` r − r̄ is divided
                              by the unbiased group std (std < 1e-8 → 1).
    linear (DMPO)             q_i = (x_i + ε)/Σ_j (x_j + ε),  x = (r − min_G r)/(max_G r − min_G r)
                              (x = 0 when all rewards are equal, so q is uniform), ε = LINEAR_EPS:
                              proportional to the shifted, range-normalised reward; invariant to
                              shifting and positively scaling r; β_r and `scale_rewards` unused.
                              Binary rewards with k correct: (1 + ε)/(k + Gε) on each correct
                              answer, ε/(k + Gε) on each wrong one (→ uniform over the correct
                              ones as ε → 0)."""
    r = sg(rewards.astype(pg_lib.float_dtype(rewards)))
    if target == "linear":
        lo, hi = r.min(-1, keepdims=True), r.max(-1, keepdims=True)
        x = jnp.where(hi > lo, (r - lo) / jnp.where(hi > lo, hi - lo, 1.0), 0.0)  # [P, G]
        return jnp.log(x + LINEAR_EPS) - jnp.log((x + LINEAR_EPS).sum(-1, keepdims=True))
    if target != "softmax":
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    a = r - r.mean(-1, keepdims=True)  # [P, G]
    if scale_rewards:
        std = r.std(-1, ddof=1, keepdims=True)
        a = a / jnp.where(std < 1e-8, 1.0, std)
    return jax.nn.log_softmax(a / beta_r, axis=-1)


def anchored_scores(
    ell: Float[Array, "P G"],
    ell_ref: Float[Array, "P G"],
    tau,
    clip_log_ratio: float,
    clip_score: float,
) -> tuple[Float[Array, "P G"], Float[Array, "P G"], Bool[Array, "P G"]]:
    """u = clip(clip(ℓ − ℓ_ref, ±clip_log_ratio) / τ, ±clip_score), spec §1.2; also returns d and
    whether either clamp saturated (zero gradient for that sample). τ is scalar or [P, 1]."""
    d = ell - sg(ell_ref)  # [P, G]
    d_c = jnp.clip(d, -clip_log_ratio, clip_log_ratio)
    u = jnp.clip(d_c / tau, -clip_score, clip_score)  # [P, G]
    clamped = (jnp.abs(d) > clip_log_ratio) | (jnp.abs(d_c / tau) > clip_score)
    return u, d, clamped


class Group(NamedTuple):
    ell: Array  # [P, G] ℓ_i(θ)
    d: Array  # [P, G] ℓ_i − ℓ_i^ref
    u: Array  # [P, G] anchored scores
    log_p: Array  # [P, G] log softmax(u)
    log_q: Array  # [P, G] target
    clamped: Array  # [P, G] bool
    valid_seq: Array  # [P, G] float, sequence has ≥ 1 token
    valid_prompt: Array  # [P] float, group has ≥ 1 token
    tau: Array  # [P, 1] τ per prompt


def anchored_group(
    logp, logp_old, mask, rewards, tau, beta_r, clip_lr, clip_u, scale_rewards, target="softmax"
):
    """The group quantities of APO and f-DPG; τ a scalar or [P] (broadcast to [P, 1])."""
    ell = sequence_logp(logp, mask)  # [P, G]
    ell_ref = sequence_logp(logp_old, mask)  # [P, G]
    tau = per_prompt(tau, ell.shape[0], ell.dtype)
    u, d, clamped = anchored_scores(ell, ell_ref, tau, clip_lr, clip_u)
    n_tok = mask.astype(ell.dtype).sum(-1)  # [P, G]
    return Group(
        ell=ell,
        d=d,
        u=u,
        log_p=jax.nn.log_softmax(u, axis=-1),
        log_q=target_log_q(rewards, beta_r, scale_rewards, target).astype(ell.dtype),
        clamped=clamped,
        valid_seq=(n_tok > 0).astype(ell.dtype),
        valid_prompt=(n_tok.sum(-1) > 0).astype(ell.dtype),
        tau=tau,
    )


def alpha_weights(
    log_q: Float[Array, "P G"], log_p: Float[Array, "P G"], alpha, eps: float = 1e-10
) -> Float[Array, "P G"]:
    """w = sg[(q+ε)^α p^(1−α)]; exactly q at α = 1, so the gradient is p − q.

    The reference code also adds ε to p; here p enters in log space (log_softmax of clamped
    scores is finite), because ε on p shifts the gradient −(1/α)(w − pW) by ~ε/α and would
    break the α → 0 (reverse-KL) limit. The two differ by ≤ ε in w."""
    w = jnp.exp(alpha * jnp.log(jnp.exp(log_q) + eps) + (1 - alpha) * log_p)
    return sg(jnp.where(alpha >= 1.0, jnp.exp(log_q), w))


def alpha_divergence(
    log_q: Float[Array, "P G"], log_p: Float[Array, "P G"], alpha
) -> Float[Array, " P"]:
    """D_α(q‖p) = (1 − Σ_i q_i^α p_i^(1−α)) / (α(1−α)) over the last axis (spec §1.4); KL(q‖p)
    at α = 1. `alpha` broadcasts against [P, 1]."""
    alpha = jnp.asarray(alpha, log_q.dtype)
    a = jnp.where(alpha >= 1.0, 0.5, alpha)  # keeps the unused branch finite
    mix = jnp.exp(jax.nn.logsumexp(a * log_q + (1 - a) * log_p, axis=-1, keepdims=True))
    d_alpha = ((1.0 - mix) / (a * (1 - a)))[..., 0]
    kl = (jnp.exp(log_q) * (log_q - log_p)).sum(-1)
    return jnp.where(jnp.broadcast_to(alpha, mix.shape)[..., 0] >= 1.0, kl, d_alpha)


def effective_sample_size(w: Float[Array, "P G"]) -> Float[Array, " P"]:
    """ESS = 1/Σ_i ŵ_i², ŵ = w/Σw, in [1, G] (spec §1.8)."""
    w_hat = w / w.sum(-1, keepdims=True)  # [P, G]
    return 1.0 / (w_hat**2).sum(-1)


def group_metrics(g: Group, logp, logp_old, mask, divergence):
    m = mask.astype(g.ell.dtype)
    return dict(
        divergence=pg_lib.masked_mean(divergence, g.valid_prompt),
        abs_log_ratio=pg_lib.masked_mean(jnp.abs(g.d), g.valid_seq),
        clamp_frac=pg_lib.masked_mean(g.clamped.astype(m.dtype), g.valid_seq),
        kl_old_new=pg_lib.kl_old_new(logp_old, logp, m),
        tau=jnp.mean(g.tau),
    )


def scheduled_loss(fn):
    """`Objective.loss` of an anchored-simplex loss: α and τ from the schedule (`Context`)."""
    return lambda logp, b, ctx, **params: fn(
        logp, b.old_logp, b.completion_mask, b.rewards, alpha=ctx.alpha, tau=ctx.tau, **params
    )


def inert_keys(p) -> dict[str, str]:
    """Keys of an anchored-simplex block without effect under these settings."""
    if p["target"] == "linear":
        why = "the linear target is invariant to shifting and scaling rewards"
        return {"beta_r": why, "scale_rewards": why}
    return {}


def check_params(name: str, p) -> None:
    """Range checks shared by the anchored-simplex objectives (`config.loss.<name>.*`)."""
    from apo_jax.objectives import registry

    for key in ("beta_r", "clip_log_ratio", "clip_score"):
        if not p[key] > 0:
            registry.fail(f"{name}.{key}", p[key], "must be > 0")
    if p["target"] not in TARGETS:
        registry.fail(f"{name}.target", p["target"], f"valid: {', '.join(TARGETS)}")
