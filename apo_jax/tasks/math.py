"""Math prompt datasets: JSONL/Parquet loading (Hendrycks MATH, MATH-500, GSM8K), Qwen3 chat
formatting with left truncation, a stateless checkpointable shuffled order with per-process
slices, and `MathTask` (the `base.Task` interface over MATH with verified rewards).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from apo_jax.tasks import base, registry
from apo_jax.tasks import rewards as rewards_lib

logger = logging.getLogger(__name__)

# This checkout keeps the shared data next to the project; anywhere else pass paths explicitly
# or set APO_JAX_DATA_DIR.
DEFAULT_DATA_DIR = Path(
    os.environ.get("APO_JAX_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data")
)

# Spec §3.1: reasoning in <think>...</think>, final answer in <answer>...</answer>; we also ask
# for \boxed{} because the grader reads the last boxed expression first.
SYSTEM_PROMPT = (
    "You are a careful mathematician. Reason step by step inside <think> </think>, then give "
    "the final answer inside <answer> </answer>, writing the final result as \\boxed{...}."
)

_MATH_HELP = (
    "pass the path of a MATH JSONL file (one JSON object per line with fields problem, answer, "
    "level, type), e.g. math_train.jsonl from the Hendrycks MATH dataset "
    "(github.com/hendrycks/math, or the lighteval/MATH mirror on the Hugging Face Hub)"
)
_GSM8K_HELP = (
    "pass the path of a GSM8K JSONL file (fields question and answer, the answer ending in "
    "'#### <number>'), e.g. test.jsonl from github.com/openai/grade-school-math"
)


@dataclasses.dataclass(frozen=True)
class Problem:
    uid: str  # stable id, e.g. "train/algebra/3.json"
    question: str
    answer: str  # reference final answer (LaTeX, no $)
    level: int | None = None  # MATH difficulty 1..5 (None when unknown, e.g. "Level ?")
    subject: str = ""


@dataclasses.dataclass
class ProblemSet(Sequence):
    """Loaded problems plus where they came from and how many malformed rows were skipped."""

    problems: list[Problem]
    source: Path
    num_skipped: int = 0

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i):
        return self.problems[i]


# --- reading rows --------------------------------------------------------------------------------


def read_records(
    path: str | os.PathLike,
    *,
    required: Sequence[str] = (),
    skip_malformed: bool = False,
    help_text: str = "pass the path of an existing JSONL or Parquet file",
) -> tuple[list[tuple[int, dict]], int]:
    """(line or row number, record) pairs of a .jsonl/.json-lines or .parquet file, and how many
    malformed records were skipped. A record is malformed if it is not a JSON object or lacks
    a `required` field; that raises ValueError naming file and line unless `skip_malformed`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; {help_text}")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"{path}: reading Parquet needs pyarrow; `pip install pyarrow` or convert the "
                "file to JSONL"
            ) from None
        raw = enumerate(pq.read_table(path).to_pylist(), start=1)  # row numbers, 1-based
        where = "row"
    else:
        raw = _jsonl_lines(path)
        where = "line"
    records, skipped = [], 0
    for lineno, rec in raw:
        if isinstance(rec, Exception):
            problem = f"not valid JSON ({rec})"
        elif not isinstance(rec, dict):
            problem = f"expected a JSON object, got {type(rec).__name__}"
        else:
            missing = [k for k in required if rec.get(k) is None]
            problem = f"missing field(s) {missing}" if missing else ""
        if problem:
            if not skip_malformed:
                raise ValueError(
                    f"{path}:{lineno} ({where} {lineno}): malformed record: "
                    f"{problem}; fix it or pass skip_malformed=True"
                )
            skipped += 1
            continue
        records.append((lineno, rec))
    if skipped:
        logger.warning(f"{path}: skipped {skipped} malformed record(s)")
    return records, skipped


def _jsonl_lines(path: Path) -> Iterator[tuple[int, object]]:
    # Bytes, decoded per line: a non-UTF-8 line is reported with file:line like a JSON error
    # (a bare UnicodeDecodeError names neither). "utf-8-sig" on the first line accepts a BOM.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}:{lineno} (line {lineno}): not UTF-8 text (byte {e.start}: "
                    f"{raw[e.start : e.start + 1]!r}); re-save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, e


# --- datasets ------------------------------------------------------------------------------------


