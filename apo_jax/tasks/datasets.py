"""Math problem datasets: JSONL/Parquet loading of Hendrycks MATH, MATH-500 and GSM8K with
level and subject filters; malformed rows are a file:line error or a counted skip."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# This checkout keeps the shared data next to the project; anywhere else pass paths explicitly
# or set APO_JAX_DATA_DIR.
DEFAULT_DATA_DIR = Path(
    os.environ.get("APO_JAX_DATA_DIR", Path(__file__).resolve().parents[3] / "shared" / "data")
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
    records were skipped. A record is malformed if it is not a JSON object, lacks a `required`
    field, or holds something other than a string there (a number or a list would be trained
    on as its Python text); that raises ValueError naming file and line unless
    `skip_malformed`. A record whose `required` text is empty or blank (nothing to ask, or no
    answer to reward) is skipped with a warning naming the first such line."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a data file; {help_text}")
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
    records, skipped, empty = [], 0, []
    for lineno, rec in raw:
        if isinstance(rec, Exception):
            problem = f"not valid JSON ({rec})"
        elif not isinstance(rec, dict):
            problem = f"expected a JSON object, got {type(rec).__name__}"
        else:
            missing = [k for k in required if rec.get(k) is None]
            wrong = [k for k in required if k not in missing and not isinstance(rec[k], str)]
            problem = f"missing field(s) {missing}" if missing else ""
            if wrong and not problem:
                problem = ", ".join(
                    f"field {k!r} must be a JSON string, got {type(rec[k]).__name__} "
                    f"{_clip(rec[k])}"
                    for k in wrong
                )
            if not problem and (blank := [k for k in required if not rec[k].strip()]):
                empty.append((lineno, blank))
                continue
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
    if empty:
        (first, fields), *_ = empty
        logger.warning(
            f"{path}:{first}: skipped {len(empty)} record(s) with an empty field "
            f"({' and '.join(fields)} at {where} {first}, the first of them)"
        )
    return records, skipped + len(empty)


def _clip(value, n: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= n else text[: n - 3] + "..."


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
            question=rec["problem"],  # read_records checked that both are strings
            answer=rec["answer"].strip(),
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
        _, mark, tail = rec["answer"].rpartition("####")
        final = tail.strip().replace(",", "") if mark else ""
        if not final:
            if not skip_malformed:
                problem = (
                    "nothing after the answer's '####'" if mark else "answer has no '#### <number>'"
                )
                raise ValueError(
                    f"{path}:{lineno} (line {lineno}): malformed record: {problem}; fix it or "
                    "pass skip_malformed=True"
                )
            skipped += 1
            continue
        problems.append(Problem(f"gsm8k/{path.stem}/{lineno}", rec["question"], final))
    return ProblemSet(problems, path, skipped)
