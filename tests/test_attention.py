"""attention.py: every implementation that runs on CPU against `naive` evaluated in float64.

Tolerances are derived, not tuned: a float32 result of n accumulated terms whose absolute values
sum to A is within n * eps * A of the exact value, and a score error of eps * kappa (kappa = the
largest sum_h |q_h k_h| * scale) perturbs each probability by a relative (1 + kappa) * eps.
So tol = eps32 * (S + T + H) * (1 + kappa) * max(A), with A the sum of |terms| of each output
(P|V| for the output; P^T|dO|, scale * E|K|, scale * E^T|Q| for dv, dq, dk, where
E = P * (|dO||V|^T + rowsum(P |dO||V|^T)) bounds the terms of the softmax backward).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apo_jax.models import attention as attn

EPS32 = float(np.finfo(np.float32).eps)
EPS_BF16 = float(jnp.finfo(jnp.bfloat16).eps)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    t: int  # queries
    s: int  # keys (== t uncached)
    n: int
    k: int
    layout: str
    # uncached: per-row (first real, one past last real); cached: per-row starts
    rows: tuple
    index: int | None = None  # cache write index (None: uncached)


H = 8
CASES = [
    # Left padding, GQA 2, a fully padded row.
    Case("left_pad_gqa2", 37, 37, 4, 2, "BSKH", ((5, 37), (0, 37), (0, 0))),
    # Right padding (completion mask), GQA ratio 1, both paddings in one row.
    Case("right_pad_mha", 37, 37, 3, 3, "BSKH", ((0, 30), (4, 33))),
    Case("both_pad_gqa4", 29, 29, 8, 2, "BSKH", ((3, 20), (0, 29))),
    # Prefill of 20 left-padded prompt slots into an empty cache of 50 (T != S).
    Case("prefill_cache", 20, 50, 4, 2, "BKSH", (6, 0, 19), index=0),
    # Decode one token at slot 33 of a 50-slot cache.
    Case("decode", 1, 50, 4, 2, "BKSH", (6, 0, 30), index=33),
    # Several tokens at once into the cache (T = 7 at slot 20).
    Case("chunk_cache", 7, 50, 6, 3, "BKSH", (2, 0), index=20),
]


def _inputs(c: Case, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    b = len(c.rows)
    kv_shape = (b, c.k, c.s, H) if c.layout == "BKSH" else (b, c.s, c.k, H)
    q = rng.normal(size=(b, c.t, c.n, H)).astype(dtype)
    k = rng.normal(size=kv_shape).astype(dtype)
    v = rng.normal(size=kv_shape).astype(dtype)
    if c.index is None:
        start, end = (np.array(x, np.int32) for x in zip(*c.rows, strict=True))
        mask = attn.Mask(jnp.asarray(start), jnp.asarray(end))
    else:
        mask = attn.Mask.for_cache(jnp.asarray(c.rows, jnp.int32), c.index, c.t)
    return q, k, v, mask


def _dense(c: Case, mask) -> np.ndarray:
    """The [B, T, S] mask written out by hand from the case (independent of Mask.dense)."""
    b = len(c.rows)
    out = np.zeros((b, c.t, c.s), bool)
    for r in range(b):
        for t in range(c.t):
            for s in range(c.s):
                if c.index is None:
                    lo, hi = c.rows[r]
                    out[r, t, s] = lo <= s < hi and s <= t
                else:
                    out[r, t, s] = c.rows[r] <= s <= c.index + t
    np.testing.assert_array_equal(np.asarray(mask.dense(c.t, c.s)), out)
    return out


def _bskh(x, layout):
    return np.swapaxes(x, 1, 2) if layout == "BKSH" else x


def _bounds(c: Case, q, k, v, dense, cot):
    """Sum-of-|terms| scales (see the module docstring), float64, for out and (dq, dk, dv)."""
    q, k, v, cot = (np.asarray(x, np.float64) for x in (q, k, v, cot))
    k, v = _bskh(k, c.layout), _bskh(v, c.layout)  # [B, S, K, H]
    g, scale = c.n // c.k, H**-0.5
    qg = q.reshape(q.shape[0], c.t, c.k, g, H)
    sc = np.einsum("btkgh,bskh->bkgts", qg, k) * scale
    sc = np.where(dense[:, None, None], sc, -np.inf)
    m = np.max(sc, -1, keepdims=True)
    p = np.where(np.isfinite(m), np.exp(sc - np.where(np.isfinite(m), m, 0)), 0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)  # [B, K, G, T, S]
    kappa = scale * np.einsum("btkgh,bskh->bkgts", np.abs(qg), np.abs(k)).max()
    do = np.abs(cot).reshape(qg.shape)
    a_out = np.einsum("bkgts,bskh->btkgh", p, np.abs(v))
    dov = np.einsum("btkgh,bskh->bkgts", do, np.abs(v))
    e = p * (dov + (p * dov).sum(-1, keepdims=True))
    a_v = np.einsum("bkgts,btkgh->bskh", p, do)
    a_q = scale * np.einsum("bkgts,bskh->btkgh", e, np.abs(k))
    a_k = scale * np.einsum("bkgts,btkgh->bskh", e, np.abs(qg))
    factor = (c.s + c.t + H) * (1 + kappa)
    return factor * a_out.max(), [factor * a.max() for a in (a_q, a_k, a_v)]


def _reference(c: Case, q, k, v, mask, cot):
    """naive in float64: output and the (q, k, v) gradients of <out, cot>."""
    with jax.enable_x64(True):
        q, k, v, cot = (jnp.asarray(x, jnp.float64) for x in (q, k, v, cot))
        m = jax.tree.map(jnp.asarray, mask)

        def f(q, k, v):
            return attn.naive(q, k, v, m, kv_layout=c.layout, scale=H**-0.5)

        out, vjp = jax.vjp(f, q, k, v)
        return np.asarray(out), [np.asarray(x) for x in vjp(cot)]


def _run(c: Case, impl, q, k, v, mask, cot, **kw):
    def f(q, k, v):
        return attn.attend(q, k, v, mask, impl=impl, kv_layout=c.layout, **kw)

    out, vjp = jax.vjp(jax.jit(f), jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    return np.asarray(out), [np.asarray(x) for x in vjp(jnp.asarray(cot))]


def _check(c: Case, impl, rows_of_interest, **kw):
    q, k, v, mask = _inputs(c)
    dense = _dense(c, mask)
    keep = rows_of_interest(mask, dense)  # [B, T]: queries whose output is specified
    cot = np.random.default_rng(1).normal(size=q.shape) * keep[:, :, None, None]
    tol_out, tol_grads = _bounds(c, q, k, v, dense, cot)
    ref_out, ref_grads = _reference(c, q, k, v, mask, cot)
    for name in (impl, "naive"):  # naive in float32 must meet the same bound
        out, grads = _run(c, name, q, k, v, mask, cot, **kw)
        assert np.all(np.isfinite(out)), name
        err = np.abs(out - ref_out)[keep].max()
        assert err <= tol_out, (name, "out", err, tol_out)
        for label, gr, ref, tol in zip("qkv", grads, ref_grads, tol_grads, strict=True):
            assert gr.dtype == np.float32
            err = np.abs(gr - ref).max()
            assert err <= tol, (name, f"d{label}", err, tol)


def _seen(mask, dense):
    return dense.any(-1)  # queries that see at least one key


def _real(mask, dense):
    """Queries at real token slots (the kernels' contract); uncached only."""
    t = np.arange(dense.shape[1])[None]
    return (t >= np.asarray(mask.kv_start)[:, None]) & (t < np.asarray(mask.kv_end)[:, None])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_blockwise_matches_naive(case):
    # Tiles of 8 x 16 with lengths that do not divide: shifted last tiles, causal tile skipping.
    _check(case, "xla_blockwise", _seen, block_q=8, block_k=16)


def test_blockwise_single_tile_and_default_tiles():
    _check(CASES[0], "xla_blockwise", _seen)  # 256 tiles > T: one tile each way


def test_fully_masked_rows_are_finite_zero():
    c = CASES[0]
    q, k, v, mask = _inputs(c)
    out = np.asarray(attn.attend(q, k, v, mask, impl="xla_blockwise", block_q=8, block_k=16))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[2], 0.0)  # the all-padding row
    np.testing.assert_array_equal(out[0, :5], 0.0)  # left-padding queries see nothing
    naive = np.asarray(attn.attend(q, k, v, mask, impl="naive"))
    assert np.all(np.isfinite(naive))  # the finite MASK_VALUE: a uniform softmax, not NaN


