"""`Plan`: the run's config as typed objects (built and checked by trainer/build.py `plan`, whose
cross-key rules are trainer/validate.py's). A module of its own so that both read it without
importing each other."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from apo_jax import objectives, settings, tasks
from apo_jax.infra import tracking
from apo_jax.objectives import entropy as entropy_lib
from apo_jax.objectives import schedule as schedule_lib


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run needs to know, typed; built once by `trainer/build.py plan(config)`."""

    seed: int
    total_steps: int
    model: settings.Model
    task: tasks.TaskSpec
    task_params: Mapping[str, Any]  # config.task.<name>.*
    rollout: settings.Rollout
    objective: objectives.Objective
    loss_params: Mapping[str, Any]  # config.loss.<name>.*
    schedule: schedule_lib.ScheduleConfig  # vocab_size filled in by `step_spec`
    optim: settings.Optim
    mesh: tuple[int, int, int]  # (data, fsdp, tensor), -1 = the devices left over
    checkpoint_every: int
    checkpoint_keep: int
    eval_every: int
    eval_prompts: int
    tensorboard: bool
    plots: bool
    progress: bool
    record: Mapping[str, Any]  # the config as plain data (config.json, checkpoint records)
    rollout_correction: str  # loss.rollout_correction (trainer/rollout_correction.py)
    rollout_correction_cap: float  # loss.rollout_correction_cap
    eval_rows_per_chunk: int  # eval.rows_per_chunk (trainer/evaluate.py rows_per_call)
    wandb: tracking.WandbSettings  # logging.wandb*
    entropy: entropy_lib.EntropyConfig  # loss.entropy_*
    loss: settings.Loss  # the keys of config.loss any objective reads (loss.anchor, ...)

    @property
    def updates_total(self) -> int:
        return self.total_steps * self.optim.mini_batches

    def to_json(self) -> str:
        return json.dumps(self.record, indent=2, sort_keys=True, default=str)