def _level(value) -> int | None:
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", str(value))
    return int(m.group(1)) if m else None  # "Level ?" in two MATH train rows


def load_math(
    path: str | os.PathLike | None = None,
    *,
    split: str = "train",
    levels: Sequence[int] | int | None = None,
    subjects: Sequence[str] | str | None = None,
    skip_malformed: bool = False,
) -> ProblemSet:
    """MATH-format problems (also MATH-500), optionally filtered by level (1..5) and subject
    (case-insensitive, e.g. "Algebra", "Number Theory"). Default: DEFAULT_DATA_DIR/math/
    math_{split}.jsonl."""
    path = Path(path) if path is not None else DEFAULT_DATA_DIR / "math" / f"math_{split}.jsonl"
    records, skipped = read_records(
        path, required=("problem", "answer"), skip_malformed=skip_malformed, help_text=_MATH_HELP
    )
    problems = [
        Problem(
            uid=str(rec.get("unique_id") or f"{path.stem}/{lineno}"),
            question=str(rec["problem"]),
            answer=str(rec["answer"]).strip(),
            level=_level(rec.get("level")),
            subject=str(rec.get("subject") or rec.get("type") or ""),
        )
        for lineno, rec in records
    ]
    if levels is not None:
        wanted = {levels} if isinstance(levels, int) else set(levels)
        problems = [p for p in problems if p.level in wanted]
    if subjects is not None:
        wanted = {s.lower() for s in ([subjects] if isinstance(subjects, str) else subjects)}
        known = {p.subject.lower() for p in problems}
        if unknown := wanted - known:
            raise ValueError(
                f"{path}: unknown subject(s) {sorted(unknown)}; subjects present: "
                f"{sorted({p.subject for p in problems})}"
            )
        problems = [p for p in problems if p.subject.lower() in wanted]
    return ProblemSet(problems, path, skipped)


def load_math500(path: str | os.PathLike | None = None, **kwargs) -> ProblemSet:
    """MATH-500 (the PRM800K test subset); same schema as MATH with integer levels."""
    return load_math(path or DEFAULT_DATA_DIR / "math" / "math500_test.jsonl", **kwargs)


def load_gsm8k(
    path: str | os.PathLike | None = None, *, skip_malformed: bool = False
) -> ProblemSet:
    """GSM8K problems; the reference answer is the number after '####' (thousands commas
    removed)."""
    path = Path(path) if path is not None else DEFAULT_DATA_DIR / "gsm8k" / "test.jsonl"
    records, skipped = read_records(
        path, required=("question", "answer"), skip_malformed=skip_malformed, help_text=_GSM8K_HELP
    )
    problems = []
    for lineno, rec in records:
        solution = str(rec["answer"])
        if "####" not in solution:
            if not skip_malformed:
                raise ValueError(
                    f"{path}:{lineno} (line {lineno}): malformed record: answer has "
                    "no '#### <number>'; fix it or pass skip_malformed=True"
                )
            skipped += 1
            continue
        final = solution.rsplit("####", 1)[1].strip().replace(",", "")
        problems.append(Problem(f"gsm8k/{path.stem}/{lineno}", str(rec["question"]), final))
    return ProblemSet(problems, path, skipped)


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
    path = Path(path) if path is not None else DEFAULT_DATA_DIR / "qwen3"
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
    from transformers import AutoTokenizer  # lazy: slow import

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
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


# --- checkpointable order ------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(n) used in `epoch`; a pure function of (n, seed, epoch)."""
    if n < 1 or epoch < 0:
        raise ValueError(f"epoch_order: need n >= 1 and epoch >= 0, got n={n}, epoch={epoch}")
    order = np.random.default_rng((seed, epoch)).permutation(n)
    order.setflags(write=False)  # cached: callers must not be able to corrupt it
    return order


def global_batch_indices(n: int, seed: int, position: int, batch_size: int) -> np.ndarray:
    """Dataset indices of the global batch that starts after `position` examples were consumed.

    `position` (an int saved in checkpoints) counts examples over all epochs; a batch that
    crosses an epoch boundary takes the end of one epoch's order and the start of the next."""
    if n < 1 or position < 0 or batch_size < 1:
        raise ValueError(
            f"global_batch_indices: need n >= 1, position >= 0 and batch_size >= 1, got "
            f"n={n}, position={position}, batch_size={batch_size}"
        )
    pos = np.arange(position, position + batch_size)
    epochs, offsets = np.divmod(pos, n)
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_order(n, seed, int(e))[offsets[sel]]
    return out