def test_decode_never_reads_past_the_filled_tiles():
    """Key tiles beyond the last one a query needs are not visited: NaN there changes nothing."""
    c = CASES[4]  # decode at slot 33, S = 50
    q, k, v, mask = _inputs(c)
    bk = 8
    first_unread = -(-(c.index + c.t) // bk) * bk  # 40
    poisoned = [x.copy() for x in (k, v)]
    for x in poisoned:
        x[:, :, first_unread:] = np.nan
    kw = dict(impl="xla_blockwise", kv_layout="BKSH", block_q=8, block_k=bk)
    clean = np.asarray(attn.attend(q, k, v, mask, **kw))
    dirty = np.asarray(attn.attend(q, *poisoned, mask, **kw))
    np.testing.assert_array_equal(dirty, clean)
    # The same poison reaches naive, which reads every slot: the test can tell the difference.
    assert np.isnan(
        np.asarray(attn.attend(q, *poisoned, mask, impl="naive", kv_layout="BKSH"))
    ).any()


def test_cudnn_left_padding_rotation_on_cpu():
    """The cuDNN wrapper's left->right padding rotation, run through jax.nn's XLA backend."""
    c = CASES[0]
    q, k, v, mask = _inputs(c)
    dense = _dense(c, mask)
    keep = _real(mask, dense)
    out = attn._cudnn(*map(jnp.asarray, (q, k, v)), mask, H**-0.5, implementation="xla")
    ref = np.asarray(attn.attend(q, k, v, mask, impl="naive"))
    tol, _ = _bounds(c, q, k, v, dense, q)
    assert np.abs(np.asarray(out) - ref)[keep].max() <= 2 * tol
    np.testing.assert_array_equal(np.asarray(out)[~keep], 0.0)


def test_selector_on_cpu():
    q, k, v, mask = _inputs(CASES[0])
    q, k = jnp.asarray(q), jnp.asarray(k)
    assert attn.resolve("auto", q, k, mask) == "xla_blockwise"
    assert attn.resolve("naive", q, k, mask) == "naive"
    with pytest.raises(ValueError, match="needs a GPU"):
        attn.attend(q, k, v, mask, impl="cudnn")
    with pytest.raises(ValueError, match="needs a TPU"):
        attn.attend(q, k, v, mask, impl="splash")
    with pytest.raises(ValueError, match="model.attention must be one of"):
        attn.attend(q, k, v, mask, impl="flash")


@pytest.mark.slow
def test_splash_interpret_matches_naive():
    """The TPU splash kernel in Pallas interpret mode (slow on CPU): real rows only."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    _check(CASES[2], "splash", _real, interpret=True)


@pytest.mark.slow
def test_splash_interpret_under_a_mesh_matches_naive():
    """Splash under jax.shard_map (rows over fsdp, heads over tensor: one query head group and
    its kv head per device), as the train step and the prefill run it on a multi-chip TPU."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    from apo_jax.infra import sharding

    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2, devices=jax.devices()[:4])
    c = CASES[2]  # 2 rows, 8 query heads over 2 kv heads
    assert attn._splash_split(mesh, len(c.rows), c.n, c.k) == (("data", "fsdp"), "tensor")
    with attn.kernels_split_over(mesh):
        _check(c, "splash", _real, interpret=True)


