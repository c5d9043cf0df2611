"""Padding-free scoring and training: padded vs trimmed vs packed, at equal real tokens. One JSON
line per (case, packing); the settings compared share `case`.

  python benchmarks/packing.py            # mean/max completion length 0.3, 0.6 and 1
  python benchmarks/packing.py --quick    # fewer repeats

Each case is one batch of B rows (prompts of Tp/2..Tp real tokens left-padded to Tp,
completions of mean/max ≈ `ratio` right-padded to Tc, one row at the cap; one case has its
longest row at Tc/2). `packing` field:
  - `padded`: [B, Tp + Tc], the completions padded to max_new_tokens (before issue 21);
  - `trimmed`: the completion axis cut to packing.trimmed_length (what optim.packing=none runs);
  - `packed_always`: packing.plan (first-fit decreasing, pack_len = Tp + Tc) + packing.score;
  - `packed`: what optim.packing=packed runs (packing.for_rollout's rule): the packed rows when
    they compute fewer tokens than `trimmed`, else `trimmed` (field `layout`).
Cases `len_ratio_*`: jit(grad(sum of real-token log-probs)) w.r.t. the parameters; cases
`train_step_*`: the real jitted update (trainer/step.py train_step: APO, 2 micro-batches,
AdamW). Medians over interleaved repeats (the host is shared); a setting that runs the same
program as another is timed once. Fields: pad_frac (padding share of the tokens the decoder
computes), step_s, real_tok_s (real prompt + completion tokens per second).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from apo_jax.models import qwen3 as model_lib  # noqa: E402
from apo_jax.trainer import build, packing, records  # noqa: E402
from apo_jax.trainer import step as ts  # noqa: E402
from configs import base  # noqa: E402

ROWS, TP, TC, CHUNK = 8, 64, 256, 2048
CFG = model_lib.Qwen3Config.tiny(
    vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2, head_dim=32
)


def _lengths(ratio: float, longest: int, rng) -> np.ndarray:
    """Completion lengths with mean/max ≈ ratio and max = longest: exponential (RL completions'
    long tail) with its mean calibrated, one row at `longest`."""
    u = rng.uniform(size=ROWS)
    if ratio >= 1:
        return np.full(ROWS, longest)
    mean = ratio * longest
    for _ in range(50):
        c_len = np.clip(np.round(-mean * np.log1p(-u)), 1, longest).astype(int)
        c_len[0] = longest
        mean *= ratio / (c_len.mean() / longest)
    return c_len


def _batch(ratio: float, longest: int = TC, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    p_len = rng.integers(TP // 2, TP + 1, ROWS)
    c_len = _lengths(ratio, longest, rng)
    pm = (np.arange(TP)[None] >= TP - p_len[:, None]).astype(np.int32)
    cm = (np.arange(TC)[None] < c_len[:, None]).astype(np.float32)
    return dict(
        prompt_ids=rng.integers(0, CFG.vocab_size, (ROWS, TP)).astype(np.int32),
        prompt_mask=pm,
        completion_ids=rng.integers(0, CFG.vocab_size, (ROWS, TC)).astype(np.int32),
        completion_mask=cm,
    )


def _programs(graphdef, b: dict):
    """{packing: (jitted grad fn, its arguments, computed tokens)} for one batch."""
    real_of = lambda logp, cm: jnp.sum(logp * cm)

    def padded(params, b):
        return real_of(
            ts.completion_logprobs(graphdef, params, b, chunk=CHUNK), b["completion_mask"]
        )

    def packed(params, pl, b):
        m = nnx.merge(graphdef, params)
        cm = b["completion_mask"]
        return real_of(
            packing.score(m, pl, b["prompt_ids"], b["completion_ids"], cm, chunk=CHUNK), cm
        )

    tc = packing.trimmed_length(b["completion_mask"], TC)
    trimmed = {k: (v[:, :tc] if k.startswith("completion") else v) for k, v in b.items()}
    pl = packing.plan(b["prompt_mask"], b["completion_mask"], TP + TC)
    choice, _ = packing.choose(b["prompt_mask"], b["completion_mask"], TP + TC, TC)
    grad = lambda f: jax.jit(jax.grad(f))
    r, ell = np.asarray(pl.src).shape
    progs = {
        "padded": (grad(padded), (b,), ROWS * (TP + TC)),
        # at the cap, trimming changes nothing: the same program as "padded", timed once
        "trimmed": (grad(padded), (trimmed,), ROWS * (TP + tc)) if tc < TC else None,
        # always the packed rows, even where they save nothing
        "packed_always": (grad(packed), (pl, b), r * ell),
    }
    # optim.packing=packed: packing.choose's layout for this batch (packed rows or trimmed)
    progs["trimmed"] = progs["trimmed"] or progs["padded"]
    progs["packed"] = progs["packed_always" if choice is not None else "trimmed"]
    return progs


def case(ratio: float, repeats: int, longest: int = TC) -> list[dict]:
    model = model_lib.init_model(CFG, 0, attention="xla_blockwise")  # model.attention=auto on CPU
    graphdef, params = nnx.split(model, nnx.Param)
    b = {k: jnp.asarray(v) for k, v in _batch(ratio, longest).items()}
    real = int(np.asarray(b["prompt_mask"]).sum() + np.asarray(b["completion_mask"]).sum())
    lens = np.asarray(b["completion_mask"]).sum(1)
    progs = _programs(graphdef, b)
    runs = {}  # distinct programs ("packed" reuses one; "trimmed" may be "padded")
    for k, prog in progs.items():
        if all(prog is not other for other in runs.values()):
            runs[k] = prog
    for fn, args, _ in runs.values():
        jax.block_until_ready(fn(params, *args))  # compile + warm-up
    times = {k: [] for k in runs}
    for i in range(repeats):  # interleaved, rotating: host drift hits all settings alike
        keys = list(runs)[i % len(runs) :] + list(runs)[: i % len(runs)]
        for k in keys:
            fn, args, _ = runs[k]
            t = time.perf_counter()
            jax.block_until_ready(fn(params, *args))
            times[k].append(time.perf_counter() - t)
    rows = []
    for k, (_, _, computed) in progs.items():
        same = next(j for j in runs if runs[j] is progs[k])
        step_s = statistics.median(times[same])
        rows.append(
            {
                "case": f"len_ratio_{ratio}" + ("" if longest == TC else f"_max_{longest}"),
                "packing": k,
                "layout": "packed" if same == "packed_always" else "padded",
                "mean_over_max": float(lens.mean() / lens.max()),
                "pad_frac": 1 - real / computed,
                "computed_tokens": computed,
                "real_tokens": real,
                "step_s": step_s,
                "real_tok_s": real / step_s,
            }
        )
    base = rows[0]["real_tok_s"]
    for row in rows:
        row["speedup_vs_padded"] = row["real_tok_s"] / base
    return rows


def train_step_case(ratio: float, repeats: int, loss: str = "apo", micro: int = 2) -> list[dict]:
    """The real jitted update (trainer/step.py train_step: scoring, loss, gradients over
    `micro` micro-batches, AdamW) on the same rows padded, trimmed and packed."""
    c = base.get_config("debug")
    c.rollout.group_size, c.rollout.prompts_per_step = 4, ROWS // 4
    c.optim.mini_batches, c.optim.micro_batches = 1, micro
    c.loss.name = loss
    p = build.plan(c)
    model = model_lib.init_model(CFG, 0, attention="xla_blockwise")
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = build.optimizer(p)
    spec = build.step_spec(p, CFG.vocab_size)
    fns = ts.build(graphdef, spec, tx)
    host = _batch(ratio)
    rng = np.random.default_rng(1)
    host["rewards"] = rng.integers(0, 2, ROWS).astype(np.float32)
    host["old_logp"] = host["ref_logp"] = np.full((ROWS, TC), -7.0, np.float32)
    real = int(host["prompt_mask"].sum() + host["completion_mask"].sum())
    lens = host["completion_mask"].sum(1)
    tc = packing.trimmed_length(host["completion_mask"], TC)
    trimmed = packing.trim(host, tc, ("completion_ids", "completion_mask", "old_logp", "ref_logp"))
    pl = packing.for_micro_batches(
        trimmed["prompt_mask"], trimmed["completion_mask"], TP + tc, micro
    )
    layouts = {
        "padded": (records.Batch(**host), ROWS * (TP + TC)),
        "trimmed": (records.Batch(**trimmed), ROWS * (TP + tc)),
        "packed": (records.Batch(**trimmed, pack=pl), pl.src.size),
    }
    if tc == TC:  # trimming changes no shape: the same program as "padded"
        layouts["trimmed"] = layouts["padded"]
    if pl.src.size >= ROWS * (TP + tc):  # packing.for_rollout's rule: keep the trimmed rows
        layouts["packed"] = layouts["trimmed"]
    runs = {}  # distinct programs, each timed once
    for k, v in layouts.items():
        if all(v is not other for other in runs.values()):
            runs[k] = v
    fresh = lambda: ts.init_train_state(jax.tree.map(jnp.copy, params), tx, 0, spec.schedule)
    states = {k: fresh() for k in runs}  # (each donated by its own steps)
    for k, (b, _) in runs.items():  # compile + warm-up
        states[k], m = fns.train_step(states[k], b)
        jax.block_until_ready(m)
    times = {k: [] for k in runs}
    for i in range(repeats):  # interleaved, rotating: host drift hits all settings alike
        keys = list(runs)[i % len(runs) :] + list(runs)[: i % len(runs)]
        for k in keys:
            t = time.perf_counter()
            states[k], m = fns.train_step(states[k], runs[k][0])
            jax.block_until_ready(m)
            times[k].append(time.perf_counter() - t)
    rows = []
    for k, (b, computed) in layouts.items():
        same = next(j for j in runs if runs[j] is layouts[k])
        step_s = statistics.median(times[same])
        rows.append(
            {
                "case": f"train_step_{loss}_micro{micro}_len_ratio_{ratio}",
                "packing": k,
                "layout": "padded" if b.pack is None else "packed",
                "mean_over_max": float(lens.mean() / lens.max()),
                "pad_frac": 1 - real / computed,
                "computed_tokens": computed,
                "real_tokens": real,
                "step_s": step_s,
                "real_tok_s": real / step_s,
            }
        )
    for row in rows:
        row["speedup_vs_padded"] = row["real_tok_s"] / rows[0]["real_tok_s"]
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--ratios", default="0.3,0.6,1.0")
    args = parser.parse_args()
    repeats = 3 if args.quick else 9
    for ratio in map(float, args.ratios.split(",")):
        for row in case(ratio, repeats):
            print(json.dumps(row), flush=True)
    # the batch's longest completion at half the cap: what trimming alone recovers
    for row in case(0.3, repeats, longest=TC // 2):
        print(json.dumps(row), flush=True)
    for ratio in map(float, args.ratios.split(",")):
        for row in train_step_case(ratio, repeats):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
