"""Padding-free scoring: padded vs trimmed vs packed forward + backward of the completions'
log-probs, at equal real tokens. One JSON line per (case, packing).

  python benchmarks/packing.py            # mean/max completion length 0.3, 0.6 and 1
  python benchmarks/packing.py --quick    # fewer repeats

Each case is one batch of B rows (prompts of Tp/2..Tp real tokens left-padded to Tp,
completions of mean/max ≈ `ratio` right-padded to Tc, one row at the cap; a last case has its
longest row at Tc/2), scored these ways:
  - `none`: trainer/step.py completion_logprobs on [B, Tp + Tc] (today's layout);
  - `trimmed`: the same with the completion axis cut to packing.trimmed_length;
  - `packed_always`: packing.plan (first-fit decreasing, pack_len = Tp + Tc) + packing.score;
  - `packed`: what optim.packing=packed runs, packing.choose's layout for the batch: the packed
    rows when they compute fewer tokens than `trimmed`, else `trimmed` (field `layout`).
Timed: jit(value_and_grad(sum of real-token log-probs)) w.r.t. the parameters, medians over
interleaved repeats (the host is shared). Fields: pad_frac (padding share of the tokens the
decoder computes), step_s, real_tok_s (real prompt + completion tokens per second).
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
from apo_jax.trainer import packing  # noqa: E402
from apo_jax.trainer import step as ts  # noqa: E402

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
        "none": (grad(padded), (b,), ROWS * (TP + TC)),
        # at the cap, trimming changes nothing: the same program as "none", timed once
        "trimmed": (grad(padded), (trimmed,), ROWS * (TP + tc)) if tc < TC else None,
        # always the packed rows, even where they save nothing
        "packed_always": (grad(packed), (pl, b), r * ell),
    }
    # optim.packing=packed: packing.choose's layout for this batch (packed rows or trimmed)
    progs["trimmed"] = progs["trimmed"] or progs["none"]
    progs["packed"] = progs["packed_always" if choice is not None else "trimmed"]
    return progs


def case(ratio: float, repeats: int, longest: int = TC) -> list[dict]:
    model = model_lib.init_model(CFG, 0, attention="xla_blockwise")  # model.attention=auto on CPU
    graphdef, params = nnx.split(model, nnx.Param)
    b = {k: jnp.asarray(v) for k, v in _batch(ratio, longest).items()}
    real = int(np.asarray(b["prompt_mask"]).sum() + np.asarray(b["completion_mask"]).sum())
    lens = np.asarray(b["completion_mask"]).sum(1)
    progs = _programs(graphdef, b)
    runs = {}  # distinct programs ("packed" reuses one; "trimmed" may be "none")
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
        row["speedup_vs_none"] = row["real_tok_s"] / base
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


if __name__ == "__main__":
    main()
