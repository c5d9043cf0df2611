"""The training loop as a user runs it: configs, resume, signals, faults, bad input."""

import glob
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from apo_jax.infra import checkpoint as checkpoint_lib
from apo_jax.trainer import loop as train
from configs import toy

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(
    glob.glob(str(ROOT / "configs" / "*.py")) + glob.glob(str(ROOT / "experiments" / "*.py"))
)
CONFIG_FILES = [f for f in CONFIG_FILES if not f.endswith("__init__.py")]


def _load(path):
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _debug_toy(**overrides):
    c = toy.get_config("debug")
    c.mesh.data = 1  # tests run with 8 fake devices; the loop itself is single-device here
    c.total_steps = 4
    c.checkpoint.every_steps = 2
    # No held-out evaluation (it would run at the last step): these tests are about training
    # and resuming; evaluation is tested in test_evaluate.py.
    c.eval.num_prompts = 0
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def _comparable(lines):
    return [{k: v for k, v in x.items() if not k.startswith("perf/")} for x in lines]


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_builds_and_runs_one_step(path, tmp_path, shared_data):
    c = _load(path).get_config("debug")
    c.mesh.data, c.total_steps = 1, 1
    c.eval.num_prompts = 0  # the last step would evaluate: tested in test_evaluate.py
    last = train.run(c, str(tmp_path))
    assert last["step"] == 1 and np.isfinite(last["loss/value"])
    assert "reward/mean" in _lines(tmp_path)[0]


