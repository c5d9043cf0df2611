"""Rotary position embedding (non-interleaved, "rotate half", as in the Hugging Face Qwen models):
the cos/sin tables of given positions and their application to q or k. Shapes: B rows, T tokens,
N heads, H head dim."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from apo_jax.models.family import RopeTables


def tables(positions: Int[Array, "B T"], head_dim: int, theta: float) -> RopeTables:
    """cos/sin of the rotary angles for `positions`, shared by all layers.

    XLA:CPU fuses (and so recomputes) the sin/cos into each layer's q and k consumers; a decode
    loop should build the tables for all its steps once and pass each step's slice as
    `Decoder.hidden_states(..., rope_cs=...)`."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]


def apply(x: Float[Array, "B T N H"], tables: RopeTables) -> Array:
    """Rotary embedding, non-interleaved ("rotate half") as in the Hugging Face Qwen models."""
    cos, sin = (t.astype(x.dtype) for t in tables)
    h = x.shape[-1]
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
