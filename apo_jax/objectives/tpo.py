"""TPO (Kaddour, "Target Policy Optimization", arXiv 2604.06159 §2; definition as its code,
JeanKaddour/tpo `tpo_target` and `tpo_skill`): cross-entropy from the group target
q ∝ p_old·exp(u/η), with u the group-standardised rewards, to the policy on the group simplex.

Token arrays are [P, G, T], rewards [P, G]; the loss is a mean over prompts.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from apo_jax.objectives import registry
from apo_jax.objectives.common import (
    LossOutput,
    float_dtype,
    kl_old_new,
    masked_mean,
    scalar_metrics,
    sequence_logp,
    sg,
)

_STD_FLOOR = 1e-6  # the reference's zero-variance test (std > 1e-6, else u = 0)

# config.loss.tpo.* (the paper's: η = 1 throughout, sequence log-probs summed over tokens)
DEFAULTS = dict(
    eta=1.0,  # target temperature η: q ∝ p_old·exp(u/η)
    # False: ℓ_i = Σ_t log π(y_i,t) (the paper's); True: the per-token mean, as APO's ℓ
    length_normalize=False,
)


def standardized_scores(rewards: Float[Array, "P G"]) -> Float[Array, "P G"]:
    """u = (r − mean r)/std r per group, population std (ddof 0), u = 0 where std <= 1e-6."""
    r = sg(rewards.astype(float_dtype(rewards)))
    centred = r - r.mean(-1, keepdims=True)  # [P, G]
    std = centred.std(-1, keepdims=True)
    ok = std > _STD_FLOOR
    return jnp.where(ok, centred / jnp.where(ok, std, 1.0), centred)


def tpo_loss(
    logp: Float[Array, "P G T"],
    logp_old: Float[Array, "P G T"],
    mask: Float[Array, "P G T"],
    rewards: Float[Array, "P G"],
    *,
    eta: float = DEFAULTS["eta"],
    length_normalize: bool = DEFAULTS["length_normalize"],
) -> LossOutput:
    """TPO (arXiv 2604.06159 eqs. 1–3), minimised, on each prompt's group of G completions:

        ℓ_i = Σ_t log π_θ(y_{i,t})  (per-token mean with `length_normalize`),   p^θ = softmax(ℓ)
        u = standardize(r)  (population std; u = 0 for a constant group)
        q = softmax(log p^old + u/η)                       (p^old from π_old's ℓ, stop-gradient)
        L_prompt = −Σ_i q_i log p^θ_i,    ∂L_prompt/∂ℓ_i = p^θ_i − q_i

    Mean over prompts. q is fixed for every update on a rollout batch (it uses π_old). With
    summed log-probs of long completions p^old is close to one-hot on the likeliest completion
    and q stays close to it (metric old_top_mass); `length_normalize` is an option the paper
    does not have. metrics: divergence (KL(q‖p^θ)), target_entropy, old_top_mass.
    """
    dt = float_dtype(logp)
    m = mask.astype(dt)
    if length_normalize:
        ell, ell_old = sequence_logp(logp, m), sequence_logp(sg(logp_old), m)  # [P, G]
    else:
        ell = (logp.astype(dt) * m).sum(-1)  # [P, G]
        ell_old = (sg(logp_old.astype(dt)) * m).sum(-1)
    log_p_old = jax.nn.log_softmax(ell_old, axis=-1)  # [P, G]
    log_q = sg(jax.nn.log_softmax(log_p_old + standardized_scores(rewards) / eta, axis=-1))
    log_p = jax.nn.log_softmax(ell, axis=-1)  # [P, G]
    q = jnp.exp(log_q)
    per_prompt = -(q * log_p).sum(-1)  # [P]
    valid = (m.sum((-2, -1)) > 0).astype(dt)  # [P]
    metrics = dict(
        divergence=masked_mean((q * (log_q - sg(log_p))).sum(-1), valid),
        target_entropy=masked_mean(-(q * log_q).sum(-1), valid),
        old_top_mass=masked_mean(jnp.exp(log_p_old).max(-1), valid),
        kl_old_new=kl_old_new(logp_old, logp, m),
    )
    return LossOutput((per_prompt * valid).sum(), valid.sum(), scalar_metrics(**metrics))


def _check(p) -> None:
    if not p["eta"] > 0.0:
        registry.fail("tpo.eta", p["eta"], "must be > 0")


OBJECTIVE = registry.Objective(
    name="tpo",
    loss=registry.plain_loss(tpo_loss),
    defaults=DEFAULTS,
    couples_rows=True,  # a softmax over each prompt's group
    check=_check,
    doc="TPO: cross-entropy to the group target q ∝ p_old·exp(standardised reward / η)",
)
