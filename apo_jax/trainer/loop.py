"""The training loop. `run` reads as one step after another: rollout (sampler -> host rewards),
anchor and reference scoring, one update per mini-batch, metrics, evaluation, checkpoint;
`setup` builds what it needs (task, model, optimizer, jitted programs) and restores."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from apo_jax import console, settings
from apo_jax.infra import checkpoint as checkpoint_lib
from apo_jax.infra import metrics as metrics_lib
from apo_jax.infra import sharding as sharding_lib
from apo_jax.infra import workdir_lock
from apo_jax.models import lora as lora_lib
from apo_jax.objectives import batch as batch_lib
from apo_jax.rollout import sampler as sampler_lib
from apo_jax.tasks import order as order_lib
from apo_jax.tasks import rewards as rewards_lib
from apo_jax.trainer import build, packing, records, validate
from apo_jax.trainer import evaluate as evaluate_lib
from apo_jax.trainer import step as step_lib


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config`, resuming from the latest checkpoint in `workdir`. Returns the last
    metrics line. Every process of a multi-host run calls this with the same config."""
    p = build.plan(config)  # validates every key before anything is built
    check_workdir(workdir)
    # One run per workdir, before anything in it is touched (a second run is refused here,
    # naming the holder's PID and host).
    with workdir_lock.hold(workdir, jax.process_index()):
        ckpt, saved = open_checkpoints(p, workdir)
        if saved is not None and saved[0] == p.total_steps:  # finished: nothing to train
            ckpt.close()
            return _already_done(workdir, saved[0])
        t = setup(p, workdir, ckpt, saved)
        line, stopping = {}, False
        progress = _progress(p, t.start)
        with checkpoint_lib.StopSignal() as stop:
            for step in range(t.start + 1, p.total_steps + 1):
                t0 = time.perf_counter()
                rng = jax.random.fold_in(t.root_key, step)
                rollout_params = t.to_rollout(t.state.params)
                examples, row_ids = step_prompts(p, t.train_set, t.position)
                data = rollout(p.rollout, t.task, t.sampler, rollout_params, examples, row_ids, rng)
                t.position, info = t.position + p.rollout.prompts_per_step, {}
                if p.rollout.dynamic_sampling:
                    data, t.position, info = refill(
                        p, t.task, t.sampler, rollout_params, data, t.position, rng
                    )
                del rollout_params  # the train step needs the memory (a reshard, if any)
                t_rollout = time.perf_counter() - t0
                line = update(p, t, data)
                seconds = time.perf_counter() - t0
                line.update(rollout_metrics(data, seconds))
                line.update({"optim/lr": float(t.lr_fn(int(t.state.step) - 1)), **info})
                line.update({"perf/step_s": seconds, "perf/rollout_s": t_rollout})
                # Every eval.every_steps steps and at the last step (also when every_steps does
                # not divide total_steps, or exceeds it): a run always ends with an evaluation.
                every = p.eval.num_prompts and p.eval.every_steps
                if every and (step % every == 0 or step == p.total_steps):
                    line.update(evaluate(p, t))
                line = t.writer.write(step, line)
                progress.update(1)
                progress.set_postfix(
                    reward=console.fmt(line.get("reward/mean")),
                    alpha=console.fmt(line.get("schedule/alpha"), 2),
                )
                # A signal may reach only some processes; saving is collective: all must agree.
                stopping = bool(_all_rows(np.asarray([stop.received is not None])).any())
                if t.ckpt.should_save(step) or step == p.total_steps or stopping:
                    record = {"position": t.position, "config": p.record, **build.base_record(p)}
                    t.ckpt.save(step, t.state, record)
                if stopping:
                    logging.warning("signal %s: saved step %d, stopping", stop.received, step)
                    break
        progress.close()
        if p.eval.num_prompts and not stopping and not p.eval.every_steps:
            line = t.writer.write(p.total_steps, {**line, **evaluate(p, t)})
        t.ckpt.close()
        plots = metrics_lib.write_plots(workdir) if p.logging.plots else []
        t.writer.close(plots=plots, summary=line)  # after the plots: W&B logs them
        return line


@dataclasses.dataclass
class Trainer:
    """What the loop carries from step to step (built by `setup`)."""

    task: object  # tasks.Task
    train_set: Sequence
    sampler: sampler_lib.Sampler
    to_rollout: Callable  # train params -> the sampler's weights
    fns: step_lib.StepFns
    state: step_lib.TrainState  # donated to each update
    ref_params: object  # frozen reference parameters, or None
    mesh: jax.sharding.Mesh
    ckpt: checkpoint_lib.Checkpointer
    writer: metrics_lib.MetricsWriter | None
    lr_fn: Callable
    root_key: jax.Array  # the run's key (rollout noise folds in the step)
    start: int  # the step restored (0: a fresh run)
    position: int  # prompts consumed from the data order


