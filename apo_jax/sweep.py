"""Sweeps over config overrides and seeds, run through the training CLI, then aggregated.

    python -m apo_jax.sweep --config=FILE[:ARG] --workdir=DIR --grid KEY=V1,V2 [--grid ...]
        [--sweep=FILE[:ARG]] --seeds=0,1,2,3 [--config.KEY=VALUE ...] [--jobs=N]
        [--print_commands] [--baseline=ARM]
    python -m apo_jax.sweep --aggregate DIR [--baseline=ARM] [--metrics=...]

Each run is an ordinary training workdir DIR/<arm>/seed<k> (an `apo_jax.main` subprocess), so a
killed run resumes from its checkpoint and a finished one is skipped when the sweep restarts.
Arms are the product of the grids, or the override dicts of an experiment file's
`get_sweep(arg)`. Every override is parsed by ml_collections against the config before any run
starts, and an existing run is checked against its own config.json record: a finished run is
skipped only under the settings it was made with, an unfinished one resumed only where resuming
allows. Trainers get SIGTERM (save and exit) when the sweep ends for any reason, kill -9
included (Linux: PR_SET_PDEATHSIG); sweep and run directories are locked (infra/workdir_lock.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import itertools
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from absl import flags

from apo_jax import config_file
from apo_jax.infra import checkpoint as checkpoint_lib
from apo_jax.infra import tracking, workdir_lock
from apo_jax.trainer import build, validate

DONE_MARKER = "sweep_done.json"  # written into a run's workdir after the trainer exits with 0
PLAN_FILE = "sweep.json"  # DIR/sweep.json: arm order and overrides, read by the aggregation


class SweepError(ValueError):
    """Bad sweep input (grid key, value, empty grid, sweep file); raised before any run."""


@dataclass(frozen=True)
class Run:
    arm: str  # readable arm name, e.g. "schedule.alpha=0.35"
    seed: int
    overrides: tuple[str, ...]  # "--config.KEY=VALUE" flags for this arm, seed included
    workdir: str  # DIR/<arm>/seed<k>
    total_steps: int  # from the fully overridden config: what "finished" means
    config_hash: str = ""  # of the fully overridden config (`config_hash`)
    # The fully overridden config as the trainer records it (config.json): compared with an
    # existing run's record before anything runs. Not written to sweep.json.
    record: dict = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "record"}


def config_hash(record) -> str:
    """A short hash of a config record (as config.json holds it): equal configs, equal hash."""
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- config loading, exactly as apo_jax.main does it -------------------------------------------


def load_config(config_arg: str, overrides: list[str] | tuple[str, ...] = ()):
    """The locked ConfigDict that `python -m apo_jax.main --config=config_arg *overrides` trains
    with, parsed on a private FlagValues so nothing leaks into the global flags."""
    build.config_root_on_path([f"--config={config_arg}"])
    argv = ["apo_jax.main", f"--config={config_arg}", *overrides]
    fv = flags.FlagValues()
    config_file.define_flag("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv.config


def _key_error(config, key: str) -> str | None:
    """Why `key` cannot be overridden in `config`, or None if it names a value."""
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return f"unknown config key {key!r}"
        node = node[part]
    if hasattr(node, "keys"):  # a sub-dict: sweeping whole groups is not supported
        return f"config key {key!r} is a group ({', '.join(node.keys())}), not a value"
    return None


def _get(config, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _to_flag_value(value) -> str:
    """A Python override value as the text the CLI parses back into it (str(float) is exact)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- planning ----------------------------------------------------------------------------------


