"""Host-side rewards for math RL: answer extraction, equivalence via math-verify under a per-call
timeout, plain 0/1 correctness, the author's shaped `good_accuracy` reward (spec §3.1) and DAPO's
overlong shaping in tokens (spec §4.3). `RewardPool` scores a batch in worker processes and returns
the rewards in input order.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

REWARD_NAMES = ("good_accuracy", "correct")
# Outcome codes of one equivalence check (what a worker sends back).
WRONG, CORRECT, TIMED_OUT = 0, 1, -1

logger = logging.getLogger(__name__)


# --- answer extraction ---------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _braced(text: str, start: int) -> str | None:
    """Contents of the brace group opening at text[start] == "{", or None if it never closes.
    Escaped braces (\\{ \\}) are literal characters, not grouping."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` / `\\fbox{...}` (nested braces allowed), or of the last
    `\\boxed x` (argument up to whitespace or "$"). None if there is none, or if the last one is
    cut off before its closing brace (a truncated answer, as in the reference grader)."""
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        content = _braced(text, i)
        return None if content is None else content.strip()
    arg = re.match(r"[^\s$]+", text[i:])
    return arg.group(0) if arg else None


EXTRACTIONS = ("strict", "author")
# "... the answer is X" / "final answer: X": X up to the end of its line (a trailing "." dropped).
_ANSWER_IS_RE = re.compile(r"answer(?:\s+is|\s*:)\s*(.+)", re.IGNORECASE)
_TRAILING_EQ_RE = re.compile(r"=\s*([^=]+?)\s*\.?\s*$")


def _tidy(s: str) -> str | None:
    """A fallback answer without surrounding "$", "**", spaces or a final "."; None if empty."""
    s = s.strip().strip("$*").strip().rstrip(".").strip().strip("$*").strip()
    return s or None


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """The model's final answer: the last boxed expression, else the last <answer>...</answer>.

    mode "author" adds the reference grader's fallbacks, tried in order when neither exists
    (answers the strict mode marks wrong): the text after the last "answer is" / "answer:" on
    its line, the right-hand side of a trailing "= X" on the last non-empty line, and finally
    that last non-empty line itself. All three drop surrounding "$"/"**" and a final "."."""
    if mode not in EXTRACTIONS:
        raise ValueError(f"unknown extraction {mode!r}; valid: {', '.join(EXTRACTIONS)}")
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG_RE.findall(text)
    if tags and tags[-1].strip():
        return tags[-1].strip()
    if mode == "strict":
        return None
    said = [m.group(1) for line in text.splitlines() for m in [_ANSWER_IS_RE.search(line)] if m]
    if said and _tidy(said[-1]):
        return _tidy(said[-1])
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    eq = _TRAILING_EQ_RE.search(lines[-1])
    if eq and _tidy(eq.group(1)):
        return _tidy(eq.group(1))
    return _tidy(lines[-1])


# --- equivalence ---------------------------------------------------------------------------------


class _Deadline(BaseException):
    """Raised by SIGALRM. A BaseException so that math-verify's and sympy's broad
    `except Exception` handlers cannot swallow it and carry on past the deadline."""


_warned_no_timeout = False
_REARM_S = 0.05  # after the deadline, raise again this often until the check stops


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raises _Deadline in the block after `seconds` of wall time (an interval timer + SIGALRM).
    Signals are delivered to the main thread only, so elsewhere the block runs unguarded; the
    worker processes of `RewardPool` run their checks in their main thread."""
    global _warned_no_timeout
    if not seconds or threading.current_thread() is not threading.main_thread():
        if seconds and not _warned_no_timeout:
            logger.warning(
                "rewards: not in the main thread, so equivalence checks run without "
                "a timeout; use RewardPool(num_workers>0) to keep one"
            )
            _warned_no_timeout = True
        yield
        return

    def on_alarm(signum, frame):
        raise _Deadline()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    # Re-armed every _REARM_S after the deadline: a _Deadline raised while a garbage-collection
    # callback runs (JAX installs one) is printed and swallowed ("Exception ignored in:
    # _xla_gc_callback"), so one alarm alone can be lost and the check would run on unbounded.
    signal.setitimer(signal.ITIMER_REAL, seconds, _REARM_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _drop_no_timeout_warning(record: logging.LogRecord) -> bool:
    # We disable math-verify's own signal.alarm() timeouts (whole seconds, main thread only, and
    # they would cancel our timer) and guard the call ourselves, so its warning is noise.
    return "Timeout is disabled" not in record.getMessage()


def _math_verify():
    import math_verify  # lazy: sympy and the LaTeX parser take ~1 s to import

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_drop_no_timeout_warning)  # adds it once only
    return math_verify


_SPACING_RE = re.compile(r"\\[,;:! ]|\\left|\\right|\s|\$")


def _normalize(s: str) -> str:
    """Cheap textual normal form for an exact-match fast path (and for answers sympy cannot
    parse, e.g. \\text{...})."""
    s = _SPACING_RE.sub("", s)
    return s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")