def test_bf16_runs_close_to_float32():
    c = CASES[0]
    q, k, v, mask = _inputs(c)
    dense = _dense(c, mask)
    keep = _seen(mask, dense)
    cot = np.random.default_rng(1).normal(size=q.shape) * keep[:, :, None, None]
    tol_out, tol_grads = _bounds(c, q, k, v, dense, cot)
    ref_out, ref_grads = _reference(c, q, k, v, mask, cot)
    b16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    cot16 = cot.astype(jnp.bfloat16)
    out, grads = _run(c, "xla_blockwise", *b16, mask, cot16, block_q=8, block_k=16)
    assert out.dtype == jnp.bfloat16
    # bf16 rounding of the inputs and of p before the value matmul: same bound, bf16 eps.
    scale = EPS_BF16 / EPS32
    assert np.abs(out.astype(np.float32) - ref_out)[keep].max() <= scale * tol_out
    for gr, ref, tol in zip(grads, ref_grads, tol_grads, strict=True):
        assert np.abs(gr.astype(np.float32) - ref).max() <= scale * tol


def _train_temp_bytes(impl, t, n, h, block=64, k=2):
    def f(q, kk, v, valid):
        out = attn.attend(
            q, kk, v, attn.Mask.from_valid(valid), impl=impl, block_q=block, block_k=block
        )
        return jnp.sum(out**2)

    sds = jax.ShapeDtypeStruct
    args = (
        sds((1, t, n, h), jnp.float32),
        sds((1, t, k, h), jnp.float32),
        sds((1, t, k, h), jnp.float32),
        sds((1, t), jnp.bool_),
    )
    compiled = jax.jit(jax.grad(f, (0, 1, 2))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_train_memory_is_linear_in_length():
    """Forward + backward temporaries, from XLA's memory analysis of the compiled gradient.
    Bound: 8 float32 [B, K, G, bq, bk] tiles + 16 float32 [B, T, N, H] buffers; naive's
    float32 [B, N, T, T] scores alone exceed it at T = 512, so the bound tells them apart."""
    n, h, block = 4, 16, 64
    for t in (128, 256, 512):
        bound = 4 * (8 * n * block * block + 16 * t * n * h)
        used = _train_temp_bytes("xla_blockwise", t, n=n, h=h, block=block)
        assert used <= bound, (t, used, bound)
    naive = _train_temp_bytes("naive", 512, n=n, h=h)
    assert naive > 4 * (8 * n * block * block + 16 * 512 * n * h), naive


# --- the model's `attention` argument (model.attention) -----------------------------------------
def _tiny_models(**kw):
    from apo_jax.models import qwen3 as model_lib

    cfg = model_lib.Qwen3Config.tiny()
    naive = model_lib.init_model(cfg, seed=3, **kw)
    blockwise = model_lib.init_model(cfg, seed=3, attention="xla_blockwise", **kw)
    return model_lib, naive, blockwise


def test_model_blockwise_logits_and_grads_match_naive():
    from flax import nnx

    _, naive, blockwise = _tiny_models(remat=True)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 128, (3, 11)), jnp.int32)
    valid = jnp.asarray([[0] * 3 + [1] * 8, [1] * 11, [0] * 2 + [1] * 6 + [0] * 3], bool)

    def loss(model):
        logp = jax.nn.log_softmax(model(ids, attention_mask=valid))  # [B, T, V]
        return jnp.sum(jnp.where(valid[..., None], logp, 0.0)[..., :5]), logp

    fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    (l1, lp1), g1 = fn(naive)
    (l2, lp2), g2 = fn(blockwise)
    real = np.asarray(valid)
    # Same convention as test_model's padding test (log-probs of order 5).
    np.testing.assert_allclose(np.asarray(lp2)[real], np.asarray(lp1)[real], atol=1e-5)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        scale = float(np.abs(np.asarray(x)).max()) + 1e-30
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5 * scale)


