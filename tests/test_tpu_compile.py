"""The TPU compiler on a host without a TPU (infra/targets.py): every program of a step lowered
for a sharded v5e:2x2 slice with each `model.attention`, and the whole `--dry_run
--target=tpu-v5e-4` compiled once. The libtpu tests skip unless the `tpu` extra is installed
(`pip install -e ".[tpu]"`); the target checks run everywhere."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from apo_jax.infra import sharding as sharding_lib
from apo_jax.infra import targets
from apo_jax.models import attention as attention_lib
from apo_jax.models.qwen3 import Qwen3Config, init_model
from apo_jax.rollout import kv_cache as kv_cache_lib
from apo_jax.rollout import sampler as sampler_lib
from apo_jax.trainer import build, dry_run, records
from apo_jax.trainer import step as step_lib
from configs import toy

needs_libtpu = pytest.mark.skipif(
    not targets.has_libtpu(),
    reason=f"libtpu is not installed (the TPU compiler): `{targets.INSTALL}` runs these",
)
# The kernel call a Mosaic (Pallas TPU) kernel lowers to.
MOSAIC = "tpu_custom_call"


def _config(attention: str):
    c = toy.get_config()
    c.model.attention = attention
    c.model.dtype = "bfloat16"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 2  # rows over fsdp, heads over tensor
    return c


def _lowered(config, devices) -> dict:
    """Train step, scoring, prefill and decode of `config` lowered (not compiled) on `devices`,
    as dry_run.estimate builds them, by name."""
    p = build.plan(config)
    r = p.rollout
    data, fsdp, tensor = p.mesh
    mesh = sharding_lib.make_mesh(data, fsdp, tensor, devices=devices)
    cfg = build.model_config(p, build.task(p).vocab_size)
    graphdef, params = build.abstract_model(p, cfg)
    tx, _ = build.optimizer(p)
    spec = build.step_spec(p, cfg.vocab_size)
    state = jax.eval_shape(step_lib.state_init(tx, 0, spec), params)
    shardings = sharding_lib.tree_shardings(state, mesh)
    state = dry_run._abstract(state, shardings)
    rows, tp, tc = 16, r.max_prompt_len, r.max_new_tokens
    rows_sharding = sharding_lib.batch_sharding(mesh)
    arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows_sharding)
    batch = records.Batch(
        prompt_ids=arr((rows, tp), jnp.int32),
        prompt_mask=arr((rows, tp), jnp.int32),
        completion_ids=arr((rows, tc), jnp.int32),
        completion_mask=arr((rows, tc), jnp.float32),
        rewards=arr((rows,), jnp.float32),
        sampler_logp=arr((rows, tc), jnp.float32),
        old_logp=arr((rows, tc), jnp.float32),
        ref_logp=arr((rows, tc), jnp.float32),
    )
    fns = step_lib.build(graphdef, spec, tx, mesh, shardings)
    out = {
        "train_step": fns.train_step.lower(state, batch),
        "scoring": fns.logprobs.lower(state.params, batch),
    }
    smp = build.sampler(p, graphdef, None, mesh)  # the run's own sampler programs
    weights = sampler_lib.rollout_weights(state.params, mesh, p.model.dtype)
    key = jax.eval_shape(lambda: jax.random.key(0))
    b = 4  # prompts; the sampler repeats each G times after the prefill
    args = (
        weights,
        arr((b, tp), jnp.int32),
        arr((b,), jnp.int32),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding_lib.named(mesh)),
        arr((b,), jnp.int32),
    )
    prefill = smp.prefill_program(r.group_size, smp.sampling)
    out["prefill"] = prefill.lower(*args)
    decode_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_lib.named(mesh)),
        jax.eval_shape(prefill, *args),
    )
    out["decode"] = smp.decode_program(smp.sampling).lower(weights, decode_state)
    return out


def test_targets_fail_before_compiling_without_libtpu(monkeypatch):
    with pytest.raises(ValueError, match="valid targets are cpu, tpu-v5e-4"):
        targets.check("tpu-v9-8")
    monkeypatch.setattr(targets, "has_libtpu", lambda: False)
    with pytest.raises(ValueError, match=r'pip install -e "\.\[tpu\]"'):
        dry_run.estimate(_config("auto"), target="tpu-v5e-8")
    targets.check("cpu")  # the default needs nothing


def test_over_hbm_line_is_the_compilers_own():
    msg = (
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
        "hbm. Used 20.31G of 15.75G hbm. Exceeded hbm capacity by 4.56G.\n\nTotal hbm usage "
        ">= 20.56G:\n    reserved 258.00M\n    program 20.31G"
    )
    line = targets.over_hbm_line(RuntimeError(msg))
    assert "Used 20.31G of 15.75G hbm" in line and "\n" not in line
    assert targets.over_hbm_line(RuntimeError("INVALID_ARGUMENT: shapes differ")) is None


@needs_libtpu
@pytest.mark.parametrize("attention", ["auto", "splash", "xla_blockwise", "naive"])
def test_every_program_lowers_for_a_sharded_v5e(attention):
    """On a TPU mesh `auto` is splash (under shard_map); the kernels appear only where they run:
    the train step, scoring and prefill (uncached shapes), never the cached decode step."""
    devices = targets.devices("tpu-v5e-4")
    progs = _lowered(_config(attention), devices)
    kernel = attention in ("auto", "splash")
    for name, lowered in progs.items():
        text = lowered.as_text()
        assert (MOSAIC in text) == (kernel and name != "decode"), (attention, name)


@needs_libtpu
def test_cudnn_on_a_tpu_mesh_is_refused_clearly():
    with pytest.raises(ValueError, match="needs a GPU backend, this one is 'tpu'"):
        _lowered(_config("cudnn"), targets.devices("tpu-v5e-4"))


@needs_libtpu
def test_splash_outside_shard_map_is_what_fails(monkeypatch):
    """The control: the same kernel called without the shard_map (the code before this test
    existed) does not lower on the sharded mesh, so the lowering test above can fail."""
    import contextlib

    monkeypatch.setattr(attention_lib, "kernels_split_over", lambda mesh: contextlib.nullcontext())
    monkeypatch.setattr(attention_lib, "_platform", lambda: "tpu")
    with pytest.raises(NotImplementedError, match="Mosaic kernels cannot be automatically"):
        _lowered(_config("splash"), targets.devices("tpu-v5e-4"))


@needs_libtpu
@pytest.mark.slow
def test_dry_run_compiles_every_program_with_the_tpu_compiler():
    """`--dry_run --target=tpu-v5e-4`: all four programs through XLA:TPU (splash included)."""
    report = dry_run.estimate(_config("auto"), target="tpu-v5e-4")
    assert report["compiler"].startswith("XLA:TPU libtpu") and "v5e:2x2" in report["compiler"]
    assert report["platform"] == "tpu" and report["devices"] == 4
    assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert report["over_hbm"] == {} and report["fits"] is True
    assert report["device_memory_gib"] == targets.TARGETS["tpu-v5e-4"].hbm_gib
    phases = [report[k] for k in ("rollout_gib", "train_step_gib", "scoring_gib")]
    assert all(x > 0 for x in phases)
    assert abs(report["peak_gib"] - (report["state_gib"] + max(phases))) <= 3e-4


def _round_temp(layers: int) -> tuple[int, int]:
    """(temporary bytes of the continuous engine's round program, bytes of one layer's gathered
    prompt caches) as XLA:TPU compiles them on a v5e-4 with rows over its 4 chips: a Qwen3 of
    `layers` layers with 8 kv heads of 128 (no lane padding) and a tiny hidden size, 32 prompts
    x 2 of 1,024 tokens through 16 slots (a pool of 16 prompts: 64 MiB of keys and values per
    layer, more than a chip's on-chip memory holds). The sampler's programs, compiled as
    --dry_run does."""
    mesh = sharding_lib.make_mesh(1, 4, 1, devices=targets.devices("tpu-v5e-4"))
    cfg = Qwen3Config.tiny(
        num_layers=layers, num_heads=8, num_kv_heads=8, head_dim=128, max_position_embeddings=2048
    )
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(cfg, attention="xla_blockwise")))
    replicated = sharding_lib.named(mesh)
    weights = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=replicated), params
    )
    tp, prompts, n, slots = 1024, 32, 2, 16
    smp = sampler_lib.Sampler(
        graphdef, max_prompt_len=tp, max_new_tokens=16, eos_ids=(1,), temperature=1.0,
        cache_dtype=jnp.bfloat16, mesh=mesh, engine="continuous", slots=slots,
    )  # fmt: skip
    temps = {}
    compiled = dry_run._compiled

    def keep(lowered, phase, over_hbm):
        out = compiled(lowered, phase, over_hbm)
        temps[phase] = out.memory_analysis().temp_size_in_bytes
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dry_run, "_compiled", keep)
        assert dry_run._sampler_call(smp, weights, prompts, n, smp.sampling, "rollout", {})
    q = smp.continuous._group(prompts, tp, n, slots)  # prompts in the pool
    per_layer = 2 * q * cfg.num_kv_heads * tp * cfg.head_dim * 2  # k and v, bf16, gathered
    return temps["rollout decode"], per_layer


@needs_libtpu
def test_continuous_admission_gathers_one_layer_of_prompt_caches_at_a_time(monkeypatch):
    """A slot may take a prompt another chip prefilled, so on a mesh the round program gathers
    the pool's prompt caches onto every chip. kv_cache.admit makes the layers take turns, so
    the compiler holds about one layer's gathered caches, not every layer's (the paper config
    on a v5e-8: 5.3 GiB of the round's temporaries before, 0.5 after). The control removes the
    ordering and must then hold most layers' at once."""
    layers = 6  # measured: 11 MiB with the ordering, 337 MiB (5.3 layers' worth) without
    temp, per_layer = _round_temp(layers)
    assert temp < 2 * per_layer, (temp, per_layer)
    monkeypatch.setattr(kv_cache_lib.jax.lax, "optimization_barrier", lambda x: x)
    free, _ = _round_temp(layers)
    assert free > layers / 2 * per_layer, (free, per_layer)
