"""The embedded toy tasks (no downloads): copy a set of value tokens, in any order ("toy") or
sorted ("toy_sorted"). The default run (`make run`) and most tests use them."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

from apo_jax.tasks import registry
from apo_jax.tasks.base import Example, trim_completion

PAD_ID, EOS_ID, SEP_ID = 0, 1, 2
_FIRST_VALUE_ID = 3
_SPECIAL_NAMES = {PAD_ID: "<pad>", EOS_ID: "<eos>", SEP_ID: "="}
_SPLITS = {"train": 0, "eval": 1}


class _LazyExamples(Sequence):
    """A large read-only sequence whose i-th example is generated on demand from (seed, i)."""

    def __init__(self, size: int, make):
        self._size, self._make = size, make

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._make(j) for j in range(*i.indices(self._size))]
        i = int(i)
        if i < 0:
            i += self._size
        if not 0 <= i < self._size:
            raise IndexError(f"example index {i} out of range for {self._size} examples")
        return self._make(i)


class ToyTask:
    """Copy-a-set task: the prompt is k distinct value tokens then "="; the completion must list
    the prompt's values, each exactly once, then EOS.

    - "toy" (`ordered=False`): any order is correct, so every prompt has k! correct answers (6 by
      default: a group of G = 6-8 can cover them all) and mode collapse vs coverage is
      measurable (`distinct_correct`, `answer_rank`).
    - "toy_sorted" (`ordered=True`): only ascending order is correct (a single answer).

    Reward (dense partial credit in [0, 1]): the completion is trimmed at its first EOS (only EOS
    ends an answer: a policy that pads instead would otherwise never learn to stop);
    credit = number of positions holding a prompt value not used earlier (ordered: the value at
    that rank of the sorted prompt), divided by max(k, completion length). So 1 iff the
    completion is exactly a valid answer, and a random policy scores well above 0.

    Give the model exactly `vocab_size` rows: a tiny random Qwen3 then learns "toy" from scratch
    by RL in a few hundred steps, while with 128 rows it rarely samples EOS and stalls.

    Prompts come from (seed, split, index) alone. A k-subset belongs to the eval split iff a
    hash of (seed, subset) is 0 mod `eval_mod`, so train and eval never share a value set.
    """

    def __init__(
        self,
        *,
        num_values: int = 10,  # size of the value alphabet (the digits 0-9)
        prompt_len: int = 3,  # k: values per prompt (and tokens per correct answer)
        ordered: bool = False,  # True: only the sorted order is correct
        seed: int = 0,
        num_train: int = 1_000_000,  # virtual size: examples are generated on demand
        num_eval: int = 128,
        eval_mod: int = 8,  # about 1/eval_mod of the value sets are held out for eval
    ):
        if not 1 <= prompt_len <= num_values:
            raise ValueError(
                f"toy task: need 1 <= prompt_len ({prompt_len}) <= num_values ({num_values})"
            )
        if num_train < 1 or num_eval < 1 or eval_mod < 2:
            raise ValueError(
                f"toy task: num_train ({num_train}) and num_eval ({num_eval}) must "
                f"be >= 1 and eval_mod ({eval_mod}) >= 2"
            )
        self.num_values, self.prompt_len, self.ordered = num_values, prompt_len, ordered
        self.seed, self.eval_mod = seed, eval_mod
        self.name = "toy_sorted" if ordered else "toy"
        self.vocab_size = _FIRST_VALUE_ID + num_values
        self.eos_ids = (EOS_ID,)
        self.pad_id = PAD_ID
        self._check_both_splits_possible()
        self._train = _LazyExamples(num_train, lambda i: self._example("train", i))
        self._eval = _LazyExamples(num_eval, lambda i: self._example("eval", i))

    @property
    def num_correct_answers(self) -> int:
        """Distinct correct completions per prompt."""
        return 1 if self.ordered else math.factorial(self.prompt_len)

    def train_examples(self) -> Sequence[Example]:
        return self._train

    def eval_examples(self) -> Sequence[Example]:
        return self._eval

    def token_name(self, t: int) -> str:
        if t in _SPECIAL_NAMES:
            return _SPECIAL_NAMES[t]
        if _FIRST_VALUE_ID <= t < self.vocab_size:
            return str(t - _FIRST_VALUE_ID)
        return f"<unk{t}>"  # ids a larger model vocabulary can still sample

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.token_name(int(t)) for t in ids)

    def reward(self, example: Example, completion: Sequence[int]) -> float:
        values = example.prompt_ids[:-1]  # drop the trailing "="
        comp = trim_completion(completion, (EOS_ID,))
        if self.ordered:
            credit = sum(t == want for t, want in zip(comp, sorted(values), strict=False))
        else:  # each prompt value counts once, wherever it stands
            credit = len(set(comp) & set(values))
        return credit / max(len(values), len(comp))

    def rewards(
        self, examples: Sequence[Example], completions: Sequence[Sequence[int]]
    ) -> np.ndarray:
        if len(examples) != len(completions):
            raise ValueError(
                f"rewards: {len(examples)} examples but {len(completions)} completions"
            )
        out = [self.reward(e, c) for e, c in zip(examples, completions, strict=True)]
        return np.asarray(out, dtype=np.float32)

    def score(
        self, examples: Sequence[Example], completions: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rewards, correct): correct means full credit (reward 1)."""
        rewards = self.rewards(examples, completions)
        return rewards, rewards >= 1.0

    def answer_keys(self, examples, completions) -> list[int | None]:
        return [self.answer_rank(e, c) for e, c in zip(examples, completions, strict=True)]

    def close(self) -> None:
        pass  # nothing held

    def answer_rank(self, example: Example, completion: Sequence[int]) -> int | None:
        """Which correct answer a completion hit: the lexicographic rank of its permutation of
        the prompt values (0 .. k!-1), or None if it is not fully correct."""
        if self.reward(example, completion) < 1.0:
            return None
        comp = list(trim_completion(completion, (EOS_ID, PAD_ID)))
        rank, pool = 0, sorted(comp)
        for j, t in enumerate(comp):  # Lehmer code
            pos = pool.index(t)
            rank += pos * math.factorial(len(comp) - 1 - j)
            pool.pop(pos)
        return rank

    # --- deterministic generation ----------------------------------------------------------------
    def _is_eval_set(self, values: Sequence[int]) -> bool:
        key = np.asarray([self.seed, *sorted(values)], dtype=np.int64).tobytes()
        return zlib.crc32(key) % self.eval_mod == 0

    def _check_both_splits_possible(self) -> None:
        n_sets = math.comb(self.num_values, self.prompt_len)
        if n_sets > 200_000:  # large spaces always hold both kinds of subsets
            return
        from itertools import combinations

        kinds = {
            self._is_eval_set(s) for s in combinations(range(self.num_values), self.prompt_len)
        }
        if kinds != {True, False}:
            raise ValueError(
                f"toy task: with num_values={self.num_values}, prompt_len={self.prompt_len} "
                f"({n_sets} value sets) the train/eval split by hash leaves one split empty; "
                "use more values or a different eval_mod/seed"
            )

    def _example(self, split: str, i: int) -> Example:
        rng = np.random.default_rng((self.seed, _SPLITS[split], i))
        want_eval = split == "eval"
        while True:  # rejection sampling: the expected number of draws is eval_mod (eval) or ~1
            values = rng.choice(self.num_values, size=self.prompt_len, replace=False)
            if self._is_eval_set(values) == want_eval:
                break
        ids = tuple(int(v) + _FIRST_VALUE_ID for v in values)
        answer = " ".join(str(v) for v in sorted(int(v) for v in values))
        return Example(prompt_ids=(*ids, SEP_ID), answer=answer, uid=f"{self.name}/{split}/{i}")


