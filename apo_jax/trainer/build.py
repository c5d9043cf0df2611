"""The build boundary: the config (a ConfigDict) becomes typed objects here, and nowhere else.

`plan(config)` validates every key and reads it into a frozen `Plan` (no I/O, no devices); the
builders below turn a plan into the run's objects: mesh, task, model, objective, optimizer,
train state, sampler. The training loop, in-loop evaluation and the evaluation CLI all start
from a plan, so their defaults cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from apo_jax import objectives, settings, tasks
from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import decoder as model_lib
from apo_jax.models import hf_io, peft_io
from apo_jax.models import lora as lora_lib
from apo_jax.models import registry as models
from apo_jax.objectives import entropy as entropy_lib
from apo_jax.objectives import schedule as schedule_lib
from apo_jax.rollout import sampler as sampler_lib
from apo_jax.trainer import step as step_lib
from apo_jax.trainer import validate
from apo_jax.trainer.plan import Plan


def plan(c: ml_collections.ConfigDict) -> Plan:
    """Validates the config (errors name the key) and reads every key into a `Plan`. A key the
    config lacks (a record written before the key existed) reads as its default."""
    read = settings.read
    run, lo = read(settings.Run, c), read(settings.Lora, c.model.lora)
    model = read(settings.Model, c.model, base_dtype=jnp.dtype(lo.base_dtype), peft_dir=lo.peft_dir)
    model = dataclasses.replace(model, lora=lora_config(lo, model.param_dtype, run.seed))
    sched, mesh = read(schedule_lib.ScheduleConfig, c.schedule), read(settings.Mesh, c.mesh)
    objective = objectives.get(c.loss.name)
    loss_params = dict(c.loss[objective.name])
    validate.check_block(f"loss.{objective.name}", loss_params, objective.defaults)
    objective.check(loss_params)
    task = tasks.get(c.task.name)
    task_params = dict(c.task[task.name])
    validate.check_block(f"task.{task.name}", task_params, task.defaults)
    task.check(task_params)
    # The other blocks: range-checked too, and refused if set (they would be ignored).
    blocks = {f"loss.{n}": objectives.get(n) for n in objectives.names()}
    blocks.update({f"task.{n}": tasks.get(n) for n in tasks.names()})
    validate.check_unused_blocks(c, {k: (b.defaults, b.check) for k, b in blocks.items()})
    # The ESS rule rebuilds p and q as the loss does: same constants as its block.
    simplex = {k: loss_params[k] for k in schedule_lib.SIMPLEX_KEYS if k in loss_params}
    p = Plan(
        seed=run.seed,
        total_steps=run.total_steps,
        model=model,
        rollout=read(settings.Rollout, c.rollout),
        loss=read(settings.Loss, c.loss),
        schedule=dataclasses.replace(sched, **simplex),
        optim=read(settings.Optim, c.optim),
        mesh=(mesh.data, mesh.fsdp, mesh.tensor),
        checkpoint=read(settings.Checkpoint, c.checkpoint),
        eval=read(settings.Eval, c.eval),
        logging=read(settings.Logging, c.logging),
        objective=objective,
        loss_params=loss_params,
        task=task,
        task_params=task_params,
        record=c.to_dict(),
    )
    validate.check_plan(p)
    return p


def lora_config(lo: settings.Lora, param_dtype, seed: int) -> lora_lib.LoRAConfig | None:
    """config.model.lora as a LoRAConfig (adapters in model.param_dtype), None when rank is 0."""
    if not lo.rank:
        return None
    targets = lora_lib.parse_targets(lo.targets)
    return lora_lib.LoRAConfig(lo.rank, float(lo.alpha), targets, param_dtype, seed)


def config_root_on_path(argv) -> None:
    """Config files import their base as `from configs import base`: put the directory holding
    `configs/` (the parent of the config file's folder) on sys.path, wherever we run from."""
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        if path:
            root = os.path.dirname(os.path.dirname(os.path.abspath(path.split(":", 1)[0])))
            if root not in sys.path:
                sys.path.insert(0, root)


def load_config_json(path: str) -> ml_collections.ConfigDict:
    """A run's saved `config.json` as a ConfigDict (for evaluation and resumption checks)."""
    with open(path) as f:
        try:
            return ml_collections.ConfigDict(json.load(f))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
            ) from None


