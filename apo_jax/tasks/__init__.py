"""Tasks: prompts, vocabulary facts and host-side rewards. `TASKS` lists them: a new task is one
module that declares a `TaskSpec` and one line here."""

import ml_collections

from apo_jax.tasks import math, toy
from apo_jax.tasks.base import Example, Task, distinct_correct, trim_completion
from apo_jax.tasks.registry import TaskContext, TaskSpec
from apo_jax.tasks.toy import ToyTask

# config.task.name -> the task's spec.
TASKS: dict[str, TaskSpec] = {s.name: s for s in (math.SPEC, *toy.SPECS)}


def names() -> tuple[str, ...]:
    return tuple(TASKS)


def get(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"config.task.name={name!r}: unknown task; valid: {', '.join(TASKS)}")
    return TASKS[name]


def default_config(name: str) -> ml_collections.ConfigDict:
    """`config.task`: the chosen name and one block per task."""
    c = ml_collections.ConfigDict()
    c.name = name
    for spec in TASKS.values():
        c[spec.name] = ml_collections.ConfigDict(dict(spec.defaults))
    return c


__all__ = [
    "TASKS",
    "Example",
    "Task",
    "TaskContext",
    "TaskSpec",
    "ToyTask",
    "default_config",
    "distinct_correct",
    "get",
    "names",
    "trim_completion",
]
