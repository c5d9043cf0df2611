"""Two local processes under jax.distributed (CPU, gloo) train exactly like one process holding
the same two devices."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _cmd(workdir, *extra):
    return [sys.executable, "-m", "apo_jax.main", "--config=configs/toy.py:debug",
            f"--workdir={workdir}", "--config.total_steps=3", "--config.mesh.data=-1",
            "--config.logging.progress=False", "--config.eval.num_prompts=0",  # training only
            *extra]  # fmt: skip


def _env(devices: int):
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine",
    # continuous: 8 prompts x G 2 = 8 rows per process for 4 slots per process, so rows queue
    # and refill, and the two processes' 8 slots drain to 4 (two rows per device) once the queue
    # is empty; both take the same scheduling decisions from the gathered slot flags. One
    # process holding both devices has 4 slots and no drain: the rows must not depend on that.
    [
        ("--config.rollout.engine=static",),
        (
            "--config.rollout.engine=continuous",
            "--config.rollout.slots=4",
            "--config.rollout.prompts_per_step=8",
        ),
    ],
    ids=["static", "continuous"],
)
def test_two_processes_match_one_process(tmp_path, engine):
    single = subprocess.run(_cmd(tmp_path / "single", *engine), cwd=ROOT, env=_env(2),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(
                tmp_path / "multi",
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *engine,
            ),
            cwd=ROOT,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]

    a, b = _lines(tmp_path / "single"), _lines(tmp_path / "multi")
    assert [x["step"] for x in a] == [x["step"] for x in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        for key in x:
            if key.startswith("perf/") or key == "step":
                continue
            np.testing.assert_allclose(y[key], x[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert (tmp_path / "multi" / "checkpoints" / "3").is_dir()  # written once, collectively


@pytest.mark.slow
def test_survivor_of_a_killed_process_ends_after_the_heartbeat_timeout(tmp_path):
    """Process 1 killed: process 0's next collective fails, and on exit it waits in JAX's
    shutdown barrier until the coordination service declares process 1 dead, after
    --heartbeat_timeout_s (JAX's default is 100 s; here 5 s, so it ends well within the 90 s
    this test waits)."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(
                tmp_path,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--heartbeat_timeout_s=5",
                "--config.total_steps=1000",
            ),
            cwd=ROOT,
            env=_env(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        seen = []
        for line in procs[0].stdout:  # process 0 prints the banner once both are connected
            seen.append(line)
            if line.startswith("steps:"):
                break
        assert any(x.startswith("steps:") for x in seen), "".join(seen)[-3000:]
        procs[1].kill()
        procs[1].wait()
        out = "".join(seen) + procs[0].communicate(timeout=90)[0]
        assert procs[0].returncode != 0
        assert "heartbeat" in out, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
