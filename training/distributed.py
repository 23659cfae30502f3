"""More than one process: what train.py needs from torch.distributed, and nothing it does not.

    torchrun --standalone --nproc_per_node 2 train.py ...                      # one machine, 2 processes
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_endpoint host:29500 train.py ...

torchrun starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK; `init` reads them and joins the
process group: NCCL on CUDA (each process on `cuda:LOCAL_RANK`), gloo on CPU. Without torchrun it is a
group of one and every call below is free.

The design, in the order a step meets it:
- Data: every process builds the same windows and the same shuffled order (both are seeded), so the
  global micro-batch is known everywhere; process r takes its r-th contiguous slice. The order does
  not depend on the number of processes, and neither does the run.
- The loss is the mean over every target token of the global batch. Each process knows the global
  batch, so it counts the global tokens itself (no communication) and divides its partial sum by them;
  the sum over processes of those gradients is then exactly the one-process gradient.
- Gradients: one all-reduce (sum) of the LoRA gradients, flattened into one buffer, after the last
  micro-batch, with the loss sums riding along. Not DistributedDataParallel: LoRA's gradients are a
  few MB, DDP would reduce them after every micro-batch unless told `no_sync`, would average (a mean
  over processes, not tokens) and would wrap the model under `module.`. One explicit collective says
  what happens. After it every process holds the same gradient, so clipping and AdamW agree everywhere.
- Rank 0 alone validates, logs, shows progress and writes checkpoints; the others book the same FLOPs
  and state, and wait at a barrier after each checkpoint so none runs ahead of it.
- A crash: the failing process exits; torchrun's agent then stops the others (SIGTERM). A process
  blocked in a collective whose peer vanished on another node gives up after `TIMEOUT`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.cli import UserError

TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This process's contiguous slice of a global micro-batch of window indices (train.setup has
        checked that the batch divides)."""
        n = len(idx) // self.world
        return idx[self.rank * n : (self.rank + 1) * n]

    def span(self, n: int) -> tuple[int, int]:
        """This process's contiguous share [start, end) of n items (study.py's forecast systems)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def all_gather(self, obj) -> list:
        """Every process's `obj` (a small Python object), in rank order, on every process."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the processes, in place, in one collective."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1).double() for t in tensors])  # fp64: exact for fp32 gradients
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def broadcast(self, obj):
        """Rank 0's `obj`, on every process (a small Python object: a FLOP count, a flag)."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def joined() -> bool:
    return dist.is_initialized()


def init(device: torch.device) -> tuple[Group, torch.device]:
    """Join the process group when torchrun started us; (group, this process's device). Joining again
    is free: study.py joins once and trains its runs, each calling this, in the same group."""
    if not launched_by_torchrun():
        return Group(), device
    group = Group(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"torchrun runs on CPU (gloo) or CUDA (NCCL), not on {device.type}")
    if joined():
        return group, device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT, **({"device_id": device} if device.type == "cuda" else {}))
    return group, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
