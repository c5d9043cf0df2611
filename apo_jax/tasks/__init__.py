"""Tasks: prompts, vocabulary facts and host-side rewards. Importing the package registers the
built-in tasks (toy, toy_sorted, math); `registry.register` adds one from anywhere."""

from apo_jax.tasks import math, toy  # noqa: F401  (registers)
from apo_jax.tasks.base import Example, Task, distinct_correct, trim_completion
from apo_jax.tasks.registry import TaskContext, TaskSpec, default_config, get, names, register
from apo_jax.tasks.toy import ToyTask

__all__ = [
    "Example",
    "Task",
    "TaskContext",
    "TaskSpec",
    "ToyTask",
    "default_config",
    "distinct_correct",
    "get",
    "names",
    "register",
    "trim_completion",
]