# config.task.toy.* / config.task.toy_sorted.*
DEFAULTS = dict(
    num_values=10,  # size of the value alphabet (vocabulary = 3 special tokens + num_values)
    prompt_len=3,  # k: values per prompt (k! correct answers for "toy", one for "toy_sorted")
)


def _builder(ordered: bool):
    def build(p, ctx: registry.TaskContext) -> ToyTask:
        # A prompt is prompt_len values and "=": left truncation would drop values the answer
        # must list, so no completion could be right.
        if ctx.max_prompt_len < p["prompt_len"] + 1:
            raise ValueError(
                f"config.rollout.max_prompt_len={ctx.max_prompt_len}: shorter than the "
                f"{'toy_sorted' if ordered else 'toy'} task's prompts (task.<name>.prompt_len + 1 "
                f"= {p['prompt_len'] + 1} tokens); truncated prompts lose values the answer "
                "must copy"
            )
        return ToyTask(ordered=ordered, seed=ctx.seed, **p)

    return build


def _check(name: str):
    def check(p) -> None:
        if not 1 <= p["prompt_len"] <= p["num_values"]:
            registry.fail(
                f"{name}.prompt_len", p["prompt_len"], "need 1 <= prompt_len <= num_values"
            )

    return check


SPECS = tuple(
    registry.TaskSpec(
        name,
        _builder(ordered),
        DEFAULTS,
        _check(name),
        doc="copy a set of values " + ("in ascending order" if ordered else "in any order"),
    )
    for name, ordered in (("toy", False), ("toy_sorted", True))
)
