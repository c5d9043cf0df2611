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
from apo_jax.objectives import schedule as schedule_lib


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a run needs to know: the config's blocks (apo_jax/settings.py, each checked
    when read) and the objective and task it selects, with their blocks."""

    seed: int
    total_steps: int
    model: settings.Model
    rollout: settings.Rollout
    loss: settings.Loss  # the keys of config.loss any objective reads (loss.anchor, ...)
    schedule: schedule_lib.ScheduleConfig  # vocab_size filled in by `step_spec`
    optim: settings.Optim
    mesh: tuple[int, int, int]  # (data, fsdp, tensor), -1 = the devices left over
    checkpoint: settings.Checkpoint
    eval: settings.Eval
    logging: settings.Logging
    objective: objectives.Objective
    loss_params: Mapping[str, Any]  # config.loss.<name>.*
    task: tasks.TaskSpec
    task_params: Mapping[str, Any]  # config.task.<name>.*
    record: Mapping[str, Any]  # the config as plain data (config.json, checkpoint records)

    @property
    def wandb(self) -> tracking.WandbSettings:
        lg = self.logging
        return tracking.WandbSettings(
            lg.wandb, lg.wandb_project, lg.wandb_entity, lg.wandb_mode, lg.wandb_group,
            tuple(lg.wandb_tags),
        )  # fmt: skip

    def to_json(self) -> str:
        return json.dumps(self.record, indent=2, sort_keys=True, default=str)
