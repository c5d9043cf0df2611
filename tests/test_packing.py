"""trainer/packing.py: pack plans, trimmed lengths, and packed scoring equal to padded scoring.

Tolerances: a log-prob is an elementwise value of order log V (a forward pass of a 2-layer
model): rtol 1e-5 of its scale, as in test_attention's model test; a gradient leaf is a sum over
tokens with cancellation: 1e-5 of the leaf's largest entry, the same convention.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apo_jax.models import attention as attention_lib
from apo_jax.models import qwen3 as model_lib
from apo_jax.trainer import packing
from apo_jax.trainer import step as step_lib

CFG = model_lib.Qwen3Config.tiny()
TP, TC = 7, 12


def _batch(prompt_lens, comp_lens, seed=0):
    """Left-padded prompts, right-padded completions of the given real lengths."""
    rng = np.random.default_rng(seed)
    b = len(prompt_lens)
    pm = np.zeros((b, TP), np.int32)
    cm = np.zeros((b, TC), np.float32)
    for i, (p, c) in enumerate(zip(prompt_lens, comp_lens, strict=True)):
        pm[i, TP - p :] = 1
        cm[i, :c] = 1
    return dict(
        prompt_ids=rng.integers(0, CFG.vocab_size, (b, TP)).astype(np.int32),
        prompt_mask=pm,
        completion_ids=rng.integers(0, CFG.vocab_size, (b, TC)).astype(np.int32),
        completion_mask=cm,
    )


def test_bucket_and_trimmed_length():
    sizes = {packing.bucket(n, 1280) for n in range(1, 1281)}
    assert sorted(sizes) == [64, 96, 128, 192, 256, 384, 512, 768, 1024, 1280]
    for n in (1, 64, 65, 97, 700, 1280):
        assert n <= packing.bucket(n, 1280) <= max(64, 1.5 * n)
    cm = np.zeros((3, 256))
    cm[0, :70], cm[1, :10] = 1, 1
    assert packing.trimmed_length(cm, 256) == 96
    assert packing.trimmed_length(np.zeros((2, 256)), 256) == 64  # all empty: the floor
    with pytest.raises(ValueError):
        packing.bucket(300, 256)


def test_plan_lays_every_real_token_once():
    b = _batch([7, 3, 5, 1, 6, 2], [12, 4, 0, 9, 2, 12])
    pl = packing.plan(b["prompt_mask"], b["completion_mask"], 24)
    width = TP + TC
    valid = np.concatenate([b["prompt_mask"], b["completion_mask"]], 1).reshape(-1) > 0
    real = np.asarray(pl.segment_ids) > 0
    src = np.asarray(pl.src)[real]
    # every real token of every row with a completion, once; nothing else
    keep = valid & np.repeat(b["completion_mask"].sum(1) > 0, width)
    assert sorted(src.tolist()) == np.flatnonzero(keep).tolist()
    seg, pos = np.asarray(pl.segment_ids), np.asarray(pl.positions)
    for r in range(seg.shape[0]):
        for s_id in set(seg[r]) - {0}:
            cols = np.flatnonzero(seg[r] == s_id)
            assert np.all(np.diff(cols) == 1)  # contiguous
            np.testing.assert_array_equal(pos[r, cols], np.arange(cols.size))  # restart at 0
            row = np.asarray(pl.src)[r, cols] // width
            assert np.all(row == row[0])  # one batch row per segment
    # first-fit decreasing on lengths 19, 7, 10, 8, 14 (row 2 has no completion: not packed):
    # 19 | 14 + 10 | 8 + 7, by hand
    members = [sorted(set(np.asarray(pl.src)[r][seg[r] > 0] // width)) for r in range(3)]
    assert members == [[0], [3, 5], [1, 4]]
    assert seg.shape == (3, 24)
    assert pl.pad_frac == pytest.approx(1 - keep.sum() / seg.size)


def test_plan_errors_name_the_key():
    b = _batch([7, 3], [12, 4])
    with pytest.raises(ValueError, match="optim.pack_len"):
        packing.plan(b["prompt_mask"], b["completion_mask"], 16)
    with pytest.raises(ValueError, match="rows"):
        packing.plan(b["prompt_mask"], b["completion_mask"], 19, rows=1)


# --- packed scoring == padded scoring ----------------------------------------------------------
CASES = {
    # pack_len = the longest sequence: one sequence per row, one of them fills its row exactly
    "one_per_row": ([7, 3, 5, 6], [12, 9, 4, 12], 19),
    # many short sequences per row, an empty completion among them
    "many_per_row": ([2, 3, 1, 4, 2, 3], [3, 0, 5, 2, 4, 1], 32),
    # rows filled exactly by two sequences each (no row straddled, no padding in rows)
    "exact_fill": ([4, 4, 2, 2], [6, 6, 8, 8], 20),
}


def _padded_vs_packed(attention, prompt_lens, comp_lens, pack_len):
    model = model_lib.init_model(CFG, seed=1, attention=attention)
    graphdef, params = nnx.split(model, nnx.Param)
    b = _batch(prompt_lens, comp_lens, seed=len(prompt_lens))
    pl = packing.plan(b["prompt_mask"], b["completion_mask"], pack_len)
    cm = jnp.asarray(b["completion_mask"])

    def padded(params):
        logp, ent = step_lib.completion_logprobs(graphdef, params, b, chunk=50, with_entropy=True)
        return jnp.sum(logp * cm), (logp, ent)

    def packed(params):
        m = nnx.merge(graphdef, params)
        logp, ent = packing.score(
            m,
            pl,
            b["prompt_ids"],
            b["completion_ids"],
            cm,
            chunk=50,
            with_entropy=True,
        )
        return jnp.sum(logp * cm), (logp, ent)

    run = lambda f: jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return run(padded), run(packed), b["completion_mask"] > 0


@pytest.mark.parametrize("attention", ["xla_blockwise", "naive"])
@pytest.mark.parametrize("case", CASES)
def test_packed_equals_padded_logprobs_and_grads(case, attention):
    ((_, (lp1, h1)), g1), ((_, (lp2, h2)), g2), real = _padded_vs_packed(attention, *CASES[case])
    for ref, got in ((lp1, lp2), (h1, h2)):
        ref, got = np.asarray(ref), np.asarray(got)
        np.testing.assert_allclose(got[real], ref[real], atol=1e-5 * (1 + np.abs(ref).max()))
        np.testing.assert_array_equal(got[~real], 0.0)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        scale = float(np.abs(np.asarray(x)).max()) + 1e-30
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5 * scale)


def test_packed_scoring_on_a_mesh_equals_one_device():
    if jax.device_count() < 8:
        pytest.skip("needs --xla_force_host_platform_device_count=8")
    from apo_jax.infra import sharding as sharding_lib
    from apo_jax.models import decoder

    mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    model = model_lib.init_model(CFG, seed=1, attention="xla_blockwise")
    graphdef, params = nnx.split(model, nnx.Param)
    b = _batch([2, 3, 1, 4, 2, 3, 5, 7], [3, 0, 5, 2, 4, 12, 8, 1], seed=3)
    pl = packing.plan(b["prompt_mask"], b["completion_mask"], 24, row_multiple=4)
    assert np.asarray(pl.src).shape[0] % 4 == 0

    def grad_of_sum(params, pl, b):
        m = nnx.merge(graphdef, params)
        cm = b["completion_mask"]
        f = lambda m: jnp.sum(
            packing.score(m, pl, b["prompt_ids"], b["completion_ids"], cm, chunk=64) * cm
        )
        return jax.grad(lambda p: f(nnx.merge(graphdef, p)))(params), packing.score(
            m, pl, b["prompt_ids"], b["completion_ids"], cm, chunk=64
        )

    g1, lp1 = jax.jit(grad_of_sum)(params, pl, b)

    def traced(*args):
        with decoder.rows_split_over(mesh):
            return grad_of_sum(*args)

    state_sh = sharding_lib.tree_shardings(params, mesh)
    rows = sharding_lib.batch_sharding(mesh)
    params_s = jax.device_put(params, state_sh)
    pl_s, b_s = jax.device_put(pl, rows), jax.device_put(b, rows)
    g2, lp2 = jax.jit(traced)(params_s, pl_s, b_s)
    real = b["completion_mask"] > 0
    np.testing.assert_allclose(
        np.asarray(lp2)[real], np.asarray(lp1)[real], atol=1e-5 * (1 + np.abs(lp1).max())
    )
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        scale = float(np.abs(np.asarray(x)).max()) + 1e-30
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5 * scale)


def test_compiles_stay_bounded_across_lengths():
    """Twelve batches of varying lengths: the packed shapes come from the bucket sets, so the
    scorer traces at most once per (R, Sc) pair, far fewer times than batches."""
    model = model_lib.init_model(CFG, seed=1, attention="xla_blockwise")
    graphdef, params = nnx.split(model, nnx.Param)
    traces = []

    @jax.jit
    def scored(params, pl, b):
        traces.append(1)
        m = nnx.merge(graphdef, params)
        cm = b["completion_mask"]
        return packing.score(m, pl, b["prompt_ids"], b["completion_ids"], cm, chunk=64)

    rng = np.random.default_rng(0)
    shapes = set()
    for i in range(12):
        b = _batch(rng.integers(1, TP + 1, 8), rng.integers(0, TC + 1, 8), seed=i)
        pl = packing.plan(b["prompt_mask"], b["completion_mask"], 64)
        shapes.add((np.asarray(pl.src).shape, np.asarray(pl.score_pos).shape))
        scored(params, pl, b)
    assert len(traces) == len(shapes) <= 4, shapes


def test_mask_from_segments_blocks_cross_segment_attention():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0]])
    dense = np.asarray(attention_lib.Mask.from_segments(seg).dense(6, 6))[0]
    want = np.zeros((6, 6), bool)
    for q in range(5):
        for s in range(5):
            want[q, s] = s <= q and (q < 2) == (s < 2)
    np.testing.assert_array_equal(dense, want)


def test_choose_packs_only_when_it_computes_fewer_tokens():
    tc = 256
    pm = np.ones((8, 64), np.int32)
    full = np.ones((8, tc), np.float32)
    pl, length = packing.choose(pm, full, 64 + tc, tc)
    assert pl is None and length == tc  # all at the cap: packing saves nothing
    short = np.zeros((8, tc), np.float32)
    short[:, :40] = 1
    pl, length = packing.choose(pm, short, 64 + tc, tc)
    assert pl is not None and length == 0
    rows, ell = np.asarray(pl.src).shape
    assert rows * ell < 8 * (64 + packing.trimmed_length(short, tc))


def test_micro_batch_plans_follow_the_strided_split():
    """for_micro_batches: step._split of the interleaved plan gives micro-batch k (rows k,
    k + M, ...) a plan of its own rows, same shapes for all, scoring what the padded pass does."""
    model = model_lib.init_model(CFG, seed=1, attention="xla_blockwise")
    graphdef, params = nnx.split(model, nnx.Param)
    b = _batch([2, 3, 1, 4, 2, 3, 5, 7], [3, 0, 5, 2, 4, 12, 8, 1], seed=5)
    ref = np.asarray(step_lib.completion_logprobs(graphdef, params, b, chunk=64))
    micro = 2
    pl = packing.for_micro_batches(b["prompt_mask"], b["completion_mask"], 24, micro, 2)
    split = lambda x: step_lib._split(jnp.asarray(x), micro)
    parts, b_parts = jax.tree.map(split, pl), jax.tree.map(split, b)
    got = []
    for k in range(micro):
        pk, bk = jax.tree.map(lambda x, k=k: x[k], (parts, b_parts))
        assert np.asarray(pk.src).shape[0] % 2 == 0
        m = nnx.merge(graphdef, params)
        cm = bk["completion_mask"]
        got.append(packing.score(m, pk, bk["prompt_ids"], bk["completion_ids"], cm, chunk=64))
    got = np.asarray(step_lib._unsplit(jnp.stack(got)))
    real = b["completion_mask"] > 0
    np.testing.assert_allclose(got[real], ref[real], atol=1e-5 * (1 + np.abs(ref).max()))