def open_checkpoints(p: build.Plan, workdir: str):
    """(the workdir's Checkpointer, (step, record) of its newest readable step or None), the
    record checked against this config before anything is built."""
    ck = p.checkpoint
    ckpt = checkpoint_lib.Checkpointer(workdir, every_steps=ck.every_steps, keep=ck.keep)
    saved = ckpt.latest_record()
    if saved is not None:
        # The blocks of unselected losses and tasks are not read: they may change.
        unused = validate.unused_blocks(p.record)
        checkpoint_lib.check_resume(saved[0], saved[1]["config"], p.record, workdir, unused)
        build.check_base(p, saved[1], workdir)
    return ckpt, saved


def setup(p: build.Plan, workdir: str, ckpt: checkpoint_lib.Checkpointer, saved) -> Trainer:
    """Builds the run: the task and shapes checked, then the model, optimizer, train state,
    jitted programs and sampler; restores the newest restorable step of `saved`."""
    mesh = build.mesh(p)
    task = build.task(p)
    model_cfg = build.model_config(p, task.vocab_size)
    _check_shapes(p, task, mesh, model_cfg)
    graphdef, params = build.model(p, model_cfg, mesh)
    # LoRA: the state trains the adapters; the frozen base is stored once and passed alongside.
    params, frozen = build.trainable(p, params)
    tx, lr_fn = build.optimizer(p)
    spec = build.step_spec(p, model_cfg.vocab_size)
    # Every field the loss reads reaches the device (checked again when the step is traced).
    batch_lib.check_reads(p.objective.name, p.objective.reads, records.FIELDS)
    ref_params = step_lib.reference_params(p.objective.reference(p.loss_params), params, frozen)
    init_state = step_lib.state_init(tx, p.seed, spec)
    state_shardings = sharding_lib.tree_shardings(jax.eval_shape(init_state, params), mesh)
    state = jax.jit(init_state, out_shardings=state_shardings)(params)
    del params
    fns = step_lib.build(graphdef, spec, tx, mesh, state_shardings, frozen=frozen)
    sampler = build.sampler(p, graphdef, task, mesh)
    # Decode reads every weight each token: without FSDP gathering the rollout copy is laid out
    # by ROLLOUT_RULES (a reshard happens only when the two tables differ on this mesh).
    # Parameters laid out alike are shared, not copied; others cast to the compute dtype first.
    to_rollout = lambda prm: sampler_lib.rollout_weights(prm, mesh, p.model.dtype)
    if frozen is not None:  # LoRA: the sampler reads the base where it lies (stored once)
        to_rollout = lambda prm: lora_lib.join(frozen, prm)

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
        workdir,
        tensorboard=p.logging.tensorboard,
        resume_step=start,
        wandb=p.wandb,
        config=p.record,
    )
    root_key = jax.random.wrap_key_data(jnp.asarray(jax.device_get(state.rng)))  # not donated
    train_set = task.train_examples()
    return Trainer(
        task, train_set, sampler, to_rollout, fns, state, ref_params, mesh, ckpt, writer, lr_fn,
        root_key, start, position,
    )  # fmt: skip