def test_model_blockwise_cached_decode_equals_uncached_forward():
    from flax import nnx

    from apo_jax.rollout import kv_cache as kv_cache_lib

    model_lib, naive, blockwise = _tiny_models()
    p, steps = 6, 4
    ids = np.random.default_rng(5).integers(1, 128, (2, p + steps)).astype(np.int32)
    ids[0, :2] = 0  # row 0: a prompt of 4 left-padded to 6
    starts = jnp.asarray([2, 0], jnp.int32)
    valid = jnp.arange(p + steps)[None, :] >= starts[:, None]
    full = np.asarray(nnx.jit(lambda m: m(jnp.asarray(ids), attention_mask=valid))(naive))

    @nnx.jit
    def run(model):
        cache = kv_cache_lib.init(model.cfg, starts, p + steps)
        pos = kv_cache_lib.positions(starts, 0, p)
        # Prefill writes slots 0..P-1 of a longer cache (T != S): described with an offset.
        prefill = attn.Mask.for_cache(starts, jnp.int32(0), p)
        hidden, layers = model.hidden_states(jnp.asarray(ids[:, :p]), pos, prefill, cache.layers, 0)
        outs = [model.logits(hidden[:, -1:])]
        for i in range(steps - 1):
            index = jnp.int32(p + i)
            mask = attn.Mask.for_cache(starts, index, 1)
            pos = kv_cache_lib.positions(starts, index, 1)
            hidden, layers = model.hidden_states(
                jnp.asarray(ids[:, p + i : p + i + 1]), pos, mask, layers, index
            )
            outs.append(model.logits(hidden))
        return jnp.concatenate(outs, axis=1)  # [B, steps, V]

    cached = np.asarray(run(blockwise))
    np.testing.assert_allclose(cached, full[:, p - 1 : p + steps - 1], atol=1e-5)


