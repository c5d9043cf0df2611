"""Orbax checkpoints of everything a run needs to resume exactly.

A checkpoint holds the train state pytree (params, optimizer state, step, RNG, alpha-schedule
state) and a JSON record (data-order position, the config it was written under). Orbax writes
each step into a temporary directory and renames it when complete, so a run killed mid-save
(even by SIGKILL) leaves the previous complete checkpoint as the latest one.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# Keys that may change between a run and its resumption; every other key must match.
RESUMABLE_PREFIXES = ("total_steps", "checkpoint.", "logging.", "eval.", "mesh.")


class Checkpointer:
    """Saves every `every_steps` steps (and on demand), keeps the last `keep`."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int):
        self.every_steps = every_steps
        directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        _remove_partial_saves(directory)
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
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

    def close(self):
        self.manager.close()


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


def check_compatible(saved: Mapping, current: Mapping, where: str) -> None:
    """Raises ValueError listing every config key that differs in a way resuming cannot honour."""
    a, b = flatten_config(saved), flatten_config(current)
    differ = sorted(
        k
        for k in a.keys() | b.keys()
        if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_PREFIXES)
    )
    if differ:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in differ[:10])
        raise ValueError(
            f"{where} holds a checkpoint from an incompatible config ({len(differ)} keys differ: "
            f"{details}). Use a fresh --workdir, or pass the original values."
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
