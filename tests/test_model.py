"""Qwen3 port: logits parity with transformers, padding, causality, remat, presets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apo_jax.models import hf_io
from apo_jax.models.qwen3 import Qwen3Config, init_model

torch = pytest.importorskip("torch", reason="torch is needed for parity with transformers")


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.float().numpy()


@nnx.jit
def _forward(model, ids, mask=None):
    # One compiled program per shape instead of eager op-by-op dispatch (much faster).
    return model(ids, attention_mask=mask)


def _ids(vocab, shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=True),
        dict(tie_word_embeddings=False),
        dict(head_dim=24),  # head_dim != hidden / heads
        dict(num_key_value_heads=4),  # GQA ratio 1 (plain multi-head)
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8),  # ratio 4
    ],
    ids=["tied", "untied", "head_dim24", "gqa1", "gqa4"],
)
def test_logits_match_transformers_float32(hf_tiny, overrides):
    path, ref = hf_tiny(**overrides)
    ours = hf_io.load_qwen3(path)
    ids = _ids(256, (3, 13))
    err = np.abs(np.asarray(_forward(ours, ids)) - _hf_logits(ref, ids)).max()
    assert err <= 1e-4, err


def test_sharded_index_checkpoint_loads(hf_tiny):
    path, ref = hf_tiny(max_shard_size="40KB")
    assert (path / hf_io.INDEX_FILE).exists() and not (path / hf_io.SINGLE_FILE).exists()
    ids = _ids(256, (2, 9), seed=1)
    err = np.abs(np.asarray(_forward(hf_io.load_qwen3(path), ids)) - _hf_logits(ref, ids)).max()
    assert err <= 1e-4, err


def test_bfloat16_compute_close_to_float32_reference(hf_tiny):
    # bf16 keeps 8 mantissa bits (relative error ~4e-3 per op); after two layers the logits of
    # this model (|logit| <~ 0.5) stay within 2e-2 of the float32 reference. Documented bound.
    path, ref = hf_tiny()
    ours = hf_io.load_qwen3(path, dtype=jnp.bfloat16)
    ids = _ids(256, (2, 11), seed=2)
    out = _forward(ours, ids)
    assert out.dtype == jnp.float32  # final logits are float32 whatever the compute dtype
    err = np.abs(np.asarray(out) - _hf_logits(ref, ids)).max()
    assert err <= 2e-2, err


def test_padded_rows_equal_unpadded_rows():
    model = init_model(Qwen3Config.tiny(), seed=3)
    a, b = _ids(128, (1, 7), seed=4), _ids(128, (1, 4), seed=5)
    pad = jnp.zeros((1, 3), jnp.int32)
    batch = jnp.concatenate([a, jnp.concatenate([pad, b], 1), jnp.concatenate([b, pad], 1)], 0)
    mask = jnp.asarray([[1] * 7, [0] * 3 + [1] * 4, [1] * 4 + [0] * 3])
    out = _forward(model, batch, mask)
    np.testing.assert_allclose(out[0], _forward(model, a)[0], atol=1e-5)
    np.testing.assert_allclose(out[1, 3:], _forward(model, b)[0], atol=1e-5)  # left-padded
    np.testing.assert_allclose(out[2, :4], _forward(model, b)[0], atol=1e-5)  # right-padded


def test_causality():
    model = init_model(Qwen3Config.tiny(), seed=6)
    ids = _ids(128, (2, 10), seed=7)
    changed = ids.at[:, 6].set((ids[:, 6] + 1) % 128)
    before, after = _forward(model, ids), _forward(model, changed)
    np.testing.assert_array_equal(before[:, :6], after[:, :6])
    assert np.abs(np.asarray(before[:, 6:] - after[:, 6:])).max() > 0


def test_remat_gives_same_values_and_gradients():
    cfg = Qwen3Config.tiny()
    ids = _ids(128, (2, 8), seed=8)

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(ids))[..., 0])

    plain, remat = init_model(cfg, seed=9), init_model(cfg, seed=9, remat=True)
    grad_fn = nnx.jit(nnx.value_and_grad(loss))
    l1, g1 = grad_fn(plain)
    l2, g2 = grad_fn(remat)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-7)


@pytest.mark.parametrize("preset", ["qwen3_0p6b", "qwen3_1p7b", "qwen3_4b", "qwen3_8b"])
def test_presets_match_transformers_parameter_count(preset):
    transformers = pytest.importorskip("transformers")
    cfg = Qwen3Config.preset(preset)
    hf_cfg = transformers.Qwen3Config(
        **{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "model_type")}
    )
    with torch.device("meta"):
        hf = transformers.Qwen3ForCausalLM(hf_cfg)
    # HF counts a tied lm_head once (parameters() de-duplicates shared tensors).
    assert cfg.num_params == sum(p.numel() for p in hf.parameters())

    abstract = nnx.eval_shape(lambda: init_model(cfg))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == cfg.num_params