def test_resume_is_exact(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.run(_debug_toy(), str(straight))
    train.run(_debug_toy(total_steps=2), str(split))  # stop half-way (checkpoint at step 2)
    train.run(_debug_toy(), str(split))  # resume to step 4
    assert _comparable(_lines(straight)) == _comparable(_lines(split))
    assert [x["step"] for x in _lines(split)] == [1, 2, 3, 4]
    ck_a = checkpoint_lib.Checkpointer(str(straight), every_steps=2, keep=3)
    ck_b = checkpoint_lib.Checkpointer(str(split), every_steps=2, keep=3)
    record_a, record_b = ck_a.read_record(4), ck_b.read_record(4)
    assert record_a["position"] == record_b["position"]
    state_a = ck_a.manager.restore(4).state
    state_b = ck_b.manager.restore(4).state
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cosine_resume_keeps_the_lr_schedule_and_refuses_a_new_horizon(tmp_path, monkeypatch):
    """A cosine run stopped (SIGTERM) and resumed logs the uninterrupted run's lr at every step
    (no jump at the resumed step); resuming it under another total_steps is refused, since the
    schedule's horizon is total_steps × mini_batches updates."""
    cosine = lambda **kw: _debug_toy(**{"total_steps": 3, "optim.decay": "cosine", **kw})
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.run(cosine(), str(straight))
    write = train.metrics_lib.MetricsWriter.write

    def stop_after_step_1(self, step, metrics):
        if step == 1:  # what a preemption does: the loop saves this step and exits
            os.kill(os.getpid(), signal.SIGTERM)
        return write(self, step, metrics)

    with monkeypatch.context() as m:
        m.setattr(train.metrics_lib.MetricsWriter, "write", stop_after_step_1)
        assert train.run(cosine(), str(split))["step"] == 1
    before = _files(split)
    with pytest.raises(ValueError, match=r"total_steps=3 and optim\.decay='cosine'.*total_steps=6"):
        train.run(cosine(total_steps=6), str(split))
    assert _files(split) == before
    train.run(cosine(), str(split))
    a, b = _lines(straight), _lines(split)
    assert [x["step"] for x in b] == [1, 2, 3]
    assert [x["optim/lr"] for x in a] == [x["optim/lr"] for x in b]
    # The cosine over 6 updates: step s logs the lr of its last update, 2s - 1 (optax's formula).
    lr = _debug_toy().optim.lr
    want = [lr * 0.5 * (1 + np.cos(np.pi * (2 * s - 1) / 6)) for s in (1, 2, 3)]
    np.testing.assert_allclose([x["optim/lr"] for x in b], want, rtol=1e-6)
    assert _comparable(a) == _comparable(b)


def test_rollout_in_row_chunks_changes_nothing(tmp_path, monkeypatch):
    """rollout.rows_per_chunk = 2 groups: the sampler sees 2 prompts per call instead of 4 and
    the run's metrics are those of one call per step (per-row noise is keyed by row id): the
    same tokens, rewards, losses and updates, bit for bit. Only the sampler's own log-probs
    (rollout/logp_gap, their mean distance to the scorer's) may round differently, as XLA's
    matmuls over 4 rows and over 8 rows need not sum in the same order."""
    calls = []
    sample = train.build.sampler_lib.Sampler.sample

    def counting(self, params, prompts, **kw):
        calls.append(len(prompts))
        return sample(self, params, prompts, **kw)

    monkeypatch.setattr(train.build.sampler_lib.Sampler, "sample", counting)
    whole, chunked = tmp_path / "whole", tmp_path / "chunked"
    c = _debug_toy(total_steps=2, **{"checkpoint.every_steps": 0})
    c.rollout.engine = "static"  # the engine that calls the sampler once per chunk
    g, n = c.rollout.group_size, c.rollout.prompts_per_step
    assert n == 4, "the test needs a step of 4 prompts (2 chunks of 2)"
    train.run(c, str(whole))
    assert calls == [n, n]
    calls.clear()
    c.rollout.rows_per_chunk = 2 * g
    train.run(c, str(chunked))
    assert calls == [2, 2, 2, 2]
    a, b = _comparable(_lines(whole)), _comparable(_lines(chunked))
    gap = "rollout/logp_gap"
    assert [{k: v for k, v in x.items() if k != gap} for x in a] == [
        {k: v for k, v in x.items() if k != gap} for x in b
    ]
    # A log-prob z_y - logsumexp(z) rounds at the scale of logsumexp, ~log V for a random model.
    vocab = train.build.task(train.build.plan(c)).vocab_size
    atol = 8 * np.finfo(np.float32).eps * np.log(vocab)
    for x, y in zip(a, b, strict=True):
        assert abs(x[gap] - y[gap]) <= atol and max(x[gap], y[gap]) <= atol


def test_continuous_engine_changes_nothing(tmp_path):
    """rollout.engine = continuous with 2 groups' rows of slots (the other rows wait and take
    freed slots; rewards are scored as rows finish), evaluation included: the same tokens,
    rewards, losses and updates as static, bit for bit. As with rows_per_chunk, only what reads
    the sampler's own log-probs (rollout/logp_gap, eval/entropy) may round differently, as the
    decode batch differs."""
    static, cont = tmp_path / "static", tmp_path / "continuous"
    c = _debug_toy(total_steps=2, **{"checkpoint.every_steps": 0, "eval.num_prompts": 4})
    c.rollout.engine = "static"
    train.run(c, str(static))
    c.rollout.engine, c.rollout.slots = "continuous", 2 * c.rollout.group_size
    train.run(c, str(cont))
    loose = ("rollout/logp_gap", "eval/entropy")
    a, b = _comparable(_lines(static)), _comparable(_lines(cont))
    assert [{k: v for k, v in x.items() if k not in loose} for x in a] == [
        {k: v for k, v in x.items() if k not in loose} for x in b
    ]
    vocab = train.build.task(train.build.plan(c)).vocab_size
    atol = 8 * np.finfo(np.float32).eps * np.log(vocab)  # as in the rows_per_chunk test
    for x, y in zip(a, b, strict=True):
        for k in loose:
            if k in x:
                assert abs(x[k] - y[k]) <= atol * max(1.0, abs(x[k])), (k, x[k], y[k])


def test_incompatible_checkpoint_names_the_keys(tmp_path):
    train.run(_debug_toy(total_steps=2), str(tmp_path))
    with pytest.raises(ValueError, match=r"incompatible config.*loss\.apo\.beta_r: 0\.3 -> 0\.5"):
        train.run(_debug_toy(**{"loss.apo.beta_r": 0.5}), str(tmp_path))


def test_half_written_checkpoint_is_never_picked(tmp_path):
    train.run(_debug_toy(total_steps=2), str(tmp_path))
    ckdir = tmp_path / "checkpoints"
    # What a kill in the middle of saving step 3 leaves: Orbax's temporary directory, under the
    # very name that re-saving step 3 after the resume will use.
    partial = ckdir / "3.orbax-checkpoint-tmp"
    shutil.copytree(ckdir / "2", partial)
    for f in partial.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
            break
    ck = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=3)
    assert ck.latest_step() == 2
    last = train.run(_debug_toy(**{"checkpoint.every_steps": 1}), str(tmp_path))
    assert last["step"] == 4
    assert checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=3).latest_step() == 4