def process_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous share of a global batch (matches a batch axis sharded over
    processes in order)."""
    indices = np.asarray(indices)
    if not 0 <= process_index < process_count or len(indices) % process_count:
        raise ValueError(
            f"process_slice: batch of {len(indices)} cannot be split evenly over "
            f"{process_count} processes (process_index={process_index})"
        )
    per = len(indices) // process_count
    return indices[process_index * per : (process_index + 1) * per]


# --- the MATH task -------------------------------------------------------------------------------


class MathTask:
    """`base.Task` over math problems with the Qwen3 chat template and verified rewards.

    reward_name: "good_accuracy" (the author's shaped reward) or "correct" (0/1). Rewards are
    scored by a `rewards.RewardPool` of `reward_workers` processes, started on first use.
    """

    def __init__(
        self,
        train_problems: Sequence[Problem],
        eval_problems: Sequence[Problem],
        tokenizer,
        *,
        reward_name: str = "good_accuracy",
        max_prompt_len: int = 1024,
        enable_thinking: bool = True,
        system_prompt: str | None = SYSTEM_PROMPT,
        reward_workers: int = 4,
        reward_timeout_s: float = 5.0,
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
        self._pool = rewards_lib.RewardPool(reward_workers, timeout_s=reward_timeout_s)

    def _examples(self, problems: Sequence[Problem], fmt: dict) -> list[base.Example]:
        ids = (
            format_prompts(self.tokenizer, [p.question for p in problems], **fmt)
            if problems
            else []
        )
        return [base.Example(tuple(x), p.answer, p.uid) for x, p in zip(ids, problems, strict=True)]

    @classmethod
    def from_files(
        cls,
        *,
        train_path: str | os.PathLike | None = None,  # default: MATH train split
        eval_path: str | os.PathLike | None = None,  # default: MATH test split
        tokenizer_path: str | os.PathLike | None = None,  # default: DEFAULT_DATA_DIR/qwen3
        levels: Sequence[int] | int | None = (3,),
        subjects: Sequence[str] | str | None = None,
        skip_malformed: bool = False,
        **kwargs,
    ) -> MathTask:
        """MATH (Level 3 by default, spec §3.1) from JSONL/Parquet files; kwargs go to __init__."""
        filt = dict(levels=levels, subjects=subjects, skip_malformed=skip_malformed)
        train = load_math(train_path, split="train", **filt)
        eval_ = load_math(eval_path, split="test", **filt)
        return cls(train.problems, eval_.problems, load_tokenizer(tokenizer_path), **kwargs)

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


def _build(p, ctx: registry.TaskContext) -> MathTask:
    levels = (p["level"],) if p["level"] else None
    train = load_math(p["data_path"] or None, split="train", levels=levels)
    eval_path = p["eval_path"] or None
    if p["eval_set"] == "math":
        held_out = load_math(eval_path, split="test", levels=levels)
    elif p["eval_set"] == "math500":
        held_out = load_math500(eval_path)
    else:
        held_out = load_gsm8k(eval_path)
    _require_problems(train, "data_path", p["level"])
    _require_problems(held_out, "eval_path", p["level"] if p["eval_set"] == "math" else 0)
    tokenizer = p["tokenizer"] or None
    if (
        tokenizer is None
        and ctx.model_dir
        and os.path.isfile(os.path.join(ctx.model_dir, "tokenizer.json"))
    ):
        tokenizer = ctx.model_dir
    return MathTask(
        train.problems,
        held_out.problems,
        load_tokenizer(tokenizer),
        reward_name=p["reward"],
        max_prompt_len=ctx.max_prompt_len,
        enable_thinking=p["enable_thinking"],
        model_dir=ctx.model_dir or None,
        extraction=p["extraction"],
    )


def _require_problems(problems: ProblemSet, key: str, level: int) -> None:
    """An empty set fails here, before any model is built, naming the file and the filter."""
    if not len(problems):
        kept = f" of level {level} (config.task.math.level={level})" if level else ""
        skipped = (
            f"; {problems.num_skipped} malformed record(s) skipped" if problems.num_skipped else ""
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


registry.register(
    registry.TaskSpec(
        "math", _build, DEFAULTS, _check, doc="Hendrycks MATH prompts, verified math rewards"
    )
)
