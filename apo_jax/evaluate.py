"""Evaluation CLI: held-out greedy accuracy, avg@k, pass@k, length, entropy and diversity,
configured exactly like training (the same config files, keys and defaults):

    python -m apo_jax.evaluate --config=configs/base.py --config.model.hf_dir=DIR \\
        [--config.task.math.eval_set=math500] [--k 8] [--num_prompts N] [--out results.json]
    python -m apo_jax.evaluate --workdir=RUN [--step S] [--config.KEY=VALUE ...]

With `--workdir` the weights come from the run's checkpoint and, unless `--config` is given, the
configuration from the run's saved config.json (overrides still apply to it).
"""

import json
import os
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from apo_jax.trainer import build


def _flag_value(argv, name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _define_config_flag(argv) -> None:
    """`--config=FILE` as in training; with only `--workdir`, the run's config.json (so that
    `--config.KEY=VALUE` overrides apply to what the run used)."""
    run = _flag_value(argv, "workdir")
    if run and _flag_value(argv, "config") is None:
        path = os.path.join(run, "config.json")
        if not os.path.isfile(path):
            sys.exit(f"--workdir={run}: no config.json (is it a training workdir?)")
        config_flags.DEFINE_config_dict("config", build.load_config_json(path), lock_config=True)
    else:
        build.config_root_on_path(argv)
        config_flags.DEFINE_config_file(
            "config", None, "Python config file (get_config(arg) -> ConfigDict).", lock_config=True
        )


_define_config_flag(sys.argv)
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run to evaluate (its checkpoint).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
_K = flags.DEFINE_integer("k", None, "Samples per prompt at T = 1 (default: rollout.group_size).")
_NUM_PROMPTS = flags.DEFINE_integer(
    "num_prompts", None, "Seeded subset of the held-out set (default: eval.num_prompts; 0 = all)."
)
_PER_CALL = flags.DEFINE_integer(
    "prompts_per_call",
    None,
    "Prompts per sampled call, i.e. k x this many rows per sampler call (default: "
    "eval.rows_per_chunk rows, else rollout.rows_per_chunk, else a step's rows).",
)
_OUT = flags.DEFINE_string("out", "results.json", "Where the JSON results go.")


def main(argv) -> None:
    del argv
    run(
        flags.FLAGS["config"].value,
        workdir=_WORKDIR.value,
        step=_STEP.value,
        k=_K.value,
        num_prompts=_NUM_PROMPTS.value,
        prompts_per_call=_PER_CALL.value,
        out=_OUT.value,
    )


def run(
    config,
    *,
    workdir: str | None = None,
    step: int | None = None,
    k: int | None = None,
    num_prompts: int | None = None,
    prompts_per_call: int | None = None,
    out: str = "results.json",
) -> dict:
    """Evaluates per `config` (weights from `workdir`'s checkpoint if given, else the config's
    model); writes the results to `out` and returns them. None = the config's value."""
    import jax

    from apo_jax.trainer import evaluate as evaluate_lib

    t0 = time.perf_counter()
    out = os.path.abspath(out)
    # Fail now, not after the evaluation: the results must have somewhere to go.
    # A real write (permission bits say nothing about read-only mounts or root).
    try:
        if os.path.isdir(out):
            raise IsADirectoryError(21, "is a directory")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with tempfile.TemporaryFile(dir=os.path.dirname(out)):
            pass
    except OSError as e:
        raise PermissionError(f"--out={out}: cannot write there ({e.strerror or e})") from None
    for flag, value, low in (
        ("k", k, 1),
        ("num_prompts", num_prompts, 0),
        ("prompts_per_call", prompts_per_call, 1),
    ):
        if value is not None and value < low:
            raise ValueError(f"--{flag}={value}: must be >= {low}")
    if config.logging.get(
        "wandb"
    ):  # results go to `out` only: W&B (an optional extra) is not needed
        config = config.copy_and_resolve_references()
        config.logging.wandb = False
    p = build.plan(config)
    task = build.task(p)
    # The prompts and the model's shape are checked before any weights are loaded.
    num_prompts = p.eval_prompts if num_prompts is None else num_prompts
    examples = evaluate_lib.eval_subset(task, num_prompts, p.seed)
    if not examples:
        raise ValueError(f"config.task.name={p.task.name!r}: the task's held-out set is empty")
    model_cfg = build.model_config(p, task.vocab_size)
    source: dict = {}
    if workdir:
        workdir = os.path.abspath(workdir)
        graphdef, params, step = evaluate_lib.restore_params(p, model_cfg, workdir, step)
        source = {"workdir": workdir, "step": step}
    else:
        mesh = build.mesh(p)
        graphdef, params = build.model(p, model_cfg, mesh)
        source = {"model": p.model.hf_dir or f"random init ({p.model.preset}, seed {p.seed})"}
    sampler = build.sampler(p, graphdef, task, mesh=None)
    k = k or p.rollout.group_size
    # Bounded calls: the KV cache holds this many rows at a time (the results do not change).
    rows = k * prompts_per_call if prompts_per_call else evaluate_lib.rows_per_call(p)
    metrics, records = evaluate_lib.evaluate(
        task, sampler, params, examples, k=k, rows_per_call=rows, seed=p.seed
    )
    if hasattr(task, "close"):
        task.close()  # stops the reward worker processes
    result = dict(
        metrics=metrics,
        task=p.task.name,
        source=source,
        k=k,
        rows_per_call=rows,
        num_prompts=len(examples),
        seconds=time.perf_counter() - t0,
        config=p.record,
        per_prompt=records,
    )
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(json.dumps(metrics, indent=1), f"\nwrote {out}")
    return result


def cli():
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    cli()
