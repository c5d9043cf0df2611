"""What a task module declares: a `TaskSpec` with its config block `config.task.<name>.*`
(defaults), a check and a builder; the trainer never reads task names."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from apo_jax.tasks.base import Task


class TaskContext(NamedTuple):
    """What a task builder gets besides its own config block."""

    seed: int  # the run's seed (toy prompts, data order)
    max_prompt_len: int  # prompts longer than this keep their end (tokens)
    model_dir: str = ""  # the model's HF directory, if any (a tokenizer may live there)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable[[Mapping[str, Any], TaskContext], Task]
    defaults: Mapping[str, Any]  # config.task.<name>.*
    # Raises ValueError naming `task.<name>.<key>` on a value the task cannot use (cheap: no I/O).
    check: Callable[[Mapping[str, Any]], None] = lambda params: None
    doc: str = ""


def fail(key: str, value, why: str):
    raise ValueError(f"config.task.{key}={value!r}: {why}")
