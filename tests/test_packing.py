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
from apo_jax.trainer import grads as grads_lib
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
    split = lambda x: grads_lib.split_rows(jnp.asarray(x), micro)
    parts, b_parts = jax.tree.map(split, pl), jax.tree.map(split, b)
    got = []
    for k in range(micro):
        pk, bk = jax.tree.map(lambda x, k=k: x[k], (parts, b_parts))
        assert np.asarray(pk.src).shape[0] % 2 == 0
        m = nnx.merge(graphdef, params)
        cm = bk["completion_mask"]
        got.append(packing.score(m, pk, bk["prompt_ids"], bk["completion_ids"], cm, chunk=64))
    got = np.asarray(grads_lib.unsplit_rows(jnp.stack(got)))
    real = b["completion_mask"] > 0
    np.testing.assert_allclose(got[real], ref[real], atol=1e-5 * (1 + np.abs(ref).max()))


# --- the train step on packed rows ---------------------------------------------------------------
def _step_batch(p, g, seed=0):
    rng = np.random.RandomState(seed)
    b = p * g
    pm = np.zeros((b, TP), np.int32)
    cm = np.zeros((b, TC), np.float32)
    for i in range(b):  # prompts of 1..TP tokens, completions of 0..TC (one empty)
        pm[i, TP - 1 - i % TP :] = 1
        cm[i, : (3 * i + 2) % (TC + 1) if i != 1 else 0] = 1
    old = -4.0 + 0.3 * rng.randn(b, TC)
    return dict(
        prompt_ids=rng.randint(0, CFG.vocab_size, (b, TP)).astype(np.int32),
        prompt_mask=pm,
        completion_ids=rng.randint(0, CFG.vocab_size, (b, TC)).astype(np.int32),
        completion_mask=cm,
        rewards=rng.randint(0, 2, (b,)).astype(np.float32),
        old_logp=old.astype(np.float32),
        ref_logp=(old + 0.1 * rng.randn(b, TC)).astype(np.float32),
        sampler_logp=(old + 0.2 * rng.randn(b, TC)).astype(np.float32),
        correct=rng.randint(0, 2, (b,)).astype(np.float32),
    )


def _train_step(loss, micro, p, g, batch, pack=None, mesh=None):
    """One SGD(lr = 1) update from the same init: (metrics, gradient as old - new params)."""
    import optax

    from apo_jax.infra import sharding as sharding_lib
    from apo_jax.trainer import build, records
    from configs import base

    c = base.get_config("debug")
    c.rollout.group_size, c.rollout.prompts_per_step = g, p
    c.optim.micro_batches, c.optim.mini_batches, c.optim.grad_clip = micro, 1, 0.0
    c.loss.name = loss
    graphdef, params = nnx.split(model_lib.init_model(CFG, seed=0), nnx.Param)
    tx = optax.sgd(1.0)
    spec = build.step_spec(build.plan(c), CFG.vocab_size)
    state = step_lib.init_train_state(params, tx, 0, spec.schedule)
    fields = dict(batch, pack=pack)
    if mesh is None:
        fns = step_lib.build(graphdef, spec, tx)
    else:
        shardings = sharding_lib.tree_shardings(state, mesh)
        state = jax.device_put(state, shardings)
        fns = step_lib.build(graphdef, spec, tx, mesh, shardings)
        fields = jax.device_put(fields, sharding_lib.batch_sharding(mesh))
    old = jax.device_get(state.params)
    new, metrics = fns.train_step(state, records.Batch(**fields))
    grads = jax.tree.map(
        lambda a, b: np.asarray(a) - np.asarray(b), old, jax.device_get(new.params)
    )
    return jax.device_get(metrics), grads, old


def _assert_same_step(ref, got):
    """As test_micro_batches: metrics are means of O(1) terms over <= 96 tokens (a few eps of
    the scale); a gradient leaf is a sum over tokens (1e-5 of the leaf's scale) read as
    old - new params (2 eps·|param| more per entry)."""
    (m1, g1, params), (m2, g2, _) = ref, got
    assert m1.keys() == m2.keys()
    eps = float(np.finfo(np.float32).eps)
    for k in m1:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=64 * eps, err_msg=k)
    leaves = zip(jax.tree.leaves(g1), jax.tree.leaves(g2), jax.tree.leaves(params), strict=True)
    for a, b, w in leaves:
        tol = 1e-5 * float(np.abs(a).max()) + 2 * eps * np.abs(np.asarray(w)) + 1e-12
        assert np.all(np.abs(b - a) <= tol), float(np.max(np.abs(b - a) - tol))


