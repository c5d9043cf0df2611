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
  - `micro_batches`: the APO step at 1 (fused), 2 (whole groups of 4) and 8 (1 row each)
    micro-batches of an 8-row batch: step time and XLA's memory estimate (compiled
    memory_analysis: temporaries and arguments);
  - `logprob_precision`: the bfloat16-compute step scored with model.logprob_precision =
    default vs float32 (float32 activations, highest matmul precision): time and memory;
  - `logprob_memory`: XLA's peak temporary memory of value-and-grad of the chunked log-probs vs
    the naive log_softmax over full logits, vocabulary 151,936, hidden 1024, several lengths
    (skipped by --quick).
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
from apo_jax.trainer import build, records  # noqa: E402
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


def _step_fns(cfg, dtype: str, batch: int, micro: int = 1, precision: str = "default"):
    c = base.get_config("debug")
    c.rollout.group_size, c.rollout.prompts_per_step = 4, batch // 4
    c.optim.mini_batches, c.optim.micro_batches = 1, micro
    c.model.logprob_precision = precision
    plan = build.plan(c)
    model = model_lib.init_model(cfg, 0, dtype=jnp.dtype(dtype))
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = build.optimizer(plan)
    spec = build.step_spec(plan, cfg.vocab_size)
    state = ts.init_train_state(params, tx, 0, spec.schedule)
    return state, ts.build(graphdef, spec, tx)


def _time_step(cfg, dtype, repeats, batch, prompt, new, micro=1, precision="default"):
    """(median step seconds, compile seconds, XLA temp + argument bytes estimate)."""
    state, fns = _step_fns(cfg, dtype, batch, micro, precision)
    rng = np.random.RandomState(0)
    b = records.Batch(
        prompt_ids=jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, prompt)), jnp.int32),
        prompt_mask=jnp.ones((batch, prompt), jnp.int32),
        completion_ids=jnp.asarray(rng.randint(0, cfg.vocab_size, (batch, new)), jnp.int32),
        completion_mask=jnp.ones((batch, new), jnp.float32),
        rewards=jnp.asarray(rng.randint(0, 2, (batch,)), jnp.float32),
    )
    b = ts.score(fns, state.params, state.params, b)  # anchor = reference = the policy
    t = time.perf_counter()
    compiled = fns.train_step.lower(state, b).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    holder = {"state": state}

    def one():
        holder["state"], m = compiled(holder["state"], b)
        return m["loss/value"]

    jax.block_until_ready(one())  # warm-up
    return _median_time(one, repeats), compile_s, mem


def train_step_case(name: str, cfg, dtype: str, repeats: int, batch=8, prompt=32, new=64) -> dict:
    seconds, compile_s, _ = _time_step(cfg, dtype, repeats, batch, prompt, new)
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


def micro_batch_case(name, cfg, dtype, repeats, micro, batch=8, prompt=32, new=64) -> dict:
    """The APO step (row-coupled: cotangent path) at `micro` micro-batches on one device:
    micro = batch is 1 row per device, micro = batch / G whole groups, 1 the fused pass."""
    seconds, compile_s, mem = _time_step(cfg, dtype, repeats, batch, prompt, new, micro=micro)
    return {
        "case": "micro_batches",
        "model": name,
        "dtype": dtype,
        "batch": batch,
        "group_size": 4,
        "micro_batches": micro,
        "rows_per_micro_batch": batch // micro,
        "step_s": seconds,
        "compile_s": compile_s,
        "xla_temp_mib": mem.temp_size_in_bytes / 2**20,
        "xla_args_mib": mem.argument_size_in_bytes / 2**20,
    }


def precision_case(name, cfg, repeats, precision, batch=8, prompt=32, new=64) -> dict:
    """bfloat16 compute, scored with `model.logprob_precision` = default or float32."""
    seconds, compile_s, mem = _time_step(
        cfg, "bfloat16", repeats, batch, prompt, new, precision=precision
    )
    return {
        "case": "logprob_precision",
        "model": name,
        "dtype": "bfloat16",
        "logprob_precision": precision,
        "batch": batch,
        "step_s": seconds,
        "compile_s": compile_s,
        "xla_temp_mib": mem.temp_size_in_bytes / 2**20,
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
    for name, cfg in models:
        for micro in (1, 2, 8):  # fused; whole groups of 4; 1 row per micro-batch
            print(json.dumps(micro_batch_case(name, cfg, "float32", repeats, micro)), flush=True)
        for precision in ("default", "float32"):
            print(json.dumps(precision_case(name, cfg, repeats, precision)), flush=True)
    if args.quick:
        return
    for seq in (256, 1024, 4096):
        print(json.dumps(logprob_memory(seq)), flush=True)


if __name__ == "__main__":
    main()
