"""`--dry_run` (issue 16's contract): one JSON line, nothing written, `fits` from
--device_memory_gib, on fake CPU devices in a fresh process."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("peak_gib", "state_gib", "rollout_gib", "train_step_gib", "compile_s", "devices", "mesh")


def test_dry_run_prints_one_json_line_and_says_when_it_does_not_fit(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "apo_jax.main",
        f"--config={ROOT}/configs/base.py:debug",
        f"--workdir={workdir}",
        "--dry_run",
        "--device_memory_gib=0.0001",  # 100 KiB: the tiny model's state alone is more
        "--config.task.name=toy",
        "--config.mesh.fsdp=2",
        "--config.model.remat=block",
    ]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    report = json.loads(lines[0])
    assert all(k in report for k in KEYS), report
    assert report["fits"] is False
    assert report["devices"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    # The peak is the resident state plus the largest phase (each rounded to 1e-4 GiB).
    phases = max(report["rollout_gib"], report["train_step_gib"], report["scoring_gib"])
    assert abs(report["peak_gib"] - (report["state_gib"] + phases)) <= 3e-4
    assert report["peak_gib"] > 0.0001 and report["state_gib"] > 0
    assert not workdir.exists()  # nothing written: no workdir, no checkpoint, no metrics
