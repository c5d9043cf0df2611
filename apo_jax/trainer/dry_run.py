"""`--dry_run`: will this config fit? Compiles one step's programs on abstract shapes and adds up
the per-device memory XLA reports, without allocating a parameter or reading data.

Phases of a step and what is resident in each (per device, bytes):
  rollout  train state (+ reference copy) + rollout weights that are not the train arrays
           + prefill / decode: the KV cache and decode state plus the programs' temporaries,
           for one sampler call (rollout.rows_per_chunk rows per process, or all of a step's;
           rollout.engine=continuous: one prefill group of prompts' caches, the slots' cache of
           rollout.slots rows per process and the output rows)
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
programs (one device's share; the sampler's are the run's own, `build.sampler`'s, on
`sampler.rollout_weights` of the abstract state) and from the shardings of the abstract state.
`fits` compares the peak with the budget (`budget`: on GPU, JAX's memory fraction of a
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
from apo_jax.trainer import build, packing, records
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
    """Compiles the sampler's own prefill and decode programs (what `Sampler.sample` runs) for
    one call of `b` prompts × n samples at the longest prompt bucket; returns the call's
    per-device bytes besides the weights (None: the compiler refused a program for memory).
    rollout.engine=continuous: its prefill (prompt caches, output rows, empty slots) and its
    round program (admission + decode) at the full slot count."""
    replicated = sharding_lib.named(smp.mesh)
    named = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (
        weights,
        # prompt ids at the last bucket: host arrays enter whole (single process)
        named((b, smp.max_prompt_len), jnp.int32),
        named((b,), jnp.int32),  # lengths
        named(key.shape, key.dtype),
        named((b,), jnp.int32),  # row ids
    )
    if smp.engine == "continuous":
        z = min(smp.slots * jax.process_count(), b * n)
        prefill_fn = smp.continuous.prefill_program(n, z, sp)
        round_fn = smp.continuous.round_program(sp)
    else:
        prefill_fn, round_fn = smp.prefill_program(n, sp), smp.decode_program(sp)
    t = time.perf_counter()
    prefill = _compiled(prefill_fn.lower(*args), f"{phase} prefill", over_hbm)
    if prefill is None:
        return None
    # Live from the prefill to the end: the KV cache and decode state (continuous: the prompts'
    # caches of one prefill group, the output rows and the slots' cache).
    state = _abstract(jax.eval_shape(prefill_fn, *args), prefill.output_shardings)
    if smp.engine == "continuous":
        pool, rows_state, slots = state
        inputs = (slots, rows_state, pool, named((z,), jnp.int32), named((), jnp.int32))
    else:
        inputs = (state,)
    decode = _compiled(round_fn.lower(weights, *inputs), f"{phase} decode", over_hbm)
    if decode is None:
        return None
    pre, dec = prefill.memory_analysis(), decode.memory_analysis()
    cache = _device_bytes(state)
    return dict(
        bytes=max(
            pre.output_size_in_bytes + pre.temp_size_in_bytes, cache + dec.temp_size_in_bytes
        ),
        cache=cache,
        rows=b * n,
        compile_s=time.perf_counter() - t,
    )


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
    cfg = build.model_config(p, task.vocab_size if task is not None else 0)
    if num_layers is not None:
        cfg = dataclasses.replace(cfg, num_layers=num_layers)
    rows = r.prompts_per_step * r.group_size // o.mini_batches  # sequences per update
    sharding_lib.check_mesh_fits(mesh.devices.shape, cfg, rows // o.micro_batches)
    over_hbm: dict[str, str] = {}  # program -> the TPU compiler's out-of-memory line
    st = _State.abstract(p, cfg, mesh)
    calls = _SamplerCalls.of(p, st, task, mesh, over_hbm)
    # Prompts per sampler call (the sampler repeats each G times after the prefill): a chunk
    # of rollout.rows_per_chunk rows from each process (loop.rollout), else the whole step (and
    # always under the continuous engine, whose cache holds rollout.slots rows).
    procs = jax.process_count()
    chunked = r.rows_per_chunk and r.engine == "static"
    b = r.rows_per_chunk // r.group_size * procs if chunked else r.prompts_per_step
    roll = calls(b, r.group_size, calls.sampler.sampling, "rollout")
    evals = _eval_calls(p, task, calls, procs)
    steps = _step_programs(p, st, mesh, rows, over_hbm)
    weights = calls.weights_extra
    rollout_bytes = roll and weights + roll["bytes"]
    eval_bytes = evals["bytes"]
    if p.eval.num_prompts and eval_bytes is not None:  # the rollout weights are resident too
        eval_bytes += weights
    phases = (rollout_bytes, steps["scoring"], steps["train_step"], eval_bytes)
    # A program the compiler refused has no size: then no peak, and `fits` is false.
    peak = None if None in phases else st.bytes + max(phases)
    platform = mesh.devices.flat[0].platform
    if device_memory_gib is None and target != "cpu":
        device_memory_gib = targets.TARGETS[target].hbm_gib
    budget_gib, fraction = budget(device_memory_gib, budget_platform or platform)
    gib = lambda x: None if x is None else round(x / GIB, 6)  # KiB: tiny configs stay visible
    compile_s = calls.compile_s() + steps["compile_s"]
    out = dict(
        target=target,
        compiler=targets.compiler(target, target_devices),
        over_hbm=over_hbm,
        peak_gib=gib(peak),
        state_gib=gib(st.bytes),
        rollout_gib=gib(rollout_bytes),
        train_step_gib=gib(steps["train_step"]),
        scoring_gib=gib(steps["scoring"]),
        eval_gib=gib(eval_bytes),  # 0 without eval.num_prompts
        # Each pass's call (besides the state and rollout weights): which one sets eval_gib.
        eval_calls_gib={name: gib(x) for name, x in evals["passes"].items()},
        kv_cache_gib=gib(roll and roll["cache"]),
        eval_kv_cache_gib=gib(evals["cache"]),
        rollout_weights_gib=gib(weights),
        compile_s=round(compile_s, 1),
        train_step_compile_s=round(steps["train_compile_s"], 1),
        devices=mesh.devices.size,
        platform=platform,
        mesh=dict(mesh.shape),
        params=cfg.num_params,
        trained_params=sum(math.prod(x.shape) for x in jax.tree.leaves(st.state.params)),
        lora_base_gib=gib(st.base_bytes),
        layers=cfg.num_layers,
        rows_per_update=rows,
        rollout_rows=b * r.group_size,  # rows per sampler call, all processes
        eval_rows=evals["rows"],  # rows per greedy / sampled evaluation call, all processes
        micro_batches=o.micro_batches,
        packing=o.packing,
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


@dataclasses.dataclass(frozen=True)
class _State:
    """The abstract train state on the mesh and what is resident beside it all step long."""

    graphdef: object
    state: object  # abstract TrainState with shardings
    shardings: object
    frozen: object  # the abstract LoRA base, or None
    tx: object
    spec: step_lib.StepSpec
    bytes: int  # per device: state (+ reference copy) (+ LoRA base)
    base_bytes: int  # per device: the LoRA base

    @classmethod
    def abstract(cls, p: build.Plan, cfg, mesh) -> _State:
        graphdef, params = build.abstract_model(p, cfg)
        # LoRA: the state holds the adapters; the frozen base is resident once beside it.
        params, frozen = build.trainable(p, params)
        tx, _ = build.optimizer(p)
        spec = build.step_spec(p, cfg.vocab_size)
        state = jax.eval_shape(step_lib.state_init(tx, p.seed, spec), params)
        shardings = sharding_lib.tree_shardings(state, mesh)
        state = _abstract(state, shardings)
        # The reference is a copy of the trained parameters (under LoRA: zero adapters, the base).
        ref = p.objective.reference(p.loss_params)
        total = _device_bytes(state) + (_device_bytes(state.params) if ref else 0)
        base = 0
        if frozen is not None:
            frozen = _abstract(frozen, sharding_lib.tree_shardings(frozen, mesh))
            base = _device_bytes(frozen)
        return cls(graphdef, state, shardings, frozen, tx, spec, total + base, base)


@dataclasses.dataclass
class _SamplerCalls:
    """The loop's own sampler and rollout weights (build.sampler, sampler.rollout_weights) on
    abstract arguments; one compile per (prompts, n, sampling). Without the task (a preset's
    vocabulary) its stop ids are unknown: the programs then differ from the run's only in the
    constants of the stop test."""

    sampler: object
    weights: object
    weights_extra: int  # per device: rollout copies that are not the train arrays themselves
    over_hbm: dict
    calls: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, p: build.Plan, st: _State, task, mesh, over_hbm: dict) -> _SamplerCalls:
        smp = build.sampler(p, st.graphdef, task, mesh)
        if st.frozen is None:
            weights = sampler_lib.rollout_weights(st.state.params, mesh, p.model.dtype)
            shared = {id(x) for x in jax.tree.leaves(st.state.params)}
            extra = sum(_device_bytes(x) for x in jax.tree.leaves(weights) if id(x) not in shared)
        else:  # LoRA: the sampler reads the base and adapters in their training layout
            weights, extra = lora_lib.join(st.frozen, st.state.params), 0
        return cls(smp, weights, extra, over_hbm)

    def __call__(self, b: int, n: int, sp, phase: str) -> dict | None:
        if (b, n, sp) not in self.calls:
            self.calls[b, n, sp] = _sampler_call(
                self.sampler, self.weights, b, n, sp, phase, self.over_hbm
            )
        return self.calls[b, n, sp]

    def compile_s(self) -> float:
        return sum(c["compile_s"] for c in self.calls.values() if c)


def _eval_calls(p: build.Plan, task, calls: _SamplerCalls, procs: int) -> dict:
    """The greedy and the sampled evaluation pass at their chunk shapes (trainer/evaluate.py):
    bytes of the larger call (besides the weights), its cache, each pass's bytes and rows."""
    if not p.eval.num_prompts:
        return dict(bytes=0, cache=0, passes={}, rows={})
    k, smp = p.rollout.group_size, calls.sampler
    # As many prompts as the held-out set has, when the task is at hand.
    num = (
        p.eval.num_prompts
        if task is None
        else len(evaluate_lib.eval_subset(task, p.eval.num_prompts))
    )
    per_call = evaluate_lib.call_prompts(evaluate_lib.rows_per_call(p, procs), k, num, procs)
    greedy = calls(per_call[0], 1, smp.sampling_for(**evaluate_lib.GREEDY), "eval greedy")
    sampled = calls(per_call[1], k, smp.sampling_for(**evaluate_lib.SAMPLED), "eval sampled")
    out = dict(
        bytes=None,
        cache=None,
        passes={name: c and c["bytes"] for name, c in (("greedy", greedy), ("sampled", sampled))},
        rows=dict(greedy=per_call[0], sampled=per_call[1] * k),
    )
    if greedy and sampled:
        out["bytes"] = max(greedy["bytes"], sampled["bytes"])
        out["cache"] = max(greedy["cache"], sampled["cache"])
    return out