def parse_grid(specs: list[str]) -> list[dict[str, str]]:
    """["a=1,2", "b=x,y"] -> the cartesian product as override dicts of value strings."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--grid {spec!r}: expected KEY=V1,V2[,...]")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise SweepError(f"--grid {spec!r}: empty grid for key {key!r} (no values)")
        if twice := sorted({v for v in vals if vals.count(v) > 1}):
            raise SweepError(f"--grid {key}: value(s) {', '.join(twice)} given twice")
        if key in (k for k, _ in axes):
            raise SweepError(f"--grid: key {key!r} given twice")
        if key == "seed":
            raise SweepError("--grid seed=...: give seeds with --seeds")
        axes.append((key, vals))
    return [dict(zip([k for k, _ in axes], combo, strict=True)) for combo in
            itertools.product(*[v for _, v in axes])]  # fmt: skip


def load_sweep_file(sweep_arg: str) -> list[dict]:
    """`get_sweep(arg)` of an experiment file: a list of {config key: value} dicts."""
    path, _, arg = sweep_arg.partition(":")
    build.config_root_on_path([f"--config={path}"])
    if not os.path.isfile(path):
        raise SweepError(f"--sweep={sweep_arg}: no such file {path!r}")
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"--sweep={sweep_arg}: {path} defines no get_sweep(arg)")
    arms = module.get_sweep(arg or None)
    if not isinstance(arms, list | tuple) or not all(isinstance(a, dict) for a in arms):
        raise SweepError(f"--sweep={sweep_arg}: get_sweep must return a list of dicts")
    if not arms:
        raise SweepError(f"--sweep={sweep_arg}: get_sweep returned an empty sweep")
    return list(arms)


def arm_name(overrides: dict) -> str:
    """Readable and usable as one directory name: "k1=v1,k2=v2" (no "/" inside)."""
    if not overrides:
        return "base"
    return ",".join(f"{k}={_to_flag_value(v)}" for k, v in overrides.items()).replace("/", "%")


def plan(
    config_arg: str,
    workdir: str,
    grid: list[str],
    seeds: list[int],
    base_overrides: list[str],
    sweep_arg: str | None = None,
) -> list[Run]:
    """Every run of the sweep, each override validated by the config's own parsing. Raises
    SweepError naming the bad key or value before anything runs."""
    try:
        base = load_config(config_arg, base_overrides)
    except Exception as e:  # absl / ml_collections raise several types; all are bad input here
        raise SweepError(f"--config={config_arg} {' '.join(base_overrides)}: {e}") from e
    points = parse_grid(grid) if grid else [{}]
    file_arms = load_sweep_file(sweep_arg) if sweep_arg else [{}]
    arms = [{**f, **g} for f in file_arms for g in points]  # file arms x grid points
    if not seeds:
        raise SweepError("--seeds: no seeds")

    runs, names, parsed = [], {}, {}
    for arm in arms:
        arm = dict(arm)
        arm_seeds = [arm.pop("seed")] if "seed" in arm else seeds
        for key in arm:
            if why := _key_error(base, key):
                raise SweepError(f"{why} (in arm {arm_name(arm)!r})")
        name = arm_name(arm)
        if names.get(name, arm) != arm:
            raise SweepError(f"two different arms share the name {name!r}")
        names[name] = arm
        for seed in arm_seeds:
            if isinstance(seed, bool | float) or not str(seed).lstrip("-").isdigit():
                raise SweepError(f"seed {seed!r} (in arm {name!r}) is not an integer")
            seed = int(seed)
            flags_ = [f"--config.{k}={_to_flag_value(v)}" for k, v in arm.items()]
            flags_.append(f"--config.seed={seed}")
            try:
                config = load_config(config_arg, [*base_overrides, *flags_])
                # Every key's range, as training will check it (no I/O, nothing built).
                # The record as config.json will hold it (JSON types: tuples become lists).
                record = json.loads(build.plan(config).to_json())
            except Exception as e:
                raise SweepError(f"arm {name!r}, seed {seed}: {e}") from e
            for key, value in arm.items():
                # Values from a sweep file are Python objects: the parsed flag must give them back.
                if not isinstance(value, str) and _get(config, key) != value:
                    raise SweepError(
                        f"arm {name!r}: {key}={value!r} parses as {_get(config, key)!r}"
                    )
                # An arm that sets a block its loss / task does not read differs in nothing.
                if unused := [u for u in validate.unused_blocks(config) if key.startswith(u)]:
                    group = unused[0].split(".")[0]
                    raise SweepError(
                        f"arm {name!r}: {key} is not read with config.{group}.name="
                        f"{config[group].name!r}: arms over it would be the same run"
                    )
            # Two arms that parse to the same settings (e.g. --grid optim.lr=1e-3,0.001).
            same = tuple((k, repr(_get(config, k))) for k in sorted(arm)), seed
            if same in parsed and parsed[same] != name:
                other = names[parsed[same]]
                keys = [k for k in sorted(arm) if str(arm[k]) != str(other.get(k))]
                raise SweepError(
                    f"arms {parsed[same]!r} and {name!r} are the same settings: "
                    + ", ".join(f"{k} = {_get(config, k)!r}" for k in keys)
                )
            parsed[same] = name
            # W&B group and tags (when the config logs to W&B).
            flags_ += tracking.sweep_flags(config, workdir, name, seed, [*base_overrides, *flags_])
            rundir = os.path.join(workdir, name, f"seed{seed}")
            if any(r.workdir == rundir for r in runs):
                raise SweepError(f"arm {name!r}: seed {seed} given twice")
            overrides = (*base_overrides, *flags_)
            runs.append(
                Run(name, seed, overrides, rundir, config.total_steps, config_hash(record), record)
            )
    return runs


def command(config_arg: str, run: Run) -> list[str]:
    return [
        sys.executable,
        "-m",
        "apo_jax.main",
        f"--config={config_arg}",
        f"--workdir={run.workdir}",
        *run.overrides,
    ]


def is_finished(run: Run) -> bool:
    """The done marker of a 0 exit for these total_steps, or (runs launched from printed
    commands) a metrics.jsonl whose last line is the final step with its final evaluation."""
    marker = os.path.join(run.workdir, DONE_MARKER)
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("total_steps") == run.total_steps:
                return True
    return _metrics_complete(run.workdir, run.total_steps)


def _metrics_complete(workdir: str, total_steps: int) -> bool:
    """metrics.jsonl ends with the line of step `total_steps`, with its final evaluation."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    if not lines or lines[-1]["step"] != total_steps:
        return False
    # The last step is always evaluated when eval.num_prompts > 0 (trainer/loop.py); an
    # end-only evaluation writes a second line for the final step after the training line.
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            final_eval = json.load(f).get("eval", {}).get("num_prompts", 0)
    except (OSError, ValueError):
        return True
    return not final_eval or any(k.startswith("eval/") for k in lines[-1])


