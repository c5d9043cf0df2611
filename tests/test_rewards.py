"""Tests for host-side rewards (rewards.py): extraction, equivalence on real MATH answers, the
timeout, good_accuracy branches, DAPO overlong shaping, and the process pool."""

import concurrent.futures
import gc
import json
import re
import sys
import time
from fractions import Fraction

import numpy as np
import pytest

from apo_jax.tasks import rewards as R

# Hangs for minutes in sympy without a timeout (a tower of powers evaluated exactly).
PATHOLOGICAL = r"10^{10^{10^{10}}}"


@pytest.fixture(scope="module")
def math_rows(shared_data):
    with open(shared_data / "math" / "math_test_level3.jsonl") as f:
        return [json.loads(line) for _, line in zip(range(40), f, strict=False)]


@pytest.fixture(scope="module")
def pool():
    with R.RewardPool(num_workers=2, timeout_s=10.0) as p:
        yield p


def _number(answer: str) -> Fraction | None:
    """The value of an integer or \\frac{p}{q} answer, else None."""
    if re.fullmatch(r"-?\d+", answer):
        return Fraction(int(answer))
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    return Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1) if m else None


def _rewrites(answer: str) -> list[str]:
    """Equivalent ways a model may write the answer."""
    out = [answer.replace("\\frac", "\\dfrac"), answer.replace(",", ", ").replace("+", " + ")]
    value = _number(answer)
    if value is not None and value.denominator == 1:
        out.append(f"{value.numerator}.0")
    elif value is not None:
        out.append(f"{value.numerator}/{value.denominator}")
        if 2**10 * 5**10 % value.denominator == 0:  # terminating decimal, e.g. 1/4 -> 0.25
            out.append(str(float(value)))
    return out


def _wrong(answer: str) -> str | None:
    value = _number(answer)
    if value is None:
        return None
    wrong = value + 1
    return (
        str(wrong.numerator)
        if wrong.denominator == 1
        else f"\\frac{{{wrong.numerator}}}{{{wrong.denominator}}}"
    )


# --- extraction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{1} then \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{\left\{ x^{2} \right\}}", r"\left\{ x^{2} \right\}"),
        (r"nested \boxed{\frac{\sqrt{3}}{{2}}} end", r"\frac{\sqrt{3}}{{2}}"),
        (r"$\boxed 5$", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces are not grouping
        (r"\boxed{3} and finally \boxed{12", None),  # the last one is truncated
        ("<think>hmm</think> <answer> 42 </answer>", "42"),
        (r"<answer>7</answer> but \boxed{8}", "8"),  # boxed wins over the tag
        ("no answer here", None),
        (r"\boxedx{3}", None),  # a different command
    ],
)
def test_extract_answer(text, expected):
    assert R.extract_answer(text) == expected


# --- equivalence on real MATH answers ------------------------------------------------------------


def test_real_answers_and_rewrites_score_one(math_rows, pool):
    completions, answers = [], []
    for row in math_rows:
        for form in [row["answer"], *_rewrites(row["answer"])]:
            completions.append(f"<think>work</think> The answer is $\\boxed{{{form}}}$.")
            answers.append(row["answer"])
    rewards = pool.rewards(completions, answers, "correct")
    failed = [c for c, r in zip(completions, rewards, strict=True) if r != 1.0]
    assert not failed, failed
    assert len(completions) > 2 * len(math_rows)


def test_wrong_answers_score_zero(math_rows, pool):
    pairs = [(w, row["answer"]) for row in math_rows if (w := _wrong(row["answer"])) is not None]
    pairs += [("(15,11)", "(15,-11)"), ("x^3 + 2x^2 + 2x", "x^3 + 2x^2 + x")]
    assert len(pairs) > 25
    comps = [f"\\boxed{{{w}}}" for w, _ in pairs]
    assert pool.rewards(comps, [a for _, a in pairs], "correct").tolist() == [0.0] * len(pairs)


