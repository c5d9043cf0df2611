"""Will the paper's run fit? The `--dry_run` JSON per case, with the hardware each case stands for.

Each case runs in its own process with `XLA_FLAGS=--xla_force_host_platform_device_count=N`
(fake CPU devices: XLA's memory analysis of the partitioned programs, nothing allocated), so a
laptop plans a pod slice. Cases (targets from issue 16):

  paper_4dev   experiments/apo_math_l3.py, 4 devices, fsdp 4      peak_gib <= 24 (4 x RTX 4090)
  paper_8dev   same, 8 devices, fsdp 8                            peak_gib <= 16 (TPU v5e-8)
  qwen3_8b     same shapes, --config.model.preset=qwen3_8b, 8 dev peak_gib <= 80 (8 x H100)
  lora_8b_8dev    qwen3_8b, model.lora.rank=16 (all projections), 8 dev   peak_gib <= 16 (v5e-8)
  lora_1p7b_4dev  the paper config, model.lora.rank=16, micro_batches 12, 4 dev  peak_gib <= 8
  depth_2/28   the paper config's train step compiled at 2 and 28 layers: ratio <= 2

  nice -n 19 python benchmarks/scale.py [--cases paper_4dev,...] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "experiments", "apo_math_l3.py")

# name -> (devices, config overrides, target peak_gib or None, hardware it stands for)
CASES = {
    "paper_4dev": (4, {"mesh.data": 1, "mesh.fsdp": 4}, 24.0, "4 x RTX 4090 (24 GB)"),
    "paper_8dev": (8, {"mesh.data": 1, "mesh.fsdp": 8}, 16.0, "TPU v5e-8 (16 GB HBM per chip)"),
    "qwen3_8b": (
        8,
        {"mesh.data": 1, "mesh.fsdp": 8, "model.preset": "qwen3_8b"},
        80.0,
        "8 x H100 (80 GB)",
    ),
    # LoRA rank 16 on every projection, bf16 frozen base (issue 23's targets).
    "lora_8b_8dev": (
        8,
        {"mesh.data": 1, "mesh.fsdp": 8, "model.preset": "qwen3_8b", "model.lora.rank": 16},
        16.0,
        "TPU v5e-8 (16 GB HBM per chip)",
    ),
    "lora_1p7b_4dev": (
        4,
        {"mesh.data": 1, "mesh.fsdp": 4, "model.lora.rank": 16, "optim.micro_batches": 12},
        8.0,
        "4 devices of 8 GB",
    ),
}
DEPTHS = (2, 28)  # train-step compile time at these depths (paper config, 4 devices)


def _worker(devices: int, overrides: dict, num_layers: int | None) -> dict:
    """One case in a fresh process (the fake device count is fixed at JAX's first import)."""
    job = json.dumps({"overrides": overrides, "num_layers": num_layers})
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", job]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_job(job: str) -> None:
    """--worker: the paper config with `overrides`, dry-run, one JSON line."""
    from apo_jax.trainer import build, dry_run

    build.config_root_on_path([f"--config={PAPER}"])
    from experiments import apo_math_l3

    spec = json.loads(job)
    config = apo_math_l3.get_config()
    for key, value in spec["overrides"].items():
        config.update_from_flattened_dict({key: value})
    print(json.dumps(dry_run.estimate(config, num_layers=spec["num_layers"])), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join([*CASES, "depth"]))
    parser.add_argument("--set", action="append", default=[], help="extra KEY=VALUE overrides")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _run_job(args.worker)
    extra = {}
    for item in args.set:
        key, value = item.split("=", 1)
        extra[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    for name in args.cases.split(","):
        if name == "depth":
            times = {}
            for layers in DEPTHS:
                res = _worker(4, {**CASES["paper_4dev"][1], **extra}, layers)
                times[layers] = res.get("train_step_compile_s")
                print(json.dumps({"case": f"depth_{layers}", **res}), flush=True)
            lo, hi = times[DEPTHS[0]], times[DEPTHS[-1]]
            ratio = round(hi / lo, 2) if lo and hi else None
            line = {"case": "depth", "compile_ratio": ratio, "target": 2.0}
            print(json.dumps({**line, "meets_target": ratio is not None and ratio <= 2.0}))
            continue
        devices, overrides, target, hardware = CASES[name]
        res = _worker(devices, {**overrides, **extra}, None)
        peak = res.get("peak_gib")
        line = {"case": name, "hardware": hardware, "target_peak_gib": target, **res}
        line["meets_target"] = peak is not None and peak <= target
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