def _step_programs(p: build.Plan, st: _State, mesh, rows: int, over_hbm: dict) -> dict:
    """Compiles the scorer and the train step on one mini-batch of `rows` sequences; their
    per-device bytes besides the state (None: refused for memory) and compile seconds."""
    batch_sharding = sharding_lib.batch_sharding(mesh)
    tp, tc = p.rollout.max_prompt_len, p.rollout.max_new_tokens
    arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    per_token = lambda dtype: arr((rows, tc), dtype)  # [B, Tc]
    batch = records.Batch(
        prompt_ids=arr((rows, tp), jnp.int32),
        prompt_mask=arr((rows, tp), jnp.int32),
        completion_ids=per_token(jnp.int32),
        completion_mask=per_token(jnp.float32),
        rewards=arr((rows,), jnp.float32),
        sampler_logp=per_token(jnp.float32),
        correct=arr((rows,), jnp.float32),
        old_logp=per_token(jnp.float32),
        ref_logp=per_token(jnp.float32),
    )
    o = p.optim
    if o.packing == "packed":  # the largest plan such a batch can need (trainer/packing.py)
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        plan = packing.worst_case(rows, o.micro_batches, tp, tc, o.pack_len or tp + tc, dp)
        batch = batch.replace(pack=jax.tree.map(lambda x: arr(x.shape, x.dtype), plan))
    batch_bytes = _device_bytes(batch)
    fns = step_lib.build(st.graphdef, st.spec, st.tx, mesh, st.shardings, frozen=st.frozen)
    t = time.perf_counter()
    score = _compiled(fns.logprobs.lower(st.state.params, batch), "scoring", over_hbm)
    t_score = time.perf_counter()
    train = _compiled(fns.train_step.lower(st.state, batch), "train_step", over_hbm)
    out = dict(
        scoring=None,
        train_step=None,
        train_compile_s=time.perf_counter() - t_score,
        compile_s=time.perf_counter() - t,
    )
    if score:
        sc = score.memory_analysis()
        out["scoring"] = batch_bytes + sc.temp_size_in_bytes + sc.output_size_in_bytes
    if train:
        tr = train.memory_analysis()
        # The state is donated: its outputs alias its arguments. What else the step holds: the
        # batch, the temporaries (activations, gradients, optimizer scratch) and the metrics.
        out["train_step"] = (
            batch_bytes + tr.temp_size_in_bytes + tr.output_size_in_bytes - tr.alias_size_in_bytes
        )
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
