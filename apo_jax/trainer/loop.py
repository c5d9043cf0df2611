"""The training loop, top to bottom: mesh -> task -> model -> optimizer -> jitted functions ->
restore -> per step: prompts, rollout, host rewards, anchor log-probs, updates, metrics,
evaluation, checkpoint."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from apo_jax import console
from apo_jax.infra import checkpoint as checkpoint_lib
from apo_jax.infra import metrics as metrics_lib
from apo_jax.infra import sharding as sharding_lib
from apo_jax.rollout import sampler as sampler_lib
from apo_jax.tasks import order as order_lib
from apo_jax.tasks import rewards as rewards_lib
from apo_jax.trainer import build, validate
from apo_jax.trainer import evaluate as evaluate_lib
from apo_jax.trainer import step as step_lib


def pad_left(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        p = list(p)[-length:]  # left truncation keeps the end of the prompt
        ids[i, length - len(p) :], mask[i, length - len(p) :] = p, 1
    return ids, mask


# What the loop keeps of a sampler call (rollout/sampler.py SampleOutput), as host arrays.
_SAMPLE_FIELDS = ("tokens", "mask", "lengths", "logp", "truncated")


def rollout(r: build.RolloutSettings, task, sampler, params, examples, row_ids, rng) -> dict:
    """G completions for each of this process's examples and their rewards: host arrays whose
    rows are this process's share of the global batch, group-major. `row_ids` (the examples'
    places in the global batch) key the per-row sampling noise, so a row's completion does not
    depend on how the batch is split over processes, nor on `r.rows_per_chunk` (the prompts go
    to the sampler in chunks of rows_per_chunk / G, so its KV cache holds that many rows)."""
    g = r.group_size
    prompts = [e.prompt_ids for e in examples]
    row_ids = np.asarray(row_ids)
    # Every process has the same number of prompts (validate.check_rows_per_chunk), so every
    # process makes the same number of (collective) sampler calls.
    k = r.rows_per_chunk // g if r.rows_per_chunk else len(prompts)  # prompts per call
    parts = []  # host rows of this process per call: the device buffers go before the next
    for i in range(0, len(prompts), k):
        part = sampler.sample(params, prompts[i : i + k], n=g, rng=rng, row_ids=row_ids[i : i + k])
        parts.append({f: sharding_lib.local_rows(getattr(part, f)) for f in _SAMPLE_FIELDS})
    # Chunks in order: group-major, as one call over all prompts would give.
    out = {f: np.concatenate([part[f] for part in parts]) for f in _SAMPLE_FIELDS}
    tokens, mask = out["tokens"], out["mask"]
    completions = [tuple(t[m > 0]) for t, m in zip(tokens, mask, strict=True)]
    grouped = [e for e in examples for _ in range(g)]  # [P·G], group-major
    rewards, correct = task.score(grouped, completions)
    rewards = np.asarray(rewards, np.float32)
    lengths = out["lengths"]
    if r.overlong_buffer:  # DAPO's overlong shaping, in tokens (spec §4.3)
        rewards += rewards_lib.overlong_penalty(lengths, r.max_new_tokens, r.overlong_buffer)
    # The sampler's bucket, not max_prompt_len: no compute on padding beyond the bucket.
    prompt_ids, prompt_mask = pad_left(prompts, sampler.bucket(prompts), task.pad_id)
    return dict(
        prompt_ids=np.repeat(prompt_ids, g, axis=0),
        prompt_mask=np.repeat(prompt_mask, g, axis=0),
        completion_ids=tokens.astype(np.int32),
        completion_mask=mask.astype(np.float32),
        sampler_logp=out["logp"].astype(np.float32),
        rewards=rewards,
        correct=np.asarray(correct, np.float32),  # verified answer, before any shaping
        lengths=lengths.astype(np.float32),
        truncated=out["truncated"].astype(np.float32),
    )


def _take_groups(batch: dict, groups: np.ndarray, g: int) -> dict:
    rows = (groups[:, None] * g + np.arange(g)).reshape(-1)
    return {k: v[rows] for k, v in batch.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config`, resuming from the latest checkpoint in `workdir`. Returns the last
    metrics line. Every process of a multi-host run calls this with the same config."""
    p = build.plan(config)  # validates every key before anything is built
    check_workdir(workdir)
    r, o = p.rollout, p.optim
    n = r.prompts_per_step  # P
    mesh = build.mesh(p)
    ckpt = checkpoint_lib.Checkpointer(
        workdir, every_steps=p.checkpoint_every, keep=p.checkpoint_keep
    )
    saved = ckpt.latest_record()  # (step, record) of the newest readable step, or None
    if saved is not None:
        checkpoint_lib.check_compatible(saved[1]["config"], p.record, workdir)
    task = build.task(p)
    train_set = task.train_examples()
    if not len(train_set):
        raise ValueError(f"config.task.name={p.task.name!r}: the task has no training prompts")
    if p.eval_prompts and not len(task.eval_examples()):
        raise ValueError(
            f"config.eval.num_prompts={p.eval_prompts}: task {p.task.name!r} has no held-out "
            "prompts (set eval.num_prompts=0 or give the task an evaluation set)"
        )
    mini = o.mini_batches
    model_cfg = build.model_config(p, task.vocab_size)
    rows = r.prompts_per_step * r.group_size // mini  # sequences per optimizer update
    data, fsdp, _ = mesh.devices.shape
    step_lib.check_micro_batches(rows, o.micro_batches, data * fsdp)
    sharding_lib.check_mesh_fits(mesh.devices.shape, model_cfg, rows // o.micro_batches)
    procs, me = jax.process_count(), jax.process_index()
    if (r.prompts_per_step // mini) % procs:
        raise ValueError(
            f"config.rollout.prompts_per_step={r.prompts_per_step}: each of the {mini} "
            f"mini-batches must split evenly over {procs} processes"
        )
    if r.rows_per_chunk:
        validate.check_rows_per_chunk(r.rows_per_chunk, r.group_size, r.prompts_per_step, procs)

    # --- model, optimizer, train state, jitted functions --------------------------------------
    graphdef, params = build.model(p, model_cfg, mesh)
    tx, lr_fn = build.optimizer(p)
    spec = build.step_spec(p, model_cfg.vocab_size)
    # The frozen reference (only for objectives that ask for one) is a copy: the state is donated.
    use_ref = p.objective.reference(p.loss_params)
    ref_params = jax.tree.map(jnp.copy, params) if use_ref else None
    init_state = lambda prm: step_lib.init_train_state(prm, tx, p.seed, spec.schedule)
    state_shardings = sharding_lib.tree_shardings(jax.eval_shape(init_state, params), mesh)
    state = jax.jit(init_state, out_shardings=state_shardings)(params)
    del params
    fns = step_lib.build(graphdef, spec, tx, mesh, state_shardings)
    sampler = build.sampler(p, graphdef, task, mesh)
    # Decode reads every weight each token: without FSDP gathering the rollout copy is laid out
    # by ROLLOUT_RULES (a reshard happens only when the two tables differ on this mesh).
    # Parameters laid out alike are shared, not copied; others cast to the compute dtype first.
    to_rollout = lambda prm: sampler_lib.rollout_weights(prm, mesh, p.model.dtype)

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
    console.banner(p, model_cfg, state.params, mesh, workdir, start)
    metrics_lib.write_config(workdir, p.to_json())
    writer = metrics_lib.MetricsWriter(
        workdir, tensorboard=p.tensorboard, resume_step=start, wandb=p.wandb, config=p.record
    )
    progress = _progress(p, start)
    root_key = jax.random.wrap_key_data(jnp.asarray(jax.device_get(state.rng)))  # not donated

    # --- loop --------------------------------------------------------------------------------
    line: dict = {}
    stopping = False
    with checkpoint_lib.StopSignal() as stop:
        for step in range(start + 1, p.total_steps + 1):
            t0 = time.perf_counter()
            rng = jax.random.fold_in(root_key, step)
            # Each process takes its share of every mini-batch, so mini-batch k holds the same
            # prompts whatever the number of processes.
            order = order_lib.global_batch_indices(
                len(train_set), p.seed, position, r.prompts_per_step
            )
            slots = np.arange(r.prompts_per_step).reshape(
                mini, -1
            )  # [mini, P/mini] places in the global batch
            mine = np.concatenate([order_lib.process_slice(s, me, procs) for s in slots])
            position += n
            rollout_params = to_rollout(state.params)
            batch = rollout(
                r, task, sampler, rollout_params, [train_set[i] for i in order[mine]], mine, rng
            )
            info = {}
            if r.dynamic_sampling:
                batch, position, info = _refill(
                    p, task, sampler, rollout_params, batch, position, rng
                )
            del rollout_params  # the train step needs the memory (a reshard, if any)
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
            host = {k: _all_rows(batch[k]) for k in ("rewards", "correct", "lengths", "truncated")}
            seconds = time.perf_counter() - t0
            line.update(
                {
                    "reward/mean": float(host["rewards"].mean()),
                    "reward/std": float(host["rewards"].std()),
                    "reward/frac_solved": float(host["correct"].mean()),
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
            # The step's device batch is done with: the evaluation holds only the train state,
            # the rollout weights and its sampler calls (what --dry_run counts as eval_gib).
            del arrays, minis, mb
            if p.eval_prompts and p.eval_every and step % p.eval_every == 0:
                line.update(evaluate(p, task, sampler, to_rollout(state.params)))
            line = writer.write(step, line)
            progress.update(1)
            progress.set_postfix(
                reward=console.fmt(line.get("reward/mean")),
                alpha=console.fmt(line.get("schedule/alpha"), 2),
            )
            # A signal may reach only some processes; saving is collective, so all must agree.
            stopping = bool(_all_rows(np.asarray([stop.received is not None])).any())
            if ckpt.should_save(step) or step == p.total_steps or stopping:
                ckpt.save(step, state, {"position": position, "config": p.record})
            if stopping:
                logging.warning("signal %s: saved step %d, stopping", stop.received, step)
                break
    progress.close()
    if p.eval_prompts and not stopping and not p.eval_every:
        final = evaluate(p, task, sampler, to_rollout(state.params))
        line = writer.write(p.total_steps, {**line, **final})
    ckpt.close()
    plots = metrics_lib.write_plots(workdir) if p.plots else []
    writer.close(plots=plots, summary=line)  # after the plots: W&B logs them
    return line


def check_workdir(workdir: str) -> None:
    """Fails now, before any model is built, if `workdir` cannot hold checkpoints and metrics
    (a real write: permission bits say nothing about read-only mounts or root)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise PermissionError(
            f"workdir {workdir!r} is not a writable directory ({e.strerror or e})"
        ) from None


# Host batch keys that go to the device; sampler_logp feeds the sampler/trainer gap metric and the
# train step's rollout correction (loss.rollout_correction).
_DEVICE_KEYS = (*step_lib.BATCH_KEYS, "sampler_logp")


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


def _refill(p: build.Plan, task, sampler, params, batch, position, rng):
    """DAPO dynamic sampling: keep groups with some but not all answers correct (verl's
    `filter_groups.metric=acc`: on correctness, not on the shaped or overlong-penalised reward,
    which differs within almost every group) and refill from fresh prompts, for
    at most `max_refill_rounds` rounds; a batch still short is topped up with dropped groups
    (reported as `rollout/refill_short`). Works on this process's rows; every process runs the
    same number of rounds (sampling is a collective)."""
    r, mini = p.rollout, p.optim.mini_batches
    n, g = r.prompts_per_step, r.group_size
    need = len(batch["rewards"])  # this process's rows
    train_set = task.train_examples()
    kept, dropped = [], []
    for round_ in range(r.max_refill_rounds + 1):
        if round_:
            order = order_lib.global_batch_indices(
                len(train_set), p.seed, position, r.prompts_per_step
            )
            slots = np.arange(r.prompts_per_step).reshape(mini, -1)
            mine = np.concatenate(
                [
                    order_lib.process_slice(s, jax.process_index(), jax.process_count())
                    for s in slots
                ]
            )
            position += n
            batch = rollout(
                r,
                task,
                sampler,
                params,
                [train_set[i] for i in order[mine]],
                mine + round_ * n,
                jax.random.fold_in(rng, round_),
            )
        keep = dynamic_sampling_keep(batch["correct"].reshape(-1, g))
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


def evaluate(p: build.Plan, task, sampler, params) -> dict:
    """Held-out `eval/...` metrics on `eval.num_prompts` prompts (trainer/evaluate.py): greedy
    accuracy, avg@G and pass@k at temperature 1, length, entropy and diversity."""
    return evaluate_lib.in_training(p, task, sampler, params)


def _progress(p: build.Plan, start):
    from tqdm.auto import tqdm

    return tqdm(
        total=p.total_steps,
        initial=start,
        disable=not p.progress or jax.process_index() != 0,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )


def dynamic_sampling_keep(correct: np.ndarray) -> np.ndarray:
    """DAPO dynamic sampling (spec §5.16): keep the groups [P, G] with 0 < #correct < G."""
    n = np.asarray(correct).astype(bool).sum(-1)  # [P]
    return (n > 0) & (n < np.shape(correct)[-1])