def _verify(pred: str, gold: str) -> bool:
    mv = _math_verify()
    gold_parsed = mv.parse(f"${gold}$", parsing_timeout=None)
    # A bare answer is parsed as LaTeX; free text (e.g. from <answer>) is searched for maths too.
    candidates = mv.parse(f"${pred}$", parsing_timeout=None)
    if "$" in pred or "\\(" in pred or "\\[" in pred or " " in pred.strip():
        candidates = candidates + mv.parse(pred, parsing_timeout=None)
    return bool(mv.verify(gold_parsed, candidates, timeout_seconds=None))


def check_answer(pred: str | None, gold: str, timeout_s: float | None = 5.0) -> int:
    """CORRECT, WRONG or TIMED_OUT for an extracted answer against the reference answer."""
    if pred is None or not pred.strip():
        return WRONG
    if _normalize(pred) == _normalize(gold):
        return CORRECT
    # Import outside the deadline: the import is not the check's cost, and one interrupted
    # half-way leaves sympy/math-verify modules broken for every later check.
    _math_verify()
    try:
        with _deadline(timeout_s):
            return CORRECT if _verify(pred, gold) else WRONG
    except _Deadline:
        return TIMED_OUT


# --- rewards -------------------------------------------------------------------------------------


def repetition_rate(text: str, n: int = 4) -> float:
    """1 - unique/total word n-grams (lower-cased, whitespace words); 0 if there are fewer than n
    words. 0 means no repeated n-gram, values near 1 a degenerate loop."""
    words = text.lower().split()
    total = len(words) - n + 1
    if total <= 0:
        return 0.0
    return 1.0 - len(set(zip(*(words[i:] for i in range(n)), strict=False))) / total


def shaped_reward(text: str, correct: bool) -> float:
    """`good_accuracy` (spec §3.1): 1 if correct; otherwise a small length bonus
    min(chars/2000, 0.1) minus 0.25 * repetition, or -0.5 if repetition > 0.3."""
    if correct:
        return 1.0
    rep = repetition_rate(text)
    if rep > 0.3:
        return -0.5
    return min(len(text) / 2000.0, 0.1) - 0.25 * rep


def good_accuracy(completion: str, answer: str, timeout_s: float | None = 5.0) -> float:
    """The author's shaped reward for one completion (see `shaped_reward`)."""
    correct = check_answer(extract_answer(completion), answer, timeout_s) == CORRECT
    return shaped_reward(completion, correct)


def overlong_penalty(num_tokens, max_len: int, cache_len: int, factor: float = 1.0):
    """DAPO overlong shaping (spec §4.3), added to the reward; lengths in tokens.

    0 up to max_len - cache_len, then linear down to -factor at max_len, and -factor beyond.
    Works on a scalar (returns float) or an array of lengths (returns float32 array)."""
    if not 0 <= cache_len <= max_len:
        raise ValueError(
            f"overlong_penalty: need 0 <= cache_len ({cache_len}) <= max_len ({max_len})"
        )
    n = np.asarray(num_tokens, dtype=np.float64)
    free = max_len - cache_len
    ramp = (free - n) / cache_len if cache_len > 0 else np.zeros_like(n)
    out = factor * np.where(n <= free, 0.0, np.where(n <= max_len, ramp, -1.0))
    return float(out) if out.ndim == 0 else out.astype(np.float32)


def validate_reward_name(name: str) -> None:
    if name not in REWARD_NAMES:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(REWARD_NAMES)}")


# --- parallel scoring ----------------------------------------------------------------------------

_POLL_S = 0.05  # how often the parent checks on running checks
# A worker's own alarm normally stops a check within ~_REARM_S of timeout_s; the parent steps
# in only past this grace (a check stuck in C code, or a worker whose alarms are all lost).
HARD_GRACE_S = 2.0
START_TIMEOUT_S = 120.0  # a pool whose workers start no check by then is broken
_started_queue = None  # set in each worker: where it announces which job it is starting


def _init_worker(started_queue) -> None:
    global _started_queue
    _started_queue = started_queue
    # Warm up (imports, parser caches) outside any deadline, so the first real check of each
    # worker is not charged ~1 s of start-up against its timeout.
    _verify("1", "1")
    # Ctrl-C belongs to the parent, which terminates the pool; workers just die with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _worker_check(job: tuple[int, str, str, float | None]) -> tuple[int, int]:
    i, pred, gold, timeout_s = job
    _started_queue.put(i)
    return i, check_answer(pred, gold, timeout_s)