def test_sampler_and_scoring_with_blockwise_match_naive():
    # The two callers that build the described mask: the sampler (prefill Mask without an
    # offset, decode Mask.for_cache) and the train step's scorer (Mask.from_valid).
    from flax import nnx

    from apo_jax.rollout import sampler as sampler_lib
    from apo_jax.trainer import step as step_lib

    _, naive, blockwise = _tiny_models()
    prompts = [[5, 9, 3], list(range(1, 15)), [7] * 9]  # left-padded to the 16 bucket
    outs, scores = [], []
    for model in (naive, blockwise):
        graphdef, params = nnx.split(model)
        smp = sampler_lib.Sampler(graphdef, max_prompt_len=16, max_new_tokens=6)
        out = smp.sample(params, prompts, n=2, rng=3)
        ids, lengths = smp.pad(prompts)
        batch = {
            "prompt_ids": jnp.repeat(jnp.asarray(ids), 2, axis=0),
            "prompt_mask": jnp.repeat(jnp.arange(16)[None] >= 16 - lengths[:, None], 2, axis=0),
            "completion_ids": out.tokens,
            "completion_mask": out.mask,
        }
        scores.append(step_lib.completion_logprobs(graphdef, params, batch, chunk=64))
        outs.append(out)
    np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(outs[0].tokens))
    np.testing.assert_allclose(np.asarray(outs[1].logp), np.asarray(outs[0].logp), atol=1e-5)
    real = np.asarray(outs[0].mask)
    np.testing.assert_allclose(np.asarray(scores[1])[real], np.asarray(scores[0])[real], atol=1e-5)
    # and the scorer agrees with the sampler's own log-probs (independent code paths)
    np.testing.assert_allclose(
        np.asarray(scores[1])[real], np.asarray(outs[0].logp)[real], atol=1e-5
    )


# --- packed rows (segment ids) ------------------------------------------------------------------
# Row 0: sequences of 5, 9, 3 and 12 tokens, then 8 of padding; row 1: 20 + 17 tokens.
SEGMENTS = np.array(
    [[1] * 5 + [2] * 9 + [3] * 3 + [4] * 12 + [0] * 8, [1] * 20 + [2] * 17], np.int32
)
PACKED = Case("packed", 37, 37, 4, 2, "BSKH", ())


def _packed_inputs(seed=0):
    c = PACKED
    q, k, v, _ = _inputs(dataclasses.replace(c, rows=((0, 37), (0, 37))), seed)
    return q, k, v, attn.Mask.from_segments(jnp.asarray(SEGMENTS))


