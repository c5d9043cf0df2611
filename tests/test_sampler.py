"""Sampler: cached decode vs full forward, HF greedy parity, sampling statistics, stop ids,
compile reuse, per-row randomness and input validation. Tiny models only."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from scipy import stats

from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import hf_io
from apo_jax.models.qwen3 import Qwen3Config, init_model
from apo_jax.rollout import sampler as sampler_lib
from apo_jax.rollout import sampling

T_NEW = 12  # new tokens per test rollout
TEMP, TOP_K, TOP_P = 0.7, 20, 0.8  # the shared sampler: every filter active


def _tiny(vocab_size, seed, scale):
    """Untied tiny model whose LM head is scaled up: the 0.02 init gives near-uniform next-token
    distributions; scaled, the max probability is ~0.05-0.3 (and the tied head's bias towards
    repeating the input token is absent)."""
    cfg = Qwen3Config.tiny(vocab_size=vocab_size, tie_word_embeddings=False)
    model = init_model(cfg, seed=seed)
    model.lm_head[...] = model.lm_head[...] * scale
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny(128, seed=1, scale=8.0)


@pytest.fixture(scope="module")
def shared(tiny):
    """One sampler (and its compiled programs) reused by several tests: 3 prompts x n=2."""
    return _sampler(tiny, temperature=TEMP, top_k=TOP_K, top_p=TOP_P)


def _sampler(model, **kw):
    graphdef, params = nnx.split(model)
    kw = {"max_prompt_len": 32, "max_new_tokens": T_NEW, **kw}
    return sampler_lib.Sampler(graphdef, **kw), params


def _generate(model, prompts, *, max_new_tokens, eos_ids):
    """Greedy completions as token lists (the stop token included, nothing after it)."""
    smp, params = _sampler(model, max_new_tokens=max_new_tokens, eos_ids=eos_ids)
    out = smp.sample(params, prompts)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    return [tokens[i, : lengths[i]].tolist() for i in range(len(prompts))]


def _prompts(lengths, vocab=128, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(1, vocab, n).tolist() for n in lengths]


def _full_logits(model, prompts, out, rows):
    """Float32 logits of each row's [prompt + completion] from one uncached forward pass."""
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    seqs = [prompts[r // rows] + tokens[r, : lengths[r]].tolist() for r in range(len(tokens))]
    width = max(map(len, seqs))
    ids = np.zeros((len(seqs), width), np.int32)
    valid = np.zeros_like(ids)
    for i, s in enumerate(seqs):  # right padding: causal attention never sees it
        ids[i, : len(s)], valid[i, : len(s)] = s, 1
    logits = np.asarray(nnx.jit(lambda m, x, a: m(x, attention_mask=a))(model, ids, valid))
    # Row r's logits predicting completion token t sit at index len(prompt) - 1 + t.
    return [
        logits[r, len(prompts[r // rows]) - 1 : len(seqs[r]) - 1] for r in range(len(seqs))
    ]  # each [len_r, V]


def _log_softmax(x):
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def test_cached_decode_matches_uncached_forward(tiny, shared):
    # Every generated token's log-probs recomputed by one uncached forward pass: the policy's
    # (temperature 1) and the sampling distribution's (temperature -> top-k -> top-p, numpy).
    smp, params = shared
    prompts = _prompts([3, 9, 14])  # left-padded to the 16 bucket
    out = smp.sample(params, prompts, n=2, rng=7)
    chex.assert_shape([out.tokens, out.logp, out.sample_logp, out.mask], (6, T_NEW))
    assert np.asarray(out.lengths).tolist() == [T_NEW] * 6 and np.asarray(out.mask).all()
    for r, logits in enumerate(_full_logits(tiny, prompts, out, rows=2)):
        toks = np.asarray(out.tokens[r])
        ref = np.take_along_axis(_log_softmax(logits), toks[:, None], -1)[:, 0]
        np.testing.assert_allclose(np.asarray(out.logp[r]), ref, atol=1e-5)
        for t, tok in enumerate(toks):
            z = logits[t] / TEMP
            kept = np.argsort(-z, kind="stable")[:TOP_K]
            probs = np.exp(_log_softmax(z[kept]))
            kept = kept[(np.cumsum(probs) - probs) < TOP_P]
            assert tok in kept, (r, t, tok, kept)
            ref_sample = z[tok] - np.logaddexp.reduce(z[kept])
            np.testing.assert_allclose(float(out.sample_logp[r, t]), ref_sample, atol=1e-5)


def test_greedy_matches_transformers(hf_tiny):
    # Token for token, prompts of different lengths, and the same stop-id handling: the sampler
    # keeps the EOS and nothing after it, as transformers does for a single prompt.
    torch = pytest.importorskip("torch", reason="torch is needed for parity with transformers")
    # initializer_range 0.2: decisive logits, no near-ties to flip
    path, ref = hf_tiny(tie_word_embeddings=False, initializer_range=0.2)
    prompts = _prompts([5, 11, 2, 8], vocab=256, seed=1)

    def hf_greedy(prompt, eos):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=10, eos_token_id=eos, pad_token_id=0)  # fmt: skip
        return out[0, len(prompt) :].tolist()

    free = [hf_greedy(p, None) for p in prompts]
    # A stop id that prompt 0 first emits at step 3 or later and prompt 1 never emits.
    eos = next(t for j, t in enumerate(free[0]) if j >= 3 and t not in free[0][:j] + free[1])
    want = [hf_greedy(p, eos) for p in prompts]
    assert len(want[0]) < 10 and len(want[1]) == 10
    got = _generate(hf_io.load_qwen3(path), prompts, max_new_tokens=10,
                               eos_ids=[eos])  # fmt: skip
    assert got == want


def _merged_chisquare(counts, probs, min_expected=5.0):
    """Chi-square of counts vs probs, bins with a small expectation pooled into one."""
    expected = probs * counts.sum()
    small = expected < min_expected
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep]).pvalue


@pytest.mark.parametrize(
    "temp,k,p",
    [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.0, 10, 1.0), (1.0, 0, 0.7), (0.8, 12, 0.9)],
    ids=["plain", "temperature", "top_k", "top_p", "all"],
)
def test_sample_frequencies_match_softmax(temp, k, p):
    # V = 1000 > 2 chunks and not a multiple of the chunk: exercises the padded two-level draw.
    b, v = 12_000, 1000
    logits = jax.random.normal(jax.random.key(0), (v,)) * 2.5
    keys = jax.random.split(jax.random.key(1), b)
    sp = sampling.SamplingParams.make(temp, k, p)
    fn = jax.jit(lambda lg, ks: sampling.sample(jnp.broadcast_to(lg, (b, v)), ks, 3, sp))
    tok, logp, sample_logp = (np.asarray(x) for x in fn(logits, keys))
    z = np.asarray(logits, np.float64) / temp
    order = np.argsort(-z, kind="stable")
    kept = order[:k] if k else order
    probs = np.exp(_log_softmax(z[kept]))
    kept = kept[(np.cumsum(probs) - probs) < p]
    target = np.zeros(v)
    target[kept] = np.exp(_log_softmax(z[kept]))
    assert np.isin(tok, kept).all(), "a token outside the top-k / top-p set was drawn"
    counts = np.bincount(tok, minlength=v).astype(np.float64)
    assert _merged_chisquare(counts, target) > 1e-3
    np.testing.assert_allclose(sample_logp, np.log(target[tok]), atol=2e-5)
    np.testing.assert_allclose(logp, _log_softmax(np.asarray(logits, np.float64))[tok], atol=2e-5)


def test_group_samples_match_softmax_through_the_model():
    # Tiny vocabulary: n = 3000 completions of one prompt share its prefill; the first tokens'
    # frequencies must follow softmax(logits) of the last prompt position.
    model = _tiny(16, seed=2, scale=5.0)
    prompt = [[3, 1, 4, 1, 5]]
    smp, params = _sampler(model, max_new_tokens=1, temperature=1.0)
    out = smp.sample(params, prompt, n=3000, rng=0)
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(prompt)))[0, -1]
    logits = logits.astype(np.float64)
    probs = np.exp(_log_softmax(logits))
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=16).astype(np.float64)
    assert 0.1 < probs.max() < 0.9, "degenerate test distribution"
    assert _merged_chisquare(counts, probs) > 1e-3


