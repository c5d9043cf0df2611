"""Tests for prompt datasets, Qwen3 chat formatting, the checkpointable order and MathTask
(tasks/datasets.py, order.py, math.py), on the real MATH / GSM8K files and the Qwen3 tokenizer
in ../shared/data."""

import json

import numpy as np
import pytest

from apo_jax import tasks
from apo_jax.tasks import datasets, order
from apo_jax.tasks import math as data

IM_END, ENDOFTEXT = 151645, 151643


@pytest.fixture(scope="module")
def tokenizer(shared_data):
    return data.load_tokenizer(shared_data / "qwen3")


@pytest.fixture(scope="module")
def math_task(shared_data):
    # Serial rewards (no worker processes) keep this fast; the pool is tested in test_rewards.
    load = lambda name: datasets.load_math(shared_data / "math" / name, levels=3).problems
    return data.MathTask(
        load("math_train.jsonl"),
        load("math_test.jsonl"),
        data.load_tokenizer(shared_data / "qwen3"),
        max_prompt_len=256,
        reward_workers=0,
    )


def _template_ids(tokenizer, messages, enable_thinking):
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, enable_thinking=enable_thinking, tokenize=True
    )
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# --- loading -------------------------------------------------------------------------------------


def test_level_and_subject_filters(shared_data):
    math_dir = shared_data / "math"
    assert len(datasets.load_math(math_dir / "math_train.jsonl", levels=3)) == 1592
    assert len(datasets.load_math(math_dir / "math_test.jsonl", levels=[3])) == 1131
    algebra = datasets.load_math(math_dir / "math_train.jsonl", levels=3, subjects="algebra")
    assert len(algebra) == 392 and {p.subject for p in algebra} == {"Algebra"}
    both = datasets.load_math(
        math_dir / "math_train.jsonl", levels=3, subjects=["Geometry", "Precalculus"]
    )
    assert len(both) == 129 + 168
    everything = datasets.load_math(math_dir / "math_train.jsonl")
    assert sum(p.level is None for p in everything) == 2  # "Level ?"
    # Of the 7,500 rows, two (lines 5530 and 5532, Level 5) have an empty answer: skipped.
    assert len(everything) == 7498 and everything.num_skipped == 2
    assert everything[0].uid.startswith("train/") and everything[0].answer
    with pytest.raises(ValueError, match="unknown subject.*Algebra"):
        datasets.load_math(math_dir / "math_train.jsonl", subjects="Algebr")


