"""Orbax checkpoints of everything a run needs to resume exactly.

A checkpoint holds the train state pytree (params, optimizer state, step, RNG, alpha-schedule and
entropy-coefficient state) and a JSON record (data-order position, the config it was written
under). Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save (even by SIGKILL) leaves the previous complete checkpoint as the latest one. A
complete step that was damaged afterwards (a truncated or deleted data file, a lost manifest, a
garbled record) is moved aside to `checkpoints/damaged/` and the run resumes from the newest
step that restores.
"""

from __future__ import annotations

import contextlib
import gc
import logging as std_logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from apo_jax import settings

# Keys that may change between a run and its resumption; every other key must match. Changing
# total_steps keeps every schedule continuous only where no schedule reads it: see
# `check_compatible` (HORIZON_DECAYS).
RESUMABLE_PREFIXES = (
    "total_steps", "checkpoint.", "logging.", "eval.", "mesh.", "allow_unused_keys"
)  # fmt: skip
# optim.decay values whose lr schedule spans total_steps × optim.mini_batches updates: under
# another total_steps the lr at the resumed step would jump (a cosine at 4 of 4 steps is near 0,
# at 4 of 8 steps near its peak), so resuming them needs the original total_steps.
HORIZON_DECAYS = ("cosine",)
DAMAGED = "damaged"  # subdirectory of checkpoints/ holding steps that failed to restore


