"""Train step, full fine-tune vs LoRA, on this machine. One JSON line per case.

  python benchmarks/lora.py            # the ~42M-parameter Qwen3 (bench_50m)
  python benchmarks/lora.py --quick    # tiny model, fewer repeats

Each case is the jitted APO update (forward, fused log-probs, loss, grads, AdamW) on one device,
batch 8 x (32 prompt + 64 completion) tokens, float32 parameters and compute (LoRA: float32 base
too, so the two differ only by what is trained): median step seconds after warm-up, compile
seconds, the resident state (trained parameters + AdamW moments, plus the frozen base under
LoRA) and XLA's memory analysis of the compiled step (temporaries: activations, gradients,
optimizer scratch). LoRA: rank 16 (and 64) on every projection, alpha = 2 x rank.
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

from apo_jax.models import lora as lora_lib  # noqa: E402
from apo_jax.models import qwen3 as model_lib  # noqa: E402
from apo_jax.trainer import build, records  # noqa: E402
from apo_jax.trainer import step as ts  # noqa: E402
from configs import base  # noqa: E402

MIB = 2**20


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def case(name, cfg, rank: int, repeats: int, batch=8, prompt=32, new=64) -> dict:
    c = base.get_config("debug")
    c.rollout.group_size, c.rollout.prompts_per_step = 4, batch // 4
    c.optim.mini_batches = 1
    plan = build.plan(c)
    lora = None
    if rank:
        lora = lora_lib.LoRAConfig(rank=rank, alpha=2.0 * rank, targets=tuple(lora_lib.TARGETS))
    model = model_lib.init_model(cfg, 0, dtype=jnp.float32, lora=lora)
    graphdef, params = nnx.split(model, nnx.Param)
    frozen = None
    if lora:
        params, frozen = lora_lib.split(params)
    tx, _ = build.optimizer(plan)
    spec = build.step_spec(plan, cfg.vocab_size)
    state = ts.init_train_state(params, tx, 0, spec.schedule)
    fns = ts.build(graphdef, spec, tx, frozen=frozen)
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
    call = compiled if frozen is None else (lambda s, x: compiled(s, x, frozen))
    holder = {"state": state}

    def one():
        holder["state"], m = call(holder["state"], b)
        return m["loss/value"]

    jax.block_until_ready(one())  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(one())
        times.append(time.perf_counter() - t)
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    return {
        "case": "lora" if rank else "full",
        "model": name,
        "params_m": cfg.num_params / 1e6,
        "lora_rank": rank,
        "trained_params_m": trained / 1e6,
        "batch": batch,
        "seq": prompt + new,
        "step_s": statistics.median(times),
        "compile_s": compile_s,
        # trained parameters + AdamW's two moments (+ the frozen base): what stays resident
        "state_mib": (_bytes(holder["state"]) + (_bytes(frozen) if frozen else 0)) / MIB,
        "frozen_base_mib": (_bytes(frozen) if frozen else 0) / MIB,
        "xla_temp_mib": mem.temp_size_in_bytes / MIB,
        "platform": jax.devices()[0].platform,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    name = "tiny" if args.quick else "bench_50m"
    cfg = getattr(model_lib.Qwen3Config, name)()
    for rank in (0, 16, 64):
        print(json.dumps(case(name, cfg, rank, repeats)), flush=True)


if __name__ == "__main__":
    main()