def test_stop_ids_mask_the_rest_and_flag_truncation(tiny, shared):
    smp, params = shared
    prompts = _prompts([4, 6, 5], seed=4)
    free = np.asarray(smp.sample(params, prompts, n=2, rng=5).tokens)
    # A stop id that row 0 first emits at step j >= 2 and row 2 never emits.
    j, eos = next(
        (j, int(t))
        for j, t in enumerate(free[0])
        if j >= 2 and t not in free[0, :j] and t not in free[2]
    )
    out = smp.sample(params, prompts, n=2, rng=5, eos_ids=[eos])
    tokens, mask, lengths = (np.asarray(x) for x in (out.tokens, out.mask, out.lengths))
    assert tokens[0, : j + 1].tolist() == free[0, : j + 1].tolist()  # same draws up to the stop
    assert mask[0].tolist() == [True] * (j + 1) + [False] * (T_NEW - j - 1)
    assert (tokens[0, j + 1 :] == smp.pad_id).all() and (
        np.asarray(out.logp[0, j + 1 :]) == 0
    ).all()
    assert lengths[0] == j + 1 and lengths[2] == T_NEW
    assert not out.truncated[0] and out.truncated[2]
    assert tokens[2].tolist() == free[2].tolist() and mask[2].all()
    np.testing.assert_array_equal(lengths, mask.sum(-1))