def test_math500_and_gsm8k(shared_data):
    m500 = datasets.load_math500(shared_data / "math" / "math500_test.jsonl", levels=3)
    assert len(m500) == 105
    gsm = datasets.load_gsm8k(shared_data / "gsm8k" / "test.jsonl")
    assert len(gsm) == 1319 and gsm[0].answer == "18"
    assert all(p.answer.lstrip("-").replace(".", "").isdigit() for p in gsm)  # no commas left


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"problem": "1+1?", "answer": "2", "level": "Level 1", "type": "Algebra"}
    lines = [json.dumps(good), "", "{not json", json.dumps({"problem": "no answer"}), "[1, 2]"]
    path.write_text("\n".join([*lines, json.dumps(good)]) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:3 .*not valid JSON"):
        datasets.load_math(path)
    loaded = datasets.load_math(path, skip_malformed=True)
    assert len(loaded) == 2 and loaded.num_skipped == 3
    assert loaded[1].uid == "bad/6"  # no unique_id: file stem and line number
    path.write_text(json.dumps(good) + "\n" + json.dumps({"problem": "x"}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2 .*missing field.*answer"):
        datasets.load_math(path)
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match=rf"{gsm}:1 .*####"):
        datasets.load_gsm8k(gsm)


def test_missing_files_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="MATH JSONL.*problem, answer.*Hendrycks MATH"):
        datasets.load_math(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="GSM8K"):
        datasets.load_gsm8k(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        data.load_tokenizer(tmp_path)


def test_parquet_needs_pyarrow_or_reads(tmp_path):
    path = tmp_path / "rows.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            datasets.load_math(path)
        return
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1?", "answer": "2", "level": 1}]), path)
    assert datasets.load_math(path)[0].answer == "2"


# --- chat formatting -----------------------------------------------------------------------------


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_prompt_ids_match_apply_chat_template(shared_data, tokenizer, enable_thinking):
    problems = datasets.load_math(shared_data / "math" / "math_test_level3.jsonl")[:20]
    questions = [p.question for p in problems]
    ids = data.format_prompts(tokenizer, questions, enable_thinking=enable_thinking)
    for q, got in zip(questions, ids, strict=True):
        assert got == _template_ids(tokenizer, data.chat_messages(q), enable_thinking)
    no_system = data.format_prompts(tokenizer, questions[:2], system_prompt=None)
    messages = [{"role": "user", "content": questions[0]}]
    assert no_system[0] == _template_ids(tokenizer, messages, True)
    tail = tokenizer.encode(
        "<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n")
    )
    assert ids[0][-len(tail) :] == tail
    assert "boxed" in data.SYSTEM_PROMPT and "<answer>" in data.SYSTEM_PROMPT


def test_left_truncation_keeps_the_tail(tokenizer):
    question = "Compute " + " + ".join(str(i) for i in range(200)) + "."
    full = data.format_prompts(tokenizer, [question])[0]
    cut = data.format_prompts(tokenizer, [question], max_prompt_len=64)[0]
    assert len(full) > 64 and cut == full[-64:]


# --- order ---------------------------------------------------------------------------------------


def test_epoch_order_is_a_deterministic_permutation():
    a = order.epoch_order(50, seed=1, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    np.testing.assert_array_equal(a, order.epoch_order(50, seed=1, epoch=0))
    assert not np.array_equal(a, order.epoch_order(50, seed=1, epoch=1))
    assert not np.array_equal(a, order.epoch_order(50, seed=2, epoch=0))
    with pytest.raises(ValueError):
        a[0] = 3  # the cached order is read-only


def test_global_batches_resume_and_cover_each_epoch_once():
    n, seed, bs = 10, 7, 4
    one_call = order.global_batch_indices(n, seed, position=6, batch_size=8)  # crosses epoch 0->1
    split = np.concatenate(
        [order.global_batch_indices(n, seed, 6, 3), order.global_batch_indices(n, seed, 9, 5)]
    )
    np.testing.assert_array_equal(one_call, split)
    stream = np.concatenate([order.global_batch_indices(n, seed, p, bs) for p in range(0, 40, bs)])
    for e in range(4):
        epoch = stream[e * n : (e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n))
        np.testing.assert_array_equal(epoch, order.epoch_order(n, seed, e))


def test_process_slices_partition_the_batch():
    batch = order.global_batch_indices(1592, seed=0, position=1590, batch_size=48)
    parts = [order.process_slice(batch, i, 4) for i in range(4)]
    assert all(len(p) == 12 for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    with pytest.raises(ValueError, match="evenly"):
        order.process_slice(batch, 0, 5)


# --- MathTask ------------------------------------------------------------------------------------


def test_math_task_interface(math_task, tokenizer):
    assert isinstance(math_task, tasks.Task)
    assert len(math_task.train_examples()) == 1592 and len(math_task.eval_examples()) == 1131
    assert math_task.vocab_size == len(tokenizer) == 151669
    assert math_task.eos_ids == (IM_END, ENDOFTEXT) and math_task.pad_id == ENDOFTEXT
    ex = math_task.train_examples()[0]
    assert (
        ex.uid.startswith("train/")
        and max(len(e.prompt_ids) for e in math_task.train_examples()) <= 256
    )
    assert "<|im_start|>assistant" in math_task.decode(ex.prompt_ids)


def test_math_task_rewards(math_task, tokenizer):
    ex = math_task.eval_examples()[0]
    right = tokenizer.encode(f"<think>ok</think><answer>\\boxed{{{ex.answer}}}</answer>")
    wrong = tokenizer.encode("<think>ok</think><answer>\\boxed{-12345}</answer>")
    completions = [right + [IM_END, ENDOFTEXT, ENDOFTEXT], wrong + [IM_END], right]
    r = math_task.rewards([ex] * 3, completions)
    assert r.dtype == np.float32 and r[0] == 1.0 and r[2] == 1.0
    assert 0 < r[1] < 0.1  # good_accuracy: a small length bonus for a wrong answer
    assert math_task.completion_texts([right + [IM_END] + wrong])[0].endswith("</answer>")


# --- files that are not what they claim -----------------------------------------------------------


def test_non_utf8_line_is_named_and_bom_is_accepted(tmp_path):
    good = json.dumps({"problem": "1+1?", "answer": "2", "level": "Level 1", "type": "Algebra"})
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good.encode() + b"\n" + good.replace("1+1", "caf\xe9").encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}:2 .*not UTF-8"):
        datasets.load_math(path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n" + good.encode() + b"\n")
    loaded = datasets.load_math(bom)
    assert [p.question for p in loaded] == ["1+1?", "1+1?"]


def test_tokenizer_config_without_vocabulary_is_refused(shared_data, tmp_path):
    (tmp_path / "tokenizer_config.json").write_bytes(
        (shared_data / "qwen3" / "tokenizer_config.json").read_bytes()
    )
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}: no tokenizer\.json"):
        data.load_tokenizer(tmp_path)


def test_slow_tokenizer_files_are_accepted(shared_data, tokenizer, tmp_path):
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((shared_data / "qwen3" / name).read_bytes())
    slow = data.load_tokenizer(tmp_path)
    text = "Compute $\\dfrac{7}{8} - 0.125$."
    assert slow.encode(text) == tokenizer.encode(text)


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", *data._CHAT_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_check_tokenizer_rejects_tiny_or_lossy_vocabularies():
    with pytest.raises(ValueError, match=r"where: the tokenizer has only 30 tokens"):
        data.check_tokenizer(_word_tokenizer([f"w{i}" for i in range(26)]), "where")
    lossy = _word_tokenizer([f"w{i}" for i in range(2000)])  # MATH symbols all map to [UNK]
    with pytest.raises(ValueError, match=r"where: the tokenizer does not round-trip"):
        data.check_tokenizer(lossy, "where")


def test_math_prompts_round_trip_through_the_real_tokenizer(tokenizer, math_task):
    data.check_tokenizer(tokenizer, "qwen3")  # the shipped tokenizer passes
    ex = math_task.eval_examples()[0]
    text = math_task.decode(ex.prompt_ids)
    assert tokenizer.encode(text, add_special_tokens=False) == list(ex.prompt_ids)
