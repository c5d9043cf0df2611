"""DAPO dynamic sampling filters on correctness (spec §5.16; verl `filter_groups.metric=acc`),
with shaped (`good_accuracy`) and overlong-penalised rewards, and the refill loop itself on a
scripted sampler over the toy task."""

import jax
import numpy as np
import pytest

from apo_jax.tasks import order as order_lib
from apo_jax.tasks import rewards as rewards_lib
from apo_jax.tasks import toy
from apo_jax.trainer import build, loop
from configs import toy as toy_config

# The issue's two groups of 6 (max 1280 tokens, 256-token buffer): both must be dropped.
WRONG_SHAPED = np.asarray([-0.5, 0.0055, -0.5, -0.5, 0.025, 0.1], np.float32)
CORRECT_LENGTHS = np.asarray([500, 1000, 1101, 1200, 1249, 1280])


def test_issue_groups_are_dropped_on_correctness_not_reward():
    correct_rewards = 1.0 + rewards_lib.overlong_penalty(CORRECT_LENGTHS, 1280, 256)
    np.testing.assert_allclose(correct_rewards, 1 + np.asarray([0, 0, -0.30, -0.69, -0.88, -1]),
                               atol=0.005)  # fmt: skip
    rewards = np.stack([WRONG_SHAPED, correct_rewards, WRONG_SHAPED])  # [3, 6]
    correct = np.asarray([[0] * 6, [1] * 6, [0, 0, 1, 0, 0, 0]], bool)
    # the rewards differ within every group, so a reward-based filter would keep all three
    assert (rewards.max(-1) > rewards.min(-1)).all()
    np.testing.assert_array_equal(loop.dynamic_sampling_keep(correct), [False, False, True])


def test_filter_keeps_exactly_the_groups_with_0_lt_correct_lt_g():
    """Brute force over every pattern of G = 5: kept iff some but not all are correct."""
    g = 5
    patterns = (np.arange(2**g)[:, None] >> np.arange(g)) & 1  # [32, 5]
    keep = loop.dynamic_sampling_keep(patterns.astype(bool))
    for pat, k in zip(patterns, keep, strict=True):
        assert k == (0 < pat.sum() < g)


def test_shaped_rewards_carry_correctness_from_the_pool():
    """good_accuracy on real texts: wrong answers get small varied rewards, correct ones 1; the
    pool's `correct` is the verified outcome, not reward >= some threshold."""
    texts = [
        "I think \\boxed{3}",
        "let me compute this carefully: \\boxed{7}",
        "a b c d a b c d a b c d a b c d \\boxed{2}",  # repetitive: -0.5
        "so \\boxed{4}",
        "the answer is 4",  # strict: no boxed, so wrong; author: correct
    ]
    with rewards_lib.RewardPool(num_workers=0, timeout_s=None) as pool:  # no timeouts: exact
        rewards, correct = pool.score(texts, ["4"] * 5, "good_accuracy")
        _, author = pool.score(texts, ["4"] * 5, "good_accuracy", "author")
    np.testing.assert_array_equal(correct, [False, False, False, True, False])
    np.testing.assert_array_equal(author, [False, False, False, True, True])
    assert rewards[3] == 1.0 and rewards[2] == -0.5 and 0 < rewards[0] < 0.1
    assert len(set(rewards[:3].tolist())) == 3  # all wrong, all different


# ------------------------------------------------------------------------- the refill loop


def _kind(prompt_ids) -> int:
    """0: every completion correct, 1: none, 2: mixed (a fixed function of the prompt)."""
    return sum(prompt_ids) % 3


