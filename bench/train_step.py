"""Time our LoRA training step against transformers + PEFT, on Qwen2.5-0.5B's shape with random weights.

    python bench/train_step.py                    # ours only
    python bench/train_step.py --reference        # ours and transformers + PEFT, alternating
    python bench/train_step.py --reference --plain-loss --batch 2 --seq 256   # the model and LoRA alone

Ours is the exact step train.py takes (`train.optimizer_step`: chunked loss, backward, clipping, our
AdamW); the reference is Qwen2ForCausalLM + PEFT LoRA with `labels=` loss, backward, clipping and
torch.optim.AdamW. `--plain-loss` gives both sides the same plain loss instead (full (B, T, V)
logits, `F.cross_entropy` in fp32, backward, clipping, AdamW step) and both sides train.py's malloc
setting, so what differs is the model and LoRA alone. Both: LoRA r=8, alpha 16 on q_proj and v_proj, batch x seq tokens without padding.
Each side lives in its own process (so each one's peak memory is its own) and the parent alternates
steps between them after the warm-up; `--one-at-a-time` times each side's process alone instead, for
sizes where both sides' memory does not fit at once (each keeps its peak while idle: train.py's malloc
setting keeps freed memory for the next step). Printed per side: median and min seconds per step, tokens/s,
achieved FLOP/s (flops.py's hardware count of the step), its share of this machine's measured matmul
peak, and peak memory (RSS on CPU, max allocated on CUDA); then ours / reference. Results are
appended to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import time

import _util  # noqa: F401  (puts the repository on sys.path)
import torch

from _util import (append_result, machine, matmul_peak, peak_memory, qwen_shape, random_qwen, reset_peak_memory,
                   summarize, sync)
from common.devices import parse_device


def build_ours(dtype, device, quantize: bool = False, layers: int | None = None):
    import lora
    from model.nf4 import quantize_projections
    from training.optim import AdamW

    model = random_qwen(scale=0.05, layers=layers).to(dtype=dtype, device=device)  # 0.05: sane activations in 24 random layers
    if quantize:
        quantize_projections(model)  # as load_model(quantize="nf4") leaves it
    torch.manual_seed(0)
    lora.apply_lora(model, rank=8, alpha=16, targets=("q_proj", "v_proj"), verbose=False)
    model.train()
    return model, AdamW(lora.lora_parameters(model), lr=1e-4)


def build_reference(dtype, device, layers: int | None = None):
    import peft
    import transformers

    config = transformers.Qwen2Config(**qwen_shape(layers))
    model = transformers.Qwen2ForCausalLM(config).to(dtype=dtype, device=device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                       task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4)


def plain_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over full logits (B, T, V), in fp32: the same on both sides."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def plain_step(logits_of, ids: torch.Tensor, params: list, opt, autocast=contextlib.nullcontext):
    """The --plain-loss step, the same on both sides: plain loss of `logits_of(ids)`, backward, clipping,
    optimizer step."""
    def step():
        with autocast():
            loss = plain_loss(logits_of(ids), ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()

    return step


def worker(side: str, conn, dtype_name: str, device_name: str, batch: int, seq: int, threads: int | None,
           reuse_memory: bool, grad_checkpoint: bool, compile_blocks: bool, plain: bool = False, layers=None):
    if threads:
        torch.set_num_threads(threads)
    if (side != "reference" or plain) and reuse_memory:
        from training.memory import reuse_freed_memory

        reuse_freed_memory()  # as train.py does
    dtype, device = getattr(torch, dtype_name), torch.device(device_name)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151643, (batch, seq), generator=g)
    if side in ("ours", "ours-nf4"):
        import train
        from data.windows import TokenWindows

        model, opt = build_ours(dtype, device, quantize=side == "ours-nf4", layers=layers)
        model.grad_checkpoint = grad_checkpoint  # as train.py --grad-checkpoint
        if compile_blocks:
            model.compile_blocks()  # as train.py --compile
        windows = TokenWindows(ids, torch.ones_like(ids, dtype=torch.bool))
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and dtype == torch.bfloat16 \
            else contextlib.nullcontext

        if plain:
            import lora

            step = plain_step(model, ids.to(device), list(lora.lora_parameters(model).values()), opt, autocast)
        else:
            def step():
                train.optimizer_step(model, opt, windows, [torch.arange(batch)], 1e-4, 1.0, autocast, 512)
    else:
        model, opt = build_reference(dtype, device, layers)
        x = ids.to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" and dtype == torch.bfloat16 \
            else (lambda: torch.autocast("cpu", enabled=False))
        if plain:
            step = plain_step(lambda x: model(input_ids=x).logits, x, params, opt, autocast)
        else:
            def step():
                with autocast():
                    loss = model(input_ids=x, labels=x).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg == "step":
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            conn.send(time.perf_counter() - t)
        elif msg == "reset":
            reset_peak_memory(device)
            conn.send("ok")
        elif msg == "peak":
            conn.send(peak_memory(device))
        else:
            return


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first: the first two still fault in fresh memory (bench/profile_step.py counts)")
    p.add_argument("--reference", action="store_true")
    p.add_argument("--plain-loss", action="store_true", help="the same plain loss on both sides: the model and LoRA alone")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--grad-checkpoint", action="store_true", help="ours with activation checkpointing")
    p.add_argument("--compile", action="store_true", help="ours with torch.compile'd blocks")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="time each side alone instead of alternating (when both sides' memory does not fit at once)")
    p.add_argument("--no-reuse-memory", action="store_true",
                   help="leave glibc's default of returning freed memory to the OS (train.py keeps it)")
    p.add_argument("--quantize", default=None, choices=["nf4"],
                   help="add a side: ours with NF4 projections (QLoRA), beside ours in --dtype, same run")
    p.add_argument("--layers", type=int, default=None,
                   help="fewer blocks than Qwen2.5-0.5B's 24 (a quick check that the script runs, not a figure)")
    return p.parse_args()


def side_flops(args) -> dict[str, int]:
    """The hardware work of one step on each side: ours recomputes the blocks' forward with --grad-checkpoint."""
    import flops
    from model import ModelConfig

    def step(recompute: bool) -> int:
        config = ModelConfig(**qwen_shape(getattr(args, "layers", None)), head_dim=64)
        return flops.count(config, args.batch, args.seq, recompute=recompute,
                           lora={"r": 8, "target_modules": ["q_proj", "v_proj"]}).train_step_hardware

    return {"ours": step(args.grad_checkpoint), "ours-nf4": step(args.grad_checkpoint), "reference": step(False)}


