"""Fused chunked token log-probs against the naive log_softmax (values, entropy and gradients),
the bfloat16 path, and the absence of any [B·T, V] buffer in the forward or backward pass."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from apo_jax.trainer import logprobs


def _naive(hidden, unembed, tokens, temperature=1.0):
    """Reference: full float32 logits, log_softmax, gather; entropy from the same logits."""
    z = jnp.einsum("btd,vd->btv", hidden.astype(jnp.float32), unembed.astype(jnp.float32))
    logp_all = jax.nn.log_softmax(z / temperature, axis=-1)  # [B, T, V]
    logp = jnp.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]
    return logp, -(jnp.exp(logp_all) * logp_all).sum(-1)


def _chunked(hidden, unembed, tokens, temperature=1.0, *, chunk_size):
    return logprobs.token_logprobs(
        hidden, unembed, tokens, chunk_size=chunk_size, temperature=temperature, return_entropy=True
    )


@functools.partial(jax.jit, static_argnums=(0,))
def _values_and_grads(fn, hidden, unembed, tokens, temperature, c_logp, c_ent):
    """(log-probs, entropy) and the gradients of Σ c_logp·logp + c_ent·H w.r.t. hidden, unembed."""

    def objective(h, w):
        logp, ent = fn(h, w, tokens, temperature)
        return (c_logp * logp).sum() + (c_ent * ent).sum(), (logp, ent)

    grads, (logp, ent) = jax.grad(objective, argnums=(0, 1), has_aux=True)(hidden, unembed)
    return logp, ent, grads


def _case(b=2, t=5, d=16, v=1000, seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    hidden = r.normal(size=(b, t, d)).astype(dtype)
    unembed = (0.5 * r.normal(size=(v, d))).astype(dtype)
    tokens = r.integers(0, v, size=(b, t)).astype(np.int32)
    c_logp, c_ent = r.normal(size=(b, t)), r.normal(size=(b, t))
    return hidden, unembed, tokens, c_logp.astype(np.float32), c_ent.astype(np.float32)


@pytest.mark.parametrize(
    "chunk,temperature",
    [(256, 0.7), (250, 1.0), (4096, 1.3)],  # ragged tail, exact split, one chunk (V = 1000)
)
def test_matches_naive_values_and_gradients(chunk, temperature):
    hidden, unembed, tokens, c_logp, c_ent = _case()
    args = (hidden, unembed, tokens, temperature, c_logp, c_ent)
    fused = functools.partial(_chunked, chunk_size=chunk)
    logp, ent, (g_h, g_w) = _values_and_grads(fused, *args)
    ref_logp, ref_ent, (ref_h, ref_w) = _values_and_grads(_naive, *args)
    assert logp.dtype == ent.dtype == jnp.float32 and logp.shape == (2, 5)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-5)
    np.testing.assert_allclose(g_h, ref_h, atol=1e-5)
    np.testing.assert_allclose(g_w, ref_w, atol=1e-5)
    if chunk == 256:  # the log-prob-only path (what the rollout scorer uses)
        only = jax.jit(functools.partial(logprobs.token_logprobs, chunk_size=chunk))
        np.testing.assert_allclose(
            only(hidden, unembed, tokens, temperature=temperature), ref_logp, atol=1e-5
        )


def test_bfloat16_inputs():
    """bf16 × bf16 → f32 matmuls: equal to the naive path on the same (bf16-rounded) values up to
    f32 summation order; against the unrounded f32 inputs only bf16's ~3 significant digits hold
    (documented bound: 0.05 absolute on log-probs of O(10), 3e-2 relative on gradients)."""
    hidden, unembed, tokens, c_logp, c_ent = _case(v=1000)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    fused = functools.partial(_chunked, chunk_size=256)
    logp, ent, (g_h, g_w) = _values_and_grads(
        fused, bf(hidden), bf(unembed), tokens, 1.0, c_logp, c_ent
    )
    assert logp.dtype == jnp.float32 and g_h.dtype == g_w.dtype == jnp.bfloat16
    up = lambda x: bf(x).astype(jnp.float32)
    ref_logp, ref_ent, (ref_h, ref_w) = _values_and_grads(
        _naive, up(hidden), up(unembed), tokens, 1.0, c_logp, c_ent
    )
    np.testing.assert_allclose(logp, ref_logp, atol=1e-4)
    np.testing.assert_allclose(ent, ref_ent, atol=1e-4)
    for g, ref in ((g_h, ref_h), (g_w, ref_w)):  # the cotangents are rounded to bf16 on output
        assert float(jnp.abs(g.astype(jnp.float32) - ref).max() / jnp.abs(ref).max()) < 1e-2
    full_logp, _, _ = _values_and_grads(_naive, hidden, unembed, tokens, 1.0, c_logp, c_ent)
    np.testing.assert_allclose(logp, full_logp, atol=0.05)


def _largest_buffer(jaxpr) -> int:
    """Largest intermediate (elements) anywhere in a jaxpr, loop and cond bodies included."""
    sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars]
    subs = [_largest_buffer(s) for eqn in jaxpr.eqns for s in jex_core.jaxprs_in_params(eqn.params)]
    return max(sizes + subs + [0])


def test_never_materialises_full_logits():
    b, t, d, v = 4, 8, 8, 1000  # N·V = 32,000 ≫ V·D (the unembed gradient) and N·chunk
    hidden, unembed, tokens, c_logp, c_ent = _case(b=b, t=t, d=d, v=v)

    def jaxpr_of(fn):
        f = lambda h, w: sum(x.sum() for x in fn(h, w, tokens))
        return jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(hidden, unembed).jaxpr

    fused = functools.partial(_chunked, chunk_size=256)
    assert _largest_buffer(jaxpr_of(fused)) <= max(v * d, b * t * 256)
    assert _largest_buffer(jaxpr_of(_naive)) >= b * t * v  # the check does see a [B, T, V]
