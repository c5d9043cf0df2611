"""The training loop, top to bottom: mesh -> task -> model -> optimizer -> jitted functions ->
restore -> per step: prompts, rollout, host rewards, anchor log-probs, updates, metrics,
evaluation, checkpoint."""

from __future__ import annotations

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


def make_model(c: ml_collections.ConfigDict, task, mesh) -> model_lib.Qwen3:
    m = c.model
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    if m.hf_dir:
        model = hf_io.load_qwen3(m.hf_dir, dtype=param_dtype, mesh=mesh, remat=m.remat)
        model.dtype = dtype  # compute dtype may differ from the stored parameter dtype
        return model
    cfg = model_lib.Qwen3Config.preset(m.preset)
    if m.vocab_size:
        vocab = task.vocab_size if m.vocab_size == -1 else m.vocab_size
        cfg = model_lib.Qwen3Config(**{**cfg.__dict__, "vocab_size": vocab})
    return model_lib.init_model(cfg, c.seed, param_dtype=param_dtype, dtype=dtype, remat=m.remat)


def pad_left(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        p = list(p)[-length:]  # left truncation keeps the end of the prompt
        ids[i, length - len(p) :], mask[i, length - len(p) :] = p, 1
    return ids, mask


def rollout(c, task, sampler, params, examples, rng) -> dict:
    """G completions per example and their rewards, as the host-side batch arrays."""
    g = c.rollout.group_size
    out = sampler.sample(params, [e.prompt_ids for e in examples], n=g, rng=rng)
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    completions = [tuple(t[m > 0]) for t, m in zip(tokens, mask, strict=True)]
    grouped = [e for e in examples for _ in range(g)]  # [P·G], group-major
    rewards = np.asarray(task.rewards(grouped, completions), np.float32)
    lengths = np.asarray(out.lengths)
    if c.rollout.overlong_buffer:
        rewards += np.asarray(
            pg_lib.dapo_overlong_penalty(
                lengths, c.rollout.max_new_tokens, c.rollout.overlong_buffer
            )
        )
    prompt_ids, prompt_mask = pad_left(
        grouped_prompts := [e.prompt_ids for e in grouped], c.rollout.max_prompt_len, task.pad_id
    )
    del grouped_prompts
    return dict(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=tokens.astype(np.int32),
        completion_mask=mask.astype(np.float32),
        sampler_logp=np.asarray(out.logp, np.float32),
        rewards=rewards,
        lengths=lengths.astype(np.float32),
        truncated=np.asarray(out.truncated, np.float32),
    )


def _take_groups(batch: dict, groups: np.ndarray, g: int) -> dict:
    rows = (groups[:, None] * g + np.arange(g)).reshape(-1)
    return {k: v[rows] for k, v in batch.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per `config`, resuming from the latest checkpoint in `workdir`. Returns the last
    metrics line."""
    c = config
    # --- checks, mesh, task ------------------------------------------------------------------
    mesh = sharding_lib.make_mesh(c.mesh)
    validate.check_config(c, mesh.size)
    task = make_task(c)
    train_set = task.train_examples()
    p, g = c.rollout.prompts_per_step, c.rollout.group_size

    # --- model, optimizer, jitted functions -------------------------------------------------
    model = make_model(c, task, mesh)
    validate.check_vocab(model.cfg.vocab_size, task.vocab_size)
    validate.check_lengths(c, model.cfg.max_position_embeddings)
    graphdef, params = nnx.split(model, nnx.Param)
    del model
    total_updates = c.total_steps * c.optim.mini_batches
    tx, lr_fn = train_step_lib.make_optimizer(c.optim, total_updates)
    sched_cfg = train_step_lib.schedule_config(c, graphdef_vocab(graphdef, params))
    # The frozen reference (only for a KL term) is a copy: the train state is donated.
    ref_params = jax.tree.map(jnp.copy, params) if c.loss.kl_coef else None
    state = train_step_lib.init_train_state(params, tx, c.seed, sched_cfg)
    state = jax.device_put(state, sharding_lib.tree_shardings(state, mesh))
    fns = train_step_lib.build(graphdef, c, tx, sched_cfg)
    sampler = sampler_lib.Sampler(
        graphdef,
        max_prompt_len=c.rollout.max_prompt_len,
        max_new_tokens=c.rollout.max_new_tokens,
        temperature=c.rollout.temperature,
        top_k=c.rollout.top_k,
        top_p=c.rollout.top_p,
        eos_ids=task.eos_ids,
        pad_id=task.pad_id,
    )

    # --- restore -----------------------------------------------------------------------------
    ckpt = checkpoint_lib.Checkpointer(
        workdir, every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep
    )
    start, position = 0, 0
    latest = ckpt.latest_step()
    if latest is not None:
        record = ckpt.read_record(latest)
        checkpoint_lib.check_compatible(record["config"], c.to_dict(), workdir)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        state, record = ckpt.restore(latest, abstract)
        start, position = latest, int(record["position"])
        logging.info("resumed from step %d (data position %d)", start, position)
    metrics_lib.write_config(workdir, c)
    writer = metrics_lib.MetricsWriter(
        workdir, tensorboard=c.logging.tensorboard, resume_step=start
    )
    progress = _progress(c, start)
    root_key = jax.random.wrap_key_data(jnp.asarray(jax.device_get(state.rng)))  # not donated

    # --- loop --------------------------------------------------------------------------------
    line: dict = {}
    with checkpoint_lib.StopSignal() as stop:
        for step in range(start + 1, c.total_steps + 1):
            t0 = time.perf_counter()
            rng = jax.random.fold_in(root_key, step)
            order = data_lib.global_batch_indices(len(train_set), c.seed, position, p)
            position += p
            batch = rollout(c, task, sampler, state.params, [train_set[i] for i in order], rng)
            reward_mean = float(batch["rewards"].mean())
            info = {}
            if c.rollout.dynamic_sampling:
                batch, position, info = _refill(c, task, sampler, state, batch, position, rng)
            t_rollout = time.perf_counter() - t0

            arrays = {k: jnp.asarray(batch[k]) for k in train_step_lib.BATCH_KEYS if k in batch}
            arrays["old_logp"] = fns.logprobs(state.params, arrays)
            arrays["ref_logp"] = (
                fns.logprobs(ref_params, arrays)
                if ref_params is not None
                else jnp.zeros_like(arrays["old_logp"])
            )
            gap = _masked_mean(
                np.abs(batch["sampler_logp"] - np.asarray(arrays["old_logp"])),
                batch["completion_mask"],
            )
            step_metrics = []
            rows = p * g // c.optim.mini_batches
            for k in range(c.optim.mini_batches):
                mb = jax.tree.map(lambda x, lo=k * rows, hi=(k + 1) * rows: x[lo:hi], arrays)
                state, m = fns.train_step(state, mb)
                step_metrics.append(m)
            step_metrics = jax.device_get(step_metrics)
            line = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
            seconds = time.perf_counter() - t0
            tokens = float(batch["completion_mask"].sum())
            line.update(
                {
                    "reward/mean": reward_mean,
                    "reward/std": float(batch["rewards"].std()),
                    "reward/frac_solved": float((batch["rewards"] >= 1.0).mean()),
                    "rollout/len_mean": float(batch["lengths"].mean()),
                    "rollout/truncated_frac": float(batch["truncated"].mean()),
                    "rollout/logp_gap": gap,
                    "optim/lr": float(lr_fn(int(state.step) - 1)),
                    "perf/step_s": seconds,
                    "perf/rollout_s": t_rollout,
                    "perf/tokens_per_s": tokens / seconds,
                    **info,
                }
            )
            if c.eval.num_prompts and c.eval.every_steps and step % c.eval.every_steps == 0:
                line.update(evaluate(c, task, sampler, state.params))
            line = writer.write(step, line)
            progress.update(1)
            progress.set_postfix(
                reward=f"{line['reward/mean']:.3f}",
                alpha=f"{line.get('schedule/alpha', float('nan')):.2f}",
            )
            last = step == c.total_steps
            if ckpt.should_save(step) or last or stop.received:
                ckpt.save(step, state, {"position": position, "config": c.to_dict()})
            if stop.received:
                logging.warning("signal %d: saved step %d, stopping", stop.received, step)
                break
    progress.close()
    if c.eval.num_prompts and not stop.received and not c.eval.every_steps:
        line = writer.write(
            c.total_steps,
            {
                "reward/mean": line.get("reward/mean", 0.0),
                **evaluate(c, task, sampler, state.params),
            },
        )
    writer.close()
    ckpt.close()
    if c.logging.plots:
        metrics_lib.write_plots(workdir)
    return line


def graphdef_vocab(graphdef, params) -> int:
    return nnx.merge(graphdef, params).cfg.vocab_size


def _masked_mean(x: np.ndarray, mask: np.ndarray) -> float:
    return float((x * mask).sum() / max(mask.sum(), 1.0))


def _refill(c, task, sampler, state, batch, position, rng):
    """DAPO dynamic sampling: keep groups whose rewards differ, refill from fresh prompts for at
    most `max_refill_rounds` rounds; if still short, the batch is topped up with dropped groups
    (reported as `rollout/refill_short`)."""
    p, g = c.rollout.prompts_per_step, c.rollout.group_size
    train_set = task.train_examples()
    kept, dropped = [], []
    for round_ in range(c.rollout.max_refill_rounds + 1):
        if round_:
            order = data_lib.global_batch_indices(len(train_set), c.seed, position, p)
            position += p
            batch = rollout(
                c,
                task,
                sampler,
                state.params,
                [train_set[i] for i in order],
                jax.random.fold_in(rng, 1000 + round_),
            )
        keep = np.asarray(pg_lib.dynamic_sampling_keep(batch["rewards"].reshape(-1, g)))
        kept.append(_take_groups(batch, np.flatnonzero(keep), g))
        dropped.append(_take_groups(batch, np.flatnonzero(~keep), g))
        if sum(len(b["rewards"]) for b in kept) >= p * g:
            break
    pool = kept + dropped
    merged = {k: np.concatenate([b[k] for b in pool])[: p * g] for k in batch}
    n_kept = sum(len(b["rewards"]) for b in kept) // g
    info = {
        "rollout/refill_rounds": float(round_),
        "rollout/refill_short": float(max(p - n_kept, 0)),
    }
    return merged, position, info


def evaluate(c, task, sampler, params) -> dict:
    """Greedy held-out reward on the first `eval.num_prompts` eval examples."""
    examples = list(task.eval_examples()[: c.eval.num_prompts])
    out = sampler.sample(
        params, [e.prompt_ids for e in examples], n=1, rng=jax.random.key(0), temperature=0.0
    )
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    completions = [tuple(t[m > 0]) for t, m in zip(tokens, mask, strict=True)]
    rewards = np.asarray(task.rewards(examples, completions), np.float32)
    return {
        "eval/reward_mean": float(rewards.mean()),
        "eval/accuracy": float((rewards >= 1).mean()),
    }


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
