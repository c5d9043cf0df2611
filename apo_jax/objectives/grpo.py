"""GRPO (DeepSeekMath; spec §4.1): the PPO clipped surrogate per token with group-normalised
advantages, optional KL to a frozen reference, and an explicit aggregation mode.

Token arrays are [P, G, T], rewards [P, G].
"""

from jaxtyping import Array, Float

from apo_jax.objectives import registry
from apo_jax.objectives.common import (
    AGG_MODES,
    KL_TYPES,
    LossOutput,
    aggregate,
    clipped_surrogate,
    float_dtype,
    group_advantages,
    kl_estimate,
    kl_old_new,
    masked_mean,
    scalar_metrics,
    scale_grad,
    sg,
)

# config.loss.grpo.* (canonical GRPO; the DeepSeekMath paper also used kl_coef = 0.04)
DEFAULTS = dict(
    clip_eps_low=0.2,  # lower ratio clip ε_low
    clip_eps_high=0.2,  # upper ratio clip ε_high
    dual_clip=0.0,  # dual-clip constant c for A < 0 (0 = off; verl uses 3)
    scale_adv=True,  # divide group advantages by the group std
    # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm | token-mean-per-micro
    agg_mode="seq-mean-token-mean",
    agg_rows=6,  # token-mean-per-micro: sequences per token-mean chunk (the author's micro-batch)
    kl_coef=0.0,  # β of the KL to the frozen initial policy (0 = no reference model)
    kl_type="k3",  # KL estimator k1 | k2 | k3
)


def grpo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    clip_eps_low: float = DEFAULTS["clip_eps_low"],
    clip_eps_high: float = DEFAULTS["clip_eps_high"],
    dual_clip: float = DEFAULTS["dual_clip"],
    scale_adv: bool = DEFAULTS["scale_adv"],
    agg_mode: str = DEFAULTS["agg_mode"],
    agg_rows: int = DEFAULTS["agg_rows"],
    max_len: int | None = None,
    kl_coef: float = DEFAULTS["kl_coef"],
    logp_ref: Float[Array, "P G T"] | None = None,
    kl_type: str = DEFAULTS["kl_type"],
    is_weight: Float[Array, "P G T"] | None = None,
) -> LossOutput:
    """GRPO (DeepSeekMath eq. 3; spec §4.1), minimised, with ρ_{i,t} = π_θ/π_old per token:

        L = agg_{i,t}[ max(−Â_i ρ_{i,t}, −Â_i clip(ρ_{i,t}, 1−ε_l, 1+ε_h)) + β·KL̂_{i,t}(π_θ‖π_ref) ]

    Â_i = (r_i − r̄)/(std + 1e-6) (or r_i − r̄ without `scale_adv`); `agg_mode` is one of
    AGG_MODES (the paper's is seq-mean-token-mean; "token-mean-per-micro" is the APO author's
    verl fork: token-mean within chunks of `agg_rows` sequences, averaged over chunks, see
    `common.aggregate`); KL̂ is `kl_type` from `kl_estimate`. `is_weight` (the rollout
    correction's token weights) scales the gradient of the clipped surrogate only, not of the
    KL term, as verl applies its rollout IS weights to the policy loss alone.
    """
    if agg_mode not in AGG_MODES or kl_type not in KL_TYPES:
        raise ValueError(f"agg_mode must be in {AGG_MODES} and kl_type in {KL_TYPES}")
    if kl_coef and logp_ref is None:
        raise ValueError("kl_coef > 0 needs logp_ref (frozen reference log-probs)")
    dt = float_dtype(logp)
    logp, m = logp.astype(dt), mask.astype(dt)
    logp_old = sg(logp_old.astype(dt))
    adv = group_advantages(rewards, scale_by_std=scale_adv)  # [P, G]
    logp_pg = logp if is_weight is None else scale_grad(logp, sg(is_weight.astype(dt)))
    tok_loss, active = clipped_surrogate(
        logp_pg - logp_old, adv[..., None], clip_eps_low, clip_eps_high, dual_clip
    )  # [P, G, T]
    metrics = dict(
        clip_frac=masked_mean(active.astype(dt), m),
        kl_old_new=kl_old_new(logp_old, logp, m),
    )
    if kl_coef:
        kl = kl_estimate(logp, sg(logp_ref.astype(dt)), kl_type)  # [P, G, T]
        tok_loss = tok_loss + kl_coef * kl
        metrics["kl_ref"] = masked_mean(kl, m)
    total, denom = aggregate(tok_loss, m, agg_mode, max_len, agg_rows)
    return LossOutput(total, denom, scalar_metrics(**metrics))


def check_ppo_clip(name: str, p) -> None:
    """Ranges of the clipped-surrogate keys shared by the PPO-style objectives."""
    for key in ("clip_eps_low", "clip_eps"):  # a lower clip must keep 1 - ε > 0
        if key in p and not 0.0 <= p[key] < 1.0:
            registry.fail(f"{name}.{key}", p[key], "must lie in [0, 1)")
    if "clip_eps_high" in p and not p["clip_eps_high"] >= 0.0:
        registry.fail(f"{name}.clip_eps_high", p["clip_eps_high"], "must be >= 0")
    if p.get("dual_clip") and not p["dual_clip"] > 1.0:
        registry.fail(f"{name}.dual_clip", p["dual_clip"], "must be 0 (off) or > 1")


def _check(p) -> None:
    check_ppo_clip("grpo", p)
    if p["agg_mode"] not in AGG_MODES:
        registry.fail("grpo.agg_mode", p["agg_mode"], f"valid: {', '.join(AGG_MODES)}")
    if p["kl_type"] not in KL_TYPES:
        registry.fail("grpo.kl_type", p["kl_type"], f"valid: {', '.join(KL_TYPES)}")
    if p["agg_rows"] < 1:
        registry.fail("grpo.agg_rows", p["agg_rows"], "must be >= 1")
    if p["kl_coef"] < 0:
        registry.fail("grpo.kl_coef", p["kl_coef"], "must be >= 0")


def _inert(p) -> dict[str, str]:
    out = {}
    if not p["kl_coef"]:
        out["kl_type"] = "the KL estimator is unused while kl_coef = 0"
    if p["agg_mode"] != "token-mean-per-micro":
        out["agg_rows"] = "only agg_mode = token-mean-per-micro cuts rows into chunks"
    return out


def _loss(logp, b, ctx, *, kl_coef, **params) -> LossOutput:
    return grpo_loss(
        logp,
        b.old_logp,
        b.completion_mask,
        b.rewards,
        kl_coef=kl_coef,
        logp_ref=b.ref_logp if kl_coef else None,
        is_weight=b.is_weight,
        max_len=ctx.max_new_tokens,
        **params,
    )


OBJECTIVE = registry.Objective(
    name="grpo",
    loss=_loss,
    defaults=DEFAULTS,
    reference=lambda p: p["kl_coef"] > 0,
    check=_check,
    reads=("completion_mask", "old_logp", "rewards", "ref_logp", "is_weight"),
    inert=_inert,
    doc="GRPO: clipped token ratios, group-normalised advantages, optional KL",
)
