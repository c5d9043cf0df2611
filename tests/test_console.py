"""A default run's console: banner, progress bar, summary; no library INFO chatter."""

import logging as py_logging
import os
import pathlib
import re
import subprocess
import sys

import pytest
from absl import logging

from apo_jax import console

ROOT = pathlib.Path(__file__).resolve().parents[1]
_ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d")  # "I1130 03:59:19.345 ... file.py:55] ..."


def console_lines(out: str) -> list[str]:
    """Non-empty lines of a run's output other than progress-bar redraws (tqdm rewrites its line
    with \\r; each redraw starts with the bar's description "train")."""
    parts = (p.strip() for p in re.split(r"[\r\n]", out))
    return [p for p in parts if p and not p.startswith("train")]


@pytest.mark.slow  # a subprocess run: start-up, compiles, 4 steps with a save each
def test_default_run_console_is_short_and_quiet(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "apo_jax.main",
        "--config=configs/toy.py:debug",
        f"--workdir={tmp_path}",
        "--config.mesh.data=1",
        "--config.total_steps=4",
        "--config.checkpoint.every_steps=1",  # a save every step: Orbax's INFO lines would show
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = console_lines(proc.stdout)
    assert not [x for x in lines if _ABSL_INFO.match(x)], "\n".join(lines)
    assert len(lines) <= 40, "\n".join(lines)
    text = "\n".join(lines)
    for want in ("parameters", "mesh", f"workdir: {tmp_path}", "fresh start", "done: step 4"):
        assert want in text, (want, text)
    assert f"metrics:     {tmp_path / 'metrics.jsonl'}" in text
    assert f"checkpoints: {tmp_path / 'checkpoints'}" in text


def test_verbosity_one_restores_library_info():
    before = logging.get_verbosity(), py_logging.getLogger("orbax").level
    try:
        console.quiet_libraries(0)
        assert logging.get_verbosity() == logging.WARNING
        assert not py_logging.getLogger("orbax").isEnabledFor(py_logging.INFO)
        console.quiet_libraries(1)
        assert logging.get_verbosity() == logging.INFO
        assert py_logging.getLogger("orbax").isEnabledFor(py_logging.INFO)
    finally:
        logging.set_verbosity(before[0])
        py_logging.getLogger("orbax").setLevel(before[1])


def test_metric_format_never_raises():
    assert console.fmt(float("nan")) == "nan"
    assert console.fmt(float("inf")) == "inf"
    assert console.fmt(None) == "-"
    assert console.fmt(0.12345, 2) == "0.12"
