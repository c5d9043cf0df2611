"""Held-out evaluation: greedy accuracy, avg@k and unbiased pass@k at temperature 1, mean length,
per-token entropy and diversity. Used by the training loop (`in_training`) and by the evaluation
CLI (`python -m apo_jax.evaluate`, apo_jax/evaluate.py).

A completion is correct when its reward is >= 1 (MATH: verified final answer; toy: full credit).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from apo_jax import tasks as tasks_lib
from apo_jax.infra import checkpoint as checkpoint_lib
from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import lora as lora_lib
from apo_jax.tasks import order as order_lib
from apo_jax.trainer import build
from apo_jax.trainer import step as step_lib

CORRECT = 1.0  # reward at or above which a completion counts as correct
# Per-prompt statistics, one column each (gathered over processes as one float array).
_FIELDS = (
    "greedy_reward",
    "greedy_correct",
    "greedy_len",
    "num_correct",  # correct completions among the k samples at T = 1
    "sample_reward",  # mean reward of the k samples
    "sample_len",  # mean length (tokens) of the k samples
    "truncated",  # fraction of the k samples that hit max_new_tokens
    "nll_sum",  # sum over the k samples' tokens of -log pi(y_t | .)
    "tokens",  # number of those tokens
    "distinct_answers",  # distinct correct final answers
    "distinct_correct",  # distinct correct completions
    "distinct_completions",  # distinct completions, correct or not
)


# --- estimators ----------------------------------------------------------------------------------


def pass_at_k(n, c, k: int) -> np.ndarray:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 − C(n−c, k)/C(n, k),
    elementwise. Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which never forms the binomials
    (they overflow float64 for n in the hundreds)."""
    n, c = np.broadcast_arrays(np.asarray(n, np.int64), np.asarray(c, np.int64))
    out = np.ones(n.shape, np.float64)
    for idx in np.ndindex(n.shape):
        ni, ci = int(n[idx]), int(c[idx])
        if not 0 <= ci <= ni or not 1 <= k <= ni:
            raise ValueError(
                f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={ni}, c={ci}, k={k}"
            )
        if ni - ci >= k:  # else every k-subset holds a correct sample: pass@k = 1
            out[idx] = 1.0 - np.prod(1.0 - k / np.arange(ni - ci + 1, ni + 1))
    return out


def avg_at_k(c, n) -> float:
    """avg@k: the mean fraction of correct samples per prompt (c of n), averaged over prompts."""
    return float(np.mean(np.asarray(c, np.float64) / np.asarray(n, np.float64)))


def pass_ks(k: int) -> list[int]:
    """The k values reported: powers of two below k, and k itself."""
    return sorted({2**i for i in range(k.bit_length()) if 2**i < k} | {k})


# --- sampling ------------------------------------------------------------------------------------

# The two passes' sampling overrides (the sampler's own eos ids stay).
GREEDY = dict(temperature=0.0)
SAMPLED = dict(temperature=1.0, top_k=0, top_p=1.0)


