"""`--dry_run`: will this config fit? Compiles one step's programs on abstract shapes and adds up
the per-device memory XLA reports, without allocating a parameter or reading data.

Phases of a step and what is resident in each (per device, bytes):
  rollout  train state (+ reference copy) + rollout weights that are not the train arrays
           + prefill / decode: the KV cache and decode state plus the programs' temporaries,
           for one sampler call (rollout.rows_per_chunk rows per process, or all of a step's)
  scoring  train state (+ reference) + the log-prob program's temporaries and output
  update   train state (+ reference; the state is donated and updated in place) + the batch
           + the train step's temporaries
  eval     (with eval.num_prompts) train state (+ reference) + rollout weights + the larger of
           the greedy and the sampled evaluation call (trainer/evaluate.py call_prompts: at most
           eval.rows_per_chunk rows per process, by default the rollout's chunk)
Under LoRA (model.lora.rank > 0) the train state holds the adapters and their moments, the
reference is zero adapters, and the frozen base (model.lora.base_dtype) is resident once
(`lora_base_gib`, counted in `state_gib`; `trained_params` counts the adapters).
`peak_gib` is the largest. Sizes come from `compiled.memory_analysis()` of the SPMD-partitioned
programs (one device's share) and from the shardings of the abstract state. The sampler phases
compile the run's own programs: `build.sampler`'s prefill / decode (`Sampler.prefill_program`,
`decode_program`) on `sampler.rollout_weights` of the abstract state, at the longest prompt
bucket. `fits` compares the peak with the budget (`budget`: on GPU, JAX's memory fraction of a
memory size given by hand).
With `XLA_FLAGS=--xla_force_host_platform_device_count=N` a laptop plans an N-device slice
(XLA:CPU's numbers); `target="tpu-v5e-8"` (infra/targets.py) compiles every program with the TPU
compiler for that slice instead, on any host with libtpu installed. A program the TPU compiler
rejects for memory is reported by the compiler's own line in `over_hbm`, and `fits` is false.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections

from apo_jax.infra import sharding as sharding_lib
from apo_jax.infra import targets
from apo_jax.models import lora as lora_lib
from apo_jax.rollout import sampler as sampler_lib
from apo_jax.trainer import build, records
from apo_jax.trainer import evaluate as evaluate_lib
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


def _sampler_call(smp, weights, b: int, n: int, sp, phase: str, over_hbm: dict) -> dict | None:
    """Compiles the sampler's own prefill and decode programs (`Sampler.prefill_program`,
    `decode_program`: what `Sampler.sample` runs) for one call of `b` prompts × n samples at
    the longest prompt bucket; returns the call's per-device bytes besides the weights (None:
    the compiler refused a program for memory, see `_compiled`)."""
    mesh = smp.mesh
    row = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.named(mesh))
    key = jax.eval_shape(lambda: jax.random.key(0))
    p = smp.max_prompt_len  # the last bucket
    args = (
        weights,
        row((b, p), jnp.int32),  # prompt ids: host arrays enter whole (single process)
        row((b,), jnp.int32),  # lengths
        row(key.shape, key.dtype),
        row((b,), jnp.int32),  # row ids
    )
    prefill, s_pre = _compile_jitted(
        smp.prefill_program(n, sp), *args, f"{phase} prefill", over_hbm
    )
    if prefill is None:
        return None
    state = _abstract(jax.eval_shape(smp.prefill_program(n, sp), *args), prefill.output_shardings)
    decode, s_dec = _compile_jitted(
        smp.decode_program(sp), weights, state, f"{phase} decode", over_hbm
    )
    if decode is None:
        return None
    pre, dec = prefill.memory_analysis(), decode.memory_analysis()
    cache = _device_bytes(state)  # KV cache + decode state, live from prefill to the end
    return dict(
        bytes=max(
            pre.output_size_in_bytes + pre.temp_size_in_bytes, cache + dec.temp_size_in_bytes
        ),
        cache=cache,
        rows=b * n,
        compile_s=s_pre + s_dec,
    )


def _compile_jitted(fn, *args):
    """(compiled or None, seconds); the last two arguments are `_compiled`'s phase, over_hbm."""
    *args, phase, over_hbm = args
    t = time.perf_counter()
    compiled = _compiled(fn.lower(*args), phase, over_hbm)
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


