"""Tasks as plug-ins: each task module registers a `TaskSpec` with its config block
`config.task.<name>.*` (defaults) and a builder; the trainer never reads task names."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_collections

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


_REGISTRY: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"a task named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> TaskSpec:
    if name not in _REGISTRY:
        raise ValueError(f"config.task.name={name!r}: unknown task; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def default_config(name: str) -> ml_collections.ConfigDict:
    """`config.task`: the chosen name and one block per registered task."""
    c = ml_collections.ConfigDict()
    c.name = name
    for spec in _REGISTRY.values():
        c[spec.name] = ml_collections.ConfigDict(dict(spec.defaults))
    return c


def fail(key: str, value, why: str):
    raise ValueError(f"config.task.{key}={value!r}: {why}")
