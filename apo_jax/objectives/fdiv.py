"""The f-divergence family on the anchored group simplex (f-DPG applied exactly over the G
candidates; spec §1.5, §4.5). The seed methods as members, all on one simplex p = softmax(u):

  forward_kl + target "softmax"   DPG/GDC; the ADPO cross-entropy (= APO at α = 1)
  forward_kl + target "linear"    DMPO: KL(q‖p) to q ∝ shifted, normalised reward
                                  (`simplex.target_log_q`), gradient p − q
  reverse_kl                      KL(p‖q), the RL-with-KL-penalty (mode-seeking) end
  js                              f-DPG's Jensen–Shannon member (its recommended f)
  hellinger                       DGPO's (squared) Hellinger distance 1 − Σ√(pq)
  alpha                           APO's α-divergence D_α(q‖p)

`target` ("softmax" | "linear") picks q for every member.

Token arrays are [P, G, T], rewards [P, G]; the loss is a mean over prompts.
"""

import jax.numpy as jnp
from jaxtyping import Array, Float

from apo_jax.objectives import common as pg_lib
from apo_jax.objectives import registry, simplex
from apo_jax.objectives.common import LossOutput

sg = pg_lib.sg
F_DIVERGENCES = ("forward_kl", "reverse_kl", "js", "hellinger", "alpha")

# config.loss.fdiv.* (τ, and α for the alpha member, come from config.schedule)
DEFAULTS = dict(
    divergence="js",  # forward_kl | reverse_kl | js | hellinger | alpha
    beta_r=0.3,  # reward temperature of the target q
    clip_log_ratio=5.0,  # clamp on the per-sequence mean log-ratio
    clip_score=10.0,  # clamp on the anchored score u
    scale_rewards=False,  # divide group advantages by their std before q
    target="softmax",  # softmax (APO: softmax((r - mean r)/beta_r)) | linear (DMPO: q ∝ r - min r)
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
        w = simplex.alpha_weights(log_q, log_p, alpha, eps)
        return -w / alpha, simplex.alpha_divergence(log_q, log_p, alpha)
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
    beta_r: float = DEFAULTS["beta_r"],
    clip_log_ratio: float = DEFAULTS["clip_log_ratio"],
    clip_score: float = DEFAULTS["clip_score"],
    scale_rewards: bool = DEFAULTS["scale_rewards"],
    target: str = DEFAULTS["target"],
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
    simplex.check_alpha_tau(alpha if divergence == "alpha" else 0.5, tau)
    dt = pg_lib.float_dtype(logp)
    alpha_c = simplex.per_prompt(alpha, rewards.shape[0], dt)  # [P, 1]
    hyper = (beta_r, clip_log_ratio, clip_score, scale_rewards, target)  # u and q
    g = simplex.anchored_group(logp, logp_old, mask, rewards, tau, *hyper)
    c, value = _f_terms(divergence, g.log_p, g.log_q, alpha_c, eps)  # [P, G], [P]
    per_prompt = (sg(c) * g.log_p).sum(-1)  # [P]
    metrics = simplex.group_metrics(g, logp, logp_old, mask, value)
    return LossOutput(
        (per_prompt * g.valid_prompt).sum(), g.valid_prompt.sum(), pg_lib.scalar_metrics(**metrics)
    )


def _check(p) -> None:
    if p["divergence"] not in F_DIVERGENCES:
        registry.fail("fdiv.divergence", p["divergence"], f"valid: {', '.join(F_DIVERGENCES)}")
    simplex.check_params("fdiv", p)


OBJECTIVE = registry.Objective(
    name="fdiv",
    loss=simplex.scheduled_loss(f_divergence_loss),
    defaults=DEFAULTS,
    schedule=True,
    couples_rows=True,
    check=_check,
    inert=simplex.inert_keys,
    doc="f-divergence (forward/reverse KL, JS, Hellinger, α) on the anchored group simplex",
)
