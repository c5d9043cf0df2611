"""Objective-agnostic entropy control (`config.loss.entropy_*`): a bonus on the mean token entropy
of the policy, with a fixed or an adaptive coefficient.

The update minimises L_objective − c·H̄, with H̄ = Σ_{i,t} m_{i,t} H_{i,t} / Σ m the token-mean
entropy of the full-vocabulary policy over the update's completion tokens (after any rollout
rejection). H_{i,t} = −Σ_v π_v log π_v comes from the fused log-prob kernel
(trainer/logprobs.py): an online pass over vocabulary chunks, so no [B, T, V] float32 array is
formed, forward or backward; its backward recomputes each chunk's logits once, as the log-prob
gradient does (one extra [B·T, C] elementwise term per chunk).

Adaptive mode (`entropy_target` > 0), Skywork-OR1's adaptive entropy control (arXiv 2505.22312,
SkyworkAI/Skywork-OR1 `EntController`): the state (coefficient c_k, switch e_k ∈ {0, 1}) starts
at (entropy_coef, 1); update k uses c_k·e_k, then, with H̄_k the entropy measured in that update,

    c_{k+1} = clip(c_k + Δ·sign(H_target − H̄_k), c_min, c_max)   (+Δ if H̄_k < target, else −Δ)
    e_{k+1} = 1[H̄_k < H_target]

so the bonus only acts while the entropy is below the target. The reference updates once per
rollout step with the mean over its mini-batches; here the state moves after every optimizer
update (the same with optim.mini_batches = 1). The state lives in the train state and is
checkpointed with it, like the α/τ schedule state. Everything here is float32 and stop-gradient.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float

from apo_jax import settings


@dataclasses.dataclass(frozen=True)
class EntropyConfig:
    """loss.entropy_coef, _target, _coef_delta, _coef_min, _coef_max (apo_jax/settings.py Loss):
    c or the adaptive c_0; H_target (> 0: adaptive, in nats); Δ; c_min; c_max."""

    coef: float = settings.Loss.entropy_coef
    target: float = settings.Loss.entropy_target
    delta: float = settings.Loss.entropy_coef_delta  # Skywork-OR1: 1e-4
    coef_min: float = settings.Loss.entropy_coef_min
    coef_max: float = settings.Loss.entropy_coef_max  # Skywork-OR1: 0.005

    @property
    def adaptive(self) -> bool:
        return self.target > 0

    @property
    def active(self) -> bool:
        """Whether the bonus can be non-zero (else the trainer skips the entropy gradient)."""
        return self.adaptive or self.coef != 0


class EntropyState(NamedTuple):
    coef: Float[Array, ""]  # c_k
    enabled: Float[Array, ""]  # e_k: 1.0 while the last measured entropy was below the target


def init_entropy_state(cfg: EntropyConfig) -> EntropyState:
    return EntropyState(jnp.asarray(cfg.coef, jnp.float32), jnp.asarray(1.0, jnp.float32))


def applied_coef(cfg: EntropyConfig, state: EntropyState) -> Float[Array, ""]:
    """The coefficient of this update: c (fixed) or c_k·e_k (adaptive)."""
    if cfg.adaptive:
        return state.coef * state.enabled
    return jnp.asarray(cfg.coef, jnp.float32)


def update(cfg: EntropyConfig, state: EntropyState, entropy: Float[Array, ""]) -> EntropyState:
    """The state after an update that measured mean token entropy `entropy` (adaptive mode;
    the fixed mode's state never changes)."""
    if not cfg.adaptive:
        return state
    below = jnp.asarray(entropy, jnp.float32) < cfg.target
    step = jnp.where(below, cfg.delta, -cfg.delta)
    coef = jnp.clip(state.coef + step, cfg.coef_min, cfg.coef_max)
    return EntropyState(coef.astype(jnp.float32), below.astype(jnp.float32))