@pytest.mark.parametrize(
    "loss,micro", [("apo", 1), ("apo", 2), ("grpo", 2)], ids=["fused", "cotangent", "per_token"]
)
def test_train_step_on_packed_rows_equals_padded(loss, micro):
    """All three gradient strategies: same loss, metrics and gradient with the batch packed
    (one plan per micro-batch of the step's strided split)."""
    p, g = 2, 4
    batch = _step_batch(p, g)
    pl = packing.for_micro_batches(batch["prompt_mask"], batch["completion_mask"], 24, micro)
    ref = _train_step(loss, micro, p, g, batch)
    _assert_same_step(ref, _train_step(loss, micro, p, g, batch, pack=pl))


def test_train_step_on_packed_rows_on_a_mesh():
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices")
    from apo_jax.infra import sharding as sharding_lib

    p, g, micro = 4, 2, 2
    batch = _step_batch(p, g, seed=1)
    mesh = sharding_lib.make_mesh(2, 2, 2)
    pl = packing.for_micro_batches(batch["prompt_mask"], batch["completion_mask"], 24, micro, 4)
    ref = _train_step("apo", micro, p, g, batch)
    _assert_same_step(ref, _train_step("apo", micro, p, g, batch, pack=pl, mesh=mesh))


def test_sampler_anchor_agrees_with_the_recomputed_one_in_float32():
    """loss.anchor=sampler: the sampler's own log-probs (float32 compute, float32 cache) equal
    the trainer's float32 scoring of the same rows within float32 rounding (elementwise values
    of order log V: rtol 1e-5 of the scale, as above)."""
    from apo_jax.rollout import sampler as sampler_lib
    from apo_jax.trainer import records

    model = model_lib.init_model(CFG, seed=2, attention="xla_blockwise")
    graphdef, params = nnx.split(model, nnx.Param)
    smp = sampler_lib.Sampler(graphdef, max_prompt_len=8, max_new_tokens=TC)
    out = smp.sample(params, [[3, 4, 5], [6, 7, 8, 9, 10, 11, 12]], n=2, rng=3)
    batch = records.Batch(
        prompt_ids=out.prompt_ids,
        prompt_mask=out.prompt_mask,
        completion_ids=out.tokens,
        completion_mask=out.mask.astype(jnp.float32),
        rewards=jnp.zeros((4,)),
        sampler_logp=out.logp,
    )
    fns = step_lib.StepFns(
        None,
        jax.jit(
            lambda p, b: step_lib.completion_logprobs(graphdef, p, b, chunk=64, precision="float32")
        ),
    )
    recomputed = step_lib.score(fns, params, None, batch, anchor="recompute").old_logp
    reused = step_lib.score(fns, params, None, batch, anchor="sampler").old_logp
    real = np.asarray(out.mask)
    ref = np.asarray(recomputed)
    assert real.sum() > 0
    np.testing.assert_allclose(
        np.asarray(reused)[real], ref[real], atol=1e-5 * (1 + np.abs(ref).max())
    )


def test_anchor_sampler_needs_alike_computation():
    from apo_jax.trainer import build
    from configs import base

    c = base.get_config("debug")
    c.loss.anchor = "sampler"
    c.model.dtype = "bfloat16"
    with pytest.raises(ValueError, match="config.loss.anchor"):
        build.plan(c)
    c.loss.rollout_correction = "tis_token"  # a correction makes it valid
    build.plan(c)
    c.loss.rollout_correction = "none"
    c.model.dtype = c.model.logprob_precision = c.rollout.cache_dtype = "float32"
    build.plan(c)
    c.optim.packing = "packed"
    c.optim.pack_len = 3
    with pytest.raises(ValueError, match="config.optim.pack_len"):
        build.plan(c)
    c.optim.pack_len = 0  # the batch's own longest: always fits
    build.plan(c)


def test_a_packed_run_matches_a_padded_one(tmp_path):
    """The loop with optim.packing=packed (toy task, one step): the same rollout, and the
    update's loss, gradient norm and metrics of optim.packing=none within float32 rounding
    (test_micro_batches' convention), on fewer computed tokens (perf/pad_frac)."""
    import json

    from apo_jax.trainer import loop
    from configs import toy

    def run(mode):
        c = toy.get_config("debug")
        c.mesh.data, c.total_steps, c.checkpoint.every_steps, c.eval.num_prompts = 1, 1, 0, 0
        c.optim.packing = mode
        loop.run(c, str(tmp_path / mode))
        return json.loads(open(tmp_path / mode / "metrics.jsonl").readline())

    none, packed = run("none"), run("packed")
    assert packed["perf/pad_frac"] < none["perf/pad_frac"]
    eps = float(np.finfo(np.float32).eps)
    for k, v in none.items():
        if k.startswith(("reward/", "rollout/len", "rollout/trunc")):
            assert packed[k] == v, k  # the rollout does not depend on the update's layout
        elif not k.startswith("perf/") and k != "rollout/logp_gap":
            np.testing.assert_allclose(packed[k], v, rtol=1e-5, atol=64 * eps, err_msg=k)