def test_same_bucket_does_not_recompile(tiny):
    smp, params = _sampler(tiny, buckets=(8, 16, 32))
    assert [smp.bucket(_prompts(n)) for n in ([3, 7], [8], [9, 2], [32])] == [8, 8, 16, 32]
    smp.sample(params, _prompts([3, 7]))
    smp.sample(params, _prompts([8, 5], seed=1))  # other lengths, same bucket (8)
    assert smp.traces == {"prefill": 1, "decode": 1}
    smp.sample(params, _prompts([12, 2]))  # bucket 16: one new prefill and decode
    assert smp.traces == {"prefill": 2, "decode": 2}
    new_params = jax.tree.map(lambda x: x * 1.01, params)  # the trainer's next step
    smp.sample(new_params, _prompts([1, 6]))
    assert smp.traces == {"prefill": 2, "decode": 2}


def test_rows_do_not_depend_on_batch_composition(shared):
    smp, params = shared
    a, b, c, d = _prompts([5, 7, 9, 6], seed=3)
    first = smp.sample(params, [a, b, c], n=2, rng=11)
    second = smp.sample(params, [a, d, b], n=2, rng=11)
    np.testing.assert_array_equal(first.tokens[:2], second.tokens[:2])  # prompt a, rows 0, 1
    swapped = smp.sample(params, [c, a, b], n=2, rng=11, row_ids=[2, 0, 1])
    np.testing.assert_array_equal(swapped.tokens[2:4], first.tokens[:2])
    np.testing.assert_array_equal(swapped.tokens[:2], first.tokens[4:6])
    assert not np.array_equal(first.tokens[0], first.tokens[1])  # group members differ