def estimate(
    config: ml_collections.ConfigDict,
    device_memory_gib: float | None = None,
    *,
    num_layers: int | None = None,
    budget_platform: str | None = None,
    target: str = "cpu",
) -> dict:
    """The dry-run report (see the module docstring) for `config` on the visible devices, or
    on the devices of `target` (infra/targets.py: `tpu-v5e-8`, ...) with its compiler.
    `num_layers` overrides the architecture's depth (benchmarks: compile time against depth);
    `budget_platform` is the platform `device_memory_gib` is memory of ("gpu": JAX's memory
    fraction of it; default: the visible devices' platform)."""
    targets.check(target)  # before any work: a TPU target without libtpu says how to get it
    p = build.plan(config)
    r, o, m = p.rollout, p.optim, p.model
    target_devices = targets.devices(target)
    mesh = sharding_lib.make_mesh(*p.mesh, devices=target_devices)
    # The task only when the model's vocabulary is the task's (its tokenizer gives the size).
    task = build.task(p) if m.vocab_size == -1 or m.hf_dir else None
    task_vocab = task.vocab_size if task is not None else 0
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
    state = jax.eval_shape(step_lib.state_init(tx, p.seed, spec), params)
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
    over_hbm: dict[str, str] = {}  # program -> the TPU compiler's out-of-memory line

    # --- rollout: prefill + decode at the config's rows and lengths ----------------------------
    # The loop's own sampler and rollout weights (build.sampler, sampler.rollout_weights) on
    # abstract arguments. Without the task (a preset's vocabulary) its stop ids are unknown:
    # the programs then differ from the run's only in the constants of the stop test.
    smp = build.sampler(p, graphdef, task, mesh)
    if frozen is None:
        weights = sampler_lib.rollout_weights(state.params, mesh, m.dtype)
        shared = {id(x) for x in jax.tree.leaves(state.params)}
        weights_extra = sum(
            _device_bytes(x) for x in jax.tree.leaves(weights) if id(x) not in shared
        )  # the gathered copies; parameters laid out alike are the train arrays themselves
    else:  # LoRA: the sampler reads the base and adapters in their training layout (no copy)
        weights, weights_extra = lora_lib.join(frozen, state.params), 0
    calls: dict = {}  # (prompts, n, sampling) -> _sampler_call: one compile per program

    def call(b, n, sp, phase):
        if (b, n, sp) not in calls:
            calls[b, n, sp] = _sampler_call(smp, weights, b, n, sp, phase, over_hbm)
        return calls[b, n, sp]

    # Prompts per sampler call (the sampler repeats each G times after the prefill): a chunk
    # of rollout.rows_per_chunk rows from each process (loop.rollout), else the whole step.
    procs = jax.process_count()
    b = r.rows_per_chunk // r.group_size * procs if r.rows_per_chunk else r.prompts_per_step
    roll = call(b, r.group_size, smp.sampling, "rollout")
    cache_bytes = roll and roll["cache"]
    rollout_bytes = roll and weights_extra + roll["bytes"]

    # --- evaluation: the greedy and the sampled pass at their chunk shapes (trainer/evaluate.py)
    eval_bytes, eval_cache, eval_rows, eval_passes = 0, 0, {}, {}
    if p.eval_prompts:
        k = r.group_size
        # As many prompts as the held-out set has, when the task is at hand.
        num = (
            p.eval_prompts if task is None else len(evaluate_lib.eval_subset(task, p.eval_prompts))
        )
        per_call = evaluate_lib.call_prompts(evaluate_lib.rows_per_call(p, procs), k, num, procs)
        greedy = call(per_call[0], 1, smp.sampling_for(**evaluate_lib.GREEDY), "eval greedy")
        sampled = call(per_call[1], k, smp.sampling_for(**evaluate_lib.SAMPLED), "eval sampled")
        passes = dict(greedy=greedy, sampled=sampled)
        eval_rows = dict(greedy=per_call[0], sampled=per_call[1] * k)
        eval_passes = {name: c and c["bytes"] for name, c in passes.items()}
        eval_bytes = eval_cache = None
        if greedy and sampled:
            eval_bytes = weights_extra + max(greedy["bytes"], sampled["bytes"])
            eval_cache = max(greedy["cache"], sampled["cache"])
    compile_s += sum(c["compile_s"] for c in calls.values() if c)

    # --- scoring and update on one mini-batch ---------------------------------------------------
    batch_sharding = sharding_lib.batch_sharding(mesh)
    tp, tc = r.max_prompt_len, r.max_new_tokens
    spec_ = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    per_token = lambda dtype: spec_((rows, tc), dtype)  # [B, Tc]
    batch = records.Batch(
        prompt_ids=spec_((rows, tp), jnp.int32),
        prompt_mask=spec_((rows, tp), jnp.int32),
        completion_ids=per_token(jnp.int32),
        completion_mask=per_token(jnp.float32),
        rewards=spec_((rows,), jnp.float32),
        sampler_logp=per_token(jnp.float32),
        correct=spec_((rows,), jnp.float32),
        old_logp=per_token(jnp.float32),
        ref_logp=per_token(jnp.float32),
    )
    batch_bytes = _device_bytes(batch)
    fns = step_lib.build(graphdef, spec, tx, mesh, state_shardings, frozen=frozen)
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
    phases = (rollout_bytes, scoring_bytes, train_step_bytes, eval_bytes)
    # A program the compiler refused has no size: then no peak, and `fits` is false.
    peak = None if None in phases else state_bytes + max(phases)

    platform = mesh.devices.flat[0].platform
    if device_memory_gib is None and target != "cpu":
        device_memory_gib = targets.TARGETS[target].hbm_gib
    budget_gib, fraction = budget(device_memory_gib, budget_platform or platform)
    gib = lambda x: None if x is None else round(x / GIB, 6)  # KiB: tiny configs stay visible
    out = dict(
        target=target,
        compiler=targets.compiler(target, target_devices),
        over_hbm=over_hbm,
        peak_gib=gib(peak),
        state_gib=gib(state_bytes),
        rollout_gib=gib(rollout_bytes),
        train_step_gib=gib(train_step_bytes),
        scoring_gib=gib(scoring_bytes),
        eval_gib=gib(eval_bytes),  # 0 without eval.num_prompts
        # Each pass's call (besides the state and rollout weights): which one sets eval_gib.
        eval_calls_gib={name: gib(x) for name, x in eval_passes.items()},
        kv_cache_gib=gib(cache_bytes),
        eval_kv_cache_gib=gib(eval_cache),
        rollout_weights_gib=gib(weights_extra),
        compile_s=round(compile_s, 1),
        train_step_compile_s=round(train_compile_s, 1),
        devices=mesh.devices.size,
        platform=platform,
        mesh=dict(mesh.shape),
        params=cfg.num_params,
        trained_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
        lora_base_gib=gib(base_bytes),
        layers=cfg.num_layers,
        rows_per_update=rows,
        rollout_rows=b * r.group_size,  # rows per sampler call, all processes
        eval_rows=eval_rows,  # rows per greedy / sampled evaluation call, all processes
        micro_batches=o.micro_batches,
        attention=m.attention,
        remat=m.remat,
        scan_layers=m.scan_layers,
        cache_dtype=str(jnp.dtype(build.cache_dtype(p, mesh))),
        device_memory_gib=None if device_memory_gib is None else round(device_memory_gib, 3),
        memory_fraction=fraction,
        budget_gib=None if budget_gib is None else round(budget_gib, 3),
    )
    if budget_gib is not None:
        out["fits"] = peak is not None and bool(peak <= budget_gib * GIB)
    return out


def memory_fraction() -> float:
    """The share of each GPU's memory JAX's allocator takes: XLA_CLIENT_MEM_FRACTION (or its
    older name XLA_PYTHON_CLIENT_MEM_FRACTION), 0.75 by default; all of it with
    XLA_PYTHON_CLIENT_ALLOCATOR=platform (allocations straight from the driver)."""
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
        return 1.0
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        if os.environ.get(name):
            return float(os.environ[name])
    return 0.75


def budget(device_memory_gib: float | None, platform: str) -> tuple[float | None, float]:
    """(GiB per device `fits` compares the peak with, the share of the given memory it is).
    A device that reports its limit (GPU, TPU) gives it, the GPU allocator's fraction already
    applied. A budget given by hand is the device's memory: on GPU only JAX's memory fraction of
    it is usable, so `fits` uses that share; elsewhere all of it."""
    if device_memory_gib is None:
        stats = jax.devices()[0].memory_stats() or {}
        if stats.get("bytes_limit"):
            return stats["bytes_limit"] / GIB, 1.0
        return None, 1.0
    fraction = memory_fraction() if platform == "gpu" else 1.0
    return device_memory_gib * fraction, fraction
