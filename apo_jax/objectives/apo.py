"""APO: α-divergence preference optimisation on the anchored group simplex (spec §1).

Token arrays are [P, G, T], rewards [P, G]; the loss is a mean over prompts.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from apo_jax.objectives import common as pg_lib
from apo_jax.objectives import registry, simplex
from apo_jax.objectives.common import LossOutput

_ON_POLICY_TOL = 0.01  # §1.7b trigger threshold on mean|ℓ−ℓ_ref| and std(u)
_ON_POLICY_ENT_COEF = 0.01  # §1.7b entropy bonus
LOGIT_REG_CENTERS = ("none", "q")

# config.loss.apo.* (the author's values, spec §1.6–1.7; α and τ come from config.schedule)
DEFAULTS = dict(
    beta_r=0.3,  # reward temperature of the target q = softmax((r - mean r)/beta_r)
    clip_log_ratio=5.0,  # clamp on the per-sequence mean log-ratio ℓ - ℓ_ref
    clip_score=10.0,  # clamp on the anchored score u = clip(ℓ - ℓ_ref)/τ
    scale_rewards=False,  # divide group advantages by their std before q
    target="softmax",  # softmax (APO: softmax((r - mean r)/beta_r)) | linear (DMPO: q ∝ r - min r)
    logit_reg_coef=0.0,  # reference-code logit regulariser (0.01 to reproduce; §1.7a)
    logit_reg_center="none",  # none: coef·lse(u)² | q: coef·(lse(u) − sg[Σ q u])² (use_q_center)
    on_policy_fix=False,  # reference-code "on-policy fix" (§1.7b)
)


def apo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    alpha: float | Float[Array, " P"],
    tau: float | Float[Array, " P"],
    beta_r: float = DEFAULTS["beta_r"],
    clip_log_ratio: float = DEFAULTS["clip_log_ratio"],
    clip_score: float = DEFAULTS["clip_score"],
    scale_rewards: bool = DEFAULTS["scale_rewards"],
    target: str = DEFAULTS["target"],
    logit_reg_coef: float = DEFAULTS["logit_reg_coef"],
    logit_reg_center: str = DEFAULTS["logit_reg_center"],
    on_policy_fix: bool = DEFAULTS["on_policy_fix"],
    eps: float = 1e-10,
) -> LossOutput:
    """APO surrogate, spec §1.5–1.6 (α, τ stop-gradient scalars or per-prompt [P]):

        u_i = clip(clip(ℓ_i − ℓ_i^ref, ±5)/τ, ±10),  p = softmax(u),  q = softmax((r − r̄)/β_r)
        w_i = sg[(q_i + ε)^α p_i^(1−α)],       L_prompt = −(1/α) Σ_i w_i log p_i
        ∇_u L_prompt = −(1/α)(w − p·Σw) = ∇_u D_α(q‖p);  α = 1: w = q, ∇ = p − q (forward KL)
        loss = Σ_prompts L_prompt / #prompts

    `target="linear"` replaces q by DMPO's q ∝ shifted, range-normalised reward
    (`simplex.target_log_q`). The surrogate's value is not D_α: metrics["divergence"] is the
    closed form D_α(q‖p).
    Off-by-default extras from the reference code: `logit_reg_coef` adds coef·logsumexp_G(u)²
    per prompt (§1.7a; the reference's micro-batch is one group, so the square is per group);
    `logit_reg_center="q"` centres it as the reference trainer's `use_q_center` (its default):
    coef·(logsumexp_G(u) − sg[Σ_i q_i u_i])², the centre a stop-gradient constant, so the value
    differs and the gradient is 2·coef·(lse − Σqu)·p instead of 2·coef·lse·p (equal on-policy,
    where u = 0); and `on_policy_fix` (§1.7b) replaces L_prompt by −Σ ŵ_i ℓ_i − 0.01·H(p) in
    groups where mean|ℓ − ℓ_ref| < 0.01 and std(u) < 0.01; with both, the regulariser is added
    after the fix (in every group, as the reference code does). Sampler/trainer mismatch
    correction (which ratio, and why): trainer/rollout_correction.py.
    """
    simplex.check_alpha_tau(alpha, tau)
    if logit_reg_center not in LOGIT_REG_CENTERS:
        raise ValueError(f"logit_reg_center must be one of {LOGIT_REG_CENTERS}")
    dt = pg_lib.float_dtype(logp)
    alpha_c = simplex.per_prompt(alpha, rewards.shape[0], dt)  # [P, 1]
    hyper = (beta_r, clip_log_ratio, clip_score, scale_rewards, target)  # u and q
    g = simplex.anchored_group(logp, logp_old, mask, rewards, tau, *hyper)
    w = simplex.alpha_weights(g.log_q, g.log_p, alpha_c, eps)  # [P, G]
    per_prompt = -(w * g.log_p / alpha_c).sum(-1)  # [P]
    extra = {}
    if on_policy_fix:
        fires = (jnp.abs(g.d).mean(-1) < _ON_POLICY_TOL) & (g.u.std(-1, ddof=1) < _ON_POLICY_TOL)
        w_hat = w / w.sum(-1, keepdims=True)  # [P, G]
        entropy = -(jnp.exp(g.log_p) * g.log_p).sum(-1)  # [P]
        fix = -(w_hat * g.ell).sum(-1) - _ON_POLICY_ENT_COEF * entropy
        per_prompt = jnp.where(fires, fix, per_prompt)
        extra["on_policy_fix_frac"] = pg_lib.masked_mean(fires.astype(dt), g.valid_prompt)
    if logit_reg_coef:  # after the fix, as the reference code: it applies to both branches
        lse = jax.nn.logsumexp(g.u, -1)  # [P]
        if logit_reg_center == "q":
            lse = lse - pg_lib.sg((jnp.exp(g.log_q) * g.u).sum(-1))
        per_prompt = per_prompt + logit_reg_coef * lse**2
    div = simplex.alpha_divergence(g.log_q, g.log_p, alpha_c)  # [P]
    metrics = simplex.group_metrics(g, logp, logp_old, mask, div)
    metrics["alpha"] = jnp.mean(alpha_c)
    metrics["ess"] = pg_lib.masked_mean(simplex.effective_sample_size(w), g.valid_prompt)
    return LossOutput(
        (per_prompt * g.valid_prompt).sum(),
        g.valid_prompt.sum(),
        pg_lib.scalar_metrics(**metrics, **extra),
    )


def _inert(p) -> dict[str, str]:
    out = simplex.inert_keys(p)
    if not p["logit_reg_coef"]:
        out["logit_reg_center"] = "the logit regulariser is off (logit_reg_coef = 0)"
    return out


def _check(p) -> None:
    simplex.check_params("apo", p)
    if p["logit_reg_coef"] < 0:
        registry.fail("apo.logit_reg_coef", p["logit_reg_coef"], "must be >= 0 (0 = off)")
    if p["logit_reg_center"] not in LOGIT_REG_CENTERS:
        registry.fail(
            "apo.logit_reg_center", p["logit_reg_center"], f"valid: {', '.join(LOGIT_REG_CENTERS)}"
        )


OBJECTIVE = registry.Objective(
    name="apo",
    loss=simplex.scheduled_loss(apo_loss),
    defaults=DEFAULTS,
    schedule=True,
    couples_rows=True,
    check=_check,
    inert=_inert,
    doc="APO: α-divergence to the reward-tilted target on the anchored group simplex",
)
