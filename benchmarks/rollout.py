"""Rollout engines on this CPU: `static` vs `continuous` at the same number of slots. JSON lines.

A small random Qwen3 (untied head, so its next-token distribution is near uniform) samples at
temperature 1; stopping on k of its V token ids makes completion lengths geometric with mean
~V/k, capped at max_new_tokens. Cases (their `case` is shared by both engines' lines):
  - `mean_0.25`: mean length ~ max_new_tokens / 4 (the RL long tail: most slot-steps of a static
    batch run on rows that already stopped);
  - `mean_0.5`: mean ~ max_new_tokens / 2;
  - `full`: no stop ids, every row runs to max_new_tokens (continuous can only lose here).
Static decodes the rows in chunks of `slots` rows (rollout.rows_per_chunk), each to its longest
row; continuous keeps `slots` rows in flight. Fields: useful_tok_s (generated tokens, the stop
included, per second of the whole rollout, prefill included), utilization (tokens made by decode
steps / slot-steps, a slot-step being one row of one decode iteration, live or not),
decode_steps, slot_steps, device_calls and host_syncs per rollout (the caller's fetch of each
call's rows included), mean_len, and on the continuous line the speedup over static and whether
both engines gave every row the same length. Engines alternate run by run (static, continuous,
static, ...) after a warm-up so that the noise of the shared host hits both; times are medians
over `--repeats`.

  python benchmarks/rollout.py            # the three cases (~3 min on 2 free cores)
  python benchmarks/rollout.py --quick    # smaller model and batch, a smoke run (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from apo_jax.models.qwen3 import Qwen3Config, init_model  # noqa: E402
from apo_jax.rollout import sampler as sampler_lib  # noqa: E402


def build(quick: bool):
    size = (
        dict(hidden_size=128, intermediate_size=384, num_layers=2, vocab_size=1024)
        if quick
        else dict(hidden_size=256, intermediate_size=768, num_layers=4, vocab_size=4096)
    )
    cfg = Qwen3Config.tiny(
        num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=False, **size
    )
    model = init_model(cfg, seed=0, attention="auto")  # what the trainer runs (blockwise on CPU)
    return nnx.split(model), cfg


def stop_ids(vocab: int, mean_len: float | None) -> tuple[int, ...]:
    """k = V / mean ids spread over the vocabulary (none: every row to the cap)."""
    if mean_len is None:
        return ()
    k = max(1, round(vocab / mean_len))
    return tuple(np.linspace(1, vocab - 1, k).astype(int).tolist())


def run_case(graphdef, params, cfg, name, frac, args) -> list[dict]:
    t = args.max_new_tokens
    eos = stop_ids(cfg.vocab_size, None if frac is None else frac * t)
    rng = np.random.RandomState(0)
    prompts = [
        rng.randint(1, cfg.vocab_size, rng.randint(8, 33)).tolist() for _ in range(args.prompts)
    ]
    kw = dict(max_prompt_len=32, max_new_tokens=t, temperature=1.0, eos_ids=eos)
    static = sampler_lib.Sampler(graphdef, engine="static", **kw)
    cont = sampler_lib.Sampler(
        graphdef, engine="continuous", slots=args.slots, refill=args.refill, **kw
    )

    def run_static(rng):  # the loop's rollout.rows_per_chunk: calls of `slots` rows in turn
        k, lengths, st = args.slots // args.n, [], {}
        for i in range(0, len(prompts), k):
            out = static.sample(
                params, prompts[i : i + k], n=args.n, rng=rng, row_ids=range(i, i + k)
            )
            lengths.append(np.asarray(out.lengths))  # the fetch the loop makes per call
            for key, v in static.stats().items():
                st[key] = v if key == "slots" else st.get(key, 0) + v
            st["host_syncs"] += 1  # the fetch
        return np.concatenate(lengths), st

    def run_continuous(rng):
        out = cont.sample(params, prompts, n=args.n, rng=rng)
        st = cont.stats()
        return np.asarray(out.lengths), {**st, "host_syncs": st["host_syncs"] + 1}  # + the fetch

    engines = {"static": run_static, "continuous": run_continuous}
    times = {e: [] for e in engines}
    result = {}
    for i in range(args.repeats + 1):  # run 0 compiles and warms up
        for e, fn in engines.items():
            start = time.perf_counter()
            result[e] = fn(i)
            if i:
                times[e].append(time.perf_counter() - start)
    lines = []
    for e in engines:
        lengths, st = result[e]
        wall = statistics.median(times[e])
        decode_tokens = int((lengths - 1).sum())  # the first token comes from the prefill
        lines.append(
            dict(
                case=name,
                engine=e,
                slots=st["slots"],
                refill=args.refill if e == "continuous" else None,
                rows=len(lengths),
                mean_len=round(float(lengths.mean()), 2),
                max_new_tokens=t,
                useful_tok_s=round(float(lengths.sum()) / wall, 1),
                utilization=round(decode_tokens / max(1, st["slot_steps"]), 3),
                slot_steps=st["slot_steps"],
                decode_steps=st["decode_steps"],
                device_calls=st["device_calls"],
                host_syncs=st["host_syncs"],
                wall_s=round(wall, 3),
                wall_s_all=[round(x, 3) for x in times[e]],
            )
        )
    lines[1]["speedup"] = round(lines[1]["useful_tok_s"] / lines[0]["useful_tok_s"], 3)
    # Chunks prefill fewer prompts per call than continuous (all at once): the log-probs may
    # differ in the last bit (matmul blocking), the lengths should not.
    lines[1]["same_lengths"] = bool(np.array_equal(result["static"][0], result["continuous"][0]))
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--slots", type=int, default=None)
    ap.add_argument("--refill", type=int, default=None)
    ap.add_argument("--max_new_tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cases", default="mean_0.25,mean_0.5,full")
    args = ap.parse_args()
    q = args.quick
    args.prompts = args.prompts or (16 if q else 64)
    args.slots = args.slots or (16 if q else 32)
    args.refill = args.refill or max(1, args.slots // 8)
    args.max_new_tokens = args.max_new_tokens or (64 if q else 128)
    args.repeats = args.repeats or (1 if q else 3)
    (graphdef, params), cfg = build(q)
    cases = {"mean_0.25": 0.25, "mean_0.5": 0.5, "full": None}
    print(json.dumps(dict(device=str(jax.devices()[0]), cpu_count=os.cpu_count())), flush=True)
    for name in args.cases.split(","):
        for line in run_case(graphdef, params, cfg, name, cases[name], args):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
