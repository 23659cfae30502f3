"""Does FSDP2 (`fully_shard`) average gradients correctly on gloo (CPU) with this torch?

    python bench/fsdp_gloo_check.py

pytorch#162338: on gloo, FSDP2's reduce-scatter asked for ReduceOp.AVG, which gloo did not implement,
and gradients came back summed over the processes (world-size times too large) without an error.
This script trains nothing: two processes hold different inputs, and their sharded gradients are
compared with the gradient of the mean loss computed in one process. train.py does not use FSDP (see
training/distributed.py); this records whether it could, on CPU, with the torch installed here.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 4, bias=False))


def inputs(world: int) -> torch.Tensor:
    return torch.randn(world, 3, 8, generator=torch.Generator().manual_seed(1))  # (world, batch, features)


def worker(rank: int, world: int, init_file: str, queue) -> None:
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    m = model()
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    m(inputs(world)[rank]).pow(2).mean().backward()  # each process: the mean over its own rows
    grads = {name: p.grad.full_tensor() for name, p in m.named_parameters()}  # gather the shards
    if rank == 0:
        queue.put({k: v.tolist() for k, v in grads.items()})  # plain lists: no shared memory to outlive us
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    world = 2
    reference = model()
    reference(inputs(world).reshape(-1, 8)).pow(2).mean().backward()  # one process, all rows: the target
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=worker, args=(r, world, os.path.join(tmp, "init"), queue)) for r in range(world)]
        for p in procs:
            p.start()
        fsdp = {k: torch.tensor(v) for k, v in queue.get(timeout=120).items()}
        for p in procs:
            p.join(timeout=60)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, gloo, {world} processes")
    verdicts = []
    for name, p in reference.named_parameters():
        ratio = float((fsdp[name] / p.grad).nanmedian())
        ok = torch.allclose(fsdp[name], p.grad, atol=1e-6, rtol=1e-5)
        verdicts.append(ok)
        print(f"  {name}: FSDP / reference gradient = {ratio:.4f} ({'averaged: correct' if ok else 'WRONG'})")
    print("FSDP2 on gloo averages gradients correctly" if all(verdicts) else
          f"FSDP2 on gloo is wrong here (a ratio of {world} means summed instead of averaged: pytorch#162338)")
    sys.exit(0 if all(verdicts) else 1)


if __name__ == "__main__":
    main()
