"""The machinery around train.py's loop, one concept a file, in reading order.

    optim.py         AdamW, gradient clipping and the learning-rate schedule, written out
    state.py         what a checkpoint holds besides the adapter: the exact-resume state
                     (the folder it goes in: common/checkpoints.py)
    lock.py          one run per folder
    memory.py        the allocator setting training runs with
    distributed.py   torchrun: slices of the global batch, one all-reduce, rank 0 for IO
    eval_prompts.py  the before/after answers of --eval-prompts
    runs.py          what a run remembers, for the commands that take its adapter
"""
