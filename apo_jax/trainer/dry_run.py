"""`--dry_run`: will this config fit? Compiles one step's programs on abstract shapes and adds up
the per-device memory XLA reports, without allocating a parameter or reading data.

Phases of a step and what is resident in each (per device, bytes):
  rollout  train state (+ reference copy) + rollout weights that are not the train arrays
           + prefill / decode: the KV cache and decode state plus the programs' temporaries,
           for one sampler call (rollout.rows_per_chunk rows per process, or all of a step's)
  scoring  train state (+ reference) + the log-prob program's temporaries and output
  update   train state (+ reference; the state is donated and updated in place) + the batch
           + the train step's temporaries
Under LoRA (model.lora.rank > 0) the train state holds the adapters and their moments, the
reference is zero adapters, and the frozen base (model.lora.base_dtype) is resident once
(`lora_base_gib`, counted in `state_gib`; `trained_params` counts the adapters).
`peak_gib` is the largest. Sizes come from `compiled.memory_analysis()` of the SPMD-partitioned
programs (one device's share) and from the shardings of the abstract state.
With `XLA_FLAGS=--xla_force_host_platform_device_count=N` a laptop plans an N-device slice.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import lora as lora_lib
from apo_jax.rollout import sampler as sampler_lib
from apo_jax.rollout.sampling import SamplingParams
from apo_jax.trainer import build
from apo_jax.trainer import step as step_lib

GIB = 2**30


def _device_bytes(tree) -> int:
    """Bytes one device holds of an abstract (ShapeDtypeStruct with sharding) pytree."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * _itemsize(x.dtype)
    return total


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # typed PRNG keys: their key data
        return math.prod(jax.random.key_data(jax.random.key(0)).shape) * 4
    return jnp.dtype(dtype).itemsize


