"""The training loop, top to bottom: mesh -> task -> model -> optimizer -> jitted functions ->
restore -> per step: prompts, rollout, host rewards, anchor log-probs, updates, metrics,
evaluation, checkpoint."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from apo_jax import checkpoint as checkpoint_lib
from apo_jax import data as data_lib
from apo_jax import evaluate as evaluate_lib
from apo_jax import hf_io, validate
from apo_jax import metrics as metrics_lib
from apo_jax import model as model_lib
from apo_jax import policy_gradient as pg_lib
from apo_jax import sampler as sampler_lib
from apo_jax import sharding as sharding_lib
from apo_jax import tasks as tasks_lib
from apo_jax import train_step as train_step_lib


def make_task(c: ml_collections.ConfigDict) -> tasks_lib.Task:
    t = c.task
    if t.name != "math":
        return tasks_lib.make_task(t.name, seed=c.seed)
    hf_tokenizer = c.model.hf_dir and os.path.isfile(os.path.join(c.model.hf_dir, "tokenizer.json"))
    return tasks_lib.make_task(
        "math",
        train_path=t.data_path or None,  # None: data.DEFAULT_DATA_DIR (../shared/data here)
        eval_path=t.eval_path or None,
        tokenizer_path=t.tokenizer or (c.model.hf_dir if hf_tokenizer else None),
        levels=(t.level,) if t.level else None,
        reward_name=t.reward,
        enable_thinking=t.enable_thinking,
        max_prompt_len=c.rollout.max_prompt_len,
    )


def model_config(c: ml_collections.ConfigDict, task) -> model_lib.Qwen3Config:
    """The architecture, read without touching any weights (for checks before loading)."""
    m = c.model
    if m.hf_dir:
        if not os.path.isdir(m.hf_dir):
            raise FileNotFoundError(
                f"config.model.hf_dir={m.hf_dir!r}: no such directory. {hf_io.WHERE}"
            )
        return model_lib.Qwen3Config.from_hf(os.path.join(m.hf_dir, "config.json"))
    cfg = model_lib.Qwen3Config.preset(m.preset)
    if m.vocab_size:
        vocab = task.vocab_size if m.vocab_size == -1 else m.vocab_size
        cfg = dataclasses.replace(cfg, vocab_size=vocab)
    return cfg


def make_model(c: ml_collections.ConfigDict, cfg: model_lib.Qwen3Config, mesh):
    """(graphdef, params) with every parameter created directly in its sharding on `mesh`."""
    m = c.model
    kw = dict(param_dtype=jnp.dtype(m.param_dtype), dtype=jnp.dtype(m.dtype), remat=m.remat)
    if m.hf_dir:
        model = hf_io.load_qwen3(m.hf_dir, dtype=kw["param_dtype"], mesh=mesh, remat=m.remat)
        model.dtype = kw["dtype"]  # the compute dtype may differ from the stored one
        return nnx.split(model, nnx.Param)
    init = lambda: model_lib.init_model(cfg, c.seed, **kw)
    graphdef, abstract = nnx.split(nnx.eval_shape(init), nnx.Param)
    shardings = sharding_lib.tree_shardings(abstract, mesh)
    params = jax.jit(lambda: nnx.split(init(), nnx.Param)[1], out_shardings=shardings)()
    return graphdef, params


def pad_left(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        p = list(p)[-length:]  # left truncation keeps the end of the prompt
        ids[i, length - len(p) :], mask[i, length - len(p) :] = p, 1
    return ids, mask


def rollout(c, task, sampler, params, examples, row_ids, rng) -> dict:
    """G completions for each of this process's examples and their rewards: host arrays whose
    rows are this process's share of the global batch, group-major. `row_ids` (the examples'
    places in the global batch) key the per-row sampling noise, so a row's completion does not
    depend on how the batch is split over processes."""
    g = c.rollout.group_size
    prompts = [e.prompt_ids for e in examples]
    out = sampler.sample(params, prompts, n=g, rng=rng, row_ids=row_ids)
    tokens, mask = (sharding_lib.local_rows(x) for x in (out.tokens, out.mask))
    completions = [tuple(t[m > 0]) for t, m in zip(tokens, mask, strict=True)]
    grouped = [e for e in examples for _ in range(g)]  # [P·G], group-major
    rewards = np.asarray(task.rewards(grouped, completions), np.float32)
    lengths = sharding_lib.local_rows(out.lengths)
    if c.rollout.overlong_buffer:
        rewards += np.asarray(
            pg_lib.dapo_overlong_penalty(
                lengths, c.rollout.max_new_tokens, c.rollout.overlong_buffer
            )
        )
    # The sampler's bucket, not max_prompt_len: no compute on padding beyond the bucket.
    prompt_ids, prompt_mask = pad_left(prompts, sampler.bucket(prompts), task.pad_id)
    return dict(
        prompt_ids=np.repeat(prompt_ids, g, axis=0),
        prompt_mask=np.repeat(prompt_mask, g, axis=0),
        completion_ids=tokens.astype(np.int32),
        completion_mask=mask.astype(np.float32),
        sampler_logp=sharding_lib.local_rows(out.logp).astype(np.float32),
        rewards=rewards,
        lengths=lengths.astype(np.float32),
        truncated=sharding_lib.local_rows(out.truncated).astype(np.float32),
    )


def _take_groups(batch: dict, groups: np.ndarray, g: int) -> dict:
    rows = (groups[:, None] * g + np.arange(g)).reshape(-1)
    return {k: v[rows] for k, v in batch.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config`, resuming from the latest checkpoint in `workdir`. Returns the last
    metrics line. Every process of a multi-host run calls this with the same config."""
    c = config
    # --- checks (before anything is built), mesh, task ----------------------------------------
    validate.check_config(c)
    mesh = sharding_lib.make_mesh(c.mesh)
    ckpt = checkpoint_lib.Checkpointer(
        workdir, every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep
    )
    saved = ckpt.latest_record()  # (step, record) of the newest readable step, or None
    if saved is not None:
        checkpoint_lib.check_compatible(saved[1]["config"], c.to_dict(), workdir)
    task = make_task(c)
    train_set = task.train_examples()
    p, g, mini = c.rollout.prompts_per_step, c.rollout.group_size, c.optim.mini_batches
    model_cfg = model_config(c, task)
    validate.check_vocab(model_cfg.vocab_size, task.vocab_size)
    validate.check_lengths(c, model_cfg.max_position_embeddings)
    rows = p * g // mini  # sequences per optimizer update
    sharding_lib.check_mesh_fits(mesh.devices.shape, model_cfg, rows // c.optim.micro_batches)
    procs, me = jax.process_count(), jax.process_index()
    if (p // mini) % procs:
        raise ValueError(
            f"config.rollout.prompts_per_step={p}: each of the {mini} mini-batches "
            f"must split evenly over {procs} processes"
        )

    # --- model, optimizer, train state, jitted functions --------------------------------------
    graphdef, params = make_model(c, model_cfg, mesh)
    tx, lr_fn = train_step_lib.make_optimizer(c.optim, c.total_steps * mini)
    sched_cfg = train_step_lib.schedule_config(c, model_cfg.vocab_size)
    # The frozen reference (only for a KL term) is a copy: the train state is donated.
    ref_params = jax.tree.map(jnp.copy, params) if c.loss.kl_coef else None
    init_state = lambda prm: train_step_lib.init_train_state(prm, tx, c.seed, sched_cfg)
    state_shardings = sharding_lib.tree_shardings(jax.eval_shape(init_state, params), mesh)
    state = jax.jit(init_state, out_shardings=state_shardings)(params)
    del params
    fns = train_step_lib.build(graphdef, c, tx, sched_cfg, mesh, state_shardings)
    sampler = sampler_lib.Sampler(
        graphdef,
        max_prompt_len=c.rollout.max_prompt_len,
        max_new_tokens=c.rollout.max_new_tokens,
        temperature=c.rollout.temperature,
        top_k=c.rollout.top_k,
        top_p=c.rollout.top_p,
        eos_ids=task.eos_ids,
        pad_id=task.pad_id,
        mesh=mesh,
    )
    # Decode reads every weight each token: without FSDP gathering the rollout copy is laid out
    # by ROLLOUT_RULES (a reshard happens only when the two tables differ on this mesh).
    to_rollout = lambda prm: sharding_lib.reshard(prm, mesh, sharding_lib.ROLLOUT_RULES)

    # --- restore -----------------------------------------------------------------------------
    start, position = 0, 0
    if saved is not None:
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
        )
        # Falls back past damaged steps (moved to checkpoints/damaged/, logged).
        if (restored := ckpt.restore_latest(abstract)) is not None:
            start, state, record = restored
            position = int(record["position"])
            logging.info("resumed from step %d (data position %d)", start, position)
    metrics_lib.write_config(workdir, c)
    writer = metrics_lib.MetricsWriter(
        workdir, tensorboard=c.logging.tensorboard, resume_step=start
    )
    progress = _progress(c, start)
    root_key = jax.random.wrap_key_data(jnp.asarray(jax.device_get(state.rng)))  # not donated

    # --- loop --------------------------------------------------------------------------------
    line: dict = {}
    stopping = False
    with checkpoint_lib.StopSignal() as stop:
        for step in range(start + 1, c.total_steps + 1):
            t0 = time.perf_counter()
            rng = jax.random.fold_in(root_key, step)
            # Each process takes its share of every mini-batch, so mini-batch k holds the same
            # prompts whatever the number of processes.
            order = data_lib.global_batch_indices(len(train_set), c.seed, position, p)
            slots = np.arange(p).reshape(mini, -1)  # [mini, P/mini] places in the global batch
            mine = np.concatenate([data_lib.process_slice(s, me, procs) for s in slots])
            position += p
            rollout_params = to_rollout(state.params)
            batch = rollout(
                c, task, sampler, rollout_params, [train_set[i] for i in order[mine]], mine, rng
            )
            info = {}
            if c.rollout.dynamic_sampling:
                batch, position, info = _refill(
                    c, task, sampler, rollout_params, batch, position, rng
                )
            t_rollout = time.perf_counter() - t0

            # Host rows -> global arrays [mini, rows, ...], rows split over the data axes.
            arrays = {k: _to_global(batch[k], mini, mesh) for k in _DEVICE_KEYS}
            # The anchor pi_old is the rollout policy: score every mini-batch before the first
            # update, so that later mini-batches see real (off-policy) ratios and clips bind.
            minis = []
            for k in range(mini):
                mb = {key: v[k] for key, v in arrays.items()}
                mb["old_logp"] = fns.logprobs(state.params, mb)
                mb["ref_logp"] = (
                    fns.logprobs(ref_params, mb)
                    if ref_params is not None
                    else jnp.zeros_like(mb["old_logp"])
                )
                minis.append(mb)
            gaps = [_logp_gap(mb) for mb in minis]
            step_metrics = []
            for mb in minis:
                state, m = fns.train_step(state, mb)
                step_metrics.append(m)
            step_metrics = jax.device_get(step_metrics)
            line = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
            host = {k: _all_rows(batch[k]) for k in ("rewards", "lengths", "truncated")}
            seconds = time.perf_counter() - t0
            line.update(
                {
                    "reward/mean": float(host["rewards"].mean()),
                    "reward/std": float(host["rewards"].std()),
                    "reward/frac_solved": float((host["rewards"] >= 1.0).mean()),
                    "rollout/len_mean": float(host["lengths"].mean()),
                    "rollout/truncated_frac": float(host["truncated"].mean()),
                    "rollout/logp_gap": float(np.mean(jax.device_get(gaps))),
                    "optim/lr": float(lr_fn(int(state.step) - 1)),
                    "perf/step_s": seconds,
                    "perf/rollout_s": t_rollout,
                    "perf/tokens_per_s": float(host["lengths"].sum()) / seconds,
                    **info,
                }
            )
            if c.eval.num_prompts and c.eval.every_steps and step % c.eval.every_steps == 0:
                line.update(evaluate(c, task, sampler, to_rollout(state.params)))
            line = writer.write(step, line)
            progress.update(1)
            progress.set_postfix(
                reward=metrics_lib.fmt(line["reward/mean"], 3),
                alpha=metrics_lib.fmt(line.get("schedule/alpha"), 2),
            )
            # A signal may reach only some processes; saving is collective, so all must agree.
            stopping = bool(_all_rows(np.asarray([stop.received is not None])).any())
            if ckpt.should_save(step) or step == c.total_steps or stopping:
                ckpt.save(step, state, {"position": position, "config": c.to_dict()})
            if stopping:
                logging.warning("signal %s: saved step %d, stopping", stop.received, step)
                break
    progress.close()
    if c.eval.num_prompts and not stopping and not c.eval.every_steps:
        final = evaluate(c, task, sampler, to_rollout(state.params))
        line = writer.write(c.total_steps, {**line, **final})
    writer.close()
    ckpt.close()
    if c.logging.plots:
        metrics_lib.write_plots(workdir)
    return line


# Host batch keys that go to the device; sampler_logp only feeds the sampler/trainer gap metric.
_DEVICE_KEYS = (*train_step_lib.BATCH_KEYS, "sampler_logp")


def _to_global(local: np.ndarray, mini: int, mesh) -> jax.Array:
    """This process's rows [mini·r, ...] -> a global [mini, R, ...] array, R split over the
    data-parallel axes (each process contributes its r rows of every mini-batch)."""
    local = local.reshape(mini, -1, *local.shape[1:])
    sharding = sharding_lib.named(mesh, None, sharding_lib.TRAIN_RULES["batch"])
    return jax.make_array_from_process_local_data(sharding, local)


@jax.jit
def _logp_gap(mb) -> jax.Array:
    """Mean |sampler log-prob − trainer log-prob| over completion tokens (same parameters)."""
    m = mb["completion_mask"]
    return jnp.sum(jnp.abs(mb["sampler_logp"] - mb["old_logp"]) * m) / jnp.maximum(m.sum(), 1.0)


def _all_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows of a host array (for metrics over the global batch)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local)).reshape(-1, *local.shape[1:])