def _launch(workdir, *extra):
    cmd = [
        sys.executable,
        "-m",
        "apo_jax.main",
        "--config=configs/toy.py:debug",
        f"--workdir={workdir}",
        "--config.mesh.data=1",
        "--config.total_steps=500",
        "--config.checkpoint.every_steps=1",
        *extra,
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for_lines(proc, workdir, n, timeout=240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and len(pathlib.Path(path).read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("run produced no metrics in time")


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = _launch(tmp_path)
    _wait_for_lines(proc, tmp_path, 2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    last = _lines(tmp_path)[-1]["step"]
    assert checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=3).latest_step() == last


@pytest.mark.slow
def test_sigkill_at_any_moment_resumes(tmp_path):
    proc = _launch(tmp_path)
    _wait_for_lines(proc, tmp_path, 3)
    time.sleep(np.random.default_rng().uniform(0, 0.5))  # some moment, possibly mid-save
    proc.kill()
    proc.wait()
    latest = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=3).latest_step()
    assert latest is not None and latest >= 1
    target = latest + 2
    last = train.run(_debug_toy(total_steps=target, **{"checkpoint.every_steps": 1}), str(tmp_path))
    assert last["step"] == target
    assert [x["step"] for x in _lines(tmp_path)] == list(range(1, target + 1))


@pytest.mark.slow
def test_reward_rises_on_the_embedded_task(tmp_path):
    c = toy.get_config()
    c.mesh.data = 1
    c.total_steps = 40
    c.eval.num_prompts = 0
    c.logging.progress = False
    train.run(c, str(tmp_path))
    rewards = [x["reward/mean"] for x in _lines(tmp_path)]
    first, last = np.mean(rewards[:8]), np.mean(rewards[-8:])
    # Loose on purpose: the default run goes further; here only "clearly learning".
    assert last > first + 0.1, (first, last)
    assert (tmp_path / "plots" / "reward_mean.png").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"loss.name": "ppo"}, "config.loss.name='ppo'"),
        ({"task.name": "chess"}, "config.task.name='chess'"),
        ({"loss.gspo.clip_eps_low": 1.5, "loss.name": "gspo"}, "config.loss.gspo.clip_eps_low"),
        ({"task.toy.prompt_len": 11}, "config.task.toy.prompt_len=11"),
        ({"schedule.alpha": 1.5}, "config.schedule.alpha=1.5"),
        ({"schedule.alpha_min": 0.0}, "config.schedule.alpha_min=0.0"),
        ({"rollout.group_size": 1}, "config.rollout.group_size=1"),
        ({"optim.mini_batches": 3}, "config.optim.mini_batches=3"),
        ({"rollout.max_new_tokens": 100_000}, "exceeds the model's max_position_embeddings"),
        ({"model.hf_dir": "/nonexistent/qwen3"}, "no such directory"),
        ({"mesh.data": 3}, "config.mesh"),
        ({"rollout.top_p": 0.0}, r"config\.rollout\.top_p=0\.0"),
        ({"rollout.top_p": 1.5}, r"config\.rollout\.top_p=1\.5"),
        ({"rollout.top_k": -1}, r"config\.rollout\.top_k=-1"),
        ({"rollout.temperature": -0.5}, r"config\.rollout\.temperature=-0\.5"),
        ({"rollout.rows_per_chunk": 3}, r"config\.rollout\.rows_per_chunk=3: must be a multiple"),
        ({"rollout.rows_per_chunk": 6}, r"config\.rollout\.rows_per_chunk=6: .*divide the 8 rows"),
        ({"rollout.rows_per_chunk": -2}, r"config\.rollout\.rows_per_chunk=-2"),
    ],
)
def test_bad_input_fails_fast_with_the_key(tmp_path, monkeypatch, overrides, match):
    def no_compile(*args, **kwargs):
        raise AssertionError("the error must come before any function is built or compiled")

    monkeypatch.setattr(train.step_lib, "build", no_compile)
    monkeypatch.setattr(train.build.sampler_lib, "Sampler", no_compile)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train.run(_debug_toy(**overrides), str(tmp_path))


