"""xla_blockwise: FlashAttention-2 in plain XLA (any backend), forward and backward, for
models/attention.py. Tiles of block_q queries x block_k keys; only the key tiles some row of the
batch may see are visited (filled cache slots, causality, packed rows' segments), and no [T, S]
tile survives the forward pass. Scores, softmax statistics and accumulators are float32.
Shapes as models/attention.py: q [B, T, N, H], k, v "BSKH" or "BKSH".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

# Finite (not -inf) so that a fully masked row in `naive` gives a uniform softmax, not NaN (and
# blockwise's running max starts from it). The package's one masking constant.
MASK_VALUE = -1e30


def attend(
    q: Array,
    k: Array,
    v: Array,
    kv_start: Int[Array, " B"],
    kv_end: Int[Array, " B"],
    q_offset: Int[Array, ""],
    segment_ids: Int[Array, "B T"] | None,
    *,
    block_q: int,
    block_k: int,
    scale: float,
    kv_layout: str,
) -> Array:
    """Attention under attention.Mask's rule (its fields passed apart), [B, T, N, H] in q.dtype."""
    cfg = _Blocks(block_q, block_k, scale, kv_layout)
    segs = None if segment_ids is None else _segment_runs(segment_ids)
    return _flash(cfg, q, k, v, kv_start, kv_end, jnp.asarray(q_offset, jnp.int32), segs)


def _segment_runs(seg: Int[Array, "B T"]):
    """(ids, first slot, one past the last slot) of each token's segment, all [B, T]: what
    blockwise needs to skip the tiles outside a query tile's segments."""
    seg = seg.astype(jnp.int32)
    t = seg.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), seg.shape)  # [B, T]
    change = seg[:, 1:] != seg[:, :-1]  # [B, T-1]: a run ends between t and t + 1
    first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), change], axis=1)
    last = jnp.concatenate([change, jnp.ones_like(seg[:, :1], bool)], axis=1)
    lo = jax.lax.cummax(jnp.where(first, idx, 0), axis=1)  # [B, T]
    hi = jax.lax.cummin(jnp.where(last, idx + 1, t), axis=1, reverse=True)  # [B, T]
    return seg, lo, hi


@dataclasses.dataclass(frozen=True)
class _Blocks:
    block_q: int
    block_k: int
    scale: float
    kv_layout: str


def _slots(i, size: int, length: int):
    """Start of tile i: i * size, shifted back so the last tile ends at `length` (no padding
    copies of a cache; rows the shift repeats are masked by their nominal start)."""
    return jnp.minimum(i * size, length - size)


def _kv_tile(x, start, size: int, layout: str):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=layout.index("S"))


def _visible(kv_start, kv_end, q_slots, k_slots, k_from, q_rows=None, q_from=None, segs=None):
    """[B, 1, 1, bq, bk] visibility of a tile; k_from / q_from are the nominal tile starts;
    segs: the tile's (query, key) segment ids [B, bq], [B, bk] of packed rows."""
    k = k_slots[None, None, :]  # [1, 1, bk]
    vis = (k >= kv_start[:, None, None]) & (k < kv_end[:, None, None])
    vis = vis & (k <= q_slots[None, :, None]) & (k >= k_from)  # [B, bq, bk]
    if q_from is not None:  # backward: a repeated query row must not add its gradient twice
        vis = vis & (q_rows[None, :, None] >= q_from)
    if segs is not None:
        vis = vis & (segs[0][:, :, None] == segs[1][:, None, :])
    return vis[:, None, None]


def _tile_segs(segs, q_start, k_start, bq: int, bk: int):
    """Segment ids of a (query tile, key tile) pair of a packed row, or None (not packed)."""
    if segs is None:
        return None
    ids = segs[0]
    cut = jax.lax.dynamic_slice_in_dim
    return cut(ids, q_start, bq, axis=1), cut(ids, k_start, bk, axis=1)


