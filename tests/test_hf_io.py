"""HF checkpoint I/O: export round trip, config reading, sharded placement, clear errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from safetensors.numpy import load_file, save_file

from apo_jax.models import hf_io
from apo_jax.models.qwen3 import Qwen3Config, init_model

torch = pytest.importorskip("torch", reason="torch is needed for parity with transformers")
transformers = pytest.importorskip("transformers")

forward = nnx.jit(lambda model, ids: model(ids))


def _ids(shape, seed=0, vocab=256):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


def _hf_logits(path, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


@pytest.mark.parametrize("tied", [True, False])
def test_export_round_trip_through_transformers(hf_tiny, tmp_path, tied):
    path, _ = hf_tiny(tie_word_embeddings=tied)
    ours = hf_io.load_qwen3(path)
    hf_io.save_qwen3(ours, tmp_path)
    ids = _ids((2, 9))
    np.testing.assert_allclose(_hf_logits(tmp_path, ids), forward(ours, ids), atol=1e-4)
    # and back into ours: bit-identical parameters
    again = hf_io.load_qwen3(tmp_path)
    for a, b in zip(
        jax.tree.leaves(nnx.state(ours)), jax.tree.leaves(nnx.state(again)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_export_sharded_with_index_and_bfloat16(tmp_path):
    model = init_model(
        Qwen3Config.tiny(vocab_size=256), seed=1, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16
    )
    hf_io.save_qwen3(model, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / hf_io.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.dtype == torch.bfloat16
    loaded = hf_io.load_qwen3(tmp_path, dtype=jnp.bfloat16)
    for a, b in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_config_reads_old_and_new_rope_theta_forms(tmp_path, hf_tiny):
    path, ref = hf_tiny()
    hf = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in hf  # transformers 5.x writes the new form
    assert Qwen3Config.from_hf(path / "config.json").rope_theta == 1e6
    old = {k: v for k, v in hf.items() if k != "rope_parameters"} | {"rope_theta": 1e6}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = Qwen3Config.from_hf(tmp_path / "config.json")
    assert cfg.rope_theta == 1e6
    assert (
        cfg.head_dim == ref.config.head_dim and cfg.num_kv_heads == ref.config.num_key_value_heads
    )


def test_load_places_parameters_with_mesh_shardings(hf_tiny):
    path, _ = hf_tiny()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sharded = hf_io.load_qwen3(path, mesh=mesh)
    q = sharded.layers[0].attn.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert len({s.device for s in q.addressable_shards}) == 8
    ids = _ids((2, 7), seed=3)
    np.testing.assert_allclose(
        forward(sharded, ids), forward(hf_io.load_qwen3(path), ids), atol=1e-5
    )


# --- bad input ----------------------------------------------------------------------------


@pytest.fixture
def ckpt(hf_tiny, tmp_path):
    """A private, editable copy of a tiny checkpoint."""
    path, _ = hf_tiny()
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def _edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _edit_weights(ckpt, fn):
    tensors = load_file(ckpt / hf_io.SINGLE_FILE)
    fn(tensors)
    save_file(tensors, ckpt / hf_io.SINGLE_FILE, metadata={"format": "pt"})


def test_missing_directory_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory.*Hugging Face model directory"):
        hf_io.load_qwen3(tmp_path / "nope")


def test_missing_config_and_weights(ckpt):
    (ckpt / hf_io.SINGLE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        hf_io.load_qwen3(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_io.load_qwen3(ckpt)


def test_missing_unexpected_and_misshapen_keys(ckpt):
    key = "model.layers.1.mlp.up_proj.weight"
    _edit_weights(ckpt, lambda t: t.pop(key))
    with pytest.raises(KeyError, match=key.replace(".", r"\.") + ".*missing"):
        hf_io.load_qwen3(ckpt)
    _edit_weights(
        ckpt,
        lambda t: t.update(
            {key: np.zeros((96, 64), np.float32), "model.layers.1.extra.weight": np.zeros(3)}
        ),
    )
    with pytest.raises(KeyError, match="unexpected safetensors key 'model.layers.1.extra.weight'"):
        hf_io.load_qwen3(ckpt)
    _edit_weights(
        ckpt,
        lambda t: (
            t.pop("model.layers.1.extra.weight"),
            t.update({key: np.zeros((64, 64), np.float32)}),
        ),
    )
    with pytest.raises(ValueError, match=r"model.safetensors: key '.*up_proj.weight' has shape"):
        hf_io.load_qwen3(ckpt)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(model_type="llama", architectures=["LlamaForCausalLM"]), "key 'model_type'"),
        (dict(head_dim=None), "key 'head_dim' is missing"),
        (dict(num_key_value_heads=3), "num_heads=4 is not a multiple of num_kv_heads=3"),
        (dict(rope_parameters=None, rope_theta=None), "key 'rope_theta' is missing"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(hidden_size=-64), "hidden_size must be a positive integer"),
    ],
)
def test_bad_config_values_name_file_and_key(ckpt, changes, match):
    _edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=match) as info:
        hf_io.load_qwen3(ckpt)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"garbage header"])
def test_damaged_safetensors_file_is_named(ckpt, content):
    weights = ckpt / hf_io.SINGLE_FILE
    weights.write_bytes(content if content else b"")
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file"):
        hf_io.load_qwen3(ckpt)


def test_truncated_safetensors_file_is_named(ckpt):
    weights = ckpt / hf_io.SINGLE_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file"):
        hf_io.load_qwen3(ckpt)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_reported_by_tensor_name(ckpt, bad):
    key = "model.layers.0.self_attn.k_proj.weight"

    def poison(t):
        t[key] = t[key].copy()
        t[key][3, 5] = bad

    _edit_weights(ckpt, poison)
    saved = (ckpt / hf_io.SINGLE_FILE).read_bytes()
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{key}' holds 1 non-finite"):
        hf_io.load_qwen3(ckpt)
    assert (ckpt / hf_io.SINGLE_FILE).read_bytes() == saved  # nothing saved was touched


@pytest.mark.parametrize("text", ["[1, 2]", '"qwen3"', "3"])
def test_config_json_that_is_not_an_object_is_named(ckpt, text):
    (ckpt / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object"):
        hf_io.load_qwen3(ckpt)


def test_run_from_hf_dir_computes_in_the_config_dtype(tmp_path):
    """model.param_dtype float32 with model.dtype bfloat16: every layer must compute in bfloat16
    (the parameters stay float32), as with a random init; not only the top module."""
    from apo_jax.trainer import build
    from configs import toy

    hf_io.save_qwen3(init_model(Qwen3Config.tiny(vocab_size=13), seed=0), tmp_path)
    c = toy.get_config("debug")
    c.model.hf_dir, c.model.param_dtype, c.model.dtype = str(tmp_path), "float32", "bfloat16"
    p = build.plan(c)
    graphdef, params = build.model(p, build.model_config(p, 13), build.mesh(p))
    model = nnx.merge(graphdef, params)
    modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
    dtypes = {type(m).__name__: jnp.dtype(m.dtype) for m in modules if hasattr(m, "dtype")}
    assert {"Decoder", "Attention", "MLP"} <= set(dtypes), dtypes
    assert set(dtypes.values()) == {jnp.dtype(jnp.bfloat16)}, dtypes
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
