"""The first import of every script: Ctrl-C while the heavy imports load ends in one line.

Importing torch takes seconds, and a Ctrl-C in that time lands deep inside its import machinery,
before `common.cli.run_cli` can catch anything: Python would print a traceback of thirty-odd lines for
what was a deliberate stop. This module imports nothing heavy, so a script that imports it first
can turn that interrupt into the same line `run_cli` prints, and still exit as an interrupted
process does (status 130: Python re-raises SIGINT on itself after an uncaught KeyboardInterrupt).
"""

import sys


def quiet_ctrl_c() -> None:
    """Print an uncaught KeyboardInterrupt as one line, "interrupted", instead of a traceback; other
    exceptions keep Python's report. A script calls it first thing, and only when run as a script:

        if __name__ == "__main__":  # before torch loads: Ctrl-C during start-up is one line
            from common.startup import quiet_ctrl_c
            quiet_ctrl_c()

    For `python -m lora.export` and `python -m data.lotka_volterra` the package's __init__ calls it,
    since the package (and torch with it) is imported before the module runs.
    """
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return
        previous(kind, value, traceback)

    sys.excepthook = hook