def _key_range(cfg: _Blocks, kv_start, kv_end, q_last_slot, s: int):
    """Key tiles [lo, hi) some row of the batch can see: before hi the keys are filled
    (kv_end) and causal (q_last_slot); a dynamic trip count, so decode skips empty slots."""
    bk = min(cfg.block_k, s)
    lo = jnp.min(kv_start) // bk
    hi_slot = jnp.minimum(jnp.max(kv_end), q_last_slot + 1)
    hi = jnp.clip(-(-hi_slot // bk), 0, -(-s // bk))
    return jnp.minimum(lo, hi), hi


def _fwd(cfg: _Blocks, q, k, v, kv_start, kv_end, q_offset, segs=None):
    b, t, n, h = q.shape
    lay = cfg.kv_layout
    s, kh = k.shape[lay.index("S")], k.shape[lay.index("K")]
    g, bq, bk, dt = n // kh, min(cfg.block_q, t), min(cfg.block_k, s), q.dtype
    q5 = q.reshape(b, t, kh, g, h)  # [B, T, K, R, H]

    def q_tile(i, carry):
        out, lse = carry
        qs = _slots(i, bq, t)
        qb = jax.lax.dynamic_slice_in_dim(q5, qs, bq, axis=1)  # [B, bq, K, R, H]
        q_slots = q_offset + qs + jnp.arange(bq, dtype=jnp.int32)  # [bq]
        lo, hi = _key_range(cfg, kv_start, kv_end, q_offset + qs + bq - 1, s)
        if segs is not None:  # packed: no key before the segment start of the tile's queries
            first = jnp.min(jnp.maximum(kv_start, segs[1][:, qs]))  # (uncached: slot = index)
            lo = jnp.minimum(jnp.maximum(lo, first // bk), hi)

        def k_tile(j, c):
            m, den, acc = c
            ks = _slots(j, bk, s)
            kb, vb = _kv_tile(k, ks, bk, lay), _kv_tile(v, ks, bk, lay)
            sc = jnp.einsum(f"BTKRH,{lay}->BKRTS", qb, kb, preferred_element_type=jnp.float32)
            k_slots = ks + jnp.arange(bk, dtype=jnp.int32)
            tsegs = _tile_segs(segs, qs, ks, bq, bk)
            vis = _visible(kv_start, kv_end, q_slots, k_slots, j * bk, segs=tsegs)
            sc = jnp.where(vis, sc * cfg.scale, MASK_VALUE)  # [B, K, R, bq, bk] float32
            m_new = jnp.maximum(m, sc.max(-1))  # [B, K, R, bq]
            p = jnp.where(vis, jnp.exp(sc - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            pv = jnp.einsum(
                f"BKRTS,{lay}->BKRTH", p.astype(dt), vb, preferred_element_type=jnp.float32
            )
            return m_new, den * alpha + p.sum(-1), acc * alpha[..., None] + pv

        init = (
            jnp.full((b, kh, g, bq), MASK_VALUE, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, h), jnp.float32),
        )
        m, den, acc = jax.lax.fori_loop(lo, hi, k_tile, init)
        seen = den > 0  # a query that sees no key gets 0, not NaN
        ob = (acc / jnp.where(seen, den, 1.0)[..., None]).astype(dt)  # [B, K, R, bq, H]
        lse_b = jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), 0.0)  # [B, K, R, bq]
        out = jax.lax.dynamic_update_slice_in_dim(out, ob.transpose(0, 3, 1, 2, 4), qs, axis=1)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_b, qs, axis=3)
        return out, lse

    init = (jnp.zeros((b, t, kh, g, h), dt), jnp.zeros((b, kh, g, t), jnp.float32))
    out, lse = jax.lax.fori_loop(0, -(-t // bq), q_tile, init)
    return out.reshape(b, t, n, h), lse  # [B, T, N, H], [B, K, R, T] float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Blocks, q, k, v, kv_start, kv_end, q_offset, segs):
    return _fwd(cfg, q, k, v, kv_start, kv_end, q_offset, segs)[0]


def _flash_fwd(cfg, q, k, v, kv_start, kv_end, q_offset, segs):
    out, lse = _fwd(cfg, q, k, v, kv_start, kv_end, q_offset, segs)
    # Residuals are O(T + S): no [T, S] tile survives the forward pass.
    return out, (q, k, v, kv_start, kv_end, q_offset, segs, out, lse)


def _flash_bwd(cfg: _Blocks, res, dout):
    """FlashAttention-2 backward: per key tile, recompute each query tile's probabilities
    from the saved logsumexp; dk, dv accumulate over query tiles, dq over key tiles."""
    q, k, v, kv_start, kv_end, q_offset, segs, out, lse = res
    b, t, n, h = q.shape
    lay = cfg.kv_layout
    s, kh = k.shape[lay.index("S")], k.shape[lay.index("K")]
    g, bq, bk, dt = n // kh, min(cfg.block_q, t), min(cfg.block_k, s), q.dtype
    q5, do5 = q.reshape(b, t, kh, g, h), dout.astype(dt).reshape(b, t, kh, g, h)
    # D_i = sum_h dO_ih O_ih = sum_j P_ij dP_ij, the softmax-backward row term.
    o5 = out.reshape(b, t, kh, g, h)
    dd = jnp.einsum("BTKRH,BTKRH->BKRT", do5, o5, preferred_element_type=jnp.float32)
    lo, hi = _key_range(cfg, kv_start, kv_end, q_offset + t - 1, s)

    def k_tile(j, carry):
        dq, dk, dv = carry
        ks = _slots(j, bk, s)
        kb, vb = _kv_tile(k, ks, bk, lay), _kv_tile(v, ks, bk, lay)
        k_slots = ks + jnp.arange(bk, dtype=jnp.int32)
        # Query tiles that can see this key tile: causal lower bound on their last slot.
        i_lo = jnp.clip((j * bk - q_offset) // bq, 0, -(-t // bq))
        i_hi = -(-t // bq)
        if segs is not None:  # packed: no query past the segment end of the tile's last key
            last_key = jnp.minimum((j + 1) * bk, s) - 1
            i_hi = jnp.clip(-(-jnp.max(segs[2][:, last_key]) // bq), i_lo, i_hi)

        def q_tile(i, c):
            dq, dkb, dvb = c
            qs = _slots(i, bq, t)
            qb = jax.lax.dynamic_slice_in_dim(q5, qs, bq, axis=1)  # [B, bq, K, R, H]
            dob = jax.lax.dynamic_slice_in_dim(do5, qs, bq, axis=1)
            lse_b = jax.lax.dynamic_slice_in_dim(lse, qs, bq, axis=3)  # [B, K, R, bq]
            dd_b = jax.lax.dynamic_slice_in_dim(dd, qs, bq, axis=3)
            rows = qs + jnp.arange(bq, dtype=jnp.int32)
            tsegs = _tile_segs(segs, qs, ks, bq, bk)
            vis = _visible(kv_start, kv_end, q_offset + rows, k_slots, j * bk, rows, i * bq, tsegs)
            sc = jnp.einsum(f"BTKRH,{lay}->BKRTS", qb, kb, preferred_element_type=jnp.float32)
            p = jnp.where(vis, jnp.exp(sc * cfg.scale - lse_b[..., None]), 0.0)  # [B,K,G,bq,bk]
            dp = jnp.einsum(f"BTKRH,{lay}->BKRTS", dob, vb, preferred_element_type=jnp.float32)
            ds = (p * (dp - dd_b[..., None]) * cfg.scale).astype(dt)  # d(scores before scale)
            dvb = dvb + jnp.einsum(
                f"BKRTS,BTKRH->{lay}", p.astype(dt), dob, preferred_element_type=jnp.float32
            )
            dkb = dkb + jnp.einsum(
                f"BKRTS,BTKRH->{lay}", ds, qb, preferred_element_type=jnp.float32
            )
            dqb = jnp.einsum(f"BKRTS,{lay}->BKRTH", ds, kb, preferred_element_type=jnp.float32)
            upd = jax.lax.dynamic_slice_in_dim(dq, qs, bq, axis=1) + dqb.transpose(0, 3, 1, 2, 4)
            return jax.lax.dynamic_update_slice_in_dim(dq, upd, qs, axis=1), dkb, dvb

        zeros = jnp.zeros(kb.shape, jnp.float32)
        dq, dkb, dvb = jax.lax.fori_loop(i_lo, i_hi, q_tile, (dq, zeros, zeros))
        axis = lay.index("S")
        add = lambda full, tile: jax.lax.dynamic_update_slice_in_dim(
            full, _kv_tile(full, ks, bk, lay) + tile, ks, axis=axis
        )
        return dq, add(dk, dkb), add(dv, dvb)

    init = (
        jnp.zeros((b, t, kh, g, h), jnp.float32),
        jnp.zeros(k.shape, jnp.float32),
        jnp.zeros(v.shape, jnp.float32),
    )
    dq, dk, dv = jax.lax.fori_loop(lo, hi, k_tile, init)
    dq = dq.reshape(b, t, n, h).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