# Keys that change what a run writes, not what it computes: a finished run made under other
# values of these is still the run asked for.
_OUTPUT_PREFIXES = ("logging.", "checkpoint.")


def check_existing(run: Run) -> None:
    """Raises SweepError if `run.workdir` holds a run made under other settings than `run`
    asks for: a finished run under any other key (a longer total_steps resumes it, where the
    lr schedule allows), an unfinished one where resuming would refuse (checkpoint.py rules).
    Compared with the run's own record, its config.json (written by every trainer start)."""
    path = os.path.join(run.workdir, "config.json")
    if not os.path.exists(path):
        return  # never started (or killed before writing anything)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise SweepError(f"{path}: cannot read the run's config record ({e})") from None
    marker = os.path.join(run.workdir, DONE_MARKER)
    if os.path.exists(marker) or _metrics_complete(run.workdir, saved.get("total_steps")):
        a, b = checkpoint_lib.flatten_record(saved), checkpoint_lib.flatten_record(run.record)
        differ = sorted(
            k
            for k in a.keys() | b.keys()
            if a.get(k) != b.get(k)
            and not k.startswith(_OUTPUT_PREFIXES)
            # A longer total_steps continues the run.
            and not (k == "total_steps" and isinstance(a[k], int) and b[k] > a[k])
        )
        if differ:
            shown = "; ".join(f"{k}={a.get(k)!r}, now {b.get(k)!r}" for k in differ[:5])
            more = f" (and {len(differ) - 5} more keys)" if len(differ) > 5 else ""
            raise SweepError(
                f"{run.workdir} is a finished run made with other settings than this sweep "
                f"gives it: {shown}{more}. A finished run is not rerun nor relabelled: give the "
                "original values, or use another --workdir."
            )
    try:
        checkpoint_lib.check_compatible(saved, run.record, run.workdir)
    except ValueError as e:
        raise SweepError(str(e)) from None


# --- running -----------------------------------------------------------------------------------


def _slots(jobs: int, gpus: list[str] | None) -> list[dict]:
    """Split the host between `jobs` concurrent runs: disjoint GPU sets if there are GPUs,
    else disjoint CPU cores (affinity, and thread-pool sizes for the numeric libraries)."""
    if gpus:
        if len(gpus) < jobs:
            raise SweepError(f"--jobs={jobs} but only {len(gpus)} GPU(s): {','.join(gpus)}")
        return [{"gpus": gpus[i::jobs]} for i in range(jobs)]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < jobs:  # more jobs than cores: share all of them
        return [{"cores": cores} for _ in range(jobs)]
    return [{"cores": cores[i::jobs]} for i in range(jobs)]


