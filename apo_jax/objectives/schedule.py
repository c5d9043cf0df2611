"""Reward- and confidence-guarded α/τ schedule for APO (spec §2) and its ESS variant (Appendix A).

Functional: `schedule(cfg, state, ell, ell_ref, rewards) -> (alpha [P], tau [P], state, metrics)`.

Reachable α (legacy rule, scope "group"): ā = (r̄ − min r)/(max r − min r) is the mean of G
values in [0, 1] of which at least one is 0 and one is 1 (or ā = 0 when all rewards are equal),
so ā ≤ (G − 1)/G, attained by one lowest and G − 1 highest rewards (binary rewards: G − 1
correct), and s = 2ā − 1 ≤ (G − 2)/G. With c ≤ 1 (c = 1 − H_dyn, H_dyn ∈ [0, 1]):

    α_t ∈ [α_max − (α_max − α_min)·(G − 2)/G, α_max]      (`alpha_floor`; spec §5.13)

so α_min is reached only as G → ∞: G = 6 gives 0.9 − 0.55·4/6 ≈ 0.533, G = 8 gives 0.4875,
G = 2 never leaves α_max. The EMA keeps this range; the ESS mode and "fixed" do reach α_min.
Inputs are [P, G] (prompts × completions); everything is under stop-gradient and float32.
`ScheduleState` is a pytree meant to live in the train state (EMA / ESS smoothing, call count).
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from apo_jax import settings
from apo_jax.objectives import simplex

MODES, SCOPES = settings.SCHEDULE_MODES, settings.SCHEDULE_SCOPES
_ESS_ALPHA_BOUNDS = (1e-3, 1.0 - 1e-3)  # Appendix A's final clip
# Keys the ESS rule shares with the anchored-simplex objectives (it rebuilds their p and q).
SIMPLEX_KEYS = ("beta_r", "scale_rewards", "clip_log_ratio", "clip_score", "target")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig(settings.Schedule):
    """config.schedule.* (their defaults, ranges and meanings: apo_jax/settings.py Schedule,
    the reference code's, spec §2 table, Appendix A; checked on construction), plus:"""

    vocab_size: int = 151936  # V in the ln V normalisation of per-token NLL (Qwen3)
    # The ESS mode rebuilds p = softmax(u) and q as the loss does; keep these equal to the loss's.
    beta_r: float = 0.3
    scale_rewards: bool = False
    clip_log_ratio: float = 5.0
    clip_score: float = 10.0
    target: str = "softmax"


def alpha_floor(alpha_min: float, alpha_max: float, group_size: int) -> float:
    """The smallest α the legacy rule can give a group of `group_size` (module docstring)."""
    return alpha_max - (alpha_max - alpha_min) * max(group_size - 2, 0) / group_size


class ScheduleState(NamedTuple):
    alpha_ema: Float[Array, ""]  # smoothed α (EMA in legacy mode, α_prev in ESS mode)
    calls: Int[Array, ""]  # number of schedule calls so far (ESS warm-up)


def init_schedule_state(cfg: ScheduleConfig) -> ScheduleState:
    return ScheduleState(jnp.asarray(cfg.alpha_max, jnp.float32), jnp.asarray(0, jnp.int32))


def schedule(
    cfg: ScheduleConfig,
    state: ScheduleState,
    ell: Float[Array, "P G"],
    ell_ref: Float[Array, "P G"],
    rewards: Float[Array, "P G"],
) -> tuple[Float[Array, " P"], Float[Array, " P"], ScheduleState, dict[str, Float[Array, ""]]]:
    """α_t, τ_t per prompt (spec §2), from ℓ (current policy), ℓ_ref (anchor) and rewards:

        H_dyn = mean clip(−ℓ/ln V, 0, 1),  H_stat = mean clip(−ℓ_ref/ln V, 0, 1),  c = 1 − H_dyn
        ā = mean (A − min A)/max(max A − min A, 1e-6),  s = 2ā − 1,  A = r − mean_G r
        α_t = α_max − (α_max − α_min)·c·max(s, 0)
        τ_t = clip(τ0·(1 + a_τ·H_stat + b_τ·c·(−s)), τ_min, τ_max)

    Means/min/max run over each group (scope "group") or the whole batch ("batch"); ā is
    invariant to shifting or positively scaling A, so rewards or advantages give the same α.
    Mode "ess" (Appendix A) instead picks α* on linspace(α_min, α_max, K) with mean-over-prompts
    ESS(ŵ) closest to frac·G, ŵ = softmax(α log q + (1−α) log p), then smooths it (one α for
    the batch). Mode "fixed" returns cfg.alpha. τ follows the rule above in every mode.
    """
    ell, ell_ref, rewards = (
        jax.lax.stop_gradient(x.astype(jnp.float32)) for x in (ell, ell_ref, rewards)
    )
    p_n = ell.shape[0]
    per_group = cfg.scope == "group"

    def reduce(fn, x):  # [P, G] -> [P, 1], per group or batch-wide broadcast
        return fn(x, axis=-1, keepdims=True) if per_group else jnp.broadcast_to(fn(x), (p_n, 1))

    def mean(x):
        return reduce(jnp.mean, x)

    ln_v = math.log(cfg.vocab_size)
    h_dyn = mean(jnp.clip(-ell / ln_v, 0.0, 1.0))  # [P, 1]
    h_stat = mean(jnp.clip(-ell_ref / ln_v, 0.0, 1.0))  # [P, 1]
    conf = 1.0 - h_dyn
    adv = rewards - rewards.mean(-1, keepdims=True)  # [P, G]
    a_lo = reduce(jnp.min, adv)
    a_bar = mean((adv - a_lo) / jnp.maximum(reduce(jnp.max, adv) - a_lo, 1e-6))  # [P, 1]
    signal = 2.0 * a_bar - 1.0
    if cfg.adaptive_tau:
        tau = cfg.tau0 * (1.0 + cfg.a_tau * h_stat + cfg.b_tau * conf * (-signal))
        tau = jnp.clip(tau, cfg.tau_min, cfg.tau_max)  # [P, 1]
    else:
        tau = jnp.full((p_n, 1), cfg.tau0, jnp.float32)
    metrics = dict(
        confidence=conf.mean(), signal=signal.mean(), h_dyn=h_dyn.mean(), h_stat=h_stat.mean()
    )

    if cfg.mode == "fixed":
        alpha = jnp.full((p_n, 1), cfg.alpha, jnp.float32)
        ema = state.alpha_ema
    elif cfg.mode == "legacy":
        alpha = cfg.alpha_max - (cfg.alpha_max - cfg.alpha_min) * conf * jnp.maximum(signal, 0.0)
        if cfg.use_ema:
            # A convex mix of values in [α_min, α_max], so the bounds still hold.
            alpha = cfg.ema_momentum * state.alpha_ema + (1.0 - cfg.ema_momentum) * alpha
        ema = alpha.mean()
    else:
        alpha_star, ess = _ess_alpha(cfg, ell, ell_ref, rewards, tau)
        prev = state.alpha_ema
        smooth = cfg.ess_momentum * prev + (1.0 - cfg.ess_momentum) * alpha_star
        smooth = jnp.clip(smooth, prev - cfg.ess_max_step, prev + cfg.ess_max_step)
        smooth = jnp.clip(smooth, *_ESS_ALPHA_BOUNDS)
        # Warm-up freezes α at α_max and resets the smoothing state to it.
        ema = jnp.where(state.calls < cfg.ess_warmup_calls, cfg.alpha_max, smooth)
        alpha = jnp.full((p_n, 1), ema, jnp.float32)
        metrics.update(ess_alpha_star=alpha_star, ess_at_alpha_star=ess)

    new_state = ScheduleState(jnp.asarray(ema, jnp.float32), state.calls + 1)
    metrics.update(alpha=alpha.mean(), tau=tau.mean())
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return alpha[:, 0], tau[:, 0], new_state, metrics


def _ess_alpha(cfg: ScheduleConfig, ell, ell_ref, rewards, tau):
    """Appendix A: α* = argmin_k |mean_P ESS(ŵ_k) − frac·G| over the α grid."""
    u, _, _ = simplex.anchored_scores(ell, ell_ref, tau, cfg.clip_log_ratio, cfg.clip_score)
    log_p = jax.nn.log_softmax(u, axis=-1)  # [P, G]
    log_q = simplex.target_log_q(rewards, cfg.beta_r, cfg.scale_rewards, cfg.target)  # [P, G]
    grid = jnp.linspace(cfg.alpha_min, cfg.alpha_max, cfg.ess_candidates)
    grid = grid[:, None, None]  # [K, 1, 1]
    log_w = jax.nn.log_softmax(grid * log_q + (1.0 - grid) * log_p, axis=-1)  # [candidates, P, G]
    ess = (1.0 / jnp.exp(2.0 * log_w).sum(-1)).mean(-1)  # [K]
    k = jnp.argmin(jnp.abs(ess - cfg.ess_target_frac * ell.shape[-1]))
    return grid[k, 0, 0], ess[k]
