"""QLoRA's price in one run: the NF4 training step against the same step on bf16 weights, and loading
with NF4 quantization against loading as stored.

    python bench/nf4_step.py                       # Qwen2.5-0.5B's shape, batch 4 x 512, bf16 compute
    python bench/nf4_step.py --dtype float32       # NF4 with fp32 compute against fp32 weights
    python bench/nf4_step.py --layers 1 --batch 1 --seq 16 --steps 1 --warmup 0 --load-runs 1   # does it run?

The step is bench/train_step.py's (train.py's `optimizer_step`, LoRA r=8 on q_proj and v_proj) on two
sides, each in its own process, alternating steps after the warm-up: "ours" with the frozen weights in
--dtype and "ours-nf4", the same model with its seven projections in NF4 (dequantized to --dtype in the
forward pass and again in the backward). The load is bench/load.py's measurement, each in a fresh
process: `load_model` of a random bf16 checkpoint of the same shape as stored, and with
`quantize="nf4"` (every projection rounded to 4 bits as it is read). Issue 29's target on the CPU: the
NF4 step at most 1.5x the bf16 one. Prints both tables and the ratios; appends one record to
bench/results.jsonl. `--layers N` builds N blocks instead of 24: a check that the script runs, not a figure.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import _util  # noqa: F401  (puts the repository on sys.path)
import torch

from _util import append_result, machine, random_qwen
from common.devices import parse_device

LOADS = ("ours (load_model)", "ours, NF4 (QLoRA)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype of both sides")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--load-runs", type=int, default=3, help="fresh-process loads of each kind (the median is shown)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--layers", type=int, default=None, help="fewer blocks than 24: a check that the script runs")
    args = p.parse_args(argv)
    # what bench/train_step.py's sides read, at train.py's defaults
    args.quantize, args.reference, args.plain_loss, args.compile, args.grad_checkpoint = "nf4", False, False, False, False
    args.one_at_a_time, args.no_reuse_memory = False, False
    return args


def time_steps(args, device) -> dict:
    """Median step seconds, tokens/s and peak memory of "ours" and "ours-nf4", alternating."""
    from train_step import run_sides

    times, peaks = run_sides(args, device, ["ours", "ours-nf4"])
    tokens = args.batch * args.seq
    return {side: {"median_s": statistics.median(t), "min_s": min(t), "tokens_per_s": tokens / statistics.median(t),
                   "peak_memory_bytes": peaks[side]} for side, t in times.items()}


def time_loads(args) -> dict:
    """Median seconds and peak RSS growth of loading a random bf16 checkpoint of the shape, as stored and with NF4."""
    from load import measure
    from model import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "qwen-shaped"
        save_pretrained(random_qwen(layers=args.layers).to(torch.bfloat16), ckpt)
        measure(LOADS[0], ckpt)  # the file into the page cache, for both alike
        runs = {name: [measure(name, ckpt) for _ in range(args.load_runs)] for name in LOADS}
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    return {"checkpoint_bytes": size, **{name: {"seconds": statistics.median(r["seconds"] for r in rs),
                                                "rss_growth": statistics.median(r["rss_growth"] for r in rs),
                                                "model_bytes": rs[0]["model_bytes"]} for name, rs in runs.items()}}


def report(args, steps: dict, loads: dict) -> dict:
    o, q = steps["ours"], steps["ours-nf4"]
    print(f"\n{'step, batch ' + str(args.batch) + ' x ' + str(args.seq):<28}{'median s':>10}{'min s':>9}{'tokens/s':>10}"
          f"{'peak mem GB':>13}")
    for name, side in ((args.dtype, o), (f"NF4, {args.dtype} compute", q)):
        print(f"{name:<28}{side['median_s']:>10.2f}{side['min_s']:>9.2f}{side['tokens_per_s']:>10.1f}"
              f"{side['peak_memory_bytes'] / 1e9:>13.2f}")
    plain, nf4 = loads[LOADS[0]], loads[LOADS[1]]
    print(f"\n{'load, ' + format(loads['checkpoint_bytes'] / 1e6, '.0f') + ' MB bf16':<28}{'median s':>10}"
          f"{'peak RSS growth GB':>20}{'model tensors MB':>18}")
    for name in LOADS:
        print(f"{name:<28}{loads[name]['seconds']:>10.2f}{loads[name]['rss_growth'] / 1e9:>20.2f}"
              f"{loads[name]['model_bytes'] / 1e6:>18.0f}")
    ratios = {"step_time": q["median_s"] / o["median_s"], "step_memory": q["peak_memory_bytes"] / o["peak_memory_bytes"],
              "load_time": nf4["seconds"] / plain["seconds"]}
    print(f"\nNF4 / {args.dtype}: {ratios['step_time']:.2f}x the step time (target on CPU: at most 1.5x), "
          f"{ratios['step_memory']:.2f}x the step's peak memory; loading with NF4 {ratios['load_time']:.2f}x "
          f"the plain load ({nf4['seconds']:.2f} s against {plain['seconds']:.2f} s)")
    return ratios


def main(argv=None):
    args = parse_args(argv)
    device = parse_device(args.device)
    info = machine()
    print(f"{info['cpu']} ({info['threads']} threads), torch {info['torch']}, device {device}, {args.dtype}"
          + (f", {args.layers} layer(s): a check that it runs, not a figure" if args.layers else ""))
    steps = time_steps(args, device)
    loads = time_loads(args)
    ratios = report(args, steps, loads)
    append_result({"bench": "nf4_step", "machine": info, "device": str(device), "dtype": args.dtype,
                   "batch": args.batch, "seq": args.seq, "layers": args.layers, "steps": steps, "loads": loads,
                   "ratios": ratios})


if __name__ == "__main__":
    main()
