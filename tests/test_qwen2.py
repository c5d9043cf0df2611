"""Qwen2 / Qwen2.5 family: logit parity with transformers, export round trip, presets' parameter
counts, config.json reading, the family registry, stop tokens, and a debug training run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from apo_jax.models import hf_io, registry
from apo_jax.models.qwen2 import Qwen2Config
from apo_jax.models.qwen3 import Qwen3Config

torch = pytest.importorskip("torch", reason="torch is needed for parity with transformers")
transformers = pytest.importorskip("transformers")

forward = nnx.jit(lambda model, ids: model(ids))
VOCAB = 256


@pytest.fixture(scope="module")
def hf_qwen2(tmp_path_factory):
    """Factory: a tiny random transformers Qwen2 (biases random, not HF's zeros, so that the
    bias mapping is exercised), save_pretrained -> (dir, torch model)."""
    cache = {}

    def make(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in cache:
            kw = dict(
                vocab_size=VOCAB,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=True,
                rope_theta=1e6,
            )
            kw.update(overrides)
            torch.manual_seed(len(cache))
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)).eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        p.normal_(0.0, 0.5)
            path = tmp_path_factory.mktemp("hf_qwen2")
            model.save_pretrained(path)
            cache[key] = (path, model)
        return cache[key]

    return make


def _ids(shape, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, VOCAB, shape), jnp.int32)


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


@pytest.mark.parametrize(
    "tied, kv_heads", [(True, 2), (False, 4)], ids=["tied-gqa2", "untied-gqa1"]
)
def test_logits_match_transformers_float32(hf_qwen2, tied, kv_heads):
    path, ref = hf_qwen2(tie_word_embeddings=tied, num_key_value_heads=kv_heads)
    ours = hf_io.load_model(path)
    assert type(ours.cfg) is Qwen2Config and ours.cfg.tie_word_embeddings == tied
    assert ours.cfg.num_kv_heads == kv_heads and ours.cfg.head_dim == 16
    ids = _ids((2, 11))
    want = _torch_logits(ref, ids)
    np.testing.assert_allclose(np.asarray(forward(ours, ids)), want, atol=1e-4, rtol=0)
    # the biases matter: zeroing ours moves the logits far beyond the tolerance
    flat = nnx.to_flat_state(nnx.state(ours, nnx.Param))
    biases = [(p, v.replace(jnp.zeros_like(v.get_value()))) for p, v in flat if "bias" in p[-1]]
    assert len(biases) == 3 * ours.cfg.num_layers
    nnx.update(ours, nnx.from_flat_state(biases))
    assert np.abs(np.asarray(forward(ours, ids)) - want).max() > 1e-2


def test_export_round_trip_through_transformers(hf_qwen2, tmp_path):
    path, _ = hf_qwen2(tie_word_embeddings=False)
    ours = hf_io.load_model(path)
    hf_io.save_model(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids = _ids((2, 9), seed=1)
    np.testing.assert_allclose(
        _torch_logits(hf, ids), np.asarray(forward(ours, ids)), atol=1e-4, rtol=0
    )
    again = hf_io.load_model(tmp_path)
    assert again.cfg == ours.cfg
    for a, b in zip(
        jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(again)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


# Published totals (Qwen2.5 model cards / technical report), in billions.
PUBLISHED = {
    "qwen2p5_0p5b": 0.49,
    "qwen2p5_1p5b": 1.54,
    "qwen2p5_math_1p5b": 1.54,
    "qwen2p5_7b": 7.61,
}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_presets_match_transformers_parameter_count(preset):
    cfg = registry.preset(preset)
    assert type(cfg) is Qwen2Config
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg.to_hf()))
    n_hf = sum(p.numel() for p in hf.parameters())
    assert cfg.num_params == n_hf
    abstract = nnx.eval_shape(lambda: registry.of(cfg).build(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert sum(math.prod(x.shape) for x in leaves) == n_hf
    assert n_hf / 1e9 == pytest.approx(PUBLISHED[preset], abs=0.006)


def test_presets_resolve_across_families():
    assert type(registry.preset("qwen3_1p7b")) is Qwen3Config
    assert type(registry.preset("tiny")) is Qwen3Config
    assert type(registry.preset("qwen2_tiny")) is Qwen2Config
    assert registry.preset("qwen2p5_math_1p5b").rope_theta == 10_000.0
    with pytest.raises(ValueError, match="unknown model preset 'qwen9'.*qwen2p5_7b.*qwen3_8b"):
        registry.preset("qwen9")


def _qwen2_json(**changes):
    hf = Qwen2Config(VOCAB, 64, 96, 2, 4, 2, 16).to_hf()
    hf.update(changes)
    return hf


def test_config_reads_hf_fields_and_refuses_sliding_window(tmp_path):
    hf = _qwen2_json(max_window_layers=21, sliding_window=4096)
    del hf["head_dim"]  # Qwen2 configs usually leave it out: hidden_size // heads
    cfg = registry.config_from_hf(hf)
    assert cfg == Qwen2Config(VOCAB, 64, 96, 2, 4, 2, 16)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_qwen2_json(use_sliding_window=True, max_window_layers=1)))
    with pytest.raises(ValueError, match=r"config.json: key 'use_sliding_window' is true"):
        registry.config_from_hf(tmp_path)
    with pytest.raises(ValueError, match="key 'layer_types'"):
        registry.config_from_hf(_qwen2_json(layer_types=["full_attention", "sliding_attention"]))
    with pytest.raises(ValueError, match="key 'max_window_layers'"):
        registry.config_from_hf(_qwen2_json(max_window_layers="x"))


def test_unsupported_model_type_lists_supported_families(tmp_path):
    hf = _qwen2_json(model_type="llama", architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="key 'model_type' is 'llama'") as info:
        hf_io.load_model(tmp_path)
    message = str(info.value)
    assert "config.json" in message
    assert "qwen3" in message and "Qwen3ForCausalLM" in message
    assert "qwen2" in message and "Qwen2ForCausalLM" in message


def test_stop_tokens_from_tokenizer_and_generation_config(shared_data, tmp_path):
    from apo_jax.tasks import math as math_task

    tokenizer = math_task.load_tokenizer(shared_data / "qwen3")
    # From the tokenizer alone: the chat template's end of turn, then eos / pad (Qwen3's values).
    assert (
        math_task.stop_token_ids(tokenizer)
        == tuple(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
        == (151645, 151643)
    )
    # generation_config.json's eos_token_id comes first when the model directory has one.
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert math_task.stop_token_ids(tokenizer, tmp_path) == (7, 151645, 151643)


@pytest.mark.slow
def test_debug_training_run_on_qwen2_tiny(tmp_path):
    from apo_jax.trainer import loop
    from configs import toy

    c = toy.get_config("debug")
    c.model.preset = "qwen2_tiny"
    c.mesh.data = 1
    last = loop.run(c, str(tmp_path))
    assert last["step"] == c.total_steps
    assert all(np.isfinite(v) for v in last.values() if isinstance(v, float))
    assert '"qwen2_tiny"' in (tmp_path / "config.json").read_text()