# --- builders -------------------------------------------------------------------------------------


def mesh(p: Plan):
    data, fsdp, tensor = p.mesh
    return sharding_lib.make_mesh(data, fsdp, tensor)


def task(p: Plan) -> tasks.Task:
    ctx = tasks.TaskContext(
        seed=p.seed, max_prompt_len=p.rollout.max_prompt_len, model_dir=p.model.hf_dir
    )
    return p.task.build(p.task_params, ctx)


def model_config(p: Plan, task_vocab: int) -> model_lib.DecoderConfig:
    """The architecture, read without touching any weights (for checks before loading)."""
    m = p.model
    if m.hf_dir:
        if not os.path.isdir(m.hf_dir):
            raise FileNotFoundError(
                f"config.model.hf_dir={m.hf_dir!r}: no such directory. {hf_io.WHERE}"
            )
        cfg = models.config_from_hf(os.path.join(m.hf_dir, "config.json"))
    else:
        cfg = models.preset(m.preset)
        if m.vocab_size:
            vocab = task_vocab if m.vocab_size == -1 else m.vocab_size
            cfg = dataclasses.replace(cfg, vocab_size=vocab)
    validate.check_model(p, cfg, task_vocab)
    return cfg


def _init(p: Plan, cfg: model_lib.DecoderConfig, lora: bool = True):
    """The model's initialiser; under LoRA the base weights are in model.lora.base_dtype
    (`lora=False`: the base alone, as a plain model)."""
    m = p.model
    kw = dict(dtype=m.dtype, remat=m.remat, attention=m.attention, scan_layers=m.scan_layers)
    kw["param_dtype"] = m.base_dtype if m.lora else m.param_dtype
    if m.lora and lora:
        kw["lora"] = m.lora
    return lambda: model_lib.init_model(cfg, p.seed, **kw)


def abstract_model(p: Plan, cfg: model_lib.DecoderConfig, lora: bool = True):
    """(graphdef, abstract params): shapes only, nothing allocated (restores, dry runs)."""
    return nnx.split(nnx.eval_shape(_init(p, cfg, lora)), nnx.Param)


def model(p: Plan, cfg: model_lib.DecoderConfig, mesh):
    """(graphdef, params) with every parameter created directly in its sharding on `mesh`.
    Under LoRA the params hold the base (loaded or initialised as without LoRA, in
    model.lora.base_dtype) and the adapters (fresh, or read from model.lora.peft_dir):
    `trainable` splits them."""
    graphdef, params = base_model(p, cfg, mesh)
    if not p.model.lora:
        return graphdef, params
    graphdef, abstract = abstract_model(p, cfg)
    init = _init(p, cfg)
    shardings = sharding_lib.tree_shardings(lora_lib.split(abstract)[0], mesh)
    # Only the adapters leave the program: XLA drops the base's initialisation.
    make = lambda: lora_lib.split(nnx.split(init(), nnx.Param)[1])[0]
    adapters = jax.jit(make, out_shardings=shardings)()
    if p.model.peft_dir:
        adapters = peft_io.load_adapters(p.model.peft_dir, adapters, p.model.lora)
    return graphdef, lora_lib.join(params, adapters)


def trainable(p: Plan, params):
    """(trained, frozen): (adapters, base) under LoRA, else (params, None)."""
    return lora_lib.split(params) if p.model.lora else (params, None)


def base_record(p: Plan) -> dict:
    """What a LoRA checkpoint records of its base (it holds the adapters alone): the identity of
    model.hf_dir's files (models/peft_io.fingerprint). Empty for a full fine-tune."""
    if not p.model.lora:
        return {}
    return {"lora_base": peft_io.fingerprint(p.model.hf_dir)}


def check_base(p: Plan, record: Mapping, workdir: str) -> None:
    """Resuming a LoRA run: model.hf_dir must hold the base the adapters were trained on."""
    if "lora_base" in record and record["lora_base"] != base_record(p).get("lora_base"):
        raise ValueError(
            f"{workdir} holds LoRA adapters trained on a different base than "
            f"config.model.hf_dir={p.model.hf_dir!r} now holds (config.json or weight files "
            f"changed: saved {record['lora_base']}, now {base_record(p).get('lora_base')})"
        )