class Checkpointer:
    """Saves every `every_steps` steps (and on demand), keeps the last `keep`.

    `read_only` (evaluation): changes nothing in the workdir, which a training run may be
    writing at the same time: Orbax's temporary directories are left alone, and a step that
    does not restore is skipped (logged), not moved aside."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int, read_only: bool = False):
        self.every_steps = every_steps
        self.workdir = workdir
        self.read_only = read_only
        self.directory = directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        if not read_only:
            _remove_partial_saves(directory)
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=not read_only,
                # Synchronous: the step is on disk before training moves on, so a crash right
                # after never loses work that was reported as saved.
                enable_async_checkpointing=False,
                # Done by _remove_partial_saves, synchronously: Orbax's own background clean-up
                # can race a re-save of the same step after a kill (same temporary name).
                cleanup_tmp_directories=False,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state, record: Mapping) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(dict(record))
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def read_record(self, step: int) -> dict:
        return self.manager.restore(
            step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
        ).record

    def restore(self, step: int, abstract_state):
        """`abstract_state`: ShapeDtypeStructs with the target shardings (any mesh)."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()
            ),
        )
        return out.state, out.record

    def latest_record(self, step: int | None = None) -> tuple[int, dict] | None:
        """(step, record) of the newest step whose JSON record reads; steps whose record does
        not are moved aside. None if the workdir holds no checkpoint. For checks that must run
        before the model is built (the state itself is checked by `restore_latest`). `step`:
        that step only."""
        return self._newest(lambda s: (s, self.read_record(s)), step)

    def restore_latest(self, abstract_state, step: int | None = None):
        """(step, state, record) of the newest step that restores completely, or None if the
        workdir holds no checkpoint. A step that fails to restore is logged with the reason and
        moved to `checkpoints/damaged/` (never deleted); if no step restores, raises one
        RuntimeError naming the workdir and every step tried. `step`: that step only."""
        return self._newest(lambda s: (s, *self.restore(s, abstract_state)), step)

    def _newest(self, load, only: int | None = None):
        tried = []
        steps = sorted(self.manager.all_steps(), reverse=True)
        if only is not None:
            if only not in steps:
                raise FileNotFoundError(
                    f"{self.workdir}: no checkpoint of step {only} (steps: "
                    f"{', '.join(map(str, steps)) or 'none'})"
                )
            steps = [only]
        for step in steps:
            with _quiet_leftovers():
                try:
                    out = load(step)
                    int(out[-1]["position"])  # a record without a data position cannot resume
                    return out
                except Exception as e:  # noqa: BLE001 (any failure means this step is unusable)
                    reason = short_reason(e)
            tried.append(f"{step} ({reason})")
            moved = "" if self.read_only else f"moved it to {self._set_aside(step)} and "
            logging.warning(
                f"checkpoint step {step} in {self.workdir} does not restore ({reason}); "
                f"{moved}trying the previous step"
            )
        if tried:
            kept = (
                ""
                if self.read_only
                else f" The damaged steps are kept in {os.path.join(self.directory, DAMAGED)}; "
                "use a fresh --workdir to start over."
            )
            raise RuntimeError(
                f"{self.workdir}: no checkpoint restores; tried step(s) {'; '.join(tried)}.{kept}"
            )
        return None

    def _set_aside(self, step: int) -> str:
        """Renames a damaged step directory to checkpoints/damaged/<step>-<time> (out of Orbax's
        sight: it lists only integer names) so that it is kept for inspection and a re-save of
        the same step starts clean."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = os.path.join(self.directory, DAMAGED, f"{step}-{stamp}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            if os.path.exists(aside):  # same step damaged twice within a second
                aside += f"-{time.monotonic_ns()}"
            os.rename(os.path.join(self.directory, str(step)), aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"apo_jax: checkpoint {step} set aside")
        self.manager.reload()  # forget the step (all_steps, latest_step, save's existence check)
        return aside

    def close(self):
        self.manager.close()


def short_reason(e: BaseException) -> str:
    """One line for a failed restore: Orbax/TensorStore messages run to dozens of lines (the
    whole spec), so the first line up to the spec dump."""
    first = (str(e).strip().splitlines() or [""])[0].split(" See full Tensor")[0]
    return f"{type(e).__name__}: {first[:300]}"


def _drop_unretrieved(record: std_logging.LogRecord) -> bool:
    return "exception was never retrieved" not in str(record.msg)


@contextlib.contextmanager
def _quiet_leftovers():
    """A failed Orbax restore leaves its other reads behind: coroutines that raise the same
    error when garbage-collected and callbacks on a closed event loop, each printed as a full
    traceback ("Exception ignored in ...", "Event loop is closed"). The one error that matters
    is raised and reported by the caller, so these echoes are dropped, here and at the next
    collection."""
    hook, thread_hook = sys.unraisablehook, threading.excepthook
    # Abandoned asyncio tasks report through the `asyncio` logger when collected, which may be
    # after this block: that filter stays (it drops only "... exception was never retrieved").
    asyncio_log = std_logging.getLogger("asyncio")
    if _drop_unretrieved not in asyncio_log.filters:
        asyncio_log.addFilter(_drop_unretrieved)
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    try:
        yield
    finally:
        # Once the caller has dropped the error (and the frames it holds): finalize the
        # abandoned coroutines and let threads finish their callbacks while the echo is muted.
        gc.collect()
        time.sleep(0.05)
        sys.unraisablehook, threading.excepthook = hook, thread_hook


def _remove_partial_saves(directory: str) -> None:
    """Deletes what a run killed mid-save leaves: Orbax's temporary step directories (they are
    never picked as a checkpoint, and a resumed run may save the same step again)."""
    if jax.process_index() == 0 and os.path.isdir(directory):
        for name in os.listdir(directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("apo_jax: partial checkpoints removed")


def flatten_config(config: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def flatten_record(record: Mapping) -> dict:
    """A config record flat, as `flatten_config`, with each core key it lacks (a record written
    before the key existed) at its default (apo_jax/settings.py): what the run used."""
    return {**settings.defaults(), **flatten_config(record)}


def check_compatible(
    saved: Mapping, current: Mapping, where: str, ignore: tuple[str, ...] = ()
) -> None:
    """Raises ValueError listing every config key that differs in a way resuming cannot honour:
    any key outside RESUMABLE_PREFIXES and `ignore` (prefixes of the blocks the run does not
    read, which may differ), and total_steps when the lr schedule's horizon is total_steps
    (HORIZON_DECAYS)."""
    a, b = flatten_record(saved), flatten_record(current)
    differ = sorted(
        k
        for k in a.keys() | b.keys()
        if a.get(k) != b.get(k) and not k.startswith((*RESUMABLE_PREFIXES, *ignore))
    )
    if differ:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:10])
        raise ValueError(
            f"{where} holds a checkpoint from an incompatible config ({len(differ)} keys differ: "
            f"{details}). Use a fresh --workdir, or pass the original values."
        )
    decay = a.get("optim.decay")
    if a.get("total_steps") != b.get("total_steps") and decay in HORIZON_DECAYS:
        raise ValueError(
            f"{where} holds a checkpoint of a run with total_steps={a.get('total_steps')} and "
            f"optim.decay={decay!r}: its lr schedule spans total_steps × optim.mini_batches "
            f"updates, so resuming with total_steps={b.get('total_steps')} would make the lr "
            "jump at the resumed step. Resume with the original total_steps, or start a fresh "
            "--workdir (a constant lr, optim.decay='constant', may change total_steps)."
        )


def check_resume(
    step: int, saved: Mapping, current: Mapping, where: str, ignore: tuple[str, ...] = ()
) -> None:
    """`check_compatible`, and a checkpoint at `step` beyond the current total_steps is an
    error (the run is past where it would end). A step equal to total_steps is a finished run:
    the caller says so and trains nothing."""
    check_compatible(saved, current, where, ignore)
    total = current["total_steps"]
    if step > total:
        raise ValueError(
            f"config.total_steps={total}: {where} holds a checkpoint at step {step}, beyond it "
            f"(the run was made with total_steps={saved.get('total_steps')}). Give "
            f"total_steps >= {step} to continue it, or a fresh --workdir."
        )


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (save, then exit)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