def _abstract(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def _compile(fn, *args, **jit_kw):
    t = time.perf_counter()
    compiled = jax.jit(fn, **jit_kw).lower(*args).compile()
    return compiled, time.perf_counter() - t


def _rollout_weights(params, mesh, compute_dtype):
    """Abstract `sampler.rollout_weights`: (weights, bytes per device not shared with the train
    parameters)."""
    train = sharding_lib.tree_shardings(params, mesh, sharding_lib.TRAIN_RULES)
    rollout = sharding_lib.tree_shardings(params, mesh, sharding_lib.ROLLOUT_RULES)
    narrow = jnp.dtype(compute_dtype)
    extra = []

    def move(var, src, dst):
        x, src, dst = var.get_value(), src.get_value(), dst.get_value()
        if src.is_equivalent_to(dst, len(x.shape)):
            return var  # the train array serves
        dtype = x.dtype
        if jnp.issubdtype(dtype, jnp.floating) and narrow.itemsize < jnp.dtype(dtype).itemsize:
            dtype = narrow
        y = jax.ShapeDtypeStruct(x.shape, dtype, sharding=dst)
        extra.append(_device_bytes(y))
        return var.replace(y)

    is_var = lambda x: isinstance(x, nnx.Variable)
    weights = jax.tree.map(move, params, train, rollout, is_leaf=is_var)
    return weights, sum(extra)


def estimate(
    config: ml_collections.ConfigDict,
    device_memory_gib: float | None = None,
    *,
    num_layers: int | None = None,
) -> dict:
    """The dry-run report (see the module docstring) for `config` on the visible devices.
    `num_layers` overrides the architecture's depth (benchmarks: compile time against depth)."""
    p = build.plan(config)
    r, o, m = p.rollout, p.optim, p.model
    mesh = build.mesh(p)
    # The task only when the model's vocabulary is the task's (its tokenizer gives the size).
    task_vocab = build.task(p).vocab_size if m.vocab_size == -1 or m.hf_dir else 0
    cfg = build.model_config(p, task_vocab)
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    rows = r.prompts_per_step * r.group_size // o.mini_batches  # sequences per update
    sharding_lib.check_mesh_fits(mesh.devices.shape, cfg, rows // o.micro_batches)
    graphdef, params = build.abstract_model(p, cfg)
    # LoRA: the state holds the adapters; the frozen base is resident once beside it.
    params, frozen = build.trainable(p, params)
    tx, _ = build.optimizer(p)
    spec = build.step_spec(p, cfg.vocab_size)
    init_state = lambda prm: step_lib.init_train_state(prm, tx, p.seed, spec.schedule)
    state = jax.eval_shape(init_state, params)
    state_shardings = sharding_lib.tree_shardings(state, mesh)
    state = _abstract(state, state_shardings)
    ref = p.objective.reference(p.loss_params)
    # The reference is a copy of the trained parameters (under LoRA: zero adapters, the base).
    state_bytes = _device_bytes(state) + (_device_bytes(state.params) if ref else 0)
    base_bytes = 0
    if frozen is not None:
        frozen = _abstract(frozen, sharding_lib.tree_shardings(frozen, mesh))
        base_bytes = _device_bytes(frozen)
        state_bytes += base_bytes
    compile_s = 0.0

    # --- rollout: prefill + decode at the config's rows and lengths ----------------------------
    if frozen is None:
        weights, weights_extra = _rollout_weights(state.params, mesh, m.dtype)
    else:  # LoRA: the sampler reads the base and adapters in their training layout (no copy)
        weights, weights_extra = lora_lib.join(frozen, state.params), 0
    smp = sampler_lib.Sampler(
        graphdef,
        max_prompt_len=r.max_prompt_len,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        cache_dtype=build.cache_dtype(p),
        mesh=mesh,
    )
    sp = SamplingParams.make(r.temperature, r.top_k, r.top_p, ())
    # Prompts per sampler call (the sampler repeats each G times after the prefill): a chunk
    # of rollout.rows_per_chunk rows from each process (loop.rollout), else the whole step.
    procs = jax.process_count()
    b = r.rows_per_chunk // r.group_size * procs if r.rows_per_chunk else r.prompts_per_step
    # Host prompt arrays enter the sampler whole (a single-process run does not split them).
    row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.named(mesh))
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (
        weights,
        row((b, r.max_prompt_len), jnp.int32),
        row((b,), jnp.int32),
        row(key.shape, key.dtype),
        row((b,), jnp.int32),
    )
    prefill_fn = functools.partial(smp._prefill, n=r.group_size, sp=sp)
    prefill, s = _compile(prefill_fn, *args)
    compile_s += s
    decode_state = _abstract(jax.eval_shape(prefill_fn, *args), prefill.output_shardings)
    decode, s = _compile(
        functools.partial(smp._decode, sp=sp), weights, decode_state, donate_argnums=1
    )
    compile_s += s
    pre, dec = prefill.memory_analysis(), decode.memory_analysis()
    cache_bytes = _device_bytes(decode_state)
    rollout_bytes = weights_extra + max(
        pre.output_size_in_bytes + pre.temp_size_in_bytes,
        cache_bytes + dec.temp_size_in_bytes,
    )

    # --- scoring and update on one mini-batch ---------------------------------------------------
    batch_sharding = sharding_lib.batch_sharding(mesh)
    tp, tc = r.max_prompt_len, r.max_new_tokens
    shapes = {
        "prompt_ids": ((rows, tp), jnp.int32),
        "prompt_mask": ((rows, tp), jnp.int32),
        "completion_ids": ((rows, tc), jnp.int32),
        "completion_mask": ((rows, tc), jnp.float32),
        "sampler_logp": ((rows, tc), jnp.float32),
        "rewards": ((rows,), jnp.float32),
        "old_logp": ((rows, tc), jnp.float32),
        "ref_logp": ((rows, tc), jnp.float32),
    }
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
        for k, (shape, dtype) in shapes.items()
    }
    batch_bytes = _device_bytes(batch)
    fns = step_lib.build(graphdef, spec, tx, mesh, state_shardings, frozen=frozen)
    t = time.perf_counter()
    score = fns.logprobs.lower(state.params, batch).compile()
    t_score = time.perf_counter()
    train = fns.train_step.lower(state, batch).compile()
    train_compile_s = time.perf_counter() - t_score
    compile_s += time.perf_counter() - t
    sc, tr = score.memory_analysis(), train.memory_analysis()
    scoring_bytes = batch_bytes + sc.temp_size_in_bytes + sc.output_size_in_bytes
    # The state is donated: its outputs alias its arguments. What else the step holds: the
    # batch, the temporaries (activations, gradients, optimizer scratch) and the metrics.
    train_step_bytes = (
        batch_bytes + tr.temp_size_in_bytes + tr.output_size_in_bytes - tr.alias_size_in_bytes
    )
    peak = state_bytes + max(rollout_bytes, scoring_bytes, train_step_bytes)

    if device_memory_gib is None:
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            device_memory_gib = stats["bytes_limit"] / GIB
    gib = lambda x: round(x / GIB, 4)
    out = dict(
        peak_gib=gib(peak),
        state_gib=gib(state_bytes),
        rollout_gib=gib(rollout_bytes),
        train_step_gib=gib(train_step_bytes),
        scoring_gib=gib(scoring_bytes),
        kv_cache_gib=gib(cache_bytes),
        rollout_weights_gib=gib(weights_extra),
        compile_s=round(compile_s, 1),
        train_step_compile_s=round(train_compile_s, 1),
        devices=mesh.devices.size,
        platform=jax.devices()[0].platform,
        mesh=dict(mesh.shape),
        params=cfg.num_params,
        trained_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        lora_base_gib=gib(base_bytes),
        layers=cfg.num_layers,
        rows_per_update=rows,
        rollout_rows=b * r.group_size,  # rows per sampler call, all processes
        micro_batches=o.micro_batches,
        attention=m.attention,
        remat=m.remat,
        scan_layers=m.scan_layers,
        cache_dtype=str(jnp.dtype(build.cache_dtype(p))),
        device_memory_gib=None if device_memory_gib is None else round(device_memory_gib, 3),
    )
    if device_memory_gib is not None:
        out["fits"] = bool(peak <= device_memory_gib * GIB)
    return out
