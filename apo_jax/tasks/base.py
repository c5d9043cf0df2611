"""The task interface the training loop consumes: a task owns its prompts (token ids), its
vocabulary facts (size, EOS, PAD) and a host-side reward over sampled completions."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]  # tokenised prompt, no padding
    answer: str  # reference answer (for rewards / logging)
    uid: str  # stable id, e.g. "train/algebra/3.json" or "toy/train/123"


@runtime_checkable
class Task(Protocol):
    name: str
    vocab_size: int  # smallest model vocabulary that covers every id the task uses
    eos_ids: tuple[int, ...]  # tokens that end a completion
    pad_id: int

    def train_examples(self) -> Sequence[Example]: ...

    def eval_examples(self) -> Sequence[Example]: ...

    def rewards(
        self, examples: Sequence[Example], completions: Sequence[Sequence[int]]
    ) -> np.ndarray: ...

    def score(
        self, examples: Sequence[Example], completions: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rewards float32 [B], correct bool [B]): the training reward and whether the answer
        is right (what DAPO's dynamic sampling filters on; a shaped reward may be < 1 or differ
        between equally right answers)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def answer_keys(
        self, examples: Sequence[Example], completions: Sequence[Sequence[int]]
    ) -> list[Hashable]:
        """What makes two correct completions of a prompt different answers (evaluation's
        `distinct_correct_answers`): e.g. the permutation found, or the extracted final answer.
        Only the keys of correct completions are read."""
        ...

    def close(self) -> None:
        """Releases what the task holds (reward worker processes); it may be used again."""
        ...


def trim_completion(ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[int, ...]:
    """The completion up to (not including) its first stop token; the rest is padding."""
    stop = set(int(t) for t in stop_ids)
    return tuple(itertools.takewhile(lambda t: t not in stop, map(int, ids)))


def distinct_correct(
    task: Task,
    examples: Sequence[Example],
    completions: Sequence[Sequence[int]],
    rewards: Sequence[float] | np.ndarray | None = None,
    threshold: float = 1.0,
) -> dict[str, int]:
    """Number of distinct correct completions per prompt, keyed by uid (first-seen order).

    A completion is correct when its reward is >= `threshold`; completions are compared after
    trimming at the first EOS/PAD. Prompts without any correct completion map to 0. On the toy
    permutation task this counts how many of the k! valid orderings a group found (coverage);
    a mode-seeking policy drives it towards 1.
    """
    if rewards is None:
        rewards = task.rewards(examples, completions)
    if not len(examples) == len(completions) == len(rewards):
        raise ValueError(
            f"distinct_correct: {len(examples)} examples, {len(completions)} completions and "
            f"{len(rewards)} rewards must have the same length"
        )
    stop = (*task.eos_ids, task.pad_id)
    found: dict[str, set[tuple[int, ...]]] = {}
    for ex, comp, r in zip(examples, completions, rewards, strict=True):
        hits = found.setdefault(ex.uid, set())
        if float(r) >= threshold:
            hits.add(trim_completion(comp, stop))
    return {uid: len(hits) for uid, hits in found.items()}