def _per_segment_reference(q, k, v, cot):
    """Each sequence attended alone (its own unpacked row, float64 naive), put back in place:
    independent of the segment-id logic."""
    out = np.zeros(q.shape)
    grads = [np.zeros(x.shape) for x in (q, k, v)]
    for r, row in enumerate(SEGMENTS):
        for s_id in set(row.tolist()) - {0}:
            cols = np.flatnonzero(row == s_id)
            sl = lambda x, r=r, cols=cols: x[r : r + 1, cols]
            n = cols.size
            c = Case("one", n, n, PACKED.n, PACKED.k, "BSKH", ((0, n),))
            m = attn.Mask(jnp.zeros((1,), jnp.int32), jnp.full((1,), n, jnp.int32))
            o, g = _reference(c, sl(q), sl(k), sl(v), m, sl(cot))
            out[r, cols] = o[0]
            for full, part in zip(grads, g, strict=True):
                full[r, cols] = part[0]
    return out, grads


@pytest.mark.parametrize("impl", ["xla_blockwise", "naive"])
def test_packed_rows_equal_separate_rows(impl):
    """Blockwise (8 x 16 tiles that straddle segments: per-tile segment ranges skip the rest)
    and naive on packed rows vs each sequence alone, values and gradients."""
    q, k, v, mask = _packed_inputs()
    dense = np.asarray(mask.dense(PACKED.t, PACKED.s))
    keep = SEGMENTS > 0
    cot = np.random.default_rng(1).normal(size=q.shape) * keep[:, :, None, None]
    tol_out, tol_grads = _bounds(PACKED, q, k, v, dense, cot)
    ref_out, ref_grads = _per_segment_reference(q, k, v, cot)
    out, grads = _run(PACKED, impl, q, k, v, mask, cot, block_q=8, block_k=16)
    assert np.abs(out - ref_out)[keep].max() <= tol_out
    for label, gr, ref, tol in zip("qkv", grads, ref_grads, tol_grads, strict=True):
        assert np.abs(gr - ref).max() <= tol, label


@pytest.mark.parametrize("impl", ["xla_blockwise", "naive"])
def test_a_segment_ignores_its_neighbours(impl):
    """New q, k, v in sequence 2 of row 0 leave every other sequence's outputs and gradients
    bit-identical (masked keys contribute exactly 0 in both implementations)."""
    q, k, v, mask = _packed_inputs()
    cot = np.random.default_rng(1).normal(size=q.shape) * (SEGMENTS > 0)[:, :, None, None]
    other = [x.copy() for x in (q, k, v)]
    nq, nk, nv, _ = _packed_inputs(seed=7)
    cols = np.flatnonzero(SEGMENTS[0] == 2)
    for x, new in zip(other, (nq, nk, nv), strict=True):
        x[0, cols] = new[0, cols]
    kw = dict(block_q=8, block_k=16)
    out1, g1 = _run(PACKED, impl, q, k, v, mask, cot, **kw)
    out2, g2 = _run(PACKED, impl, *other, mask, cot, **kw)
    rest = SEGMENTS > 0  # (padding queries' outputs are implementation-defined)
    rest[0, cols] = False
    np.testing.assert_array_equal(out2[rest], out1[rest])
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_array_equal(b[rest], a[rest])
    assert not np.array_equal(out2[0, cols], out1[0, cols])  # the change did reach its segment


@pytest.mark.slow
def test_splash_interpret_packed_rows():
    """Splash's own segment ids on packed rows (interpret mode): real tokens vs naive."""
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    q, k, v, mask = _packed_inputs()
    keep = SEGMENTS > 0
    ref = np.asarray(attn.attend(q, k, v, mask, impl="naive"))
    out = np.asarray(attn.attend(q, k, v, mask, impl="splash", interpret=True))
    dense = np.asarray(mask.dense(PACKED.t, PACKED.s))
    tol, _ = _bounds(PACKED, q, k, v, dense, q)
    assert np.abs(out - ref)[keep].max() <= 2 * tol
