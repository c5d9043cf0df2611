"""model.scan_layers (stacked [L, ...] layers under lax.scan) against the per-layer Python loop:
same parameters, logits, gradients, samples and HF files; and model.remat under scan keeps
about one residual stream per layer (XLA's memory analysis of the compiled backward pass)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from apo_jax.models import hf_io
from apo_jax.models.qwen3 import Qwen3Config, init_model
from apo_jax.rollout import sampler as sampler_lib

CFG = Qwen3Config.tiny(num_layers=3)


def _pair(**kw):
    return init_model(CFG, seed=4, **kw), init_model(CFG, seed=4, scan_layers=True, **kw)


def _layer_params(model, state=None):
    """Per-layer parameter dicts {path: array}, layer 0 first, from either layout (the model's
    parameters, or `state` laid out like them, e.g. its gradients)."""
    state = nnx.state(model, nnx.Param) if state is None else state
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(state)}
    if model.scan_layers:
        stacked = {p[1:]: w for p, w in flat.items() if p[0] == "layers"}
        return [{p: w[i] for p, w in stacked.items()} for i in range(CFG.num_layers)]
    return [
        {p[2:]: w for p, w in flat.items() if p[:2] == ("layers", i)} for i in range(CFG.num_layers)
    ]


def test_scanned_parameters_are_the_looped_layers_stacked():
    looped, scanned = _pair()
    for a, b in zip(_layer_params(looped), _layer_params(scanned), strict=True):
        assert a.keys() == b.keys()
        for path in a:
            np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]))
    axes = scanned.layers.attn.q_proj.get_metadata()["axes"]
    assert axes == ("layers", "embed", "heads", "head_dim")


def test_scanned_and_looped_give_same_logits_and_gradients():
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (3, 12)), jnp.int32)
    valid = jnp.asarray([[0] * 3 + [1] * 9, [1] * 12, [0] * 2 + [1] * 7 + [0] * 3], bool)

    def loss(model):
        logp = jax.nn.log_softmax(model(ids, attention_mask=valid))  # [B, T, V]
        return jnp.sum(jnp.where(valid[..., None], logp, 0.0)[..., :5]), logp

    fn = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
    for remat, attention in (("block", "naive"), ("none", "xla_blockwise")):
        looped, scanned = _pair(remat=remat, attention=attention)
        (l1, lp1), g1 = fn(looped)
        (l2, lp2), g2 = fn(scanned)
        real = np.asarray(valid)
        # Same ops per layer in the same order; only XLA's fusion choices differ. Convention of
        # test_model's padding test (log-probs of order 5, float32).
        np.testing.assert_allclose(np.asarray(lp2)[real], np.asarray(lp1)[real], atol=1e-5)
        np.testing.assert_allclose(l2, l1, rtol=1e-5)
        grads = _layer_params(looped, g1), _layer_params(scanned, g2)
        for a, b in zip(*grads, strict=True):
            for path in a:
                x, y = np.asarray(a[path]), np.asarray(b[path])
                np.testing.assert_allclose(y, x, atol=1e-5 * (np.abs(x).max() + 1e-30))
        e1, e2 = (
            np.asarray(g1["embed_tokens"].get_value()),
            np.asarray(g2["embed_tokens"].get_value()),
        )
        np.testing.assert_allclose(e2, e1, atol=1e-5 * np.abs(e1).max())


def test_scanned_model_samples_like_the_looped_one():
    outs = []
    prompts = [[5, 9, 3], list(range(1, 15))]
    for model in _pair():
        graphdef, params = nnx.split(model)
        smp = sampler_lib.Sampler(graphdef, max_prompt_len=16, max_new_tokens=5)
        outs.append(smp.sample(params, prompts, n=2, rng=1))
    np.testing.assert_array_equal(np.asarray(outs[1].tokens), np.asarray(outs[0].tokens))
    np.testing.assert_allclose(np.asarray(outs[1].logp), np.asarray(outs[0].logp), atol=1e-5)


def test_hf_files_do_not_depend_on_the_layout(tmp_path):
    looped, scanned = _pair()
    hf_io.save_model(scanned, tmp_path / "s")
    back = hf_io.load_model(tmp_path / "s")  # per-layer weights from a scanned model's files
    again = hf_io.load_model(tmp_path / "s", scan_layers=True)
    for a, b, c in zip(
        _layer_params(looped), _layer_params(back), _layer_params(again), strict=True
    ):
        for path in a:
            np.testing.assert_array_equal(np.asarray(b[path]), np.asarray(a[path]))
            np.testing.assert_array_equal(np.asarray(c[path]), np.asarray(a[path]))


def _backward_temp_bytes(num_layers: int, remat: str, scan: bool, b=2, t=256, d=128) -> int:
    cfg = Qwen3Config.tiny(
        vocab_size=256, hidden_size=d, intermediate_size=2 * d, num_layers=num_layers
    )
    kw = dict(remat=remat, scan_layers=scan, attention="xla_blockwise")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(cfg, 0, **kw)))
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(state, ids):
        return jnp.sum(jax.nn.log_softmax(nnx.merge(graphdef, state)(ids))[..., 0])

    compiled = jax.jit(jax.grad(loss)).lower(state, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_keeps_about_one_residual_stream_per_layer():
    b, t, d = 2, 256, 128
    stream = b * t * d * 4  # one float32 residual stream [B, T, D]
    per_layer = lambda **kw: (_backward_temp_bytes(6, **kw) - _backward_temp_bytes(2, **kw)) / 4
    kept = per_layer(remat="block", scan=True)
    # Bound: the saved layer input (1 stream) plus slack of half a stream for XLA's buffer
    # packing; the stacked per-layer weight gradients are outputs, not temporaries.
    assert kept <= 1.5 * stream, (kept, stream)
    # The bound is not vacuous: without remat each layer keeps its activations.
    assert per_layer(remat="none", scan=True) > 4 * stream