def _check_shapes(p: build.Plan, task, mesh, model_cfg) -> None:
    """What the plan cannot check without the task and the devices (errors name the key)."""
    r, o = p.rollout, p.optim
    if not len(task.train_examples()):
        raise ValueError(f"config.task.name={p.task.name!r}: the task has no training prompts")
    if p.eval.num_prompts and not len(task.eval_examples()):
        raise ValueError(
            f"config.eval.num_prompts={p.eval.num_prompts}: task {p.task.name!r} has no held-out "
            "prompts (set eval.num_prompts=0 or give the task an evaluation set)"
        )
    rows = r.prompts_per_step * r.group_size // o.mini_batches  # sequences per optimizer update
    data, fsdp, _ = mesh.devices.shape
    step_lib.check_micro_batches(rows, o.micro_batches, data * fsdp)
    sharding_lib.check_mesh_fits(mesh.devices.shape, model_cfg, rows // o.micro_batches)
    procs = jax.process_count()
    if (r.prompts_per_step // o.mini_batches) % procs:
        raise ValueError(
            f"config.rollout.prompts_per_step={r.prompts_per_step}: each of the "
            f"{o.mini_batches} mini-batches must split evenly over {procs} processes"
        )
    if r.rows_per_chunk:
        validate.check_rows_per_chunk(r.rows_per_chunk, r.group_size, r.prompts_per_step, procs)
    if o.packing == "packed" and procs > 1:  # each process would pack only its own rows
        raise ValueError(
            f"config.optim.packing='packed' runs on one process, this run has {procs} "
            "(use optim.packing=none: trimmed rows)"
        )


def step_prompts(p: build.Plan, train_set, position: int) -> tuple[list, np.ndarray]:
    """This process's prompts of the step starting at data `position` and their places in the
    global batch. Each process takes its share of every mini-batch, so mini-batch k holds the
    same prompts whatever the number of processes."""
    n, mini = p.rollout.prompts_per_step, p.optim.mini_batches
    order = order_lib.global_batch_indices(len(train_set), p.seed, position, n)
    places = np.arange(n).reshape(mini, -1)  # [M, P/M] places in the global batch
    procs, me = jax.process_count(), jax.process_index()
    mine = np.concatenate([order_lib.process_slice(s, me, procs) for s in places])
    return [train_set[i] for i in order[mine]], mine


def rollout(r: settings.Rollout, task, sampler, params, examples, row_ids, rng):
    """G completions for each of this process's examples and their rewards: a Rollout of this
    process's share of the global batch, group-major. `row_ids` (the examples' places in the
    global batch) key the per-row sampling noise, so a row's completion does not depend on how
    the batch is split over processes, on `r.rows_per_chunk` (the static engine takes the
    prompts in chunks of rows_per_chunk / G, so its KV cache holds that many rows), nor on the
    engine: the continuous one takes them all in one call (its cache holds `rollout.slots` rows)
    and the task scores rows as they finish, while the others decode."""
    g = r.group_size
    row_ids = np.asarray(row_ids)
    # Every process has the same number of prompts (validate.check_rows_per_chunk), so every
    # process makes the same number of (collective) sampler calls.
    whole = sampler.engine == "continuous" or not r.rows_per_chunk
    k = len(examples) if whole else r.rows_per_chunk // g  # prompts per call
    parts = []  # host rows of this process per call: the device buffers go before the next
    for i in range(0, len(examples), k):
        prompts = [e.prompt_ids for e in examples[i : i + k]]
        scorer = _Scorer(task, [e for e in examples[i : i + k] for _ in range(g)])
        out = sampler.sample(
            params, prompts, n=g, rng=rng, row_ids=row_ids[i : i + k], on_finished=scorer
        )
        parts.append(_scored(r, scorer, out))
    return records.Rollout.concat(parts, task.pad_id)  # chunks in order: group-major


class _Scorer:
    """The sampler's on_finished hook: the task's rewards of the rows reported so far (rows are
    scored one by one, so the batches they come in do not change them)."""

    def __init__(self, task, grouped):
        self.task, self.grouped = task, grouped  # [P·G] examples, group-major
        self.rewards = np.zeros((len(grouped),), np.float32)
        self.correct = np.zeros((len(grouped),), np.float32)
        self.seen = np.zeros((len(grouped),), bool)

    def __call__(self, rows, tokens) -> None:
        rewards, correct = self.task.score(
            [self.grouped[i] for i in rows], [tuple(t) for t in tokens]
        )
        self.rewards[rows] = np.asarray(rewards, np.float32)
        self.correct[rows] = np.asarray(correct, np.float32)
        self.seen[rows] = True


def _scored(r: settings.Rollout, scorer: _Scorer, out) -> records.Rollout:
    """One sampler call's rows on the host, with the rewards its scorer collected."""
    host = sharding_lib.local_rows
    tokens, mask, lengths = host(out.tokens), host(out.mask), host(out.lengths)
    if not scorer.seen.all():
        raise RuntimeError(f"the sampler reported {scorer.seen.sum()} of {len(scorer.seen)} rows")
    rewards = scorer.rewards.copy()
    if r.overlong_buffer:  # DAPO's overlong shaping, in tokens (spec §4.3)
        rewards += rewards_lib.overlong_penalty(lengths, r.max_new_tokens, r.overlong_buffer)
    return records.Rollout(
        prompt_ids=host(out.prompt_ids).astype(np.int32),
        prompt_mask=host(out.prompt_mask).astype(np.int32),
        completion_ids=tokens.astype(np.int32),
        completion_mask=mask.astype(np.float32),
        sampler_logp=host(out.logp).astype(np.float32),
        rewards=rewards,
        correct=scorer.correct,
        lengths=lengths.astype(np.float32),
        truncated=host(out.truncated).astype(np.float32),
    )


def refill(p: build.Plan, task, sampler, params, data: records.Rollout, position: int, rng):
    """DAPO dynamic sampling: keep groups with some but not all answers correct (verl's
    `filter_groups.metric=acc`: on correctness, not on the shaped or overlong-penalised reward,
    which differs within almost every group) and refill from fresh prompts, for at most
    `max_refill_rounds` rounds; a batch still short is topped up with dropped groups (reported
    as `rollout/refill_short`). Works on this process's rows; every process runs the same number
    of rounds (sampling is a collective). Returns (rollout, data position, metrics)."""
    r = p.rollout
    n, g = r.prompts_per_step, r.group_size
    need = len(data.rewards)  # this process's rows
    kept, dropped = [], []
    for round_ in range(r.max_refill_rounds + 1):
        if round_:
            examples, row_ids = step_prompts(p, task.train_examples(), position)
            position += n
            key = jax.random.fold_in(rng, round_)
            data = rollout(r, task, sampler, params, examples, row_ids + round_ * n, key)
        keep = dynamic_sampling_keep(data.correct.reshape(-1, g))
        kept.append(data.take_groups(np.flatnonzero(keep), g))
        dropped.append(data.take_groups(np.flatnonzero(~keep), g))
        have = sum(len(b.rewards) for b in kept)
        if _all_rows(np.asarray([have >= need])).all():
            break
    merged = records.Rollout.concat(kept + dropped, task.pad_id).take(np.arange(need))
    short = _all_rows(np.asarray([max(need - have, 0) // g])).sum()
    info = {"rollout/refill_rounds": float(round_), "rollout/refill_short": float(short)}
    return merged, position, info


def update(p: build.Plan, t: Trainer, data: records.Rollout) -> dict:
    """The anchor π_old is the rollout policy: every mini-batch is scored before the first
    update, so later mini-batches see real (off-policy) ratios and clips bind; then one update
    per mini-batch. Returns the updates' mean metrics and the sampler/trainer log-prob gap."""
    o, mini = p.optim, p.optim.mini_batches
    # optim.packing: completions trimmed to the longest; packed: one plan per mini-batch
    agree = lambda n: int(_all_rows(np.asarray([n])).max())
    data, packs, layout = packing.for_rollout(data, o, p.rollout.max_new_tokens, t.mesh, agree)
    batch = data.to_batch(mini, t.mesh)  # host rows -> global [M, R, ...], R over the data axes
    minis = [batch.mini(k).replace(pack=packs[k]) for k in range(mini)]
    minis = [step_lib.score(t.fns, t.state.params, t.ref_params, mb, p.loss.anchor) for mb in minis]
    gaps = [_logp_gap(mb) for mb in minis]
    metrics = []
    for mb in minis:
        t.state, m = t.fns.train_step(t.state, mb)
        metrics.append(m)
    metrics = jax.device_get(metrics)
    line = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
    line["rollout/logp_gap"] = float(np.mean(jax.device_get(gaps)))
    return {**line, **layout}


def rollout_metrics(data: records.Rollout, seconds: float) -> dict:
    """Rewards, correctness and lengths over the global batch (every process's rows)."""
    rewards, correct, lengths, truncated = (
        _all_rows(x) for x in (data.rewards, data.correct, data.lengths, data.truncated)
    )
    return {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "reward/frac_solved": float(correct.mean()),
        "rollout/len_mean": float(lengths.mean()),
        "rollout/truncated_frac": float(truncated.mean()),
        "perf/tokens_per_s": float(lengths.sum()) / seconds,
    }


def evaluate(p: build.Plan, t: Trainer) -> dict:
    """Held-out `eval/...` metrics on `eval.num_prompts` prompts (trainer/evaluate.py): greedy
    accuracy, avg@G and pass@k at temperature 1, length, entropy and diversity. The evaluation
    holds only the train state, the rollout weights and its sampler calls (what --dry_run counts
    as eval_gib): the step's device batch is gone by now."""
    return evaluate_lib.in_training(p, t.task, t.sampler, t.to_rollout(t.state.params))


def _already_done(workdir: str, step: int) -> dict:
    """A run started again at its last step: nothing is trained, evaluated or written; the
    last metrics line is returned for the summary."""
    if jax.process_index() == 0:
        print(f"{workdir}: already at step {step} = total_steps; nothing to train", flush=True)
    path = os.path.join(workdir, "metrics.jsonl")
    lines = metrics_lib.read_metrics(path, allow_torn_end=True) if os.path.exists(path) else []
    last = lines[-1] if lines and lines[-1].get("step") == step else {}
    return {**last, "step": step}


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


def _progress(p: build.Plan, start):
    from tqdm.auto import tqdm

    return tqdm(
        total=p.total_steps,
        initial=start,
        disable=not p.logging.progress or jax.process_index() != 0,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )


def dynamic_sampling_keep(correct: np.ndarray) -> np.ndarray:
    """DAPO dynamic sampling (spec §5.16): keep the groups [P, G] with 0 < #correct < G."""
    n = np.asarray(correct).astype(bool).sum(-1)  # [P]
    return (n > 0) & (n < np.shape(correct)[-1])