def test_common_rewrites_in_process():
    same = lambda pred, gold: R.check_answer(pred, gold) == R.CORRECT
    assert same("0.5", r"\frac{1}{2}")
    assert same(r"\dfrac{1}{2}", r"\frac{1}{2}")
    assert same(r"\frac12", r"\frac{1}{2}")
    assert same("( 3 , 4 )", "(3,4)")
    assert same(r"\$15,\!000", "15000")
    assert not same("3", "2")
    assert R.good_accuracy(r"<answer>\frac{1}{2}</answer>", "0.5") == 1.0
    assert R.good_accuracy("The answer is 0.5", "0.5") < 1.0  # no boxed, no tag


def test_pool_matches_serial_and_keeps_order(math_rows, pool):
    rng = np.random.default_rng(0)
    answers = [r["answer"] for r in math_rows]
    picks = [answers[i] for i in rng.integers(0, len(answers), size=len(answers))]
    comps = [f"... \\boxed{{{p}}} " + "step " * int(k) for k, p in enumerate(picks)]
    with R.RewardPool(num_workers=0) as in_process:
        serial = in_process.rewards(comps, answers, "good_accuracy")
    parallel = pool.rewards(comps, answers, "good_accuracy")
    np.testing.assert_array_equal(serial, parallel)
    assert 0 < (serial == 1.0).sum() < len(serial)  # a mix of hits and misses, in input order


# --- timeouts ------------------------------------------------------------------------------------


def test_soft_timeout_interrupts_pathological_latex():
    start = time.monotonic()
    assert R.check_answer(PATHOLOGICAL, "5", timeout_s=0.3) == R.TIMED_OUT
    assert time.monotonic() - start < 5.0
    assert R.good_accuracy(rf"\boxed{{{PATHOLOGICAL}}}", "5", timeout_s=0.3) < 1.0


def test_pool_timeout_in_worker_and_from_a_thread():
    comps = [rf"\boxed{{{PATHOLOGICAL}}}", r"\boxed{5}", r"\boxed{6}"]
    preds = [R.extract_answer(c) for c in comps]
    with (
        R.RewardPool(num_workers=1, timeout_s=1.5) as p,
        concurrent.futures.ThreadPoolExecutor(1) as ex,  # signals never reach this thread
    ):
        codes = ex.submit(p.check, preds, ["5"] * 3).result(timeout=60)
    assert codes.tolist() == [R.TIMED_OUT, R.CORRECT, R.WRONG]


def test_hard_timeout_restarts_the_pool():
    # No soft timeout: the worker really hangs, so only the parent's watchdog can free it.
    with R.RewardPool(num_workers=1, timeout_s=None, hard_timeout_s=1.0) as p:
        start = time.monotonic()
        codes = p.check([PATHOLOGICAL, "5", "4"], ["5", "5", "5"])
        assert codes.tolist() == [R.TIMED_OUT, R.CORRECT, R.WRONG]
        assert p.num_timeouts == 1
        assert time.monotonic() - start < 30


@pytest.fixture
def busy_gc_callback():
    """A garbage-collection callback that spends 10 ms per call, like JAX's _xla_gc_callback
    under load: an alarm that lands in it raises inside the callback, where CPython prints the
    exception ("Exception ignored in ...") and swallows it."""

    def callback(phase, info):
        t = time.perf_counter()
        while time.perf_counter() - t < 0.01:
            pass

    # pytest's own hook records swallowed exceptions, and would itself be hit by alarms.
    hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
    # Only this callback: JAX's own one spends its time in C++ with the GIL held, where no
    # signal can act (up to ~0.6 s per collection here), which would make the timing noisy.
    others = gc.callbacks[:]
    gc.callbacks[:] = [callback]
    threshold = gc.get_threshold()
    gc.set_threshold(50)  # collect often, so most of the time is spent in the callback
    yield
    gc.set_threshold(*threshold)
    gc.callbacks[:] = others
    sys.unraisablehook = hook


def test_deadline_holds_under_a_busy_garbage_collector(monkeypatch, busy_gc_callback):
    def gc_heavy_verify(pred, gold):  # 2/3 of the time inside gc callbacks; gives up at 20 s
        end = time.monotonic() + 20.0
        while time.monotonic() < end:
            gc.collect(0)  # young generation: quick, so the time goes to the callbacks
            t = time.perf_counter()
            while time.perf_counter() - t < 0.01:
                pass
        return True

    monkeypatch.setattr(R, "_verify", gc_heavy_verify)
    for _ in range(3):  # a lost alarm is likely each time: without re-arming, ~20 s per call
        start = time.monotonic()
        assert R.check_answer("x", "y", timeout_s=0.5) == R.TIMED_OUT
        assert time.monotonic() - start < 0.5 + 1.5