def start_side(ctx, side: str, args, device):
    """A worker process for one side, ready to step; returns (process, connection)."""
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=worker, args=(side, child, args.dtype, str(device), args.batch, args.seq, args.threads,
                                            not args.no_reuse_memory, args.grad_checkpoint, args.compile,
                                            args.plain_loss, getattr(args, "layers", None)))
    proc.start()
    child.close()  # the worker holds the only other end: if it dies, recv() raises instead of waiting forever
    ask(proc, parent, side, None)  # its "ready"
    return proc, parent


def ask(proc, conn, side: str, message):
    """Send a message to a side's worker (None: only wait) and return its answer; a dead worker is one line."""
    try:
        if message is not None:
            conn.send(message)
        return conn.recv()
    except (EOFError, BrokenPipeError):
        proc.join(timeout=10)
        killed = " (killed: most likely out of memory)" if proc.exitcode == -9 else ""
        raise SystemExit(f"the {side} process died with exit code {proc.exitcode}{killed}; if the two sides' "
                         f"memory does not fit at once, run them one after the other with --one-at-a-time")


def timed_steps(args, procs: dict, conns: dict, times: dict) -> None:
    """Warm-up, then the timed steps, alternating between the sides given."""
    for side in procs:
        ask(procs[side], conns[side], side, "reset")
    for i in range(args.warmup + args.steps):
        for side in procs:  # alternate, so both see the same machine state
            t = ask(procs[side], conns[side], side, "step")
            if i >= args.warmup:
                times[side].append(t)
            print(f"  {side:<9} step {i + 1}{' (warm-up)' if i < args.warmup else ''}: {t:.2f} s", flush=True)


