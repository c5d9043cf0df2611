"""One run per workdir: an exclusive `fcntl` lock on `DIR/workdir.lock`, held for the whole run.

The kernel drops an fcntl lock when its process ends, however it ends (kill -9 included), so a
lock is never held by a dead process on the same host; what a dead holder leaves is its record
(PID, host, start time, command) inside the file, which the next run replaces with a line saying
so. The record is what a refused run names. fcntl locks also work across hosts on NFS (v4, or v3
with lockd), where multi-host runs keep their workdir.

In a multi-process run every process holds its own file (`workdir.lock` for process 0,
`workdir.lock.<i>` for process i): the processes of one run share the workdir, and any process
of a second run on it is refused by the process of the same index before anything is compiled.
The file is never deleted (deleting it would let two runs lock two different files).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from absl import logging

LOCK_FILE = "workdir.lock"
# Lock path -> record, for the locks this process holds. fcntl locks belong to the process: a
# second lock by the same process would succeed, and closing *any* descriptor of the file drops
# the lock, so a held file is never opened again here.
_held: dict[str, dict] = {}


class WorkdirLocked(RuntimeError):
    """The workdir is in use by another run (the message names its PID and host)."""


def lock_path(workdir: str, process_index: int = 0) -> str:
    name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.{process_index}"
    return os.path.join(os.path.abspath(workdir), name)


def read_record(path: str) -> dict | None:
    """The holder record in a lock file ({pid, host, started, command}), or None if empty or
    unreadable."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):  # an empty file included: a run that ended cleanly
        return None
    return record if isinstance(record, dict) else None


def describe(record: dict | None) -> str:
    if not record:
        return "another process (it left no record)"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("started", 0)))
    return (
        f"PID {record.get('pid')} on host {record.get('host')} (since {since}: "
        f"{record.get('command', '?')})"
    )


def pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True  # exists under another user (or unreadable: assume alive)
    return True


def _try_lock(fd: int) -> bool:
    """True if this process now holds the lock; False if another does. Raises OSError if the
    file system cannot lock at all."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def holder(workdir: str, process_index: int = 0) -> dict | None:
    """The record of the process holding `workdir`'s lock, or None if nobody holds it (a
    momentary lock attempt, released at once)."""
    path = lock_path(workdir, process_index)
    if path in _held:
        return _held[path]
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        if _try_lock(fd):
            return None  # closing the descriptor below releases it
        return read_record(path) or {}
    except OSError:
        return None
    finally:
        os.close(fd)


@contextmanager
def hold(workdir: str, process_index: int = 0) -> Iterator[str]:
    """Holds `workdir`'s lock for the body; raises WorkdirLocked naming the holder if another
    run has it. On a file system without locks, warns and relies on the record alone."""
    path = lock_path(workdir, process_index)
    if path in _held:
        raise WorkdirLocked(
            f"workdir {os.path.dirname(path)} is already in use by this process "
            f"(PID {os.getpid()}): one run per workdir"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        previous = read_record(path)
        try:
            locked = _try_lock(fd)
        except OSError as e:  # no locking on this file system (some FUSE mounts)
            logging.warning(
                "%s: the file system cannot lock files (%s); only the holder record guards "
                "this workdir against a second run",
                path,
                e.strerror or e,
            )
            here = previous and previous.get("host") == socket.gethostname()
            locked = not (here and pid_alive(previous.get("pid")))
        if not locked:
            raise WorkdirLocked(
                f"workdir {os.path.dirname(path)} is in use by "
                f"{describe(read_record(path) or previous)}; lock file "
                f"{path}. Wait for that run to end (or stop it), or use another --workdir."
            )
        if previous and previous.get("pid") != os.getpid():
            same_host = previous.get("host") == socket.gethostname()
            gone = same_host and not pid_alive(previous.get("pid"))
            logging.warning(
                f"workdir {os.path.dirname(path)}: taking over the stale lock of "
                f"{describe(previous)}, no longer {'running' if gone else 'holding the lock'} "
                "(it did not end cleanly)"
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        _held[path] = record
        try:
            yield path
        finally:
            del _held[path]
            # An empty file = ended cleanly: the next run takes it over without a word.
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock
