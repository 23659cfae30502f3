"""The small pieces every script and package shares, one concept a file, none of them about the model.

    startup.py   the first import of every script: Ctrl-C while torch loads is one line
    cli.py       one-line user errors (exit code 2), Ctrl-C, signals held back at step boundaries
    files.py     atomic, fsynced writes: a file is the old one or the new one, never half
    devices.py   the --device and --dtype flags
    checkpoints.py  a run folder on disk: numbered checkpoints, each switched in by one rename

Nothing is re-exported here, so `from common.startup import quiet_ctrl_c` stays light: it must run
before torch is imported.
"""