def base_model(p: Plan, cfg: model_lib.DecoderConfig, mesh):
    """(graphdef, params) of the model without adapters (under LoRA: the frozen base, in
    model.lora.base_dtype)."""
    m = p.model
    if m.hf_dir:
        loaded = hf_io.load_model(
            m.hf_dir,
            dtype=m.base_dtype if m.lora else m.param_dtype,
            compute_dtype=m.dtype,
            mesh=mesh,
            remat=m.remat,
            attention=m.attention,
            scan_layers=m.scan_layers,
        )
        return nnx.split(loaded, nnx.Param)
    graphdef, abstract = abstract_model(p, cfg, lora=False)
    init = _init(p, cfg, lora=False)
    shardings = sharding_lib.tree_shardings(abstract, mesh)
    params = jax.jit(lambda: nnx.split(init(), nnx.Param)[1], out_shardings=shardings)()
    return graphdef, params


def optimizer(p: Plan):
    """AdamW with optional warm-up and cosine decay, behind a global-norm clip; and the lr
    schedule (for logging)."""
    o = p.optim
    if o.decay == "constant":
        lr = optax.constant_schedule(o.lr)
    else:  # cosine (validated)
        lr = optax.cosine_decay_schedule(
            o.lr, max(p.total_steps * o.mini_batches - o.warmup_steps, 1)
        )
    if o.warmup_steps:
        warm = optax.linear_schedule(0.0, o.lr, o.warmup_steps)
        lr = optax.join_schedules([warm, lr], [o.warmup_steps])
    adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    clip = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    return optax.chain(*clip, adamw), lr


def step_spec(p: Plan, vocab_size: int) -> step_lib.StepSpec:
    return step_lib.StepSpec(
        group_size=p.rollout.group_size,
        micro_batches=p.optim.micro_batches,
        logprob_chunk=p.optim.logprob_chunk,
        max_new_tokens=p.rollout.max_new_tokens,
        objective=p.objective,
        loss_params=tuple(sorted(p.loss_params.items())),
        schedule=dataclasses.replace(p.schedule, vocab_size=vocab_size),
        logprob_precision=p.model.logprob_precision,
        rollout_correction=p.loss.rollout_correction,
        rollout_correction_cap=float(p.loss.rollout_correction_cap),
        entropy=entropy_lib.EntropyConfig(
            p.loss.entropy_coef,
            p.loss.entropy_target,
            p.loss.entropy_coef_delta,
            p.loss.entropy_coef_min,
            p.loss.entropy_coef_max,
        ),
        anchor=p.loss.anchor,
    )


def sampler(p: Plan, graphdef, task: tasks.Task | None, mesh) -> sampler_lib.Sampler:
    """The run's sampler (the loop, the evaluations and --dry_run); task None (the dry run of a
    preset without its task) leaves the stop ids empty and pads with 0."""
    r = p.rollout
    continuous = r.engine == "continuous"
    return sampler_lib.Sampler(
        graphdef,
        max_prompt_len=r.max_prompt_len,
        max_new_tokens=r.max_new_tokens,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        eos_ids=task.eos_ids if task is not None else (),
        pad_id=task.pad_id if task is not None else 0,
        cache_dtype=cache_dtype(p, mesh),
        mesh=mesh,
        engine=r.engine,
        slots=slots(p, jax.process_count()) if continuous else None,
    )


def slots(p: Plan, procs: int = 1) -> int:
    """Decode rows held at once per process under rollout.engine=continuous: rollout.slots,
    else rollout.rows_per_chunk, else all of a step's rows (no refill: only the drain)."""
    r = p.rollout
    return r.slots or r.rows_per_chunk or -(-r.prompts_per_step * r.group_size // procs)


def cache_dtype(p: Plan, mesh=None):
    """rollout.cache_dtype: `auto` is bfloat16 on accelerators (the KV cache is what limits the
    rollout batch there) and the compute dtype on CPU (float32 stays exact). The platform is the
    mesh's (a dry run's TPU target), else the default backend."""
    if p.rollout.cache_dtype == "auto":
        platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
        return p.model.dtype if platform == "cpu" else jnp.dtype(jnp.bfloat16)
    return jnp.dtype(p.rollout.cache_dtype)
