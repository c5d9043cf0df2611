"""Fused, vocabulary-chunked token log-probs (and entropy) from final hidden states.

log π(y_t) = z_t[y_t] − logsumexp(z_t) with z_t = (h_t · Wᵀ) / temperature. The logits are built
one vocabulary chunk [B·T, C] at a time with an online logsumexp, forward and backward (custom VJP
that recomputes chunk logits), so no [B, T, V] float32 buffer ever exists. Shapes: B batch,
T tokens, D model dim, V vocab, C chunk. Log-probs and entropy are float32.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

DEFAULT_CHUNK_SIZE = 8192  # vocab rows per chunk: [B·T, 8192] f32 logits live at once


def token_logprobs(
    hidden: Float[Array, "B T D"],
    unembed: Float[Array, "V D"],
    tokens: Int[Array, "B T"],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    temperature: float | Float[Array, ""] = 1.0,
    return_entropy: bool = False,
) -> Float[Array, "B T"] | tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Log-probs of `tokens` under softmax(hidden·unembedᵀ / temperature), never forming [B, T, V].

    `unembed` is the LM head in HF layout (rows are vocabulary entries). The matmul runs in the
    promoted dtype of `hidden` and `unembed` with float32 accumulation; pass both in bfloat16 for
    the fast path. Tokens must lie in [0, V); padded positions need a valid id (mask them later).
    Returns float32 log-probs [B, T], plus the per-token entropy H = −Σ_v π_v log π_v [B, T]
    (differentiable too) when `return_entropy`. `temperature` is not differentiated.
    """
    b, t, d = hidden.shape
    chunk = max(1, min(int(chunk_size), unembed.shape[0]))
    inv_temp = jax.lax.stop_gradient(1.0 / jnp.asarray(temperature, jnp.float32))
    h = hidden.reshape(b * t, d)  # [B·T, D]
    ids = tokens.reshape(b * t).astype(jnp.int32)  # [B·T]
    logp, entropy = _fused(h, unembed, ids, inv_temp, chunk, return_entropy)
    logp = logp.reshape(b, t)  # [B, T]
    if return_entropy:
        return logp, entropy.reshape(b, t)
    return logp


def _chunk_logits(h, w, start, size, inv_temp):
    """Logits for vocabulary rows [start, start+size): [B·T, size] float32."""
    dt = jnp.promote_types(h.dtype, w.dtype)
    w_c = jax.lax.dynamic_slice_in_dim(w, start, size, axis=0)  # [C, D]
    z = jax.lax.dot_general(
        h.astype(dt), w_c.astype(dt), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [B·T, C]
    return z * inv_temp


def _over_chunks(update, carry, vocab: int, chunk: int):
    """`update(carry, start, size)` over the vocabulary: the full chunks in a loop, then the
    trailing partial one (its size is static)."""
    n_full, rem = divmod(vocab, chunk)
    carry = jax.lax.fori_loop(0, n_full, lambda i, c: update(c, i * chunk, chunk), carry)
    return update(carry, n_full * chunk, rem) if rem else carry


def _forward_stats(h, w, ids, inv_temp, chunk, with_entropy):
    """One pass over the vocabulary: running max m, Σe^(z−m), Σe^(z−m)·z and the target logit."""
    n = h.shape[0]

    def update(carry, start, size):
        m, s, sz, tgt = carry
        z = _chunk_logits(h, w, start, size, inv_temp)  # [B·T, C]
        m_new = jnp.maximum(m, z.max(-1))  # [B·T]
        scale = jnp.exp(m - m_new)  # rescales the sums accumulated under the old max
        e = jnp.exp(z - m_new[:, None])  # [B·T, C]
        s = s * scale + e.sum(-1)
        if with_entropy:
            sz = sz * scale + (e * z).sum(-1)
        local = ids - start  # the target's column in this chunk, if it is in it
        inside = (local >= 0) & (local < size)
        z_tgt = jnp.take_along_axis(z, jnp.clip(local, 0, size - 1)[:, None], axis=-1)[:, 0]
        tgt = tgt + jnp.where(inside, z_tgt, 0.0)
        return m_new, s, sz, tgt

    zeros = jnp.zeros((n,), jnp.float32)
    carry = (jnp.full((n,), -jnp.inf, jnp.float32), zeros, zeros, zeros)
    m, s, sz, tgt = _over_chunks(update, carry, w.shape[0], chunk)
    lse = m + jnp.log(s)  # [B·T]
    # H = lse − E_π[z]; zeros when entropy is not requested.
    entropy = lse - sz / s if with_entropy else zeros
    return tgt - lse, entropy, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h, w, ids, inv_temp, chunk, with_entropy):
    logp, entropy, _ = _forward_stats(h, w, ids, inv_temp, chunk, with_entropy)
    return logp, entropy


def _fused_fwd(h, w, ids, inv_temp, chunk, with_entropy):
    logp, entropy, lse = _forward_stats(h, w, ids, inv_temp, chunk, with_entropy)
    # Residuals are O(B·T·D + V·D): the inputs and two [B·T] vectors, no logits.
    return (logp, entropy), (h, w, ids, inv_temp, lse, entropy)


def _fused_bwd(chunk, with_entropy, res, cts):
    """Recompute each chunk's logits; dz = g·(onehot − π) − g_H·π·(log π + H)."""
    h, w, ids, inv_temp, lse, entropy = res
    g_logp, g_ent = cts  # [B·T], [B·T]
    dt = jnp.promote_types(h.dtype, w.dtype)

    def update(carry, start, size):
        dh, dw = carry
        z = _chunk_logits(h, w, start, size, inv_temp)  # [B·T, C]
        logpi = z - lse[:, None]  # [B·T, C]
        pi = jnp.exp(logpi)
        onehot = (ids[:, None] - start) == jnp.arange(size)[None, :]  # [B·T, C]
        dz = g_logp[:, None] * (onehot.astype(jnp.float32) - pi)
        if with_entropy:
            dz = dz - g_ent[:, None] * pi * (logpi + entropy[:, None])
        # d/dh and d/dW of z = (h·Wᵀ)·inv_temp; the cotangent is cast to the matmul dtype so the
        # bf16 path stays bf16 × bf16 → f32.
        dz = (dz * inv_temp).astype(dt)
        w_c = jax.lax.dynamic_slice_in_dim(w, start, size, axis=0).astype(dt)  # [C, D]
        dh = dh + jnp.dot(dz, w_c, preferred_element_type=jnp.float32)  # [B·T, D]
        dw_c = jax.lax.dot_general(
            dz, h.astype(dt), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [C, D]
        dw = jax.lax.dynamic_update_slice_in_dim(dw, dw_c, start, axis=0)
        return dh, dw

    carry = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, jnp.float32))
    dh, dw = _over_chunks(update, carry, w.shape[0], chunk)
    # Integer ids get no cotangent; the temperature is a stop-gradient constant.
    return dh.astype(h.dtype), dw.astype(w.dtype), None, jnp.zeros_like(inv_temp)


_fused.defvjp(_fused_fwd, _fused_bwd)
