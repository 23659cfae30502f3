"""LoRA, DoRA, LoRA+ and PiSSA side by side: the same steps, data and FLOP budget, one train.py run each.

    python bench/variants.py --model /path/to/smollm2 --data ../shared/data/lotka_volterra_data.h5
    python bench/variants.py --model tiny --steps 2 --eval-systems 2 --horizon 2      # the script's own check
    python bench/variants.py --model M --data D --variants lora,dora -- --targets all --rank 4

Each variant is one train.py run in OUT/<variant> with the same flags (the shared ones, then the flags
after `--`), differing only in its own: `dora` adds --dora, `loraplus` --loraplus-ratio (16, PEFT's
suggestion), `pissa` --init pissa. Every run gets the same --steps and the same --max-flops, so a
variant whose steps cost more (DoRA) shows that as FLOPs, or as fewer steps if the budget binds.
Then each adapter is loaded, as a user would load it, into a fresh copy of the base model (PiSSA's
converted one into the original base) and forecasts --eval-systems validation systems greedily.

Printed per variant: steps run, FLOPs (coursework), final validation loss, forecast MAE and MSE on
the validation systems, and the median seconds per training step (validation passes excluded),
with the machine it ran on. A killed comparison continues where it stopped: finished runs are kept
(OUT/<variant>/checkpoint-*), an interrupted one is resumed. Results also go to OUT/variants.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import _util  # noqa: F401  (puts the repository on sys.path)

from _util import machine

VARIANTS = {"lora": [], "dora": ["--dora"], "loraplus": ["--loraplus-ratio", "16"], "pissa": ["--init", "pissa"]}


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    a = p.add_argument
    a("--model", required=True, help="SmolLM2 (or any supported) checkpoint folder, or 'tiny'")
    a("--data", default=None, help="the coursework HDF5 file (default: the built-in simulator)")
    a("--out", default="runs/variants")
    a("--variants", default="lora,dora,loraplus,pissa", help=f"comma-separated, from {', '.join(VARIANTS)}")
    a("--steps", type=int, default=300)
    a("--max-flops", type=float, default=1e17, help="the same budget for every variant")
    a("--lr", type=float, default=1e-4)
    a("--batch-size", type=int, default=4)
    a("--context-length", type=int, default=512)
    a("--eval-every", type=int, default=50)
    a("--eval-systems", type=int, default=20, help="validation systems forecast per variant")
    a("--eval-context-steps", type=int, default=50)
    a("--horizon", type=int, default=20)
    a("--device", default="auto")
    args = p.parse_args(argv)
    args.extra = extra
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def train_variant(args, name: str) -> Path:
    """Train (or resume, or keep) OUT/<name>; return its folder."""
    import train
    from common.checkpoints import latest_checkpoint

    folder = Path(args.out) / name
    shared = ["--model", args.model, *(["--data", args.data] if args.data else []), "--lr", str(args.lr),
              "--batch-size", str(args.batch_size), "--context-length", str(args.context_length),
              "--eval-every", str(args.eval_every), "--max-flops", str(args.max_flops), "--device", args.device]
    if latest_checkpoint(folder):
        train.train(["--resume", str(folder), "--steps", str(args.steps)])  # a finished run just says so
    else:
        train.train(shared + args.extra + VARIANTS[name] + ["--steps", str(args.steps), "--out", str(folder)])
    return folder


def step_seconds(records: list[dict]) -> float:
    """Median time between consecutive training steps that had no validation pass between them."""
    gaps, last, evaluated = [], None, False
    for r in records:
        if "val_loss" in r or "samples" in r:
            evaluated = True
        elif "loss" in r:
            if last is not None and not evaluated and r["step"] == last["step"] + 1:
                gaps.append(r["time"] - last["time"])
            last, evaluated = r, False
    return statistics.median(gaps) if gaps else float("nan")


def forecast_errors(args, folder: Path, base, tok) -> dict:
    """Greedy forecasts of the validation systems with the saved adapter on a fresh copy of the base."""
    import eval as ev
    import lora
    from common.files import read_json
    from data import Scaler, forecast_task

    cfg = read_json(folder / "config.json", what="run config")
    model = copy.deepcopy(base)
    lora.load_adapter(model, folder)
    model.eval()
    dataset, split, _ = ev.trained_data([cfg])
    values = ev.split_systems(dataset, split, "val", args.eval_systems)
    scaler, decimals = Scaler.from_dict(cfg["scaler"]), int(cfg["args"]["decimals"])
    task = forecast_task(values, scaler, decimals, args.eval_context_steps, args.horizon)
    texts = ev.generate_forecasts(model, tok, task.prompts, args.horizon, decimals)
    metrics = ev.evaluate_forecasts(texts, task, scaler, decimals, args.horizon)
    return {"val_mae": metrics["mae"], "val_mse": metrics["mse"], "invalid": metrics["invalid"]}


def summarize(args, name: str, folder: Path, base, tok) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    return {"variant": name, "flags": " ".join(VARIANTS[name]) or "(plain LoRA)", "steps": steps[-1]["step"],
            "flops": max(r["flops"] for r in records), "val_loss": vals[-1]["val_loss"],
            "s_per_step": step_seconds(records), **forecast_errors(args, folder, base, tok)}


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from common.devices import parse_device
    from model import load_pretrained
    from model.precision import weights_dtype
    from training.memory import reuse_freed_memory

    reuse_freed_memory()  # as train.py's main: the runs below are timed with the setting train.py uses
    folders = {name: train_variant(args, name) for name in args.variants}
    device = parse_device(args.device)
    base, tok = load_pretrained(args.model, dtype=weights_dtype("auto", device), device=device)
    rows = [summarize(args, name, folder, base, tok) for name, folder in folders.items()]
    info = machine()
    print(f"\n{args.model}, {args.data or 'simulated data'}: {args.steps} steps each, batch {args.batch_size} x "
          f"{args.context_length} tokens, lr {args.lr}, budget {args.max_flops:.3g}; forecasts of "
          f"{args.eval_systems} validation systems, {args.horizon} steps ahead")
    print(f"machine: {info.get('gpu') or info['cpu']} ({info['cores']} cores, torch {info['torch']}, "
          f"commit {info['commit']})")
    print(f"| variant | flags | steps | FLOPs | val loss | val MAE | val MSE | s/step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['flags']} | {r['steps']} | {r['flops']:.3e} | {r['val_loss']:.4f} | "
              f"{r['val_mae']:.4f} | {r['val_mse']:.4f} | {r['s_per_step']:.3f} |")
    from common.files import write_json

    write_json(Path(args.out) / "variants.json", {"settings": {k: v for k, v in vars(args).items()}, "machine": info,
                                                  "results": rows})
    return rows


if __name__ == "__main__":
    from common.cli import run_cli

    run_cli(main)
