"""A process of tests/test_precision.py's torchrun test, in a module of its own so that the spawned
processes import only the model package (not train.py, the data and the rest)."""

import os

from model import precision

FAST_BF16 = {"float32": 200.0, "bfloat16": 700.0}
SLOW_BF16 = {"float32": 220.0, "bfloat16": 140.0}


def choice_in_process(rank: int, store: str, answers):
    """One of two gloo processes; each would measure differently (rank 0 fast bf16, rank 1 slow)."""
    import torch.distributed as dist

    os.environ.pop(precision.PIN_ENV, None)
    os.environ["RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    precision.measure_matmul_gflops = lambda hidden, intermediate, **kw: FAST_BF16 if rank == 0 else SLOW_BF16
    answers.put((rank, precision.cpu_choice(64, 176).name))
    dist.destroy_process_group()
