"""Where a plain-loss LoRA step spends its time, ours and transformers + PEFT, by torch.profiler.

    python bench/profile_step.py                      # fp32, batch 2 x 256
    python bench/profile_step.py --dtype bfloat16 --batch 4 --seq 512 --rows 25

The step of `bench/train_step.py --plain-loss` (full logits, fp32 cross-entropy, backward, clipping,
AdamW), warm-up steps until the step no longer faults pages in (two at least: the first two steps
still fault in ~1 GB each at batch 2 x 256, which a profile of them shows as a slow log-softmax and
fill), then one profiled step per side. Printed per side: the operators with the most
self CPU time, the time grouped into matmuls, attention, elementwise work and the rest, and the
matmuls by shape. Last, the floor: the time of the work both sides must do with the same kernels
(every matmul, SDPA's forward and backward, and every operator on a (.., V) tensor, which is the
plain loss itself), and the most any model code could gain on the reference while keeping them.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import _util  # noqa: F401
import torch
from torch.profiler import ProfilerActivity, profile

from _util import QWEN_SHAPE, machine
from train_step import build_ours, build_reference, plain_step

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::_flash_attention"),
    "copies and casts": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone", "aten::cat"),
}


def group_of(name: str) -> str:
    for group, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return group
    return "elementwise and other"


def step_fn(side: str, dtype, batch: int, seq: int):
    ids = torch.randint(0, 151643, (batch, seq), generator=torch.Generator().manual_seed(0))
    if side == "ours":
        import lora

        model, opt = build_ours(dtype, torch.device("cpu"))
        return plain_step(model, ids, list(lora.lora_parameters(model).values()), opt)
    model, opt = build_reference(dtype, torch.device("cpu"))
    return plain_step(lambda x: model(input_ids=x).logits, ids, [p for p in model.parameters() if p.requires_grad], opt)


def floor_seconds(events, vocab: int) -> float:
    """Self time of the operators no implementation of this step avoids: matmuls (the same calls on both
    sides), attention's fused kernels, and the plain loss (any operator with a (.., V) input)."""
    def on_logits(e):
        return any(shape and shape[-1] == vocab for shape in e.input_shapes if isinstance(shape, list))

    return sum(e.self_cpu_time_total for e in events
               if group_of(e.key) in ("matmul", "attention") or on_logits(e)) / 1e6


def print_matmul_shapes(events, rows: int = 8) -> None:
    mms = sorted((e for e in events if group_of(e.key) == "matmul" and e.self_cpu_time_total > 0),
                 key=lambda e: -e.self_cpu_time_total)
    print(f"  {'matmul':<12}{'input shapes':<44}{'calls':>6}{'self s':>8}{'ms/call':>9}")
    for e in mms[:rows]:
        shapes = " ".join(str(s) for s in e.input_shapes if s)
        print(f"  {e.key[6:]:<12}{shapes[:43]:<44}{e.count:>6}{e.self_cpu_time_total / 1e6:>8.3f}"
              f"{e.self_cpu_time_total / 1e3 / e.count:>9.2f}")


def page_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(step, least: int = 2, most: int = 6) -> None:
    """Steps until one faults in less than 1% of its pages again: a profile of a step that still maps fresh
    memory times the kernel's page faults, not the operators."""
    for i in range(most):
        before = page_faults()
        step()
        faults = page_faults() - before
        print(f"  warm-up step {i + 1}: {faults} page faults", flush=True)
        if i + 1 >= least and faults < 2500:  # 2500 x 4 KB = 10 MB
            return


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rows", type=int, default=18)
    args = p.parse_args()
    from training.memory import reuse_freed_memory

    reuse_freed_memory()
    info = machine()
    print(f"{info['cpu']} ({info['threads']} threads), torch {info['torch']}, {args.dtype}, batch {args.batch} x {args.seq}")
    totals, floors = {}, {}
    for side in ("ours", "reference"):
        step = step_fn(side, getattr(torch, args.dtype), args.batch, args.seq)
        warm_up(step)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        by_shape = prof.key_averages(group_by_input_shape=True)
        events = prof.key_averages()
        totals[side] = total = sum(e.self_cpu_time_total for e in events) / 1e6
        floors[side] = floor_seconds(by_shape, QWEN_SHAPE["vocab_size"])
        print(f"\n{side}: {total:.2f} s of self CPU time in the step")
        print(f"{'operator':<48}{'calls':>7}{'self s':>9}{'share':>8}")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
            print(f"{e.key[:47]:<48}{e.count:>7}{e.self_cpu_time_total / 1e6:>9.3f}{e.self_cpu_time_total / 1e6 / total:>8.1%}")
        groups = defaultdict(float)
        for e in events:
            groups[group_of(e.key)] += e.self_cpu_time_total / 1e6
        print("  " + ", ".join(f"{g} {s:.2f} s" for g, s in sorted(groups.items(), key=lambda gs: -gs[1])))
        print_matmul_shapes(by_shape)
    floor = min(floors.values())
    print(f"\nfloor (matmuls, attention kernels, the plain loss): ours {floors['ours']:.2f} s, reference "
          f"{floors['reference']:.2f} s. The reference's step ({totals['reference']:.2f} s) is at most "
          f"{totals['reference'] / floor:.2f}x a step that did nothing else; ours is {totals['ours']:.2f} s "
          f"({totals['reference'] / totals['ours']:.2f}x).")


if __name__ == "__main__":
    main()