def test_deadline_holds_on_a_deep_frac_nest_under_a_busy_garbage_collector(busy_gc_callback):
    deep = "\\frac{1}{" * 5000 + "2" + "}" * 5000
    start = time.monotonic()
    assert R.check_answer(deep, "1", timeout_s=1.0) == R.TIMED_OUT
    assert time.monotonic() - start < 1.0 + 1.5


def test_pool_deadline_holds_on_a_deep_frac_nest():
    deep = "\\frac{1}{" * 5000 + "2" + "}" * 5000
    with R.RewardPool(num_workers=1, timeout_s=1.0) as p:
        assert p.hard_timeout_s == 1.0 + R.HARD_GRACE_S  # the parent enforces it too
        p.check(["1"], ["1"])  # start the worker outside the timed part
        start = time.monotonic()
        codes = p.check([deep, "5"], ["1", "5"])
        assert codes.tolist() == [R.TIMED_OUT, R.CORRECT]
        assert time.monotonic() - start < 1.0 + R.HARD_GRACE_S + 1.0


# --- shaped rewards ------------------------------------------------------------------------------


def test_repetition_rate():
    assert R.repetition_rate("a b c") == 0.0  # fewer than 4 words
    assert R.repetition_rate("a b c d e f") == 0.0
    assert R.repetition_rate("x x x x x x") == pytest.approx(2 / 3)  # 3 four-grams, 1 unique
    assert R.repetition_rate("A b c d a B C D") == pytest.approx(1 / 5)  # case-insensitive


def test_good_accuracy_branches():
    assert R.good_accuracy(r"long text \boxed{\frac{1}{2}}", "0.5") == 1.0
    short = r"I think \boxed{3}"  # wrong, no repetition: length bonus only
    assert R.good_accuracy(short, "2") == pytest.approx(len(short) / 2000)
    long = " ".join(f"w{i}" for i in range(200)) + r" \boxed{3}"  # > 200 chars: bonus capped
    assert R.good_accuracy(long, "2") == pytest.approx(0.1)
    mild = r"a b c d e f g h a b c d \boxed{3}"  # 10 four-grams, 9 unique: rep = 0.1
    assert R.good_accuracy(mild, "2") == pytest.approx(len(mild) / 2000 - 0.25 * 0.1)
    loop = "again " * 50 + r"\boxed{3}"  # rep > 0.3
    assert R.good_accuracy(loop, "2") == -0.5
    assert R.good_accuracy("again " * 50 + r"\boxed{2}", "2") == 1.0  # correct beats repetition
    assert R.shaped_reward("", correct=False) == 0.0


def test_unknown_reward_name():
    with pytest.raises(ValueError, match="unknown reward 'acc'.*good_accuracy.*correct"):
        R.RewardPool(num_workers=0).rewards(["x"], ["1"], "acc")


def test_overlong_penalty():
    max_len, cache = 1280, 256
    assert R.overlong_penalty(100, max_len, cache) == 0.0
    assert R.overlong_penalty(max_len - cache, max_len, cache) == 0.0
    assert R.overlong_penalty(max_len - cache // 2, max_len, cache) == pytest.approx(-0.5)
    assert R.overlong_penalty(max_len, max_len, cache) == pytest.approx(-1.0)
    assert R.overlong_penalty(max_len + 5, max_len, cache) == -1.0
    out = R.overlong_penalty(np.array([0, 1152, 1280, 2000]), max_len, cache, factor=0.5)
    assert out.dtype == np.float32 and out.tolist() == [0.0, -0.25, -0.5, -0.5]
    assert R.overlong_penalty(1281, 1280, 0) == -1.0  # no buffer: a hard cliff
    with pytest.raises(ValueError, match="cache_len"):
        R.overlong_penalty(10, 100, 200)
