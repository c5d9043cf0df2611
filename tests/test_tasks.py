"""Tests for the task interface and the embedded toy tasks (tasks.py)."""

import itertools
import math

import numpy as np
import pytest

from apo_jax import tasks
from apo_jax.tasks import toy

EOS, PAD, SEP = toy.EOS_ID, toy.PAD_ID, toy.SEP_ID


def _values(example):
    return list(example.prompt_ids[:-1])


@pytest.fixture(scope="module")
def toy():
    return tasks.ToyTask()


def test_interface_and_vocabulary(toy):
    assert isinstance(toy, tasks.Task)
    assert toy.eos_ids == (EOS,) and toy.pad_id == PAD
    ex = toy.train_examples()[0]
    assert ex.prompt_ids[-1] == SEP and len(ex.prompt_ids) == toy.prompt_len + 1
    assert max(ex.prompt_ids) < toy.vocab_size
    # vocab_size is the smallest that covers every id: the largest value id is vocab_size - 1.
    assert toy.vocab_size == 3 + toy.num_values
    assert toy.decode([*ex.prompt_ids, EOS]).endswith("= <eos>")
    assert toy.num_correct_answers == math.factorial(toy.prompt_len)


def test_reward_correct_wrong_partial(toy):
    ex = toy.train_examples()[5]
    vals = _values(ex)
    not_in_prompt = next(t for t in range(3, toy.vocab_size) if t not in vals)
    assert toy.reward(ex, vals + [EOS]) == 1.0
    assert toy.reward(ex, vals[::-1] + [EOS, PAD, PAD]) == 1.0  # any order; after EOS ignored
    # PAD does not end an answer: without EOS the extra tokens count against the credit
    assert toy.reward(ex, vals + [PAD, PAD, PAD]) == 0.5
    assert toy.reward(ex, vals) == 1.0  # truncated exactly at k tokens is still complete
    assert toy.reward(ex, [not_in_prompt] * len(vals) + [EOS]) == 0.0
    assert toy.reward(ex, [EOS]) == 0.0
    partial = toy.reward(ex, vals[:-1] + [not_in_prompt, EOS])
    assert partial == pytest.approx((len(vals) - 1) / len(vals))
    repeated = toy.reward(ex, [vals[0]] * len(vals) + [EOS])  # a value counts once
    assert repeated == pytest.approx(1 / len(vals))
    too_long = toy.reward(ex, vals + [vals[0], EOS])  # right values, extra token
    assert 0 < too_long < 1
    rewards = toy.rewards([ex, ex], [vals + [EOS], [EOS]])
    assert rewards.dtype == np.float32 and rewards.tolist() == [1.0, 0.0]


def test_sorted_variant_has_one_answer():
    task = tasks.ToyTask(ordered=True)
    ex = task.train_examples()[3]
    vals = _values(ex)
    assert task.reward(ex, sorted(vals) + [EOS]) == 1.0
    assert task.reward(ex, sorted(vals, reverse=True) + [EOS]) < 1.0
    assert task.num_correct_answers == 1


def test_uniform_random_policy_gets_dense_partial_reward(toy):
    rng = np.random.default_rng(0)
    examples = [toy.train_examples()[i] for i in range(2000)]
    completions = rng.integers(0, toy.vocab_size, size=(2000, 6))
    rewards = toy.rewards(examples, completions)
    # Dense enough to learn from: most groups of 6-8 contain some nonzero reward.
    assert 0.08 < rewards.mean() < 0.5
    assert (rewards > 0).mean() > 0.4


def test_generation_is_deterministic_and_seeded():
    a, b = tasks.ToyTask(seed=3), tasks.ToyTask(seed=3)
    c = tasks.ToyTask(seed=4)
    idx = [0, 1, 17, 999_999]
    assert [a.train_examples()[i] for i in idx] == [b.train_examples()[i] for i in idx]
    assert a.eval_examples()[:10] == b.eval_examples()[:10]
    assert a.train_examples()[:50] != c.train_examples()[:50]
    assert a.train_examples()[-1] == a.train_examples()[len(a.train_examples()) - 1]
    with pytest.raises(IndexError):
        a.eval_examples()[len(a.eval_examples())]


def test_train_and_eval_value_sets_are_disjoint(toy):
    train_sets = {frozenset(_values(toy.train_examples()[i])) for i in range(3000)}
    eval_sets = {frozenset(_values(e)) for e in toy.eval_examples()}
    assert eval_sets and not train_sets & eval_sets
    assert len({e.uid for e in toy.eval_examples()}) == len(toy.eval_examples())


def test_distinct_correct_and_answer_rank(toy):
    ex0, ex1 = toy.train_examples()[0], toy.train_examples()[1]
    v0, v1 = _values(ex0), _values(ex1)
    examples = [ex0] * 4 + [ex1] * 2
    completions = [
        v0 + [EOS],
        v0 + [EOS, PAD],  # the same answer again (padding differs)
        v0[::-1] + [EOS],  # a second distinct answer
        v0[:1] + [EOS],  # wrong
        [EOS],
        [EOS],
    ]
    assert tasks.distinct_correct(toy, examples, completions) == {ex0.uid: 2, ex1.uid: 0}
    assert toy.answer_rank(ex0, sorted(v0) + [EOS]) == 0
    assert toy.answer_rank(ex0, sorted(v0, reverse=True)) == toy.num_correct_answers - 1
    assert toy.answer_rank(ex0, [EOS]) is None
    perms = itertools.permutations(v1)
    assert {toy.answer_rank(ex1, [*p, EOS]) for p in perms} == set(range(toy.num_correct_answers))


def test_make_task_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="config.task.name='nope': unknown task; valid: ") as e:
        tasks.get("nope")
    assert all(name in str(e.value) for name in ("toy", "toy_sorted", "math"))
    with pytest.raises(ValueError, match="prompt_len"):
        tasks.ToyTask(num_values=2, prompt_len=3)
    with pytest.raises(ValueError, match="split"):
        tasks.ToyTask(num_values=3, prompt_len=3)  # a single value set: no eval split
