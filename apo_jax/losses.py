"""APO (spec §1) and its f-divergence family (§1.5, §4.5) on the anchored group simplex.

Token arrays are [P, G, T] (P prompts × G completions × T tokens), rewards [P, G]: grouping is by
prompt. Losses return LossOutput(loss_sum, denom, metrics) (see policy_gradient.py, which holds
the token-ratio baselines); float32 throughout, float64 when given float64.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from apo_jax import policy_gradient as pg_lib

sg = jax.lax.stop_gradient
LossOutput = pg_lib.LossOutput  # re-exported: every loss returns one
sequence_logp = pg_lib.sequence_logp  # re-exported: ℓ_i, also an input of the α schedule

F_DIVERGENCES = ("forward_kl", "reverse_kl", "js", "hellinger", "alpha")
_ON_POLICY_TOL = 0.01  # §1.7b trigger threshold on mean|ℓ−ℓ_ref| and std(u)
_ON_POLICY_ENT_COEF = 0.01  # §1.7b entropy bonus


def _per_prompt(x, p: int, dt) -> Float[Array, "P 1"]:
    """A stop-gradient scalar or [P] hyper-parameter broadcast to [P, 1]."""
    x = sg(jnp.asarray(x, dt))
    return jnp.broadcast_to(x.reshape(-1, 1) if x.ndim else x, (p, 1))


def _check_alpha_tau(alpha, tau) -> None:
    if isinstance(alpha, int | float) and not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1] (α = 1 is forward KL), got {alpha}")
    if isinstance(tau, int | float) and not tau > 0.0:
        raise ValueError(f"tau must be > 0, got {tau}")


# ----------------------------------------------------------------------------- anchored simplex


def target_log_q(rewards: Float[Array, "P G"], beta_r, scale_rewards: bool) -> Float[Array, "P G"]:
    """log q = log_softmax_G((r − r̄)/β_r); with `scale_rewards` A is divided by the unbiased group
    std (std < 1e-8 → 1), spec §1.3. Stop-gradient."""
    r = sg(rewards.astype(pg_lib.float_dtype(rewards)))
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


class _Group(NamedTuple):
    ell: Array  # [P, G] ℓ_i(θ)
    d: Array  # [P, G] ℓ_i − ℓ_i^ref
    u: Array  # [P, G] anchored scores
    log_p: Array  # [P, G] log softmax(u)
    log_q: Array  # [P, G] target
    clamped: Array  # [P, G] bool
    valid_seq: Array  # [P, G] float, sequence has ≥ 1 token
    valid_prompt: Array  # [P] float, group has ≥ 1 token


def _anchored_group(logp, logp_old, mask, rewards, tau, beta_r, clip_lr, clip_u, scale_rewards):
    ell = sequence_logp(logp, mask)  # [P, G]
    ell_ref = sequence_logp(logp_old, mask)  # [P, G]
    u, d, clamped = anchored_scores(ell, ell_ref, tau, clip_lr, clip_u)
    n_tok = mask.astype(ell.dtype).sum(-1)  # [P, G]
    return _Group(
        ell=ell,
        d=d,
        u=u,
        log_p=jax.nn.log_softmax(u, axis=-1),
        log_q=target_log_q(rewards, beta_r, scale_rewards).astype(ell.dtype),
        clamped=clamped,
        valid_seq=(n_tok > 0).astype(ell.dtype),
        valid_prompt=(n_tok.sum(-1) > 0).astype(ell.dtype),
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


def _group_metrics(g: _Group, tau, logp, logp_old, mask, divergence):
    m = mask.astype(g.ell.dtype)
    k3 = pg_lib.kl_estimate(logp_old.astype(m.dtype), logp.astype(m.dtype), "k3")  # KL(old‖new)
    return dict(
        divergence=pg_lib.masked_mean(divergence, g.valid_prompt),
        abs_log_ratio=pg_lib.masked_mean(jnp.abs(g.d), g.valid_seq),
        clamp_frac=pg_lib.masked_mean(g.clamped.astype(m.dtype), g.valid_seq),
        kl_old_new=pg_lib.masked_mean(k3, m),
        tau=jnp.mean(tau),
    )


def apo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    alpha: float | Float[Array, " P"],
    tau: float | Float[Array, " P"],
    beta_r: float = 0.3,
    clip_log_ratio: float = 5.0,
    clip_score: float = 10.0,
    scale_rewards: bool = False,
    logit_reg_coef: float = 0.0,
    on_policy_fix: bool = False,
    eps: float = 1e-10,
) -> LossOutput:
    """APO surrogate, spec §1.5–1.6 (α, τ stop-gradient scalars or per-prompt [P]):

        u_i = clip(clip(ℓ_i − ℓ_i^ref, ±5)/τ, ±10),  p = softmax(u),  q = softmax((r − r̄)/β_r)
        w_i = sg[(q_i + ε)^α p_i^(1−α)],       L_prompt = −(1/α) Σ_i w_i log p_i
        ∇_u L_prompt = −(1/α)(w − p·Σw) = ∇_u D_α(q‖p);  α = 1: w = q, ∇ = p − q (forward KL)
        loss = Σ_prompts L_prompt / #prompts

    The surrogate's value is not D_α: metrics["divergence"] is the closed form D_α(q‖p).
    Off-by-default extras from the reference code: `logit_reg_coef` adds coef·logsumexp_G(u)²
    per prompt (§1.7a; the reference's micro-batch is one group, so the square is per group),
    and `on_policy_fix` (§1.7b) replaces L_prompt by −Σ ŵ_i ℓ_i − 0.01·H(p) in groups where
    mean|ℓ − ℓ_ref| < 0.01 and std(u) < 0.01.
    """
    _check_alpha_tau(alpha, tau)
    p_n = rewards.shape[0]
    dt = pg_lib.float_dtype(logp)
    alpha_c, tau_c = _per_prompt(alpha, p_n, dt), _per_prompt(tau, p_n, dt)  # [P, 1]
    g = _anchored_group(
        logp, logp_old, mask, rewards, tau_c, beta_r, clip_log_ratio, clip_score, scale_rewards
    )
    w = alpha_weights(g.log_q, g.log_p, alpha_c, eps)  # [P, G]
    per_prompt = -(w * g.log_p / alpha_c).sum(-1)  # [P]
    extra = {}
    if logit_reg_coef:
        per_prompt = per_prompt + logit_reg_coef * jax.nn.logsumexp(g.u, -1) ** 2
    if on_policy_fix:
        fires = (jnp.abs(g.d).mean(-1) < _ON_POLICY_TOL) & (g.u.std(-1, ddof=1) < _ON_POLICY_TOL)
        w_hat = w / w.sum(-1, keepdims=True)  # [P, G]
        entropy = -(jnp.exp(g.log_p) * g.log_p).sum(-1)  # [P]
        fix = -(w_hat * g.ell).sum(-1) - _ON_POLICY_ENT_COEF * entropy
        per_prompt = jnp.where(fires, fix, per_prompt)
        extra["on_policy_fix_frac"] = pg_lib.masked_mean(fires.astype(dt), g.valid_prompt)
    div = alpha_divergence(g.log_q, g.log_p, alpha_c)  # [P]
    metrics = _group_metrics(g, tau_c, logp, logp_old, mask, div)
    metrics["alpha"] = jnp.mean(alpha_c)
    metrics["ess"] = pg_lib.masked_mean(effective_sample_size(w), g.valid_prompt)
    return LossOutput(
        (per_prompt * g.valid_prompt).sum(),
        g.valid_prompt.sum(),
        pg_lib.scalar_metrics(**metrics, **extra),
    )


def _f_terms(divergence: str, log_p, log_q, alpha, eps):
    """Pseudo-reward weights c_i = p_i f′(p_i/q_i) (constant·p_i dropped) and the value D_f."""
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    if divergence == "forward_kl":  # f(t) = −log t
        return -q, (q * (log_q - log_p)).sum(-1)
    if divergence == "reverse_kl":  # f(t) = t log t
        return p * (log_p - log_q), (p * (log_p - log_q)).sum(-1)
    if divergence == "js":  # f(t) = t log(2t/(1+t)) + log(2/(1+t))
        log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)  # m = (p + q)/2
        return p * (log_p - log_m), (p * (log_p - log_m) + q * (log_q - log_m)).sum(-1)
    if divergence == "hellinger":  # f(t) = (√t − 1)²/2
        root = jnp.exp(0.5 * (log_p + log_q))  # √(pq)
        return -0.5 * root, 1.0 - root.sum(-1)
    if divergence == "alpha":  # f(t) = (t − t^(1−α))/(α(1−α))
        w = alpha_weights(log_q, log_p, alpha, eps)
        return -w / alpha, alpha_divergence(log_q, log_p, alpha)
    raise ValueError(f"unknown divergence {divergence!r}; expected one of {F_DIVERGENCES}")


def f_divergence_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    divergence: str,
    tau: float | Float[Array, " P"],
    alpha: float | Float[Array, " P"] = 0.5,
    beta_r: float = 0.3,
    clip_log_ratio: float = 5.0,
    clip_score: float = 10.0,
    scale_rewards: bool = False,
    eps: float = 1e-10,
) -> LossOutput:
    """f-DPG on the anchored group simplex (spec §1.5, §4.5), p = softmax(u) and q as in APO:

        D_f(p‖q) = Σ_i q_i f(p_i/q_i),   ∇_θ D_f = Σ_i p_i f′(p_i/q_i) ∇_θ log p_i   (exact over G)
        L_prompt = Σ_i sg[c_i] log p_i,  c_i = p_i f′(p_i/q_i) − const·p_i  (Σ_i p_i ∇log p_i = 0)

      forward_kl  KL(q‖p)           f = −log t                         c = −q
      reverse_kl  KL(p‖q)           f = t log t                        c = p (log p − log q)
      js          KL(p‖m) + KL(q‖m) f = t log(2t/(1+t)) + log(2/(1+t)) c = p log(p/m), m = (p+q)/2
      hellinger   1 − Σ √(pq)       f = (√t − 1)²/2                    c = −√(pq)/2
      alpha       D_α(q‖p)          f = (t − t^(1−α))/(α(1−α))         c = −w/α  (APO exactly)

    Mean over prompts; metrics["divergence"] is D_f itself.
    """
    if divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {F_DIVERGENCES}")
    _check_alpha_tau(alpha if divergence == "alpha" else 0.5, tau)
    p_n = rewards.shape[0]
    dt = pg_lib.float_dtype(logp)
    alpha_c, tau_c = _per_prompt(alpha, p_n, dt), _per_prompt(tau, p_n, dt)  # [P, 1]
    g = _anchored_group(
        logp, logp_old, mask, rewards, tau_c, beta_r, clip_log_ratio, clip_score, scale_rewards
    )
    c, value = _f_terms(divergence, g.log_p, g.log_q, alpha_c, eps)  # [P, G], [P]
    per_prompt = (sg(c) * g.log_p).sum(-1)  # [P]
    metrics = _group_metrics(g, tau_c, logp, logp_old, mask, value)
    return LossOutput(
        (per_prompt * g.valid_prompt).sum(), g.valid_prompt.sum(), pg_lib.scalar_metrics(**metrics)
    )


# Selection by config name; every loss keeps its own explicit keyword arguments.
LOSSES = {
    "apo": apo_loss,
    "f_divergence": f_divergence_loss,
    "grpo": pg_lib.grpo_loss,
    "dapo": pg_lib.dapo_loss,
    "dr_grpo": pg_lib.dr_grpo_loss,
    "gspo": pg_lib.gspo_loss,
}