def test_sharded_rollout_matches_single_device(tiny, shared):
    # 2 (data) x 2 (tensor) fake CPU devices: rows split over data, kv heads over tensor.
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py sets 8 fake CPU devices)")
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh(
        (2, 1, 2), sharding_lib.MESH_AXES, axis_types=auto, devices=jax.devices()[:4]
    )
    smp, params = shared
    sharded = sharding_lib.reshard(params, mesh, sharding_lib.ROLLOUT_RULES)
    sharded_smp = sampler_lib.Sampler(
        smp.graphdef,
        max_prompt_len=32,
        max_new_tokens=T_NEW,
        temperature=TEMP,
        top_k=TOP_K,
        top_p=TOP_P,
        mesh=mesh,
    )
    prompts = _prompts([3, 9, 4], seed=6)  # the shapes `shared` has compiled already
    ids, lengths = sharded_smp.pad(prompts)
    state = sharded_smp.prefill(
        sharded, ids, lengths, jax.random.key(1), np.arange(3), n=2, sampling=sharded_smp.sampling
    )
    want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), "tensor", None, None))
    assert state.cache.layers[0][0].sharding.is_equivalent_to(want, 4)
    out = sharded_smp.sample(sharded, prompts, n=2, rng=1)
    ref = smp.sample(params, prompts, n=2, rng=1)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logp, ref.logp, atol=1e-5)


def test_bfloat16_model_samples(tiny):
    model = init_model(Qwen3Config.tiny(), seed=1, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    smp, params = _sampler(model, temperature=1.0, top_k=5)
    out = smp.sample(params, _prompts([4, 9]), n=2)
    assert np.isfinite(np.asarray(out.logp)).all() and np.asarray(out.mask).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompts=[[1, 2], []]), "empty"),
        (dict(prompts=[list(range(1, 40))]), "longer than the cache"),
        (dict(prompts=[[1, 500]]), "token ids"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=1000), "top_k"),
        (dict(n=0), r"n \(completions"),
        (dict(eos_ids=[128]), "eos_ids"),
    ],
)
def test_bad_input_raises_before_compiling(tiny, kwargs, match):
    smp, params = _sampler(tiny)
    call = {"prompts": [[1, 2, 3]], **kwargs}
    with pytest.raises(ValueError, match=match):
        smp.sample(params, call.pop("prompts"), **call)
    assert not smp.traces


def test_bad_lengths_raise(tiny):
    with pytest.raises(ValueError, match="max_new_tokens"):
        _sampler(tiny, max_new_tokens=0)


def test_rollout_weights_share_or_cast_the_train_parameters():
    # fsdp 2: TRAIN_RULES shard `embed`, ROLLOUT_RULES do not. Parameters without an embed axis
    # (q/k norms) are the train arrays themselves; the rest become bfloat16 rollout copies, and a
    # bf16-compute model samples the same tokens from them as from the float32 train arrays.
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices (tests/conftest.py sets 8 fake CPU devices)")
    mesh = sharding_lib.make_mesh(1, 2, 1)
    model = init_model(Qwen3Config.tiny(), seed=2, dtype=jnp.bfloat16)
    graphdef, params = nnx.split(model)
    train = sharding_lib.reshard(params, mesh, sharding_lib.TRAIN_RULES)
    rollout = sampler_lib.rollout_weights(train, mesh, jnp.bfloat16)
    flat_t, flat_r = nnx.to_flat_state(train), dict(nnx.to_flat_state(rollout))
    shared = [path for path, v in flat_t if flat_r[path].get_value() is v.get_value()]
    assert ("layers", 0, "attn", "q_norm", "scale") in shared
    assert ("embed_tokens",) not in shared
    assert flat_r[("embed_tokens",)].get_value().dtype == jnp.bfloat16
    assert flat_r[("embed_tokens",)].get_value().sharding.is_fully_replicated
    smp = sampler_lib.Sampler(graphdef, max_prompt_len=16, max_new_tokens=6, mesh=mesh)
    prompts = _prompts([3, 9], seed=2)
    a, b = smp.sample(train, prompts, n=2, rng=4), smp.sample(rollout, prompts, n=2, rng=4)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    # Same weights as the sampler casts them; only the reduction order differs with the layout.
    np.testing.assert_allclose(np.asarray(b.logp), np.asarray(a.logp), atol=1e-5)