def rows_per_call(p: build.Plan, procs: int = 1) -> int:
    """Rows per evaluation sampler call (what the KV cache holds) per process:
    `eval.rows_per_chunk`, else `rollout.rows_per_chunk`, else a step's rows. Under the
    continuous engine each pass is one call, the engine holding `rollout.slots` rows at a time."""
    r = p.rollout
    if r.engine == "continuous":
        return max(p.eval.num_prompts, 1) * r.group_size
    return (
        p.eval.rows_per_chunk or r.rows_per_chunk or -(-r.prompts_per_step * r.group_size // procs)
    )


def call_prompts(rows: int, k: int, num_prompts: int, procs: int = 1) -> tuple[int, int]:
    """(greedy, sampled) prompts per sampler call over all processes, for `rows` rows per call
    per process: `rows` prompts of one row, or rows // k (at least one) of k rows; at most the
    `num_prompts` evaluated, rounded up to a multiple of the processes."""
    fit = lambda n: min(n, num_prompts + -num_prompts % procs)
    return fit(rows * procs), fit(max(1, rows // k) * procs)


def _generate(task, sampler, params, examples, *, n, per_call, rng, **overrides):
    """This process's share of n completions per prompt, in calls of `per_call` prompts (a
    multiple of the processes: each takes the same number; the last call padded with repeats so
    every call has one shape and compiles once). Returns the global prompt index of each local
    row, its example, completion and reward, and host arrays logp, mask, truncated [rows, ...]."""
    procs, me = jax.process_count(), jax.process_index()
    prompts = [e.prompt_ids for e in examples]
    index, cols = [], []
    for lo in range(0, len(prompts), per_call):
        mine = order_lib.process_slice(np.arange(lo, lo + per_call), me, procs)
        batch = [prompts[min(i, len(prompts) - 1)] for i in mine]
        # row_ids = global prompt index: a prompt's samples do not depend on the batching.
        out = sampler.sample(params, batch, n=n, rng=rng, row_ids=mine, **overrides)
        parts = [
            sharding_lib.local_rows(x) for x in (out.tokens, out.logp, out.mask, out.truncated)
        ]
        keep = np.repeat(mine < len(prompts), n)  # drop the padding prompts' rows
        index.append(np.repeat(mine, n)[keep])
        cols.append([x[keep] for x in parts])
    index = np.concatenate(index)
    tokens, logp, mask, truncated = (np.concatenate(c) for c in zip(*cols, strict=True))
    rows = [examples[i] for i in index]
    comps = [tuple(t[m]) for t, m in zip(tokens, mask, strict=True)]
    rewards = np.asarray(task.rewards(rows, comps), np.float64)
    return index, rows, comps, rewards, logp, mask, truncated


# --- evaluation ----------------------------------------------------------------------------------


def evaluate(
    task: tasks_lib.Task,
    sampler,
    params,
    examples: Sequence[tasks_lib.Example],
    *,
    k: int,
    rows_per_call: int,
    seed: int = 0,
) -> tuple[dict, list[dict]]:
    """(metrics, per-prompt records) for `examples`: one greedy completion and k samples at
    temperature 1 (top-k / top-p off) per prompt, from the same `seed` every call so that
    successive evaluations of a run share their sampling noise.

    The sampler sees at most `rows_per_call` rows per process per call (`call_prompts`; at least
    one prompt's k samples; under the continuous engine every prompt, `slots` rows at a time).
    Samples are keyed by prompt index, so the results do not depend on it (only the sampler's
    log-probs may round differently with the batch shape).

    Per-token entropy: the sampler's `logp` is log π(y_t | x, y_<t) under the untempered policy,
    and at T = 1 the tokens are drawn from π itself, so −log π(y_t | ·) is an unbiased estimate
    of the entropy H(π(· | x, y_<t)) at that step; `eval/entropy` is their mean over all sampled
    tokens (nats), i.e. a token-weighted average along the policy's own trajectories.
    """
    examples = list(examples)
    if sampler.engine == "continuous":  # one call per pass: the engine bounds the cache
        rows_per_call = max(rows_per_call, len(examples) * k)
    greedy_prompts, sampled_prompts = call_prompts(
        rows_per_call, k, len(examples), jax.process_count()
    )
    rng = jax.random.key(seed)
    local = _greedy(task, sampler, params, examples, greedy_prompts, rng)
    _sampled(task, sampler, params, examples, sampled_prompts, rng, k, local)
    stats = _gather(local, len(examples))  # [N, len(_FIELDS)]
    col = {f: stats[:, j] for j, f in enumerate(_FIELDS)}
    metrics = {
        "eval/accuracy": col["greedy_correct"].mean(),  # greedy
        "eval/reward_mean": col["greedy_reward"].mean(),  # greedy
        "eval/greedy_len_mean": col["greedy_len"].mean(),
        f"eval/avg@{k}": avg_at_k(col["num_correct"], k),
        **{f"eval/pass@{j}": pass_at_k(k, col["num_correct"], j).mean() for j in pass_ks(k)},
        "eval/sample_reward_mean": col["sample_reward"].mean(),
        "eval/len_mean": col["sample_len"].mean(),
        "eval/truncated_frac": col["truncated"].mean(),
        "eval/entropy": col["nll_sum"].sum() / max(col["tokens"].sum(), 1.0),
        "eval/distinct_correct_answers": col["distinct_answers"].mean(),
        "eval/distinct_correct": col["distinct_correct"].mean(),
        "eval/distinct_completions": col["distinct_completions"].mean(),
    }
    records = [
        {"uid": e.uid, "answer": e.answer, **{f: float(col[f][i]) for f in _FIELDS}}
        for i, e in enumerate(examples)
    ]
    return {key: float(v) for key, v in metrics.items()}, records


def _greedy(task, sampler, params, examples, per_call, rng) -> dict[int, dict]:
    """This process's per-prompt statistics of the greedy pass (rows = prompts)."""
    idx, _, _, rewards, _, mask, _ = _generate(
        task, sampler, params, examples, n=1, per_call=per_call, rng=rng, **GREEDY
    )
    return {
        int(i): dict(greedy_reward=r, greedy_correct=float(r >= CORRECT), greedy_len=m.sum())
        for i, r, m in zip(idx, rewards, mask, strict=True)
    }


def _sampled(task, sampler, params, examples, per_call, rng, k, local) -> None:
    """Adds the k samples' statistics at T = 1 to `local` (rows of a prompt are consecutive)."""
    idx, grouped, comps, rewards, logp, mask, truncated = _generate(
        task, sampler, params, examples, n=k, per_call=per_call, rng=rng, **SAMPLED
    )
    correct = rewards >= CORRECT
    keys = task.answer_keys(grouped, comps)  # counted for the correct completions only
    nll = -(logp * mask).sum(-1)  # [rows]
    stop = (*task.eos_ids, task.pad_id)
    for lo in range(0, len(idx), k):
        g = slice(lo, lo + k)
        solved = {key for key, ok in zip(keys[g], correct[g], strict=True) if ok}
        solved.discard(None)
        distinct = tasks_lib.distinct_correct(task, grouped[g], comps[g], rewards[g], CORRECT)
        local[int(idx[lo])].update(
            num_correct=float(correct[g].sum()),
            sample_reward=rewards[g].mean(),
            sample_len=mask[g].sum(-1).mean(),
            truncated=truncated[g].mean(),
            nll_sum=nll[g].sum(),
            tokens=mask[g].sum(),
            distinct_answers=float(len(solved)),
            distinct_correct=float(distinct[grouped[lo].uid]),
            distinct_completions=float(len({tasks_lib.trim_completion(c, stop) for c in comps[g]})),
        )


def _gather(local: dict[int, dict], n: int) -> np.ndarray:
    """Every process's per-prompt rows as one [n, fields] array, in prompt order."""
    ids = np.asarray(sorted(local), np.int64)
    rows = np.asarray([[local[i][f] for f in _FIELDS] for i in ids], np.float64).reshape(
        -1, len(_FIELDS)
    )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ids = np.asarray(multihost_utils.process_allgather(ids)).reshape(-1)
        rows = np.asarray(multihost_utils.process_allgather(rows)).reshape(-1, len(_FIELDS))
    out = np.full((n, len(_FIELDS)), np.nan)
    out[ids] = rows
    if np.isnan(out).any():
        raise RuntimeError("evaluation: some prompts got no completions")
    return out


def eval_subset(task, num_prompts: int, seed: int = 0) -> list[tasks_lib.Example]:
    """A fixed, seeded subset of the eval split (spread over it: MATH files are sorted by
    subject), the whole split if num_prompts is 0 or larger."""
    pool = task.eval_examples()
    if not num_prompts or num_prompts >= len(pool):
        return list(pool)
    pick = np.sort(np.random.default_rng(seed).permutation(len(pool))[:num_prompts])
    return [pool[int(i)] for i in pick]


def in_training(p: build.Plan, task, sampler, params) -> dict:
    """The training loop's evaluation: k = the group size, calls shaped like the rollout's by
    default, so the sampled pass reuses the rollout's compiled programs when it samples at T = 1."""
    examples = eval_subset(task, p.eval.num_prompts, seed=p.seed)
    metrics, _ = evaluate(
        task,
        sampler,
        params,
        examples,
        k=p.rollout.group_size,
        rows_per_call=rows_per_call(p, jax.process_count()),
        seed=p.seed,
    )
    return metrics


def restore_params(p: build.Plan, model_cfg, workdir: str, step: int | None = None):
    """(graphdef, params, step) from a training workdir's checkpoint, on the default device:
    the newest step that restores unless `step`, read-only (a run may be writing the workdir).
    Orbax needs the whole train state's tree; all but the parameters is then dropped."""
    ckpt = checkpoint_lib.Checkpointer(
        workdir, every_steps=0, keep=max(p.checkpoint.keep, 1), read_only=True
    )
    try:
        graphdef, abstract = build.abstract_model(p, model_cfg)
        if p.model.lora:  # the checkpoint holds the adapters; the base comes from model.hf_dir
            abstract = build.trainable(p, abstract)[0]
        tx, _ = build.optimizer(p)
        spec = build.step_spec(p, model_cfg.vocab_size)
        state = jax.eval_shape(step_lib.state_init(tx, p.seed, spec), abstract)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state
        )
        restored = ckpt.restore_latest(state, step)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}: no complete checkpoint under checkpoints/")
    step, state, record = restored
    if not p.model.lora:
        return graphdef, state.params, step
    build.check_base(p, record, workdir)
    mesh = sharding_lib.make_mesh(1, 1, 1)  # the default device, as the restored adapters
    base = build.base_model(p, model_cfg, mesh)[1]
    return graphdef, lora_lib.join(base, state.params), step


def check_rows(p: build.Plan, model_cfg, rows: int, what: str) -> None:
    """Fails before compiling if one sampler call of `rows` (B) sequences cannot fit this
    device: its KV cache and one step's logits alone (keys and values [B, L, 2, S, K, H] in the
    cache dtype, logits [B, V] float32) against the device's memory (host memory on CPU)."""
    r = p.rollout
    length = r.max_prompt_len + r.max_new_tokens
    kv = 2 * model_cfg.num_layers * length * model_cfg.num_kv_heads * model_cfg.head_dim
    per_row = kv * build.cache_dtype(p).itemsize + 4 * model_cfg.vocab_size
    need = rows * per_row
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    have = (stats or {}).get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf(
        "SC_PHYS_PAGES"
    )
    if need > have:
        raise ValueError(
            f"{what}: one sampler call of {rows} rows needs at least {need / 2**30:.1f} GiB "
            f"(KV cache and logits), more than this {dev.platform} device's "
            f"{have / 2**30:.1f} GiB"
        )
