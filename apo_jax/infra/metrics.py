"""Run outputs: `config.json`, `metrics.jsonl` (one line per step), TensorBoard events, an optional
Weights & Biases run (infra/tracking.py), a progress bar, and PNG plots at the end. Metric names
are `group/name`. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging

from apo_jax.infra import tracking

PLOTS = (  # (metric, title) drawn by `write_plots`
    ("reward/mean", "mean reward"),
    ("schedule/alpha", "alpha"),
    ("schedule/tau", "tau"),
    ("policy/entropy", "per-token entropy (nats)"),
    ("rollout/len_mean", "response length (tokens)"),
    ("optim/grad_norm", "gradient norm"),
)


def _to_float(x):
    x = float(np.asarray(x))
    return x if math.isfinite(x) else repr(x)  # JSON has no NaN/inf: keep them readable


class MetricsWriter:
    """Appends one JSON line per step; mirrors scalars to TensorBoard and W&B when enabled."""

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = True,
        resume_step: int = 0,
        wandb: tracking.WandbSettings | None = None,
        config: Mapping | None = None,
    ):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        # Steps after the checkpoint we resume from are re-run: drop their old lines so the
        # file reads exactly like an uninterrupted run.
        kept = []
        if os.path.exists(self.path):
            kept = [
                line
                for line in read_metrics(self.path, allow_torn_end=True)
                if line["step"] <= resume_step
            ]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(json.dumps(line) + "\n" for line in kept)
            os.replace(self.path + ".tmp", self.path)
        have = max((line["step"] for line in kept), default=0)
        if have < resume_step:  # deleted or cut short while the checkpoints were kept
            found = f"holds steps up to {have} only" if have else "missing"
            logging.warning(
                f"{self.path}: {found}; resuming at step {resume_step}, so the file lacks steps "
                f"{have + 1}..{resume_step}"
            )
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1
            )
        if wandb is not None and wandb.enabled:
            self._wandb = tracking.WandbRun(wandb, workdir, config or {})

    def write(self, step: int, metrics: Mapping[str, object]) -> dict:
        line = {"step": int(step), **{k: _to_float(v) for k, v in sorted(metrics.items())}}
        if self.active:
            # One write() of the whole line on an O_APPEND descriptor: a kill leaves either the
            # line or (at worst, mid-syscall) a torn tail that resuming drops, never a mix.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(line) + "\n").encode())
            finally:
                os.close(fd)
            if self._tb is not None:
                for k, v in line.items():
                    if k != "step" and isinstance(v, float):
                        # TensorBoard tags allow no "@" (avg@k, pass@k).
                        self._tb.add_scalar(k.replace("@", "_at_"), v, step)
            if self._wandb is not None:  # non-finite values go as floats (W&B shows gaps)
                self._wandb.log(step, {k: float(v) for k, v in line.items() if k != "step"})
        return line

    def close(self, *, plots: Sequence[str] = (), summary: Mapping | None = None):
        """Ends every sink; W&B also gets the end-of-run plots (PNG paths) and the last line
        (final evaluation included) as its summary."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            values = {k: float(v) for k, v in (summary or {}).items() if k != "step"}
            self._wandb.finish(images=plots, summary=values)


def write_config(workdir: str, config_json: str) -> None:
    """Writes the run's configuration (JSON text) as `workdir/config.json`."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_json)


def read_metrics(path: str, *, allow_torn_end: bool = False) -> list[dict]:
    """The lines of a `metrics.jsonl`. A line that is not JSON raises ValueError naming file and
    line, except (with `allow_torn_end`) a last line without its newline: what a kill during
    the write leaves. That one is dropped with a warning."""
    with open(path, encoding="utf-8") as f:
        raw = f.readlines()
    lines = []
    for lineno, text in enumerate(raw, start=1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError as e:
            if allow_torn_end and lineno == len(raw) and not text.endswith("\n"):
                logging.warning("%s:%d: dropping a torn last line (%s)", path, lineno, e)
                continue
            raise ValueError(f"{path}:{lineno}: not a JSON metrics line ({e})") from None
    return lines


def write_plots(workdir: str) -> list[str]:
    """One PNG per metric of PLOTS found in `metrics.jsonl`, under `workdir/plots/`."""
    if jax.process_index() != 0:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    out_dir = os.path.join(workdir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key, title in PLOTS:
        points = [(m["step"], m[key]) for m in lines if isinstance(m.get(key), float)]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot(steps, values, lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, key.replace("/", "_") + ".png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