def _files(directory) -> dict:
    """Relative path -> bytes of every file below `directory`."""
    root = pathlib.Path(directory)
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


def _damage(step_dir: pathlib.Path, how: str) -> None:
    data = sorted((step_dir / "state").glob("ocdbt.process_*/d/*"), key=lambda f: f.stat().st_size)
    if how == "truncate_data":
        data[-1].write_bytes(data[-1].read_bytes()[:10])
    elif how == "delete_data":
        for f in data:
            f.unlink()
    elif how == "delete_manifest":
        (step_dir / "state" / "manifest.ocdbt").unlink()
    elif how == "garbage_record":
        (step_dir / "record" / "metadata").write_text("{garbage")
    else:
        raise ValueError(how)


def _toy_checkpoints(workdir, steps=(1, 2)):
    ck = checkpoint_lib.Checkpointer(str(workdir), every_steps=1, keep=5)
    for s in steps:
        state = {"w": np.arange(1000, dtype=np.float32) * s, "b": np.full(3, s, np.float32)}
        ck.save(s, jax.tree.map(jax.numpy.asarray, state), {"position": 10 * s, "config": {}})
    ck.close()
    abstract = {
        k: jax.ShapeDtypeStruct(
            shape, np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
        )
        for k, shape in (("w", (1000,)), ("b", (3,)))
    }
    return abstract


@pytest.mark.parametrize(
    "how", ["truncate_data", "delete_data", "delete_manifest", "garbage_record"]
)
def test_damaged_latest_checkpoint_falls_back_and_is_kept_aside(tmp_path, how, capfd):
    abstract = _toy_checkpoints(tmp_path)
    ckdir = tmp_path / "checkpoints"
    _damage(ckdir / "2", how)
    damaged, intact = _files(ckdir / "2"), _files(ckdir / "1")
    ck = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=5)
    step, state, record = ck.restore_latest(abstract)
    assert step == 1 and record["position"] == 10
    np.testing.assert_array_equal(state["w"], np.arange(1000, dtype=np.float32))
    # The damaged step is kept, byte for byte, out of Orbax's way; step 1 is untouched.
    (aside,) = (ckdir / checkpoint_lib.DAMAGED).iterdir()
    assert aside.name.startswith("2-") and _files(aside) == damaged
    assert _files(ckdir / "1") == intact and ck.latest_step() == 1
    # The same step can be saved again (a resumed run re-saves it).
    ck.save(2, jax.tree.map(lambda x: x + 0, state), {"position": 20, "config": {}})
    assert ck.manager.all_steps() == [1, 2]
    ck.close()
    # No flood of Orbax/TensorStore tracebacks (the one reason goes to the log).
    assert capfd.readouterr().err.count("Traceback") == 0


