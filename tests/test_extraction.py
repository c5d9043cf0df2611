"""Answer extraction modes (`task.math.extraction`): "strict" (last \\boxed{}, else <answer>)
and "author" (also the reference grader's fallbacks: "answer is X", a trailing "= X", the last
line), on hand-written fallbacks and on real MATH Level-3 test answers."""

import json

import numpy as np
import pytest

from apo_jax.tasks import math as math_task
from apo_jax.tasks import rewards as R


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Thus the answer is 12.", "12"),
        (r"So the final answer is $\frac{1}{2}$.", r"\frac{1}{2}"),
        ("Answer: 7", "7"),
        ("**Final Answer:** **3**", "3"),
        ("x + y = 3 + 4 = 7", "7"),
        ("so $x = \\frac{3}{4}$.", r"\frac{3}{4}"),
        ("some work\n\n42\n", "42"),
        ("The answer is 6\nCheck: 2 + 4 = 6", "6"),  # "answer is" before the trailing "="
        ("The answer is 6\nthen more text", "6"),
        ("", None),
        ("  \n \n", None),
    ],
)
def test_author_fallbacks_and_strict_rejects_them(text, expected):
    assert R.extract_answer(text, "author") == expected
    assert R.extract_answer(text, "strict") is None
    assert R.extract_answer(text) is None  # strict is the default


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"the answer is 3, so \boxed{4}", "4"),
        ("<answer>9</answer>\nso x = 8", "9"),
        (r"\boxed{3} and finally \boxed{12", None),  # truncated last box: wrong in both
    ],
)
def test_boxed_and_tag_take_precedence_in_both_modes(text, expected):
    if expected is None:  # a cut-off box: the author mode falls back to the last line
        assert R.extract_answer(text, "strict") is None
        assert R.extract_answer(text, "author") == r"\boxed{3} and finally \boxed{12"
        return
    assert R.extract_answer(text, "strict") == R.extract_answer(text, "author") == expected


def test_unknown_mode_and_config_check():
    with pytest.raises(ValueError, match="extraction"):
        R.extract_answer("x", "loose")
    with pytest.raises(ValueError, match="config.task.math.extraction='loose'"):
        math_task._check({**math_task.DEFAULTS, "extraction": "loose"})
    math_task._check({**math_task.DEFAULTS, "extraction": "author"})


@pytest.fixture(scope="module")
def l3_answers(shared_data):
    with open(shared_data / "math" / "math_test_level3.jsonl") as f:
        rows = [json.loads(line) for _, line in zip(range(40), f, strict=False)]
    return [r["answer"] for r in rows]


def test_both_modes_on_real_level3_answers(l3_answers):
    """Every real answer written four ways: boxed (right in both modes) and three fallback
    forms (right only in author mode); a wrong fallback answer stays wrong in both."""
    forms = {
        "boxed": lambda a: f"<think>work</think> so it is $\\boxed{{{a}}}$.",
        "answer_is": lambda a: f"<think>work</think>\nTherefore, the answer is ${a}$.",
        "equals": lambda a: f"We simplify.\nSo the result = {a}",
        "last_line": lambda a: f"Some steps here.\n\n{a}\n",
    }
    comps, golds, kinds = [], [], []
    for a in l3_answers:
        for name, fmt in forms.items():
            if name == "equals" and "=" in a:  # the right-hand side would lose part of it
                continue
            comps.append(fmt(a))
            golds.append(a)
            kinds.append(name)
    comps.append("The answer is 1000001.")  # wrong in both
    golds.append(l3_answers[0])
    kinds.append("wrong")
    kinds = np.asarray(kinds)
    with R.RewardPool(num_workers=2, timeout_s=10.0) as pool:
        _, strict = pool.score(comps, golds, "correct", "strict")
        _, author = pool.score(comps, golds, "correct", "author")
    boxed, fallback = kinds == "boxed", (kinds != "boxed") & (kinds != "wrong")
    assert strict[boxed].all() and author[boxed].all()
    assert not strict[fallback].any()
    failed = [c for c, ok in zip(comps, author, strict=True) if not ok and "1000001" not in c]
    assert author[fallback].all(), failed
    assert not strict[kinds == "wrong"].any() and not author[kinds == "wrong"].any()
    assert fallback.sum() > 100
