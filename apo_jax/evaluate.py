"""Evaluation CLI: held-out greedy accuracy, avg@k, pass@k, length, entropy and diversity,
configured exactly like training (the same config files, keys and defaults):

    python -m apo_jax.evaluate --config=configs/base.py --config.model.hf_dir=DIR \\
        [--config.task.math.eval_set=math500] [--k 8] [--num_prompts N] [--out results.json]
    python -m apo_jax.evaluate --workdir=RUN [--step S] [--config.KEY=VALUE ...]

With `--workdir` the weights come from the run's checkpoint (the newest that restores, past a
damaged one, unless `--step`; nothing in the run directory is changed) and, unless `--config`
is given, the configuration from that checkpoint's own config record (overrides still apply to
it); the run's config.json, which anyone may edit, is only compared with it.
"""

import json
import os
import sys
import tempfile
import time

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from apo_jax import config_file, settings
from apo_jax.trainer import build


def _flag_value(argv, name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _verbosity(argv) -> int:
    """absl's --verbosity / -v before flags are parsed (the config is read before that)."""
    value = _flag_value(argv, "verbosity") or _flag_value(argv, "v") or "0"
    return int(value) if value.lstrip("-").isdigit() else 0


def run_config(run: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a training run used, from its checkpoint's own record (of `step`, else the
    newest whose record reads). The run's config.json is only compared with it: a difference
    or a file that is not JSON is reported, naming the file."""
    from apo_jax.infra import checkpoint as checkpoint_lib

    if not os.path.isdir(run):
        raise FileNotFoundError(f"--workdir={run}: no such directory")
    ckpt = checkpoint_lib.Checkpointer(run, every_steps=0, keep=1, read_only=True)
    try:
        found = ckpt.latest_record(step)
    finally:
        ckpt.close()
    if found is None:
        raise FileNotFoundError(
            f"--workdir={run}: no checkpoint under {os.path.join(run, 'checkpoints')} "
            "(is it a training workdir, and did it save a step?)"
        )
    step, record = found
    config = settings.with_defaults(record["config"])
    path = os.path.join(run, "config.json")
    try:
        saved = build.load_config_json(path).to_dict() if os.path.exists(path) else config
    except ValueError as e:
        logging.warning("%s; using the config record of checkpoint step %d", e, step)
        saved = config
    if differ := _differences(config, saved):
        logging.warning(
            "%s differs from the config record of checkpoint step %d in %s; using the "
            "checkpoint's (give --config.KEY=VALUE to change an evaluation setting)",
            path,
            step,
            ", ".join(f"{k} ({x!r} there, {y!r} in config.json)" for k, x, y in differ[:5]),
        )
    return ml_collections.ConfigDict(config)


def _differences(a: dict, b: dict, ignore: tuple = ()) -> list[tuple]:
    """(key, value in `a`, value in `b`) where config records `a` and `b` differ, a key a record
    lacks at its default (settings.py), outside the `ignore` prefixes."""
    from apo_jax.infra import checkpoint as checkpoint_lib

    a, b = checkpoint_lib.flatten_record(a), checkpoint_lib.flatten_record(b)
    keys = sorted(k for k in a.keys() | b.keys() if not k.startswith(ignore))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def _define_config_flag(argv) -> None:
    """`--config=FILE` as in training; with only `--workdir`, the config the run used (its
    checkpoint's record, so that `--config.KEY=VALUE` overrides apply to what the run used)."""
    run = _flag_value(argv, "workdir")
    if run and _flag_value(argv, "config") is None:
        from apo_jax import console

        console.quiet_libraries(_verbosity(argv))  # Orbax reads the record below
        step = _flag_value(argv, "step")
        try:
            config = run_config(run, int(step) if step and step.isdigit() else None)
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            sys.exit(f"apo_jax.evaluate: error: {e}")
        config_flags.DEFINE_config_dict("config", config, lock_config=True)
    else:
        build.config_root_on_path(argv)
        config_file.define_flag("config")


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
    from apo_jax import console

    console.quiet_libraries(flags.FLAGS.verbosity)  # training's quiet console (no Orbax INFO)
    if flags.FLAGS["config"].value is None:
        raise app.UsageError(
            "nothing to evaluate: give --config=FILE[:ARG] (with --config.model.hf_dir=DIR for a "
            "Hugging Face model) or --workdir=RUN (a training run's checkpoint)"
        )
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
    # The results go to `out` only: W&B (an optional extra) is not needed.
    if config.logging.get("wandb"):
        config = config.copy_and_resolve_references()
        config.logging.wandb = False
    p = build.plan(config)
    task = build.task(p)
    # The prompts and the model's shape are checked before any weights are loaded.
    num_prompts = p.eval.num_prompts if num_prompts is None else num_prompts
    examples = evaluate_lib.eval_subset(task, num_prompts, p.seed)
    if not examples:
        raise ValueError(f"config.task.name={p.task.name!r}: the task's held-out set is empty")
    model_cfg = build.model_config(p, task.vocab_size)
    k = k or p.rollout.group_size
    # Bounded calls: the KV cache holds this many rows at a time (the results do not change).
    rows = k * prompts_per_call if prompts_per_call else evaluate_lib.rows_per_call(p)
    # The largest call: the greedy pass's prompts (a row each), or the sampled pass's × k.
    greedy, sampled = evaluate_lib.call_prompts(rows, k, len(examples))
    what = f"--k={k} × --prompts_per_call={max(1, rows // k)}"
    evaluate_lib.check_rows(p, model_cfg, max(greedy, sampled * k), what)
    if workdir:
        workdir = os.path.abspath(workdir)
        graphdef, params, step = _restore(p, model_cfg, workdir, step)
        source = {"workdir": workdir, "step": step}
    else:
        graphdef, params = build.model(p, model_cfg, build.mesh(p))
        source = {"model": p.model.hf_dir or f"random init ({p.model.preset}, seed {p.seed})"}
    sampler = build.sampler(p, graphdef, task, mesh=None)
    metrics, records = evaluate_lib.evaluate(
        task, sampler, params, examples, k=k, rows_per_call=rows, seed=p.seed
    )
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


def _restore(p, model_cfg, workdir: str, step: int | None):
    """evaluate_lib.restore_params; if no step restores under this config, the error names the
    keys where the config differs from the checkpoint's own record (a tree-structure mismatch
    otherwise reads as damage)."""
    from apo_jax.infra import checkpoint as checkpoint_lib
    from apo_jax.trainer import evaluate as evaluate_lib

    try:
        return evaluate_lib.restore_params(p, model_cfg, workdir, step)
    except RuntimeError as e:
        try:
            record = run_config(workdir, step).to_dict()
        except (OSError, RuntimeError, ValueError):
            raise e from None
        if not (differ := _differences(record, p.record, checkpoint_lib.RESUMABLE_PREFIXES)):
            raise
        shown = ", ".join(f"{k}: {x!r} -> {y!r}" for k, x, y in differ[:10])
        raise RuntimeError(
            f"{e} The evaluation config differs from the checkpoint's config record in "
            f"{shown}: evaluate with --workdir alone (the run's own config), or give the run's "
            "values."
        ) from None


def cli():
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    cli()
