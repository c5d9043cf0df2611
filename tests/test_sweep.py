"""apo_jax.sweep as a user runs it: printed commands, a killed and resumed sweep, aggregation
checked against a direct numpy/scipy computation on the same metrics files, and bad input."""

import csv
import json
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from apo_jax import sweep, sweep_summary

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/toy.py:debug"
STEPS = 6
# Debug toy runs: 6 steps, an evaluation every 3 (two per run), a checkpoint every 2 (so a run
# killed after step 3 resumes from step 2), fixed alpha so the grid key matters.
BASE = [
    f"--config.total_steps={STEPS}",
    "--config.eval.every_steps=3",
    "--config.checkpoint.every_steps=2",
    "--config.schedule.mode=fixed",
    "--config.mesh.data=1",
]
GRID = ["--grid", "schedule.alpha=0.5,1.0"]
ARMS = ["schedule.alpha=0.5", "schedule.alpha=1.0"]
SEEDS = [0, 1]


def _env():
    env = dict(os.environ)
    # One CPU device per run (conftest's 8 fake devices are for in-process mesh tests).
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )
    return env


def _sweep_cmd(workdir, *extra):
    args = [f"--config={CONFIG}", f"--workdir={workdir}", *GRID, "--seeds=0,1", *BASE, *extra]
    return [sys.executable, "-m", "apo_jax.sweep", *args]


