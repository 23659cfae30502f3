"""How a script fails and stops: one line for a user's mistake, one for Ctrl-C, signals held back.

A research script should fail the way a good command-line tool does: one line that says what was
wrong and what to do, exit code 2, no traceback. Code deep inside the library raises `UserError`;
the scripts' `main` is wrapped in `run_cli`, which turns it into that one line.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


class UserError(Exception):
    """Something the user can fix: a bad path, flag, file or network. The message says how."""


def run_cli(main) -> None:
    """Run `main()`, turning UserError (and Ctrl-C) into one line on stderr and exit code 2 / 130."""
    speaks = os.environ.get("RANK", "0") == "0"  # rank 0 speaks plainly; under torchrun the others name their rank
    try:
        main()
    except UserError as e:  # under torchrun each process says its own (it may be the only one to meet it)
        line = f"error: {e}\n" if speaks else f"error (rank {os.environ['RANK']}): {e}\n"
        sys.stderr.write(line)  # one write: lines of several processes sharing a pipe do not interleave
        sys.stderr.flush()
        sys.exit(2)
    except KeyboardInterrupt as e:
        if speaks and not isinstance(e, ReportedInterrupt):  # a reported one has had its line already
            print("interrupted", file=sys.stderr)
        sys.exit(130)


class ReportedInterrupt(KeyboardInterrupt):
    """Ctrl-C whose outcome was already reported ("interrupted after step N: checkpoint saved ..."):
    `run_cli` exits with 130 without adding a second, bare "interrupted"."""


def format_perplexity(ppl: float) -> str:
    """One format for perplexity everywhere (train.py's log, eval.py's table): 4 significant digits,
    so a random model's 2.4e+18 is not written out as nineteen digits and 3.987 stays readable."""
    return f"{ppl:.4g}"




@contextmanager
def deferred_interrupts():
    """Hold back Ctrl-C (SIGINT) and SIGTERM inside the block and deliver them at its end.

    A few operations must happen whole or not at all: an optimizer update together with the step
    counter, data position and RNG state that say it happened. Inside this block a signal is only
    noted; leaving the block raises KeyboardInterrupt, so the caller sees the state before the block
    or after it, never in between. Outside the main thread signals cannot be caught; the block then
    runs as is.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:  # delivered once the block is complete (an error inside it propagates as is)
        raise KeyboardInterrupt


@contextmanager
def sigterm_as_interrupt():
    """Treat SIGTERM (what schedulers and `kill` send) like Ctrl-C inside the block, so a preempted
    run saves its checkpoint the same way an interrupted one does."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


