"""`--dry_run`: will this config fit? Compiles one step's programs on abstract shapes and adds up
the per-device memory XLA reports, without allocating a parameter or reading data.

Phases of a step and what is resident in each (per device, bytes):
  rollout  train state (+ reference copy) + rollout weights that are not the train arrays
           + prefill / decode: the KV cache and decode state plus the programs' temporaries,
           for one sampler call (rollout.rows_per_chunk rows per process, or all of a step's)
  scoring  train state (+ reference) + the log-prob program's temporaries and output
  update   train state (+ reference; the state is donated and updated in place) + the batch
           + the train step's temporaries
`peak_gib` is the largest. Sizes come from `compiled.memory_analysis()` of the SPMD-partitioned
programs (one device's share) and from the shardings of the abstract state.
With `XLA_FLAGS=--xla_force_host_platform_device_count=N` a laptop plans an N-device slice
(XLA:CPU's numbers); `target="tpu-v5e-8"` (infra/targets.py) compiles every program with the TPU
compiler for that slice instead, on any host with libtpu installed. A program the TPU compiler
rejects for memory is reported by the compiler's own line in `over_hbm` and `fits` is false.
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
from apo_jax.infra import targets
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


def _compile(fn, *args, phase: str, over_hbm: dict, **jit_kw):
    t = time.perf_counter()
    compiled = _compiled(jax.jit(fn, **jit_kw).lower(*args), phase, over_hbm)
    return compiled, time.perf_counter() - t


def _compiled(lowered, phase: str, over_hbm: dict):
    """The compiled program, or None when the compiler refused it for memory (its one-line
    verdict goes to over_hbm[phase]); any other error propagates."""
    try:
        return lowered.compile()
    except Exception as e:  # XlaRuntimeError; its message is all there is to tell them apart
        line = targets.over_hbm_line(e)
        if line is None:
            raise
        over_hbm[phase] = line
        return None


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
    target: str = "cpu",
) -> dict:
    """The dry-run report (see the module docstring) for `config` on the visible devices, or
    on the devices of `target` (infra/targets.py: `tpu-v5e-8`, ...) with its compiler.
    `num_layers` overrides the architecture's depth (benchmarks: compile time against depth)."""
    targets.check(target)
    p = build.plan(config)
    target_devices = targets.devices(target)
    data, fsdp, tensor = p.mesh
    mesh = sharding_lib.make_mesh(data, fsdp, tensor, devices=target_devices)
    out = _estimate(p, mesh, num_layers)
    if device_memory_gib is None:
        if target != "cpu":
            device_memory_gib = targets.TARGETS[target].hbm_gib
        else:
            stats = jax.devices()[0].memory_stats() or {}
            if stats.get("bytes_limit"):
                device_memory_gib = stats["bytes_limit"] / GIB
    out.update(
        target=target,
        compiler=targets.compiler(target, target_devices),
        devices=mesh.devices.size,
        platform=mesh.devices.flat[0].platform,
        mesh=dict(mesh.shape),
        device_memory_gib=None if device_memory_gib is None else round(device_memory_gib, 3),
    )
    if device_memory_gib is not None:
        peak = out["peak_gib"]
        out["fits"] = peak is not None and peak <= device_memory_gib
    return out


def _estimate(p: build.Plan, mesh, num_layers: int | None) -> dict:
    r, o, m = p.rollout, p.optim, p.model
    # The task only when the model's vocabulary is the task's (its tokenizer gives the size).
    task_vocab = build.task(p).vocab_size if m.vocab_size == -1 or m.hf_dir else 0
    cfg = build.model_config(p, task_vocab)
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    rows = r.prompts_per_step * r.group_size // o.mini_batches  # sequences per update
    sharding_lib.check_mesh_fits(mesh.devices.shape, cfg, rows // o.micro_batches)
    graphdef, params = build.abstract_model(p, cfg)
    tx, _ = build.optimizer(p)
    spec = build.step_spec(p, cfg.vocab_size)
    init_state = lambda prm: step_lib.init_train_state(prm, tx, p.seed, spec.schedule)
    state = jax.eval_shape(init_state, params)
    state_shardings = sharding_lib.tree_shardings(state, mesh)
    state = _abstract(state, state_shardings)
    ref = p.objective.reference(p.loss_params)
    state_bytes = _device_bytes(state) + (_device_bytes(state.params) if ref else 0)
    compile_s = 0.0
    over_hbm: dict[str, str] = {}  # phase -> the TPU compiler's out-of-memory line

    # --- rollout: prefill + decode at the config's rows and lengths ----------------------------
    weights, weights_extra = _rollout_weights(state.params, mesh, m.dtype)
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
    prefill, s = _compile(prefill_fn, *args, phase="prefill", over_hbm=over_hbm)
    compile_s += s
    decode = cache_bytes = rollout_bytes = None
    if prefill:  # the decode program's input layouts are the prefill's output layouts
        decode_state = _abstract(jax.eval_shape(prefill_fn, *args), prefill.output_shardings)
        cache_bytes = _device_bytes(decode_state)
        decode, s = _compile(
            functools.partial(smp._decode, sp=sp),
            weights,
            decode_state,
            phase="decode",
            over_hbm=over_hbm,
            donate_argnums=1,
        )
        compile_s += s
    if prefill and decode:
        pre, dec = prefill.memory_analysis(), decode.memory_analysis()
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
    fns = step_lib.build(graphdef, spec, tx, mesh, state_shardings)
    t = time.perf_counter()
    score = _compiled(fns.logprobs.lower(state.params, batch), "scoring", over_hbm)
    t_score = time.perf_counter()
    train = _compiled(fns.train_step.lower(state, batch), "train_step", over_hbm)
    train_compile_s = time.perf_counter() - t_score
    compile_s += time.perf_counter() - t
    scoring_bytes = train_step_bytes = None
    if score:
        sc = score.memory_analysis()
        scoring_bytes = batch_bytes + sc.temp_size_in_bytes + sc.output_size_in_bytes
    if train:
        tr = train.memory_analysis()
        # The state is donated: its outputs alias its arguments. What else the step holds: the
        # batch, the temporaries (activations, gradients, optimizer scratch) and the metrics.
        train_step_bytes = (
            batch_bytes + tr.temp_size_in_bytes + tr.output_size_in_bytes - tr.alias_size_in_bytes
        )
    phases = (rollout_bytes, scoring_bytes, train_step_bytes)
    # A phase the compiler refused has no size: no peak, and `fits` is false.
    peak = None if None in phases else state_bytes + max(phases)

    gib = lambda x: None if x is None else round(x / GIB, 4)
    return dict(
        over_hbm=over_hbm,
        peak_gib=gib(peak),
        state_gib=gib(state_bytes),
        rollout_gib=gib(rollout_bytes),
        train_step_gib=gib(train_step_bytes),
        scoring_gib=gib(scoring_bytes),
        kv_cache_gib=gib(cache_bytes),
        rollout_weights_gib=gib(weights_extra),
        compile_s=round(compile_s, 1),
        train_step_compile_s=round(train_compile_s, 1),
        params=cfg.num_params,
        layers=cfg.num_layers,
        rows_per_update=rows,
        rollout_rows=b * r.group_size,  # rows per sampler call, all processes
        micro_batches=o.micro_batches,
        attention=m.attention,
        remat=m.remat,
        scan_layers=m.scan_layers,
        cache_dtype=str(jnp.dtype(build.cache_dtype(p))),
    )
