"""The MATH task: Qwen3 chat formatting with left truncation, the tokenizer and its stop tokens,
and `MathTask` (the `base.Task` interface over math problems with verified rewards)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from apo_jax.tasks import base, datasets, registry
from apo_jax.tasks import rewards as rewards_lib

SYSTEM_PROMPT = (
    "You are a careful mathematician. Reason step by step inside <think> </think>, then give "
    "the final answer inside <answer> </answer>, writing the final result as \\boxed{...}."
)

# --- chat formatting -----------------------------------------------------------------------------


# What a real tokenizer needs on disk: its config plus the vocabulary, either as the fast
# tokenizer.json or as one of the slow tokenizers' file sets (BPE, SentencePiece, WordPiece).
_TOKENIZER_VOCAB_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")  # Qwen3's chat template
MIN_VOCAB = 1000  # any real subword vocabulary is far larger; 26 = only the special tokens
_ROUND_TRIP = "Find $x$ if $\\frac{2}{3}x + 5 = 11$, then write $\\sqrt{x^2}$ as \\boxed{x}."


def load_tokenizer(path: str | os.PathLike | None = None):
    """A Hugging Face tokenizer from a local directory (a Qwen3 model directory works); default
    DEFAULT_DATA_DIR/qwen3. Never touches the network. Raises naming the directory and file if
    the files a real tokenizer needs are missing, or if what loads fails `check_tokenizer`
    (transformers otherwise builds a special-tokens-only tokenizer from the config alone)."""
    path = Path(path) if path is not None else datasets.DEFAULT_DATA_DIR / "qwen3"
    help_text = (
        "pass a directory holding a Qwen3 tokenizer (tokenizer.json + tokenizer_config.json), "
        "e.g. a Qwen/Qwen3-1.7B model directory"
    )
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer_config.json; {help_text}")
    if not any(all((path / f).is_file() for f in files) for files in _TOKENIZER_VOCAB_FILES):
        raise FileNotFoundError(
            f"{path}: no tokenizer.json (nor the slow-tokenizer files vocab.json + merges.txt "
            f"or tokenizer.model); tokenizer_config.json alone is not a tokenizer; {help_text}"
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a damaged file, named
        if (path / name).is_file():
            try:
                with open(path / name, "rb") as f:
                    json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(
                    f"{path / name}: not valid JSON ({e}); the file is damaged or truncated: "
                    f"copy it again; {help_text}"
                ) from None
    from transformers import AutoTokenizer  # lazy: slow import

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 (transformers and tokenizers raise many types)
        raise ValueError(
            f"{path}: the tokenizer does not load ({type(e).__name__}: {e}); {help_text}"
        ) from None
    check_tokenizer(tokenizer, str(path))
    return tokenizer


def check_tokenizer(tokenizer, where: str) -> None:
    """Raises ValueError (naming `where`) unless the tokenizer has a real vocabulary, the Qwen3
    chat special tokens, and round-trips a MATH-style prompt (encode then decode is identity)."""
    if len(tokenizer) < MIN_VOCAB:
        raise ValueError(
            f"{where}: the tokenizer has only {len(tokenizer)} tokens (< {MIN_VOCAB}); its "
            "vocabulary files are missing or broken"
        )
    vocab = tokenizer.get_vocab()
    if missing := [t for t in _CHAT_TOKENS if t not in vocab]:
        raise ValueError(f"{where}: the tokenizer lacks the chat special token(s) {missing}")
    ids = tokenizer.encode(_ROUND_TRIP, add_special_tokens=False)
    back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if back != _ROUND_TRIP:
        raise ValueError(
            f"{where}: the tokenizer does not round-trip a MATH prompt: {_ROUND_TRIP!r} "
            f"-> {len(ids)} ids -> {back!r}"
        )


def _end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template closes an assistant turn with (Qwen: <|im_end|>),
    found by rendering one assistant turn: the first special token after its text."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "MARKER7431"
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template that cannot render a plain turn names no end-of-turn token
        return None
    if marker not in text:
        return None
    tail = tokenizer(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return next((i for i in tail["input_ids"] if i in special), None)


def stop_token_ids(tokenizer, model_dir: str | os.PathLike | None = None) -> tuple[int, ...]:
    """The ids that end a completion, in order, without duplicates: `eos_token_id` of
    generation_config.json (in `model_dir`, else beside the tokenizer) when there is one, the chat
    template's end-of-turn token, the tokenizer's eos token, and its pad token (a model that emits
    the padding token has left the text: Qwen's pad <|endoftext|> is its end-of-document token).
    Qwen3: (151645 <|im_end|>, 151643 <|endoftext|>)."""
    ids: list[int] = []
    dirs = [d for d in (model_dir, getattr(tokenizer, "name_or_path", None)) if d]
    for d in dirs:
        path = Path(d) / "generation_config.json"
        if path.is_file():
            try:
                eos = json.loads(path.read_text()).get("eos_token_id")
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            ids += [eos] if isinstance(eos, int) else list(eos or [])
            break
    ids += [_end_of_turn_id(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id]
    out = tuple(dict.fromkeys(int(i) for i in ids if i is not None))
    if not out:
        raise ValueError(
            f"tokenizer {dirs[-1] if dirs else tokenizer!r}: no stop token found (no "
            "generation_config.json eos_token_id, chat-template end-of-turn, eos or pad token)"
        )
    return out


def chat_messages(question: str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [*system, {"role": "user", "content": question}]


def format_prompts(
    tokenizer,
    questions: Sequence[str],
    *,
    enable_thinking: bool = True,
    system_prompt: str | None = SYSTEM_PROMPT,
    max_prompt_len: int | None = None,
) -> list[list[int]]:
    """Token ids of each question in the chat template with the assistant turn opened.

    Same ids as `apply_chat_template(messages, add_generation_prompt=True, enable_thinking=...)`;
    rendered to text first so that all prompts go through the fast tokenizer in one batch.
    Prompts longer than `max_prompt_len` keep their tail (left truncation), as in the reference.
    """
    texts = [
        tokenizer.apply_chat_template(
            chat_messages(q, system_prompt),
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=enable_thinking,
        )
        for q in questions
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if max_prompt_len is not None:
        ids = [x[-max_prompt_len:] for x in ids]
    return ids


# --- the MATH task -------------------------------------------------------------------------------


class MathTask:
    """`base.Task` over math problems with the Qwen3 chat template and verified rewards.

    reward_name: "good_accuracy" (the author's shaped reward) or "correct" (0/1). Rewards are
    scored by a `rewards.RewardPool` of `reward_workers` processes, started on first use.
    """

    def __init__(
        self,
        train_problems: Sequence[datasets.Problem],
        eval_problems: Sequence[datasets.Problem],
        tokenizer,
        *,
        reward_name: str = "good_accuracy",
        max_prompt_len: int = 1024,
        enable_thinking: bool = True,
        system_prompt: str | None = SYSTEM_PROMPT,
        reward_workers: int = 4,
        extraction: str = "strict",
        name: str = "math",
        model_dir: str | os.PathLike | None = None,  # for its generation_config.json
    ):
        rewards_lib.validate_reward_name(reward_name)
        if extraction not in rewards_lib.EXTRACTIONS:
            raise ValueError(f"extraction must be one of {rewards_lib.EXTRACTIONS}")
        self.name, self.reward_name, self.tokenizer = name, reward_name, tokenizer
        check_tokenizer(tokenizer, getattr(tokenizer, "name_or_path", "") or "tokenizer")
        self.extraction = extraction
        self.vocab_size = len(tokenizer)
        self.eos_ids = stop_token_ids(tokenizer, model_dir)
        pad = tokenizer.pad_token_id
        self.pad_id = self.eos_ids[-1] if pad is None else pad
        fmt = dict(
            enable_thinking=enable_thinking,
            system_prompt=system_prompt,
            max_prompt_len=max_prompt_len,
        )
        self._train = self._examples(train_problems, fmt)
        self._eval = self._examples(eval_problems, fmt)
        self._pool = rewards_lib.RewardPool(reward_workers)

    def _examples(self, problems: Sequence[datasets.Problem], fmt: dict) -> list[base.Example]:
        ids = (
            format_prompts(self.tokenizer, [p.question for p in problems], **fmt)
            if problems
            else []
        )
        return [base.Example(tuple(x), p.answer, p.uid) for x, p in zip(ids, problems, strict=True)]

    def train_examples(self) -> Sequence[base.Example]:
        return self._train

    def eval_examples(self) -> Sequence[base.Example]:
        return self._eval

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)

    def completion_texts(self, completions: Sequence[Sequence[int]]) -> list[str]:
        """Response strings as graded: cut at the first EOS/PAD, special tokens dropped."""
        stop = (*self.eos_ids, self.pad_id)
        trimmed = [list(base.trim_completion(c, stop)) for c in completions]
        return self.tokenizer.batch_decode(trimmed, skip_special_tokens=True)

    def rewards(
        self, examples: Sequence[base.Example], completions: Sequence[Sequence[int]]
    ) -> np.ndarray:
        return self.score(examples, completions)[0]

    def score(
        self, examples: Sequence[base.Example], completions: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rewards, correct): correct is the reward pool's CORRECT outcome (verified answer)."""
        if len(examples) != len(completions):
            raise ValueError(
                f"rewards: {len(examples)} examples but {len(completions)} completions"
            )
        texts = self.completion_texts(completions)
        answers = [e.answer for e in examples]
        return self._pool.score(texts, answers, self.reward_name, self.extraction)

    def answer_keys(self, examples, completions) -> list[str]:
        """The final answer (strict extraction), whitespace-normalised."""
        texts = self.completion_texts(completions)
        return [" ".join((rewards_lib.extract_answer(t) or "").split()) for t in texts]

    def close(self) -> None:
        """Stops the reward workers (they are restarted if rewards are asked for again)."""
        self._pool.close()


# --- registration --------------------------------------------------------------------------------

EVAL_SETS = ("math", "math500", "gsm8k")

# config.task.math.*
DEFAULTS = dict(
    data_path="",  # training JSONL/Parquet; empty = $APO_JAX_DATA_DIR/math/math_train.jsonl
    eval_set="math",  # held-out set: math (MATH test, same level filter) | math500 | gsm8k
    eval_path="",  # held-out file; empty = the shared copy of eval_set
    tokenizer="",  # tokenizer dir; empty = model.hf_dir if it has one, else $APO_JAX_DATA_DIR/qwen3
    level=3,  # keep MATH problems of this level, 1..5 (0 = all levels)
    reward="good_accuracy",  # good_accuracy (the author's shaped reward) | correct (0/1)
    # final answer: strict (last \boxed{}, else <answer>) | author (also "answer is X", a
    # trailing "= X", the last line: the reference grader's fallbacks)
    extraction="strict",
    enable_thinking=True,  # Qwen3 chat template thinking mode
)


def _named(key: str, load, *args, **kwargs):
    """`load(*args, **kwargs)`, its errors (a file's, with file:line) prefixed by the config key
    that gave the path."""
    try:
        return load(*args, **kwargs)
    except (OSError, ValueError) as e:
        try:
            err = type(e)(f"config.{key}: {e}")
        except TypeError:  # an exception type with more arguments than a message
            err = ValueError(f"config.{key}: {e}")
        raise err from None


def _build(p, ctx: registry.TaskContext) -> MathTask:
    levels = (p["level"],) if p["level"] else None
    train = _named("task.math.data_path", datasets.load_math, p["data_path"] or None, levels=levels)
    held_out_loaders = {
        "math": functools.partial(datasets.load_math, split="test", levels=levels),
        "math500": datasets.load_math500,
        "gsm8k": datasets.load_gsm8k,
    }
    load_held_out = held_out_loaders[p["eval_set"]]
    held_out = _named("task.math.eval_path", load_held_out, p["eval_path"] or None)
    _require_problems(train, "data_path", p["level"])
    _require_problems(held_out, "eval_path", p["level"] if p["eval_set"] == "math" else 0)
    tokenizer, key = p["tokenizer"] or None, "task.math.tokenizer"
    if (
        tokenizer is None
        and ctx.model_dir
        and os.path.isfile(os.path.join(ctx.model_dir, "tokenizer.json"))
    ):
        tokenizer, key = ctx.model_dir, "model.hf_dir"
    return MathTask(
        train.problems,
        held_out.problems,
        _named(key, load_tokenizer, tokenizer),
        reward_name=p["reward"],
        max_prompt_len=ctx.max_prompt_len,
        enable_thinking=p["enable_thinking"],
        model_dir=ctx.model_dir or None,
        extraction=p["extraction"],
    )


def _require_problems(problems: datasets.ProblemSet, key: str, level: int) -> None:
    """An empty set fails here, before any model is built, naming the file and the filter."""
    if not len(problems):
        kept = f" of level {level} (config.task.math.level={level})" if level else ""
        skipped = (
            f"; {problems.num_skipped} record(s) skipped (malformed, or an empty problem or "
            "answer: see the warnings)"
            if problems.num_skipped
            else ""
        )
        raise ValueError(
            f"config.task.math.{key}: {problems.source} has no problems{kept}{skipped}"
        )


def _check(p) -> None:
    if p["eval_set"] not in EVAL_SETS:
        registry.fail("math.eval_set", p["eval_set"], f"valid: {', '.join(EVAL_SETS)}")
    if p["reward"] not in rewards_lib.REWARD_NAMES:
        registry.fail("math.reward", p["reward"], f"valid: {', '.join(rewards_lib.REWARD_NAMES)}")
    if p["extraction"] not in rewards_lib.EXTRACTIONS:
        registry.fail(
            "math.extraction", p["extraction"], f"valid: {', '.join(rewards_lib.EXTRACTIONS)}"
        )
    if not 0 <= p["level"] <= 5:
        registry.fail("math.level", p["level"], "MATH levels are 1..5 (0 = all levels)")


SPEC = registry.TaskSpec(
    "math", _build, DEFAULTS, _check, doc="Hendrycks MATH prompts, verified math rewards"
)
