"""What a person sees on the console: library loggers at WARNING, a start banner, NaN-safe
progress-bar metrics and an end summary. Only process 0 prints; metrics files are the record."""

import logging as py_logging
import math
import os

import jax
import numpy as np
from absl import logging

# Python loggers of libraries that report routine work at INFO (Orbax logs every save step by
# step, ~50 lines a checkpoint, through absl; jax logs compilation-cache hits).
_LIBRARY_LOGGERS = ("absl", "orbax", "jax", "etils", "tensorstore")


def quiet_libraries(verbosity: int) -> None:
    """Library INFO chatter off unless absl `--verbosity` ≥ 1 (then everything at INFO).

    absl's default verbosity (0) means INFO; a default run should show warnings and errors
    only, so level 0 maps to WARNING here and `--verbosity=1` restores INFO."""
    level = py_logging.INFO if verbosity >= 1 else py_logging.WARNING
    logging.set_verbosity(logging.INFO if verbosity >= 1 else logging.WARNING)
    for name in _LIBRARY_LOGGERS:
        py_logging.getLogger(name).setLevel(level)


def fmt(x, digits: int = 3) -> str:
    """A metric for the progress bar or summary: missing, NaN and Inf print as text, never raise."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "-"
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def _size(plan, model_cfg, params) -> str:
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    if lora := plan.model.lora:  # the state holds the adapters alone
        return (
            f"{model_cfg.num_params / 1e6:.2f}M parameters frozen, LoRA rank {lora.rank} on "
            f"{','.join(lora.targets)}: {count / 1e6:.2f}M trained"
        )
    return f"{count / 1e6:.2f}M parameters"


def banner(plan, model_cfg, params, mesh, workdir: str, start: int) -> None:
    """Start banner: model and size, devices and mesh, loss, workdir, resumed-from step
    (`plan` is the run's trainer.build.Plan)."""
    if jax.process_index() != 0:
        return
    axes = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    dev = jax.devices()[0]
    lines = [
        f"apo_jax: model {plan.model.hf_dir or plan.model.preset} "
        f"({_size(plan, model_cfg, params)}, {model_cfg.num_layers} layers), "
        f"loss {plan.objective.name}, task {plan.task.name}",
        f"devices: {jax.device_count()} × {dev.platform} ({dev.device_kind}) on "
        f"{jax.process_count()} process(es); mesh {axes}",
        f"workdir: {workdir}",
        f"steps:   {start} → {plan.total_steps}"
        + (f" (resumed from step {start})" if start else " (fresh start)"),
    ]
    print("\n".join(lines), flush=True)


def summary(line: dict, workdir: str) -> None:
    """End summary: final key metrics and where the metrics, plots and checkpoints are."""
    if jax.process_index() != 0:
        return
    keys = sorted(k for k in line if k.startswith(("reward/", "eval/", "loss/", "schedule/")))
    shown = [f"{k}={fmt(line[k])}" for k in keys if not k.startswith("eval/pass@")]
    out = [f"done: step {line.get('step', '?')}"]
    for i in range(0, len(shown), 4):  # a few metrics per line, not one dict on one long line
        out.append("  " + "  ".join(shown[i : i + 4]))
    for path in ("metrics.jsonl", "plots", "checkpoints", "tensorboard", "wandb"):
        if os.path.exists(os.path.join(workdir, path)):
            out.append(f"{path.split('.')[0] + ':':13s}{os.path.join(workdir, path)}")
    print("\n".join(out), flush=True)