def _steps(rundir):
    path = rundir / "metrics.jsonl"
    return [x["step"] for x in sweep_summary.read_lines(path)] if path.exists() else []


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A 2-arm x 2-seed sweep driven the three ways a user drives one: a printed command run by
    hand, a sweep killed mid-run (preemption), and the same sweep started again."""
    workdir = tmp_path_factory.mktemp("sweep")
    runs = {(a, s): workdir / a / f"seed{s}" for a in ARMS for s in SEEDS}
    log = {}

    # 1. --print_commands: one shell line per run; run the first exactly as printed.
    out = subprocess.run(
        [*_sweep_cmd(workdir), "--print_commands"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, check=True,
    )  # fmt: skip
    log["printed"] = out.stdout.splitlines()
    subprocess.run(["bash", "-c", log["printed"][0]], env=_env(), check=True, capture_output=True)
    first = runs[(ARMS[0], 0)]
    log["first_mtime"] = (first / "metrics.jsonl").stat().st_mtime_ns

    # 2. The sweep, one run at a time (seed-major: next is arm 2, seed 0); kill the whole sweep
    # once that run has logged step 3 (its step-2 checkpoint is written before step 3 starts).
    victim = runs[(ARMS[1], 0)]
    proc = subprocess.Popen(
        _sweep_cmd(workdir, "--jobs=1"), cwd=ROOT, env=_env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 600
    while len(_steps(victim)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    log["killed_out"] = proc.communicate()[0]
    log["steps_at_kill"] = _steps(victim)

    # 3. The same sweep again, two runs at once: completes, skipping the finished run.
    out = subprocess.run(
        _sweep_cmd(workdir, "--jobs=2"), cwd=ROOT, env=_env(), capture_output=True, text=True
    )
    log["rerun"] = out
    return workdir, runs, log


@pytest.mark.slow
def test_printed_commands_run_as_printed(finished_sweep):
    workdir, runs, log = finished_sweep
    printed = log["printed"]
    assert len(printed) == len(runs)
    for (arm, seed), rundir in runs.items():  # one line per run, each with its overrides
        line = next(x for x in printed if f"--workdir={rundir}" in x)
        assert f"--config.{arm}" in line and f"--config.seed={seed}" in line
        assert all(flag in shlex.split(line) for flag in BASE)
    first = runs[(ARMS[0], 0)]
    assert _steps(first) == list(range(1, STEPS + 1))
    config = json.loads((first / "config.json").read_text())
    assert config["schedule"]["alpha"] == 0.5 and config["seed"] == 0


@pytest.mark.slow
def test_killed_sweep_resumes_and_skips_finished_runs(finished_sweep):
    workdir, runs, log = finished_sweep
    out = log["rerun"]
    assert out.returncode == 0, out.stdout + out.stderr
    first, victim = runs[(ARMS[0], 0)], runs[(ARMS[1], 0)]
    # The kill happened mid-run, after the step-2 checkpoint...
    assert 3 <= len(log["steps_at_kill"]) < STEPS, log["killed_out"]
    # ...the rerun skipped the finished run without touching it...
    assert f"skip (finished): {first}" in out.stdout
    assert (first / "metrics.jsonl").stat().st_mtime_ns == log["first_mtime"]
    # ...and resumed the killed one from its checkpoint: every step logged exactly once.
    assert "resumed from step" in (victim / "sweep.log").read_text()
    for rundir in runs.values():
        assert _steps(rundir) == list(range(1, STEPS + 1)), rundir
        # Done markers come from the sweep's own runs, not from the command run by hand.
        assert (rundir / sweep.DONE_MARKER).exists() == (rundir != first)
    # A finished sweep started once more runs nothing.
    plan = sweep.plan(CONFIG, str(workdir), GRID[1:], SEEDS, BASE)
    assert all(sweep.is_finished(r) for r in plan)


@pytest.mark.slow
def test_summary_matches_direct_statistics(finished_sweep):
    workdir, runs, _ = finished_sweep
    with open(workdir / "summary.csv") as f:
        rows = {r["arm"]: r for r in csv.DictReader(f)}
    assert list(rows) == ARMS and (workdir / "curves.png").stat().st_size > 0
    md = (workdir / "summary.md").read_text()
    assert all(f"| {arm} | 2 |" in md for arm in ARMS) and "Student t" in md

    def final(arm, metric):  # straight from the metrics files
        out = []
        for seed in SEEDS:
            text = (runs[(arm, seed)] / "metrics.jsonl").read_text()
            lines = [json.loads(x) for x in text.splitlines()]
            if metric == "reward/mean":  # the last 10 % of 6 steps: ceil(0.6) = 1 step
                out.append(lines[-1]["reward/mean"])
            else:
                out.append([x[metric] for x in lines if metric in x][-1])
        return np.array(out, np.float64)

    metrics = ["reward/mean", "eval/accuracy", "eval/avg@2", "eval/pass@2", "eval/entropy"]
    for metric in metrics:
        for arm in ARMS:
            x, row = final(arm, metric), rows[arm]
            # scipy wants a positive scale; equal values (e.g. accuracy 0 in both seeds of so
            # short a run) have the degenerate interval [mean, mean].
            sem = stats.sem(x)
            lo, hi = (
                stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sem)
                if sem > 0
                else (x.mean(), x.mean())
            )
            got = [float(row[f"{metric}:{k}"]) for k in ("mean", "std", "ci_lo", "ci_hi")]
            want = [x.mean(), x.std(ddof=1), lo, hi]
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15, err_msg=metric)
            assert int(row[f"{metric}:n"]) == 2
        # Welch: difference, interval and p-value from the textbook formulas.
        a, b = final(ARMS[1], metric), final(ARMS[0], metric)
        va, vb = a.var(ddof=1) / 2, b.var(ddof=1) / 2
        row = rows[ARMS[1]]
        assert float(row[f"{metric}:diff"]) == pytest.approx(a.mean() - b.mean(), abs=1e-15)
        if va + vb > 0:
            df = (va + vb) ** 2 / (va**2 + vb**2)  # n - 1 = 1 for both arms
            t = (a.mean() - b.mean()) / math.sqrt(va + vb)
            p = 2 * stats.t.sf(abs(t), df)
            half = stats.t.ppf(0.975, df) * math.sqrt(va + vb)
            np.testing.assert_allclose(float(row[f"{metric}:diff_p"]), p, rtol=1e-9)
            np.testing.assert_allclose(
                [float(row[f"{metric}:diff_ci_lo"]), float(row[f"{metric}:diff_ci_hi"])],
                [a.mean() - b.mean() - half, a.mean() - b.mean() + half],
                rtol=1e-12,
            )
    # Aggregation alone gives the same table.
    before = (workdir / "summary.csv").read_text()
    assert sweep.main(["--aggregate", str(workdir)]) == 0
    assert (workdir / "summary.csv").read_text() == before


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused_naming_the_key(finished_sweep, capsys):
    """The finished sweep again with one more override: refused before anything runs, naming
    the key and its two values; sweep.json, the summary and every run stay as they were."""
    workdir, runs, _ = finished_sweep
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    args = _sweep_cmd(workdir, "--config.optim.lr=0.01")[3:]
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert "optim.lr=0.001, now 0.01" in err and "finished run" in err
    assert any(str(rundir) in err for rundir in runs.values())
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
    # Each run's record of what it was made with: its overrides and config hash.
    planned = {r.workdir: r for r in sweep.plan(CONFIG, str(workdir), GRID[1:], SEEDS, BASE)}
    for rundir in runs.values():
        marker = rundir / sweep.DONE_MARKER
        if marker.exists():
            done = json.loads(marker.read_text())
            assert done["config_hash"] == planned[str(rundir)].config_hash
            assert tuple(done["overrides"]) == planned[str(rundir)].overrides


def _state(pid: int) -> str | None:
    """The process's state letter, or None once it is gone (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if state in "ZX" else state


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killed_sweep_leaves_no_trainer_behind(tmp_path):
    """kill -9 of the sweep process alone (not its group): its trainer, in a process group of
    its own, is ended with it."""
    from apo_jax.infra import workdir_lock

    cmd = [sys.executable, "-m", "apo_jax.sweep", f"--config={CONFIG}", f"--workdir={tmp_path}",
           "--seeds=0", "--config.total_steps=1000", "--config.mesh.data=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    rundir = tmp_path / "base" / "seed0"
    deadline, holder = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        holder = workdir_lock.holder(str(rundir)) if rundir.exists() else None
        if holder:  # the trainer is up: it holds its run's workdir
            break
        time.sleep(0.05)
    assert holder and holder["pid"] != proc.pid, "the sweep never started its trainer"
    trainer = holder["pid"]
    assert os.getpgid(trainer) == trainer != os.getpgid(proc.pid)  # its own process group
    proc.kill()
    proc.wait()
    deadline = time.time() + 300
    while _state(trainer) is not None and time.time() < deadline:
        time.sleep(0.1)
    alive = _state(trainer)
    if alive is not None:
        os.kill(trainer, signal.SIGKILL)
    assert alive is None, f"trainer {trainer} outlived its sweep"


# --- bad input: rejected before any run -----------------------------------------------------


@pytest.mark.parametrize(
    "grid, needle",
    [
        (["schedule.alphaa=0.5,1.0"], "unknown config key 'schedule.alphaa'"),
        (["schedule=0.5"], "config key 'schedule' is a group"),  # a sub-dict, not a value
        (["schedule.alpha=0.5,high"], "--config.schedule.alpha=high"),
        (["seed=1,2"], "--seeds"),
        (["total_steps=2.5"], "--config.total_steps=2.5"),
        (["schedule.alpha="], "empty grid for key 'schedule.alpha'"),
        (["schedule.alpha"], "expected KEY=V1,V2"),
        (["schedule.alpha=0.5,1.5"], "config.schedule.alpha=1.5: must lie in"),  # a range
    ],
)
def test_bad_grid_rejected_before_any_run(grid, needle, tmp_path, capsys):
    args = [f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}", "--seeds=0"]
    for g in grid:
        args += ["--grid", g]
    assert sweep.main(args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_sweep_file_arms_seeds_and_bad_values(tmp_path):
    path = tmp_path / "exp.py"
    path.write_text(
        "def get_sweep(arg):\n"
        "    if arg == 'bad':\n"
        "        return [{'schedule.alpha': 'x'}]\n"
        "    if arg == 'empty':\n"
        "        return []\n"
        "    if arg == 'seed':\n"
        "        return [{'seed': 1.5}]\n"
        "    return [{'schedule.mode': 'fixed', 'schedule.alpha': 0.35, 'seed': 7},\n"
        "            {'optim.lr': 1e-3, 'logging.plots': True}]\n"
    )
    runs = sweep.plan(CONFIG, "W", [], [0, 1], [], sweep_arg=f"{path}")
    assert [(r.arm, r.seed) for r in runs] == [
        ("schedule.mode=fixed,schedule.alpha=0.35", 7),
        ("optim.lr=0.001,logging.plots=true", 0),
        ("optim.lr=0.001,logging.plots=true", 1),
    ]
    assert runs[0].workdir == os.path.join("W", "schedule.mode=fixed,schedule.alpha=0.35", "seed7")
    # The flags a run gets rebuild exactly the Python values of the sweep file.
    config = sweep.load_config(CONFIG, runs[2].overrides)
    assert config.optim.lr == 1e-3 and config.logging.plots is True and config.seed == 1
    # A grid on top of a sweep file multiplies the arms.
    assert len(sweep.plan(CONFIG, "W", ["optim.b1=0.8,0.9"], [0], [], f"{path}")) == 4
    with pytest.raises(sweep.SweepError, match="schedule.alpha=x"):
        sweep.plan(CONFIG, "W", [], [0], [], sweep_arg=f"{path}:bad")
    with pytest.raises(sweep.SweepError, match="empty sweep"):
        sweep.plan(CONFIG, "W", [], [0], [], sweep_arg=f"{path}:empty")
    with pytest.raises(sweep.SweepError, match="seed 1.5"):
        sweep.plan(CONFIG, "W", [], [0], [], sweep_arg=f"{path}:seed")
    with pytest.raises(sweep.SweepError, match="alphaa"):
        sweep.plan(CONFIG, "W", [], [0], ["--config.schedule.alphaa=1"])


def test_jobs_split_cores_or_gpus():
    gpus = sweep._slots(2, ["0", "1", "2", "3"])
    assert [s["gpus"] for s in gpus] == [["0", "2"], ["1", "3"]]
    assert sweep._env(gpus[1])["CUDA_VISIBLE_DEVICES"] == "1,3"
    cores = sorted(os.sched_getaffinity(0))
    slots = sweep._slots(len(cores), None)
    assert sorted(c for s in slots for c in s["cores"]) == cores  # disjoint, all used
    assert all(sweep._env(s)["OMP_NUM_THREADS"] == "1" for s in slots)
    with pytest.raises(sweep.SweepError, match="GPU"):
        sweep._slots(3, ["0", "1"])


def test_aggregate_leaves_out_unfinished_runs_and_uses_last_tenth(tmp_path):
    """Hand-written metrics files: 20 steps, so the final training reward is the mean of the
    last 2 steps; an unfinished run (10 of 20 steps) is left out and named."""
    rng = np.random.default_rng(0)
    finals = {}
    for arm in ("a", "b"):
        for seed in range(3):
            run = tmp_path / arm / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "config.json").write_text(json.dumps({"total_steps": 20}))
            steps = 10 if (arm, seed) == ("b", 2) else 20
            rewards = rng.uniform(size=steps)
            lines = [{"step": i + 1, "reward/mean": float(r)} for i, r in enumerate(rewards)]
            (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            if steps == 20:
                finals.setdefault(arm, []).append(rewards[-2:].mean())
    rows = sweep_summary.write_summary(str(tmp_path), baseline="b")
    assert [r["arm"] for r in rows] == ["a", "b"] and rows[0]["baseline"] == "b"
    for row in rows:
        x = np.array(finals[row["arm"]])
        assert row["reward/mean:n"] == len(x)
        np.testing.assert_allclose(row["reward/mean:mean"], x.mean(), rtol=1e-12)
    assert os.path.join(str(tmp_path), "b", "seed2") in (tmp_path / "summary.md").read_text()
    with pytest.raises(ValueError, match="baseline 'c'"):
        sweep_summary.write_summary(str(tmp_path), baseline="c")
