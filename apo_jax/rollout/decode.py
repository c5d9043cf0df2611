"""The traced pieces both rollout engines share: the prompt prefill (with the first token) and
one decode step over rows at their own lengths. Sharing them is what makes a row's tokens and
log-probs the same under `static` and `continuous` (rollout/sampler.py, rollout/continuous.py).

Shapes: P prompts, B = P·n rows, Tp prompt bucket, Tc = max_new_tokens, S cache slots, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array, Bool, Float, Int

from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import attention as attention_lib
from apo_jax.rollout import kv_cache as kv_cache_lib
from apo_jax.rollout import sampling as sampling_lib
from apo_jax.rollout.sampling import SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefilled:
    """The prompts run once: their cache (P slots, not yet repeated) and each row's first token."""

    cache: kv_cache_lib.KVCache  # [P, K, Tp, H] per layer, index Tp
    tokens: Int[Array, " B"]  # first generated token of each row
    logp: Float[Array, " B"]
    sample_logp: Float[Array, " B"]
    keys: Array  # [B] per-row PRNG keys, fold_in(rng, row_id)


def prefill(model, ids, lengths, rng, row_ids, *, n: int, sp: SamplingParams, dtype) -> Prefilled:
    """Runs the prompts [P, Tp] (left-padded) once and draws the first token of their n rows."""
    b, p = ids.shape
    # The prompt attends within its own P slots; the decode slots come after (extend / admit).
    cache = kv_cache_lib.init(model.cfg, p - lengths, p, dtype)
    positions = kv_cache_lib.positions(cache.starts, 0, p)  # [P, Tp]
    # The cache is exactly P slots here, so the prompt is "uncached"-shaped (T == S): described
    # without an offset, the kernels (cuDNN / splash) can take it.
    mask = attention_lib.Mask(cache.starts, jnp.full((b,), p, jnp.int32))
    at = jnp.zeros((), jnp.int32)  # every row writes slots 0 .. P-1: one slice, no scatter
    hidden, layers = model.hidden_states(ids, positions, mask, cache.layers, at)
    logits = model.logits(hidden[:, -1:])[:, 0]  # [P, V] float32
    cache = kv_cache_lib.KVCache(tuple(layers), jnp.full((b,), p, jnp.int32), cache.starts)
    logits = jnp.repeat(logits, n, axis=0)  # [B, V]
    row_ids = (row_ids[:, None] * n + jnp.arange(n)).reshape(-1)  # [B]
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, row_ids)  # [B]
    tok, logp, sample_logp = sampling_lib.sample(logits, keys, jnp.int32(0), sp)
    return Prefilled(cache, tok, logp, sample_logp, keys)


def rope(model, cache: kv_cache_lib.KVCache, first_slot: int, num_slots: int):
    """RoPE tables of each row's decode slots first_slot .. + num_slots - 1 ([B, T, 1, H/2]):
    built once per decode program, outside its loop (see models/rope.py tables for why)."""
    return model.rope_tables(kv_cache_lib.positions(cache.starts, first_slot, num_slots))


def step(
    model,
    cache: kv_cache_lib.KVCache,
    last: Int[Array, " B"],
    keys: Array,
    lengths: Int[Array, " B"],
    tables,
    first_slot: int,
    sp: SamplingParams,
    live: Bool[Array, " B"] | None = None,
):
    """One decode step: row b feeds `last[b]` at its slot cache.index[b] and draws the token of
    column lengths[b] with noise fold_in(keys[b], lengths[b]). Returns (token, logp,
    sample_logp, cache with the keys written; the caller advances the index). `live`, if given,
    marks the rows whose outputs count: the others see no key, so that blockwise attention reads
    only the key tiles some live row needs (a finished slot may hold a long row's index)."""
    # Attends only to the filled slots (blockwise stops at the last live row's index + 1).
    mask = kv_cache_lib.decode_mask(cache)
    if live is not None:  # a dead row: start = end = the live rows' furthest end
        end = jnp.max(jnp.where(live, mask.kv_end, 0))
        pick = lambda x: jnp.where(live, x, end)
        mask = attention_lib.Mask(pick(mask.kv_start), pick(mask.kv_end), mask.q_offset)
    at = (cache.index - first_slot)[:, None, None, None]  # [B, 1, 1, 1] column of the tables
    rope_cs = tuple(jnp.take_along_axis(x, at, axis=1) for x in tables)  # [B, 1, 1, H/2]
    hidden, layers = model.hidden_states(
        last[:, None], None, mask, cache.layers, cache.index, rope_cs=rope_cs
    )
    logits = model.logits(hidden)[:, 0]  # [B, V] float32: the only vocab-sized buffer
    tok, logp, sample_logp = sampling_lib.sample(logits, keys, lengths, sp)
    return tok, logp, sample_logp, dataclasses.replace(cache, layers=tuple(layers))


def constrain_rows(x: Array, mesh: Mesh | None, rules: sharding_lib.Rules) -> Array:
    """x [B, ...] with B on the batch mesh axes (unchanged without a mesh)."""
    if mesh is None:
        return x
    spec = sharding_lib.fit_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain_cache(cache: kv_cache_lib.KVCache, mesh: Mesh | None, rules) -> kv_cache_lib.KVCache:
    """The cache with rows on the batch axes and kv heads on tensor (unchanged without a mesh)."""
    if mesh is None:
        return cache
    return jax.lax.with_sharding_constraint(cache, kv_cache_lib.shardings(cache, mesh, rules))


def live_mask(done: Bool[Array, " B"], lengths: Int[Array, " B"], max_new_tokens: int):
    """Rows still decoding: no stop id yet and room for another token."""
    return ~done & (lengths < max_new_tokens)
