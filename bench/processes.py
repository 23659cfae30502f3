"""Two processes of one thread against one process of two threads: train.py's tokens/s, same machine, same run.

    python bench/processes.py --model ~/.cache/smollm2-135m-instruct --steps 6

Both sides run the same training (global batch, windows, steps) as subprocesses: `torchrun
--nproc_per_node 2` with OMP_NUM_THREADS=1, and plain `python train.py` with OMP_NUM_THREADS=2. The
rate is window tokens per second from metrics.jsonl, timed from the end of step 1 (so loading, the
first step's allocations and the data preparation are left out) to the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import _util  # noqa: F401
from _util import ROOT, append_result, machine


def side(cmd_prefix: list[str], threads: int, train_args: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd_prefix + ["train.py", *train_args, "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"train.py failed:\n{proc.stderr[-3000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    first, last = steps[0], steps[-1]
    tokens = last["tokens_seen"] - first["tokens_seen"]
    seconds = last["time"] - first["time"]
    return {"tokens_per_s": tokens / seconds, "seconds": seconds, "steps_timed": len(steps) - 1,
            "final_loss": last["loss"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", default=str(Path("~/.cache/smollm2-135m-instruct").expanduser()))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    train_args = ["--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--context-length", str(args.context_length), "--dtype", args.dtype, "--eval-every", "100000",
                  "--systems", "40"]
    record = {"bench": "processes", "machine": machine(), "args": vars(args), "sides": {}}
    print(f"machine: {record['machine']}")
    with tempfile.TemporaryDirectory() as tmp:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        for name, prefix, threads in (("1 process x 2 threads", [sys.executable], 2), ("2 processes x 1 thread", torchrun, 1)):
            record["sides"][name] = side(prefix, threads, train_args, Path(tmp) / name.replace(" ", "_"))
            s = record["sides"][name]
            print(f"{name:<24} {s['tokens_per_s']:8.1f} tokens/s  ({s['steps_timed']} steps in {s['seconds']:.1f} s, "
                  f"final loss {s['final_loss']:.4f})")
    a, b = (record["sides"][k]["tokens_per_s"] for k in ("2 processes x 1 thread", "1 process x 2 threads"))
    record["ratio_2p_over_1p"] = a / b
    print(f"2 processes x 1 thread / 1 process x 2 threads: {a / b:.2f}x")
    append_result(record)


if __name__ == "__main__":
    main()
