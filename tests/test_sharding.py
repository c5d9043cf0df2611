"""Meshes on 8 fake CPU devices: same results as one device, real sharding, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from apo_jax.infra import checkpoint as checkpoint_lib
from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import qwen3 as model_lib
from apo_jax.trainer import build, records
from apo_jax.trainer import step as ts
from configs import base

if jax.device_count() < 8:
    pytest.skip("needs --xla_force_host_platform_device_count=8", allow_module_level=True)

# 8 query and 8 kv heads so that tensor=8 divides them; hidden 64 divides fsdp=4.
CFG = model_lib.Qwen3Config.tiny(num_heads=8, num_kv_heads=8, head_dim=8)
P, G, TP, TC = 4, 2, 5, 6


def _config():
    c = base.get_config("debug")
    c.rollout.group_size, c.rollout.prompts_per_step = G, P
    c.optim.mini_batches, c.optim.micro_batches = 1, 1
    return c


def _batch(seed=0):
    rng = np.random.RandomState(seed)
    b = P * G
    cmask = np.ones((b, TC), np.float32)
    cmask[1, 4:] = 0
    return dict(
        prompt_ids=rng.randint(0, CFG.vocab_size, (b, TP)).astype(np.int32),
        prompt_mask=np.ones((b, TP), np.int32),
        completion_ids=rng.randint(0, CFG.vocab_size, (b, TC)).astype(np.int32),
        completion_mask=cmask,
        rewards=rng.randint(0, 2, (b,)).astype(np.float32),
        old_logp=(-4.0 + 0.1 * rng.randn(b, TC)).astype(np.float32),
        ref_logp=np.zeros((b, TC), np.float32),
    )


def _two_steps(mesh):
    """Two APO updates from the same init, on `mesh` (None = one device, no shardings)."""
    c = _config()
    model = model_lib.init_model(CFG, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)
    # SGD with lr 1: the parameter change is the gradient itself, so the comparison is tight
    # (Adam's first steps are sign-like and would amplify rounding in near-zero entries).
    tx = optax.sgd(1.0)
    spec = build.step_spec(build.plan(c), CFG.vocab_size)
    state = ts.init_train_state(params, tx, 0, spec.schedule)
    batch = _batch()
    if mesh is None:
        fns = ts.build(graphdef, spec, tx)
    else:
        shardings = sharding_lib.tree_shardings(state, mesh)
        state = jax.device_put(state, shardings)
        fns = ts.build(graphdef, spec, tx, mesh, shardings)
        batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
    metrics = []
    for _ in range(2):
        state, m = fns.train_step(state, records.Batch(**batch))
        metrics.append(m)
    return state, metrics


@pytest.fixture(scope="module")
def reference():
    return _two_steps(None)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_train_step_on_mesh_equals_one_device(reference, shape):
    mesh = sharding_lib.make_mesh(*shape)
    state, metrics = _two_steps(mesh)
    ref_state, ref_metrics = reference
    for m, r in zip(metrics, ref_metrics, strict=True):
        np.testing.assert_allclose(m["loss/value"], r["loss/value"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(m["optim/grad_norm"], r["optim/grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    # the parameters really are split (not silently replicated): q_proj [D, N, H] has D on
    # fsdp and N on tensor
    q = state.params["layers"][0]["attn"]["q_proj"][...]
    assert q.addressable_shards[0].data.size == q.size // (shape[1] * shape[2])


def test_large_parameters_of_qwen3_0p6b_are_sharded():
    mesh = sharding_lib.make_mesh(2, 2, 2)
    abstract = nnx.eval_shape(lambda: model_lib.init_model(model_lib.Qwen3Config.qwen3_0p6b()))
    state = nnx.state(abstract, nnx.Param)
    flat = nnx.to_flat_state(state)
    shardings = dict(nnx.to_flat_state(sharding_lib.tree_shardings(state, mesh)))
    checked = 0
    for path, var in flat:
        if var.get_value().size * 4 >= 1 << 20:  # >= 1 MB in float32
            spec = shardings[path].spec
            assert any(axis is not None for axis in spec), (path, spec)
            checked += 1
    assert checked > 28 * 7  # every projection of every layer, plus the embedding


def test_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path):
    mesh_a = sharding_lib.make_mesh(2, 4, 1)
    mesh_b = sharding_lib.make_mesh(1, 2, 4)
    state, _ = _two_steps(mesh_a)
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=2)
    ckpt.save(2, state, {"position": 8, "config": {}})
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        state,
        sharding_lib.tree_shardings(state, mesh_b),
    )
    restored, record = ckpt.restore(2, target)
    assert record["position"] == 8
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    q = restored.params["layers"][0]["attn"]["q_proj"][...]
    assert q.sharding.mesh.shape == mesh_b.shape


def test_rollout_rules_drop_fsdp():
    spec = sharding_lib.logical_to_spec(("embed", "mlp"), sharding_lib.ROLLOUT_RULES)
    assert spec == PartitionSpec(None, "tensor")
    mesh = sharding_lib.make_mesh(1, 4, 2)
    params = nnx.state(model_lib.init_model(CFG), nnx.Param)
    train = sharding_lib.reshard(params, mesh, sharding_lib.TRAIN_RULES)
    rollout = sharding_lib.reshard(train, mesh, sharding_lib.ROLLOUT_RULES)
    gate = rollout["layers"][0]["mlp"]["gate_proj"][...]
    assert gate.sharding.spec == PartitionSpec(None, "tensor")
    np.testing.assert_array_equal(
        np.asarray(gate), np.asarray(params["layers"][0]["mlp"]["gate_proj"][...])
    )


@pytest.mark.parametrize(
    "shape, match",
    [
        ((3, 1, 1), "does not divide the 8 devices"),
        ((-1, -1, 1), "at most one"),
        ((0, 1, 1), "must be >= 1"),
        ((16, 1, 1), "does not divide the 8 devices"),
    ],
)
def test_bad_mesh_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        sharding_lib.make_mesh(*shape)


def test_mesh_must_divide_heads_and_batch():
    tiny = model_lib.Qwen3Config.tiny()  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match="config.mesh.tensor=4 does not divide.*num_kv_heads=2"):
        sharding_lib.check_mesh_fits((2, 1, 4), tiny, 8)
    with pytest.raises(ValueError, match="data\\*fsdp = 8 does not divide the 4 sequences"):
        sharding_lib.check_mesh_fits((4, 2, 1), tiny, 4)
    assert jnp.ones(()) == 1  # the checks above raise before touching devices