def run_sides(args, device, sides: list[str]) -> tuple[dict, dict]:
    """One process per side; warm-up, then alternate their steps (or, with --one-at-a-time, each side's
    process alone: it holds its peak memory while idle, since train.py's malloc setting keeps freed
    memory, so two large sides may not fit together). Returns (step times, peak memory)."""
    ctx = mp.get_context("spawn")
    times, peaks = {s: [] for s in sides}, {}
    groups = [[s] for s in sides] if args.one_at_a_time else [sides]
    for group in groups:
        procs, conns = {}, {}
        try:
            for side in group:  # start one at a time, so the two set-ups do not add up in memory
                procs[side], conns[side] = start_side(ctx, side, args, device)
            timed_steps(args, procs, conns, times)
            for side in group:
                peaks[side] = ask(procs[side], conns[side], side, "peak")
        finally:
            for side in procs:
                if procs[side].is_alive():
                    conns[side].send("stop")
                procs[side].join()
    return times, peaks


def report(args, record: dict, flops_of: dict, times: dict, peaks: dict, peak: float) -> None:
    """Print each side's figures and the ratios; add them to the record."""
    tokens = args.batch * args.seq
    print(f"\n{'':<11}{'median s':>10}{'min s':>9}{'tokens/s':>10}{'GFLOP/s':>9}{'% peak':>8}{'peak mem GB':>13}")
    for side in times:
        s = summarize(times[side])
        rate = flops_of[side] / s["median_s"]
        record["sides"][side] = {**s, "tokens_per_s": tokens / s["median_s"], "flops_per_s": rate,
                                 "share_of_peak": rate / peak, "peak_memory_bytes": peaks[side]}
        print(f"{side:<11}{s['median_s']:>10.2f}{s['min_s']:>9.2f}{tokens / s['median_s']:>10.1f}{rate / 1e9:>9.1f}"
              f"{100 * rate / peak:>7.1f}%{peaks[side] / 1e9:>13.2f}")
    if args.reference:
        o, r = record["sides"]["ours"], record["sides"]["reference"]
        record["ratios"] = {"speed": r["median_s"] / o["median_s"], "memory": o["peak_memory_bytes"] / r["peak_memory_bytes"]}
        print(f"\nours / reference: {record['ratios']['speed']:.2f}x the tokens/s, "
              f"{record['ratios']['memory']:.2f}x the peak memory")
    if args.quantize:
        o, q = record["sides"]["ours"], record["sides"]["ours-nf4"]
        record["nf4_vs_ours"] = {"time": q["median_s"] / o["median_s"], "memory": q["peak_memory_bytes"] / o["peak_memory_bytes"]}
        print(f"NF4 / {args.dtype}: {record['nf4_vs_ours']['time']:.2f}x the step time, "
              f"{record['nf4_vs_ours']['memory']:.2f}x the peak memory")


def main():
    args = parse_args()
    device = parse_device(args.device)
    dtype = getattr(torch, args.dtype)
    flops_of = side_flops(args)
    peak_size = 2048 if dtype == torch.float32 or device.type == "cuda" else 512
    peak_before = matmul_peak(dtype, device, size=peak_size)
    info = machine()
    print(f"{info['cpu']} ({info['threads']} threads), torch {info['torch']}, device {device}, {args.dtype}"
          + (f", GLIBC_TUNABLES={info['glibc_tunables']} (both sides)" if info["glibc_tunables"] else ""))
    print(f"measured matmul peak {peak_before / 1e9:.1f} GFLOP/s; one step = {flops_of['ours'] / 1e12:.3f} TFLOP "
          f"(flops.py, hardware)")
    sides = ["ours"] + (["ours-nf4"] if args.quantize else []) + (["reference"] if args.reference else [])
    times, peaks = run_sides(args, device, sides)
    # a shared virtual machine's speed drifts: the ceiling is the best of a measurement before and after
    peak_after = matmul_peak(dtype, device, size=peak_size)
    peak = max(peak_before, peak_after)
    print(f"measured matmul peak after the steps {peak_after / 1e9:.1f} GFLOP/s; using {peak / 1e9:.1f}")
    record = {"bench": "train_step", "machine": info, "device": str(device), "dtype": args.dtype, "batch": args.batch,
              "quantize": args.quantize, "plain_loss": args.plain_loss,
              "grad_checkpoint": args.grad_checkpoint, "compile": args.compile, "one_at_a_time": args.one_at_a_time,
              "reuse_memory": not args.no_reuse_memory, "layers": args.layers,
              "seq": args.seq, "step_flops_hardware": flops_of["ours"], "matmul_peak_flops": peak,
              "matmul_peak_flops_before_after": [peak_before, peak_after], "sides": {}}
    report(args, record, flops_of, times, peaks, peak)
    append_result(record)


if __name__ == "__main__":
    main()