class RewardPool:
    """Scores batches of completions in `num_workers` processes (0: in this process).

    Each check runs in a worker's main thread under a SIGALRM deadline of `timeout_s`, which
    interrupts slow Python-level parsing/simplification. A check stuck in C code cannot be
    interrupted that way, so the parent also times every check from the moment a worker starts
    it: one running longer than `hard_timeout_s` (default: `timeout_s` plus a short grace, so
    the per-check deadline holds even if the worker's alarm is lost) counts as timed out, the
    pool is terminated, and the unfinished rest is resubmitted to a fresh pool (the fork server
    restarts it in milliseconds). Works from any thread of the parent.
    Output order always follows the input; results depend on timing only through timeouts.
    """

    def __init__(
        self,
        num_workers: int = 4,
        timeout_s: float | None = 5.0,
        hard_timeout_s: float | None = None,  # default: timeout_s + HARD_GRACE_S
    ):
        if num_workers < 0:
            raise ValueError(f"RewardPool: num_workers must be >= 0, got {num_workers}")
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self.hard_timeout_s = hard_timeout_s or (timeout_s or 5.0) + HARD_GRACE_S
        # Not "fork": forking a process that runs JAX can deadlock. The fork server is a clean
        # process that imports math_verify once, so (re)starting workers takes milliseconds.
        self._ctx = multiprocessing.get_context("forkserver")
        self._pool = self._queue = None
        self.num_timeouts = 0  # checks that timed out so far (for logging)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = self._queue = None

    def _start(self):
        if self._pool is None:
            # math_verify (sympy) is the slow import; workers import this module themselves.
            # No effect once a server runs.
            self._ctx.set_forkserver_preload(["math_verify"])
            self._queue = self._ctx.SimpleQueue()
            self._pool = self._ctx.Pool(
                self.num_workers, initializer=_init_worker, initargs=(self._queue,)
            )
        return self._pool

    def check(self, preds: Sequence[str | None], golds: Sequence[str]) -> np.ndarray:
        """Outcome codes (CORRECT / WRONG / TIMED_OUT, int8 [B]) of extracted answers."""
        if len(preds) != len(golds):
            raise ValueError(f"check: {len(preds)} answers but {len(golds)} references")
        codes = np.full(len(preds), WRONG, dtype=np.int8)
        todo = [(i, p, golds[i], self.timeout_s) for i, p in enumerate(preds) if p]
        if self.num_workers == 0:
            for i, p, g, t in todo:
                codes[i] = check_answer(p, g, t)
        while todo and self.num_workers > 0:
            finished, hung = self._run(todo, codes)
            if hung:
                logger.warning(
                    f"rewards: {len(hung)} check(s) ran past the hard timeout of "
                    f"{self.hard_timeout_s:.1f}s; restarting the worker pool"
                )
                codes[hung] = TIMED_OUT
                self.close()  # the only way to stop a worker stuck in C code
            todo = [job for job in todo if job[0] not in finished and job[0] not in hung]
        self.num_timeouts += int((codes == TIMED_OUT).sum())
        return codes

    def _run(self, jobs: list, codes: np.ndarray) -> tuple[set[int], list[int]]:
        """Runs jobs until all finish or one hangs; returns (finished, hung) job indices."""
        results = self._start().imap_unordered(_worker_check, jobs, chunksize=1)
        launched, started, finished = time.monotonic(), {}, set()
        while len(finished) < len(jobs):
            try:
                i, code = results.next(timeout=_POLL_S)
                codes[i] = code
                finished.add(i)
            except multiprocessing.TimeoutError:
                pass
            now = time.monotonic()
            while not self._queue.empty():
                started.setdefault(self._queue.get(), now)
            late = now - self.hard_timeout_s
            if hung := [i for i, t0 in started.items() if i not in finished and t0 < late]:
                return finished, hung
            if not started and now - launched > START_TIMEOUT_S:
                self.close()
                raise RuntimeError(
                    f"rewards: no worker started a check within {START_TIMEOUT_S:.0f}s. "
                    "Workers may be failing at start-up (see their traceback above); with the "
                    "'spawn' or 'forkserver' start method the main script must guard its entry "
                    "point with `if __name__ == '__main__':`"
                )
        return finished, []

    def rewards(
        self,
        completions: Sequence[str],
        answers: Sequence[str],
        reward_name: str = "good_accuracy",
        extraction: str = "strict",
    ) -> np.ndarray:
        """float32 [B] rewards ('good_accuracy' or 'correct') of decoded completions."""
        return self.score(completions, answers, reward_name, extraction)[0]

    def score(
        self,
        completions: Sequence[str],
        answers: Sequence[str],
        reward_name: str = "good_accuracy",
        extraction: str = "strict",
    ) -> tuple[np.ndarray, np.ndarray]:
        """(float32 rewards [B], bool correct [B]): correct is the CORRECT outcome code (a timeout
        is not correct), the reward is shaped from it."""
        validate_reward_name(reward_name)
        codes = self.check([extract_answer(c, extraction) for c in completions], answers)
        correct = codes == CORRECT
        if reward_name == "correct":
            return correct.astype(np.float32), correct
        shaped = [shaped_reward(c, k) for c, k in zip(completions, correct, strict=True)]
        return np.asarray(shaped, dtype=np.float32), correct