def _refill(c, task, sampler, params, batch, position, rng):
    """DAPO dynamic sampling: keep groups whose rewards differ and refill from fresh prompts, for
    at most `max_refill_rounds` rounds; a batch still short is topped up with dropped groups
    (reported as `rollout/refill_short`). Works on this process's rows; every process runs the
    same number of rounds (sampling is a collective)."""
    p, g, mini = c.rollout.prompts_per_step, c.rollout.group_size, c.optim.mini_batches
    need = len(batch["rewards"])  # this process's rows
    train_set = task.train_examples()
    kept, dropped = [], []
    for round_ in range(c.rollout.max_refill_rounds + 1):
        if round_:
            order = data_lib.global_batch_indices(len(train_set), c.seed, position, p)
            slots = np.arange(p).reshape(mini, -1)
            mine = np.concatenate(
                [data_lib.process_slice(s, jax.process_index(), jax.process_count()) for s in slots]
            )
            position += p
            batch = rollout(
                c,
                task,
                sampler,
                params,
                [train_set[i] for i in order[mine]],
                mine + round_ * p,
                jax.random.fold_in(rng, round_),
            )
        keep = np.asarray(pg_lib.dynamic_sampling_keep(batch["rewards"].reshape(-1, g)))
        kept.append(_take_groups(batch, np.flatnonzero(keep), g))
        dropped.append(_take_groups(batch, np.flatnonzero(~keep), g))
        have = sum(len(b["rewards"]) for b in kept)
        if _all_rows(np.asarray([have >= need])).all():
            break
    merged = {k: np.concatenate([b[k] for b in kept + dropped])[:need] for k in batch}
    short = _all_rows(np.asarray([max(need - have, 0) // g])).sum()
    return (
        merged,
        position,
        {"rollout/refill_rounds": float(round_), "rollout/refill_short": float(short)},
    )


def evaluate(c, task, sampler, params) -> dict:
    """Held-out `eval/...` metrics on `eval.num_prompts` prompts (apo_jax/evaluate.py): greedy
    accuracy, avg@G and pass@k at temperature 1, length, entropy and diversity."""
    return evaluate_lib.in_training(c, task, sampler, params)


def _progress(c, start):
    from tqdm.auto import tqdm

    return tqdm(
        total=c.total_steps,
        initial=start,
        disable=not c.logging.progress or jax.process_index() != 0,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