def test_abandoned_restore_reads_are_not_echoed_even_when_collected_late(capfd):
    """Orbax's other reads of a failed restore are asyncio tasks that may be collected after
    the restore has returned; asyncio then logs "Task exception was never retrieved" with a
    full traceback. The guard drops those records, and only those."""
    import asyncio
    import gc
    import logging as std_logging

    async def fails():
        raise ValueError("echo of the reported error")

    async def abandon():
        asyncio.get_running_loop().create_task(fails())
        await asyncio.sleep(0.01)

    handler = std_logging.StreamHandler()  # to stderr, captured by capfd
    std_logging.getLogger("asyncio").addHandler(handler)
    try:
        with checkpoint_lib._quiet_leftovers():
            pass
        asyncio.run(abandon())  # collected after the guarded block has ended
        gc.collect()
        std_logging.getLogger("asyncio").error("an unrelated asyncio error")
    finally:
        std_logging.getLogger("asyncio").removeHandler(handler)
    err = capfd.readouterr().err
    assert "never retrieved" not in err and "Traceback" not in err
    assert "an unrelated asyncio error" in err


def test_no_restorable_checkpoint_names_workdir_and_steps(tmp_path):
    abstract = _toy_checkpoints(tmp_path)
    _damage(tmp_path / "checkpoints" / "2", "delete_manifest")
    _damage(tmp_path / "checkpoints" / "1", "truncate_data")
    ck = checkpoint_lib.Checkpointer(str(tmp_path), every_steps=1, keep=5)
    with pytest.raises(RuntimeError, match=rf"{tmp_path}: no checkpoint restores.*2 \(.*1 \("):
        ck.restore_latest(abstract)
    assert len(list((tmp_path / "checkpoints" / checkpoint_lib.DAMAGED).iterdir())) == 2


def test_damaged_checkpoint_and_torn_metrics_line_resume_from_previous_step(tmp_path):
    """A kill that tears the metrics line of step 3, plus a damaged step-2 checkpoint: the run
    resumes from step 1 and re-runs steps 2-3 exactly as the first run did step 2."""
    c = lambda n: _debug_toy(total_steps=n, **{"checkpoint.every_steps": 1, "eval.num_prompts": 0})
    train.run(c(2), str(tmp_path))
    first = _lines(tmp_path)
    _damage(tmp_path / "checkpoints" / "2", "truncate_data")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss/val')  # torn: no closing brace, no newline
    step1 = _files(tmp_path / "checkpoints" / "1")
    last = train.run(c(3), str(tmp_path))
    lines = _lines(tmp_path)
    assert last["step"] == 3 and [x["step"] for x in lines] == [1, 2, 3]
    assert _comparable(lines[:2]) == _comparable(first)  # step 2 re-run from step 1: identical
    assert _files(tmp_path / "checkpoints" / "1") == step1
    (aside,) = (tmp_path / "checkpoints" / checkpoint_lib.DAMAGED).iterdir()
    assert aside.name.startswith("2-")


def test_metrics_torn_last_line_dropped_on_resume_and_bad_middle_line_named(tmp_path):
    from apo_jax.infra import metrics as metrics_lib

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss/value": 0.5 * s}) for s in (1, 2)]
    path.write_text("\n".join(good) + '\n{"step": 3, "loss/va')
    writer = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=2)
    writer.write(3, {"loss/value": float("nan")})
    assert path.read_text().splitlines() == [*good, '{"step": 3, "loss/value": "nan"}']
    path.write_text(good[0] + "\n{torn\n" + good[1] + "\n")  # not the last line: an error
    with pytest.raises(ValueError, match=rf"{path}:2: not a JSON metrics line"):
        metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False, resume_step=2)
    assert path.read_text() == good[0] + "\n{torn\n" + good[1] + "\n"  # left as it was


@pytest.mark.parametrize(
    "value, text",
    [(float("nan"), "nan"), (float("inf"), "inf"), ("nan", "nan"), (None, "-"), (0.25, "0.25")],
)
def test_progress_formatting_never_raises(value, text):
    from apo_jax import console

    assert console.fmt(value, 2) == text
