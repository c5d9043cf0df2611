"""Train-step throughput and log-prob memory on this machine. One JSON line per case.

  python benchmarks/train_step.py            # all cases
  python benchmarks/train_step.py --quick    # tiny model only, fewer repeats

Cases:
  - `matmul_peak`: measured 2048^3 matmul FLOP/s (float32, and bfloat16 inputs with float32
    accumulation), the denominators of the utilisation figures below;
  - `train_step`: the jitted APO update (forward, fused log-probs, loss, grads, AdamW) for the tiny
    and the ~42M-parameter Qwen3, batch 8 x (32 prompt + 64 completion) tokens, float32 and
    bfloat16 compute: tokens/s, model FLOP/s (6 N per token + attention) and that divided by the
    matmul peak of the same dtype, all medians after warm-up, compile time separately;
  - `logprob_memory`: XLA's peak temporary memory of value-and-grad of the chunked log-probs vs
    the naive log_softmax over full logits, vocabulary 151,936, hidden 1024, several lengths.
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
from apo_jax.trainer import logprobs as logprobs_lib  # noqa: E402
from apo_jax.trainer import step as ts  # noqa: E402
from configs import base  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(repeats: int) -> dict:
    n = 2048
    a32 = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b32 = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f32 = jax.jit(lambda a, b: a @ b)
    bf16 = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    a16, b16 = a32.astype(jnp.bfloat16), b32.astype(jnp.bfloat16)
    jax.block_until_ready((f32(a32, b32), bf16(a16, b16)))
    flops = 2 * n**3
    return {
        "case": "matmul_peak",
        "float32_gflops": flops / _median_time(lambda: f32(a32, b32), repeats) / 1e9,
        "bfloat16_gflops": flops / _median_time(lambda: bf16(a16, b16), repeats) / 1e9,
    }


def model_flops_per_token(cfg: model_lib.Qwen3Config, seq: int) -> float:
    """Training FLOPs per token: 6 x matmul weights (LM head included) + attention scores."""
    d, f, n, k, h = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    )
    per_layer = d * h * (2 * n + 2 * k) + 3 * d * f
    weights = cfg.num_layers * per_layer + cfg.vocab_size * d
    attention = cfg.num_layers * 2 * 2 * seq * n * h  # QK^T and PV, forward
    return 6 * weights + 3 * attention


def train_step_case(name: str, cfg, dtype: str, repeats: int, batch=8, prompt=32, new=64) -> dict:
    c = base.get_config("debug")
    c.rollout.group_size, c.rollout.prompts_per_step = 4, batch // 4
    c.optim.mini_batches, c.optim.micro_batches = 1, 1
    model = model_lib.init_model(cfg, 0, dtype=jnp.dtype(dtype))
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = ts.make_optimizer(c.optim, 100)
    sched = ts.schedule_config(c, cfg.vocab_size)
    state = ts.init_train_state(params, tx, 0, sched)
    fns = ts.build(graphdef, c, tx, sched)
    rng = np.random.RandomState(0)
    b = dict(
        prompt_ids=jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, prompt)), jnp.int32),
        prompt_mask=jnp.ones((batch, prompt), jnp.int32),
        completion_ids=jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, new)), jnp.int32),
        completion_mask=jnp.ones((batch, new), jnp.float32),
        rewards=jnp.asarray(rng.randint(0, 2, (batch,)), jnp.float32),
    )
    b["old_logp"] = fns.logprobs(state.params, b)
    b["ref_logp"] = b["old_logp"]
    t = time.perf_counter()
    compiled = fns.train_step.lower(state, b).compile()
    compile_s = time.perf_counter() - t
    holder = {"state": state}

    def one():
        holder["state"], m = compiled(holder["state"], b)
        return m["loss/value"]

    jax.block_until_ready(one())  # warm-up
    seconds = _median_time(one, repeats)
    tokens = batch * (prompt + new)
    flops = model_flops_per_token(cfg, prompt + new) * tokens
    return {
        "case": "train_step",
        "model": name,
        "params_m": cfg.num_params / 1e6,
        "dtype": dtype,
        "batch": batch,
        "seq": prompt + new,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "model_gflops": flops / seconds / 1e9,
        "compile_s": compile_s,
    }


def logprob_memory(seq: int, vocab=151_936, hidden=1024) -> dict:
    h = jax.ShapeDtypeStruct((1, seq, hidden), jnp.float32)
    w = jax.ShapeDtypeStruct((vocab, hidden), jnp.float32)
    tok = jax.ShapeDtypeStruct((1, seq), jnp.int32)

    def naive(h, w, tok):
        logits = jnp.einsum("BTD,VD->BTV", h, w)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), tok[..., None], -1).sum()

    def chunked(h, w, tok):
        return logprobs_lib.token_logprobs(h, w, tok).sum()

    out = {"case": "logprob_memory", "seq": seq, "vocab": vocab, "hidden": hidden}
    for label, fn in (("naive", naive), ("chunked", chunked)):
        grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
        mem = grad.lower(h, w, tok).compile().memory_analysis()
        out[f"{label}_temp_mib"] = mem.temp_size_in_bytes / 2**20
    out["logits_f32_mib"] = seq * vocab * 4 / 2**20
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    peak = matmul_peak(repeats)
    print(json.dumps(peak), flush=True)
    models = [("tiny", model_lib.Qwen3Config.tiny())]
    if not args.quick:
        models.append(("bench_50m", model_lib.Qwen3Config.bench_50m()))
    for name, cfg in models:
        for dtype in ("float32", "bfloat16"):
            row = train_step_case(name, cfg, dtype, repeats)
            # The host is shared and its speed drifts: the denominator is the matmul peak
            # measured right after this case, not at start-up.
            peak = matmul_peak(repeats)
            peak_gflops = peak[f"{dtype}_gflops"]
            row["matmul_peak_gflops"] = peak_gflops
            row["fraction_of_peak"] = row["model_gflops"] / peak_gflops
            print(json.dumps(row), flush=True)
    for seq in (256, 1024) if args.quick else (256, 1024, 4096):
        print(json.dumps(logprob_memory(seq)), flush=True)


if __name__ == "__main__":
    main()