class _ScriptedSampler:
    """Completions scripted per prompt kind on the toy task; lengths (for the overlong penalty)
    grow along the group so all-correct groups still get different rewards."""

    engine = "static"  # one call per chunk, rows reported to on_finished at the end

    def __init__(self, max_new_tokens):
        self.t, self.calls = max_new_tokens, 0

    def sample(self, params, prompts, *, n, rng, row_ids, on_finished=None):
        self.calls += 1
        rows = []
        for p in prompts:
            values = list(p[:-1])  # prompt = values + SEP
            for j in range(n):
                right = _kind(p) == 0 or (_kind(p) == 2 and j == 0)
                comp = values if right else values[: j % len(values)]  # partial credit
                rows.append(comp + [toy.EOS_ID])
        tokens = np.full((len(rows), self.t), toy.PAD_ID, np.int32)
        mask = np.zeros_like(tokens, bool)
        for i, row in enumerate(rows):
            tokens[i, : len(row)], mask[i, : len(row)] = row, True
        lengths = np.asarray([min(len(prompts[0]) + j, self.t) for j in range(n)] * len(prompts))
        zeros = np.zeros(tokens.shape, np.float32)
        if on_finished is not None:
            on_finished(np.arange(len(rows)), [t[m] for t, m in zip(tokens, mask, strict=True)])
        width = max(len(p) for p in prompts)
        prompt_ids = np.asarray(
            [[0] * (width - len(p)) + list(p) for p in prompts for _ in range(n)]
        )
        prompt_mask = np.asarray(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts for _ in range(n)]
        )
        return type("Out", (), dict(tokens=tokens, mask=mask, lengths=lengths, logp=zeros,
                                    truncated=np.zeros(len(rows), bool), prompt_ids=prompt_ids,
                                    prompt_mask=prompt_mask))  # fmt: skip


def _plan(max_refill_rounds):
    c = toy_config.get_config("debug")
    c.rollout.prompts_per_step, c.rollout.group_size = 4, 4
    c.rollout.dynamic_sampling, c.rollout.max_refill_rounds = True, max_refill_rounds
    c.rollout.overlong_buffer = 4  # max_new_tokens 8: lengths 5..8 get 0 .. -1
    return build.plan(c)


def _expected_rounds(p, task, need_groups):
    """Rounds until enough mixed groups were seen, from the data order alone."""
    train, have, position = task.train_examples(), 0, 0
    for round_ in range(p.rollout.max_refill_rounds + 1):
        order = order_lib.global_batch_indices(len(train), p.seed, position, 4)
        position += 4
        have += sum(_kind(train[i].prompt_ids) == 2 for i in order)
        if have >= need_groups:
            return round_, 0, position
    return round_, need_groups - have, position


@pytest.mark.parametrize("max_refill_rounds", [0, 10])
def test_refill_loop_keeps_only_mixed_groups(max_refill_rounds):
    p = _plan(max_refill_rounds)
    r, g = p.rollout, p.rollout.group_size
    task = build.task(p)
    sampler = _ScriptedSampler(r.max_new_tokens)
    train = task.train_examples()
    order = order_lib.global_batch_indices(len(train), p.seed, 0, 4)
    rng = jax.random.key(0)
    batch = loop.rollout(r, task, sampler, None, [train[i] for i in order], np.arange(4), rng)
    groups = batch.rewards.reshape(-1, g)
    kinds = [_kind(train[i].prompt_ids) for i in order]
    for k, rw in zip(kinds, groups, strict=True):  # rewards differ in every group (overlong
        assert rw.max() > rw.min(), k  # penalty on all-correct ones, partial credit otherwise)
    out, position, info = loop.refill(p, task, sampler, None, batch, 4, rng)
    rounds, short, end = _expected_rounds(p, task, 4)
    assert info == {"rollout/refill_rounds": float(rounds), "rollout/refill_short": float(short)}
    assert position == end and sampler.calls == 1 + rounds
    assert len(out.rewards) == 4 * g
    correct = out.correct.reshape(-1, g)
    n_mixed = 4 - short
    np.testing.assert_array_equal(loop.dynamic_sampling_keep(correct)[:n_mixed], True)
    np.testing.assert_array_equal(loop.dynamic_sampling_keep(correct)[n_mixed:], False)
    # rows stay grouped: one prompt per group, rewards and correctness agree with the task
    prompts = out.prompt_ids.reshape(4, g, -1)
    assert (prompts == prompts[:, :1]).all()
    penalty = rewards_lib.overlong_penalty(out.lengths, r.max_new_tokens, r.overlong_buffer)
    np.testing.assert_array_equal(out.correct, out.rewards - penalty >= 1.0)
