"""Rollout engines: `continuous` gives the rows `static` gives, bit for bit (CPU float32), with
refills and no recompilation; per-row cache positions; a refilled slot never reads its previous
occupant's keys; the on_finished hook. Tiny models only."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apo_jax.infra import sharding as sharding_lib
from apo_jax.models.qwen3 import Qwen3Config, init_model
from apo_jax.rollout import decode as decode_lib
from apo_jax.rollout import kv_cache as kv_cache_lib
from apo_jax.rollout import sampler as sampler_lib
from apo_jax.rollout import sampling

T_NEW = 10
BUCKETS = (8, 16, 32)
EOS = tuple(range(3, 128, 11))  # 12 of 128 ids: rows stop after ~10 tokens, lengths spread out
MIXED = (3, 20, 9, 5, 14)  # prompts of buckets 8, 32, 16, 8, 16: all padded to 32


def _model(attention="naive", **kw):
    cfg = Qwen3Config.tiny(vocab_size=128, tie_word_embeddings=False)
    model = init_model(cfg, seed=1, attention=attention, **kw)
    model.lm_head[...] = model.lm_head[...] * 8.0  # decisive, varied next-token distributions
    return nnx.split(model)


def _prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, 128, n).tolist() for n in lengths]


def _pair(graphdef, mesh=None, slots=4, refill=1, **kw):
    kw = dict(max_prompt_len=32, max_new_tokens=T_NEW, buckets=BUCKETS, eos_ids=EOS, **kw)
    static = sampler_lib.Sampler(graphdef, mesh=mesh, **kw)
    cont = sampler_lib.Sampler(
        graphdef, mesh=mesh, engine="continuous", slots=slots, refill=refill, **kw
    )
    return static, cont


def _assert_same(a, b):
    for name in a._fields:
        np.testing.assert_array_equal(
            np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name
        )


@pytest.mark.parametrize("attention", ["naive", "xla_blockwise"])
@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_continuous_rows_equal_static_rows(attention, temperature):
    # 10 rows through 4 slots, one refill at a time (most rows land in a slot another row used),
    # then the drain to 2 slots.
    graphdef, params = _model(attention)
    static, cont = _pair(graphdef, slots=4, temperature=temperature, top_k=20)
    prompts = _prompts(MIXED)
    want = static.sample(params, prompts, n=2, rng=3)
    got = cont.sample(params, prompts, n=2, rng=3)
    _assert_same(want, got)
    lengths = np.asarray(got.lengths)
    assert len(set(lengths.tolist())) >= 3 and lengths.max() == T_NEW, lengths  # varied, capped
    stats = cont.stats()
    decoded = int((lengths > 1).sum())  # rows that needed a slot (the rest stopped at once)
    assert decoded > 4 and stats["slots"] == 4 and stats["device_calls"] >= 3  # refill rounds
    # Each slot-step makes at most one token; at most 4 slots per iteration.
    assert 4 * stats["decode_steps"] >= stats["slot_steps"] >= int((lengths - 1).sum())
    # One round program per slot count (4, then 2 for the drain), whatever the refills; other
    # prompts of the same bucket and count, another refill pattern: no new program.
    assert cont.traces == {"prefill": 1, "decode": 2}
    again = _prompts((30, 2, 17, 8, 4), seed=1)
    _assert_same(static.sample(params, again, n=2, rng=4), cont.sample(params, again, n=2, rng=4))
    assert cont.traces == {"prefill": 1, "decode": 2}


def test_prompts_prefilled_in_groups_when_they_outgrow_the_slots():
    # 11 short prompts (bucket 8) through 2 slots: the prompts' caches would outgrow the slots'
    # (2 x 18 positions), so they are prefilled 4 at a time (prompts 0-3, 4-7, then 7-10 of which
    # 7 is not queued again). Same tokens and lengths as static; the log-probs may round
    # differently in the last bits, as the prefill batch differs (as with rows_per_chunk).
    graphdef, params = _model()
    static, cont = _pair(graphdef, slots=2, temperature=0.8, top_k=20)
    prompts = _prompts((3, 5, 7, 2, 6, 4, 8, 1, 5, 3, 7), seed=2)
    finished = []
    want = static.sample(params, prompts, n=1, rng=5)
    got = cont.sample(params, prompts, n=1, rng=5, on_finished=lambda r, t: finished.extend(r))
    for name in ("tokens", "mask", "lengths", "truncated", "prompt_ids", "prompt_mask"):
        np.testing.assert_array_equal(getattr(want, name), getattr(got, name), err_msg=name)
    for name in ("logp", "sample_logp"):
        # Another prefill batch only reorders float32 sums: a few ulps of the log-probs' scale.
        ref = getattr(want, name)
        tol = 64 * np.finfo(np.float32).eps * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(ref, getattr(got, name), rtol=0, atol=tol, err_msg=name)
    assert sorted(finished) == list(range(11))
    assert cont.continuous._group(11, 8, 1, 2) == 4 and cont.traces["prefill"] == 2
    assert cont.stats()["device_calls"] >= 3 + 2  # three prefills, rounds


def test_on_finished_reports_every_row_once_while_others_decode():
    graphdef, params = _model()
    static, cont = _pair(graphdef, slots=2, temperature=1.0)
    prompts = _prompts(MIXED, seed=3)
    for smp in (static, cont):
        calls = []
        out = smp.sample(
            params, prompts, n=2, rng=6, on_finished=lambda r, t, c=calls: c.append((r, t))
        )
        rows = np.concatenate([r for r, _ in calls])
        assert sorted(rows.tolist()) == list(range(10))
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for r, toks in calls:
            for i, tok in zip(r, toks, strict=True):
                np.testing.assert_array_equal(tok, tokens[i, : lengths[i]])
        if smp is static:
            assert len(calls) == 1  # static: once, at the end
    assert len(calls) > 2  # continuous: in several batches, as rows finish


@pytest.mark.parametrize("attention", ["naive", "xla_blockwise"])
def test_refilled_slot_never_reads_previous_keys(attention):
    # A slot whose cache beyond the new row's prompt holds large leftovers decodes exactly as a
    # clean slot; a mask reaching one slot further would read them (the check can fail).
    graphdef, params = _model(attention)
    sp = sampling.SamplingParams.make()
    p, t = 8, 6
    ids = jnp.asarray(np.stack([[0] * 3 + _prompts((5,), 4)[0], _prompts((8,), 5)[0]]), jnp.int32)
    take = jnp.asarray([1, 0], jnp.int32)  # slot 0 takes prompt 1, slot 1 prompt 0

    @functools.partial(jax.jit, static_argnums=2)
    def one_step(params, cache, reach):
        model = nnx.merge(graphdef, params)
        key, rows = jax.random.key(0), jnp.arange(2)
        pre = decode_lib.prefill(
            model, ids, jnp.asarray([5, 8]), key, rows, n=1, sp=sp, dtype=jnp.float32
        )
        cache = kv_cache_lib.admit(cache, pre.cache, take)
        tables = decode_lib.rope(model, cache, p, t)
        # reach 1: the faulty variant, whose mask ends one slot past the row's own keys
        cache = dataclasses.replace(cache, index=cache.index + reach)
        tok, keys, lengths = pre.tokens[take], pre.keys[take], jnp.ones(2, jnp.int32)
        return decode_lib.step(model, cache, tok, keys, lengths, tables, p, sp)[:3]

    cfg = nnx.merge(graphdef, params).cfg
    clean = kv_cache_lib.init(cfg, jnp.zeros((2,), jnp.int32), p + t)
    junk = jax.tree.map(lambda x: x + 50.0 * jax.random.normal(jax.random.key(1), x.shape), clean)
    junk = dataclasses.replace(junk, index=clean.index, starts=clean.starts)
    for a, b in zip(one_step(params, clean, 0), one_step(params, junk, 0), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    faulty = one_step(params, junk, 1)[1], one_step(params, clean, 1)[1]
    assert not np.array_equal(np.asarray(faulty[0]), np.asarray(faulty[1]))


def test_per_row_cache_positions_and_masks():
    # Rows at different write slots: positions and the described mask agree with a loop over
    # (row, key slot).
    cfg = Qwen3Config.tiny()
    cache = kv_cache_lib.init(cfg, jnp.asarray([2, 0, 5]), 12)
    cache = dataclasses.replace(cache, index=jnp.asarray([4, 9, 11], jnp.int32))
    positions = kv_cache_lib.positions(cache.starts, cache.index, 1)
    described = kv_cache_lib.decode_mask(cache).dense(1, 12)
    want = np.zeros((3, 1, 12), bool)
    for b, (start, index) in enumerate([(2, 4), (0, 9), (5, 11)]):
        want[b, 0, start : index + 1] = True
        assert positions[b, 0] == index - start
    np.testing.assert_array_equal(np.asarray(described), want)


def test_noise_uses_each_rows_own_step():
    # A row's draw depends on its key and its own token index only, not on the other rows'.
    logits = jax.random.normal(jax.random.key(0), (4, 128)) * 3.0
    keys = jax.random.split(jax.random.key(1), 4)
    sp = sampling.SamplingParams.make(1.0)
    steps = jnp.asarray([0, 5, 2, 7], jnp.int32)
    draw = jax.jit(lambda lg, k, st: sampling.sample(lg, k, st, sp)[0])
    together = draw(logits, keys, steps)
    alone = [int(draw(logits[b : b + 1], keys[b : b + 1], steps[b])[0]) for b in range(4)]
    assert np.asarray(together).tolist() == alone
    other = draw(logits, keys, steps.at[1].set(6))
    assert np.asarray(other)[[0, 2, 3]].tolist() == [alone[0], alone[2], alone[3]]


def _sharded_pair(slots: int):
    """(params, static, continuous) on 8 fake CPU devices: rows / slots over data (4), kv heads
    over tensor (2); sampled at temperature 0.8, top-k 20, two slots freed per round."""
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets 8 fake CPU devices)")
    mesh = sharding_lib.make_mesh(4, 1, 2)
    graphdef, params = _model("xla_blockwise")
    params = sharding_lib.reshard(params, mesh, sharding_lib.ROLLOUT_RULES)
    static, cont = _pair(graphdef, mesh=mesh, slots=slots, refill=2, temperature=0.8, top_k=20)
    return params, static, cont


def test_sharded_engines_give_identical_rows():
    # 8 fake CPU devices: rows / slots over data (4), kv heads over tensor (2). At least two
    # slots per device (the drain's floor): a one-row matmul takes XLA:CPU's matrix-vector
    # kernel, which sums in another order (one row per device differs in the last bit under
    # either engine).
    params, static, cont = _sharded_pair(slots=16)
    prompts = _prompts(MIXED + (11, 6, 25, 4, 13, 7), seed=7)
    want = static.sample(params, prompts, n=2, rng=8)
    got = cont.sample(params, prompts, n=2, rng=8)
    _assert_same(want, got)
    assert cont.stats()["device_calls"] > 2
    assert cont.traces["decode"] == 2  # 16 slots, then the drain's 8 (two per device)


def test_sharded_prefill_groups_stay_split_over_devices(monkeypatch):
    # 24 short prompts through 8 slots on the 8-device mesh: prefilled in groups of 20 (prompts
    # 0-19, then 4-23), the second one sliced at a start known only on device. The group's
    # prompts stay on the batch axes, each device prefilling its quarter (a slice at a traced
    # start is replicated unless constrained: every device would prefill, and hold, all 20).
    params, static, cont = _sharded_pair(slots=8)
    engine, pools = cont.continuous, []
    made = engine.group_program

    def spy(*args):
        fn = made(*args)

        def call(*a):
            out = fn(*a)
            pools.append(out[0])  # the group's pool of prompt caches
            return out

        return call

    monkeypatch.setattr(engine, "group_program", spy)
    prompts = _prompts((3, 5, 7, 2, 6, 4, 8, 1) * 3, seed=9)
    want = static.sample(params, prompts, n=1, rng=10)
    got = cont.sample(params, prompts, n=1, rng=10)
    for name in ("tokens", "mask", "lengths", "truncated"):
        np.testing.assert_array_equal(getattr(want, name), getattr(got, name), err_msg=name)
    assert engine._group(24, 8, 1, 8) == 20 and len(pools) == 1
    k = pools[0].prefilled.cache.layers[0][0]  # [Q, K, Tp, H]
    assert k.shape[0] == 20 and k.addressable_shards[0].data.shape[0] == 5, k.sharding


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(engine="paged"), "rollout.engine"),
        (dict(engine="continuous"), "rollout.slots"),
        (dict(engine="continuous", slots=0), "rollout.slots"),
        (dict(engine="continuous", slots=4, refill=0), "rollout.refill"),
        (dict(engine="static", slots=4), "rollout.slots"),
    ],
)
def test_bad_engine_settings_raise(kwargs, match):
    graphdef, _ = _model()
    with pytest.raises(ValueError, match=match):
        sampler_lib.Sampler(graphdef, max_prompt_len=8, max_new_tokens=4, **kwargs)
