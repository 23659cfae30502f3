"""One run per folder: a lock that a killed process cannot leave held.

Two runs writing the same --out would interleave their checkpoints and metrics. train.py takes an
exclusive flock on OUT/.lock for as long as the run lives; the kernel drops it when the process dies,
however it dies, so the next run never waits for a lock nobody holds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

from common.cli import UserError


LOCK_FILE = ".lock"


_held_locks: list = []  # (open lock file, folder, created) of this process's current run (train() releases them)


def claim_run_folder(out: Path, group) -> None:
    """Rank 0 makes --out a folder it can write and takes its lock; every process learns the outcome, so
    a refusal is one line from each process instead of a traceback at the next barrier."""
    problem = None
    if group.is_main:
        try:
            lock_run_folder(out)
        except UserError as e:
            problem = str(e)
    problems = [p for p in group.all_gather(problem) if p]
    if problems:
        raise UserError(problems[0])


def lock_run_folder(out: Path) -> None:
    """One run per folder: an exclusive flock on OUT/.lock, held until the run ends. The kernel drops a
    flock when its process dies, however it dies, so a lock left by a killed process holds nothing and
    the next run takes it over. The file names its holder (pid, host) for the message; a clean exit
    empties it, so a name found there by the next run is a holder that was killed. Local file
    systems only: NFS and some cluster file systems may not honour flock across machines."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK_FILE, "a+")
    except OSError as e:
        raise UserError(f"cannot create or write the run folder {out} ({e.strerror or e}); choose another --out") from None
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the folder is not locked
        lock.close()
        return
    lock.seek(0)
    holder = lock.read().strip()
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UserError(f"{out} is in use by another run (process {holder or '?'}); wait for it to end, "
                        f"or choose another --out") from None
    if holder and os.environ.get("RANK", "0") == "0":
        print(f"note: {out} was locked by process {holder}, which ended without releasing it; taken over",
              file=sys.stderr)
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    _held_locks.append((lock, out, created))


def release_run_folder() -> None:
    """Empty and close this process's lock files (closing releases the flock); a folder this run created
    and left with nothing but its lock (it failed before starting) is removed."""
    while _held_locks:
        lock, out, created = _held_locks.pop()
        with contextlib.suppress(OSError):
            lock.truncate(0)
            lock.flush()
        lock.close()
        if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            with contextlib.suppress(OSError):
                (out / LOCK_FILE).unlink()
                out.rmdir()
