"""One writer per output: a job holds an exclusive lock on a lock file in its output dir while it runs.

A second `train-student` into the same --output, or a second copy of the same array job of `teacher-cache` or
`generate` (a resubmitted SLURM task while the first still runs), is refused before any work, naming who holds the
lock. It is a POSIX record lock (fcntl.lockf): the kernel drops it when its process ends, kill -9 included, so a
killed run never leaves a stale lock, and processes it forks (vLLM's workers, data-loader workers) do not inherit
it. NFS (through its lock manager) and Lustre mounted with `flock` honour it across nodes; where the filesystem
refuses locks, or the lock file is another user's and read-only, the job runs unlocked, as before.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import DistilyError


@contextlib.contextmanager
def run_lock(path: Path, what: str):
    """Hold an exclusive lock on `path` (created if missing) for the block; refuse when another process holds it.
    `what`: the job, in the words of the error ("train-student into runs/x")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fh = open(path, "a+")
    except PermissionError:
        yield
        return
    with fh:
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise DistilyError(f"{what} is already running ({holder}; lock file {path}). Wait for it to end or stop "
                               "it, or write somewhere else.") from None
        except OSError:  # no locks on this filesystem (yielding here would chain this error to any in the block)
            locked = False
        if not locked:
            yield
            return
        try:
            fh.truncate(0)
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            fh.flush()
            yield
        finally:
            fcntl.lockf(fh, fcntl.LOCK_UN)