def _env(slot: dict) -> dict:
    env = dict(os.environ)
    if "gpus" in slot:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot["gpus"])
    elif slot.get("cores"):
        n = str(len(slot["cores"]))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = n
    return env


# Trainers running now (for the signal handler); `_stopping` is set once the sweep is told to stop.
_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()
_stopping = threading.Event()
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _child_setup(cores):
    """What runs in the trainer's process between fork and exec: its CPU cores, and SIGTERM when
    the sweep dies (kill -9 included). PR_SET_PDEATHSIG fires when the *thread* that forked the
    child ends; that thread waits for the child, so only the sweep's death ends it first."""
    parent, prctl = os.getpid(), None
    # libc's prctl is resolved here in the parent: a child between fork and exec should not
    # load libraries.
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl

    def setup():
        if cores:
            os.sched_setaffinity(0, cores)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            if os.getppid() != parent:  # the sweep died before the line above
                os._exit(1)

    return setup


def _wait_for_lock(run: Run) -> None:
    """Waits while a trainer on this host still holds the run's workdir (the trainer of a
    killed sweep, saving and ending after its SIGTERM). A holder elsewhere is left to the new
    trainer's refusal, which names it."""
    said = False
    while not _stopping.is_set() and (rec := workdir_lock.holder(run.workdir)) is not None:
        if rec.get("host") != socket.gethostname():
            return
        if not said:
            print(f"[sweep] waiting: {run.workdir} is in use by {workdir_lock.describe(rec)}",
                  flush=True)  # fmt: skip
            said = True
        time.sleep(0.5)


def _run_one(config_arg: str, run: Run, slot: dict) -> int:
    os.makedirs(run.workdir, exist_ok=True)
    setup = _child_setup(slot.get("cores"))
    with open(os.path.join(run.workdir, "sweep.log"), "a") as log:
        log.write(f"$ {shlex.join(command(config_arg, run))}\n")
        log.flush()
        with _children_lock:
            if _stopping.is_set():
                return -signal.SIGTERM
            # Its own process group: the sweep's signals reach it only through the sweep, which
            # stops it by its group (the trainer and its reward workers).
            child = subprocess.Popen(
                command(config_arg, run),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_env(slot),
                preexec_fn=setup,
                start_new_session=True,
            )
            _children.add(child)
        try:
            rc = child.wait()
        finally:
            with _children_lock:
                _children.discard(child)
    # A trainer stopped by a signal saves and exits with 0 before its last step: not done.
    if rc == 0 and _metrics_complete(run.workdir, run.total_steps):
        with open(os.path.join(run.workdir, DONE_MARKER), "w") as f:
            # The core / GPU count is part of what reproduces a run (see README, determinism).
            json.dump({"total_steps": run.total_steps, "seed": run.seed, "arm": run.arm,
                       "config_hash": run.config_hash, "overrides": list(run.overrides),
                       **{k: len(v) for k, v in slot.items()}}, f)  # fmt: skip
    return rc


def _stop_children(signum, frame) -> None:
    """The sweep's SIGTERM / SIGINT handler: no new run starts; running trainers get SIGTERM
    (they save and exit), a second signal kills them."""
    again = _stopping.is_set()
    _stopping.set()
    with _children_lock:
        for child in _children:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL if again else signal.SIGTERM)
    what = "killed them" if again else "they save, then exit"
    # os.write: print() from a handler can re-enter a write the main thread is in.
    os.write(2, f"[sweep] signal {signum}: stopping the running trainers ({what})\n".encode())


