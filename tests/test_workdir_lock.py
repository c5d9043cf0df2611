"""One run per workdir (apo_jax/infra/workdir_lock.py): a second run is refused before it
compiles anything, naming the holder; a killed holder's lock is taken over, with a line."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
from absl import logging

from apo_jax.infra import workdir_lock

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOLD = """
import os, sys, time
from apo_jax.infra import workdir_lock
with workdir_lock.hold(sys.argv[1]):
    print("held", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), 9)  # no clean-up: the record stays, the kernel drops the lock
    time.sleep(600)
"""


def _holder(workdir, how: str) -> subprocess.Popen:
    """A process holding `workdir`'s lock (`how="die"`: killed by SIGKILL while holding it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir), how],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held" or how == "die"
    return proc


def test_second_holder_is_refused_with_pid_and_host(tmp_path):
    proc = _holder(tmp_path, "sleep")
    try:
        with pytest.raises(workdir_lock.WorkdirLocked) as err, workdir_lock.hold(tmp_path):
            pass
        message = str(err.value)
        assert f"PID {proc.pid} on host {socket.gethostname()}" in message
        assert str(tmp_path) in message and "another --workdir" in message
        assert workdir_lock.holder(str(tmp_path))["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    # Released with its process: the next run takes it.
    with workdir_lock.hold(tmp_path):
        assert workdir_lock.holder(str(tmp_path))["pid"] == os.getpid()
    assert workdir_lock.holder(str(tmp_path)) is None


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_line(tmp_path, monkeypatch):
    proc = _holder(tmp_path, "die")
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stale = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
    assert stale["pid"] == proc.pid  # what the killed holder left
    said = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: said.append(msg % args))
    with workdir_lock.hold(tmp_path):
        record = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()
    (line,) = said
    assert f"stale lock of PID {proc.pid} on host {socket.gethostname()}" in line
    assert "no longer running" in line
    # A clean end leaves an empty file: the next run takes it without a word.
    assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == ""
    with workdir_lock.hold(tmp_path):
        pass
    assert len(said) == 1


def test_same_process_cannot_hold_a_workdir_twice(tmp_path):
    # fcntl locks belong to the process, so this case is checked apart from the kernel's lock.
    with workdir_lock.hold(tmp_path):
        refused = pytest.raises(workdir_lock.WorkdirLocked, match="already in use by this process")
        with refused, workdir_lock.hold(tmp_path):
            pass
        # The refused attempt did not drop the lock held by the outer one.
        assert workdir_lock.holder(str(tmp_path))["pid"] == os.getpid()
    # Processes of one multi-process run hold one file each.
    with workdir_lock.hold(tmp_path, 0), workdir_lock.hold(tmp_path, 1):
        assert os.path.exists(workdir_lock.lock_path(str(tmp_path), 1))


def _train_cmd(workdir):
    return [sys.executable, "-m", "apo_jax.main", "--config=configs/toy.py:debug",
            f"--workdir={workdir}", "--config.total_steps=3", "--config.mesh.data=1"]  # fmt: skip


@pytest.mark.slow
def test_two_runs_on_one_workdir_one_is_refused(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    first = subprocess.Popen(_train_cmd(tmp_path), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lock = tmp_path / workdir_lock.LOCK_FILE
    deadline = time.time() + 300
    while not (lock.exists() and lock.read_text()) and time.time() < deadline:
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.05)
    # Paused while it holds the lock: the second run surely meets it (no race with its end).
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(_train_cmd(tmp_path), cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=300)  # fmt: skip
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert second.returncode != 0
    assert f"in use by PID {first.pid} on host {socket.gethostname()}" in second.stderr
    assert "Traceback" not in second.stderr and "steps:" not in second.stdout  # nothing built
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]  # one run's lines, not two interleaved