def execute(config_arg: str, runs: list[Run], jobs: int, gpus: list[str] | None) -> list[Run]:
    """Runs every unfinished run, `jobs` at a time; returns the failed ones."""
    lock, failed = threading.Lock(), []

    def say(text: str) -> None:
        with lock:
            print(f"[sweep] {text}", flush=True)

    todo = []
    for run in runs:
        if is_finished(run):
            say(f"skip (finished): {run.workdir}")
        else:
            todo.append(run)
    # Seed-major order: a sweep cut short still has every arm at the seeds it reached.
    todo.sort(key=lambda r: r.seed)
    free: queue.Queue = queue.Queue()
    # Always `jobs` slots, even for fewer runs: a run's core count must not depend on how many
    # runs were left when the sweep (re)started (it changes CPU rounding, see README).
    for slot in _slots(jobs, gpus):
        free.put(slot)

    def work(run: Run) -> None:
        slot = free.get()
        try:
            _wait_for_lock(run)
            if _stopping.is_set():
                return
            if is_finished(run):  # finished by the trainer it waited for
                say(f"skip (finished): {run.workdir}")
                return
            say(f"start: {run.workdir} {slot}")
            rc = _run_one(config_arg, run, slot)
            say(f"exit {rc}: {run.workdir}")
            if rc != 0:
                failed.append(run)
        finally:
            free.put(slot)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        list(pool.map(work, todo))
    return failed


def _gpus(arg: str | None) -> list[str] | None:
    text = arg if arg is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    return [g for g in (text or "").split(",") if g.strip()] or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--config", help="training config FILE[:ARG], as for apo_jax.main")
    p.add_argument("--workdir", help="sweep directory; runs go to DIR/<arm>/seed<k>")
    p.add_argument("--grid", action="append", default=[], help="KEY=V1,V2[,...] (repeatable)")
    p.add_argument("--sweep", help="experiment FILE[:ARG] defining get_sweep(arg)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one run per arm each")
    p.add_argument("--jobs", type=int, default=1, help="runs at once on this host")
    p.add_argument("--gpus", help="GPU ids split between jobs (default: CUDA_VISIBLE_DEVICES)")
    p.add_argument("--print_commands", action="store_true", help="print one command per run")
    p.add_argument("--aggregate", metavar="DIR", help="only aggregate an existing sweep DIR")
    p.add_argument("--baseline", help="arm the others are compared with (default: the first)")
    p.add_argument("--metrics", help="comma-separated metrics to summarise (default: see docs)")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith(("--config.", "--noconfig."))]
    unknown = [a for a in rest if a not in overrides]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")

    try:
        return _main(p, args, overrides)
    except (SweepError, workdir_lock.WorkdirLocked) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2


def _main(p: argparse.ArgumentParser, args, overrides: list[str]) -> int:
    from apo_jax import sweep_summary

    metrics = args.metrics.split(",") if args.metrics else None
    if args.aggregate:
        if not os.path.isdir(args.aggregate):
            raise SweepError(f"--aggregate {args.aggregate}: no such directory")
        try:
            rows = sweep_summary.write_summary(args.aggregate, args.baseline, metrics)
        except ValueError as e:  # an unknown metric or baseline arm, named
            raise SweepError(str(e)) from None
        tracking.log_sweep_summary(args.aggregate, rows)  # if the runs logged to W&B
        return 0
    if not args.config or not args.workdir:
        p.error("--config and --workdir are required (or --aggregate DIR)")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds={args.seeds}: expected comma-separated integers")
    runs = plan(args.config, args.workdir, args.grid, seeds, overrides, args.sweep)
    if args.print_commands:
        cwd = shlex.quote(os.getcwd())
        for run in runs:
            print(f"cd {cwd} && {shlex.join(command(args.config, run))}")
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    with workdir_lock.hold(args.workdir):  # one sweep per directory
        for run in runs:  # every existing run against its record, before anything runs
            check_existing(run)
        _stopping.clear()
        arms = list(dict.fromkeys(r.arm for r in runs))
        with open(os.path.join(args.workdir, PLAN_FILE), "w") as f:
            json.dump({"config": args.config, "arms": arms, "runs": [r.to_json() for r in runs]},
                      f, indent=1)  # fmt: skip
        stops = (signal.SIGTERM, signal.SIGINT)
        handlers = {sig: signal.signal(sig, _stop_children) for sig in stops}
        try:
            failed = execute(args.config, runs, args.jobs, _gpus(args.gpus))
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        if _stopping.is_set():
            print("[sweep] stopped by a signal: start it again to resume", file=sys.stderr)
            return 130
        for run in failed:
            print(f"[sweep] FAILED: {run.workdir} (see {run.workdir}/sweep.log)", file=sys.stderr)
        rows = sweep_summary.write_summary(args.workdir, args.baseline, metrics)
        tracking.log_sweep_summary(args.workdir, rows)  # if the runs logged to W&B
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
