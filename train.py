"""LoRA fine-tuning of Qwen2.5 on Lotka–Volterra trajectories written as LLMTIME text.

    python train.py --rank 8 --lr 1e-4                 # Qwen2.5-0.5B-Instruct, simulated data, runs/lv
    python train.py --model tiny --steps 50 --out runs/tiny      # the whole loop offline, in seconds
    python train.py --resume runs/lv --steps 2000      # continue a run to 2,000 steps in total

Each optimizer step accumulates `--grad-accum` micro-batches of `--batch-size` windows and averages
the loss over every real target token in them (not the mean of micro-batch means). FLOPs are counted
with flops.py in the coursework accounting (hardware count beside it) and the run stops cleanly,
with a checkpoint, before a step would pass `--max-flops`.

Outputs in --out: config.json (every setting, the data scaling), metrics.jsonl (one JSON line per
step and per evaluation), checkpoint/ (the adapter in PEFT format + trainer_state.pt, replaced
atomically at every save).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import flops
import lora
from common import UserError, atomic_dir, parse_device, read_json, reuse_freed_memory, run_cli, write_json
from data import Scaler, load_trajectories, make_windows, split_indices, trajectory_texts
from model import DEFAULT_MODEL, load_pretrained
from model.loss import lm_loss_sum
from optim import AdamW, clip_grad_norm, lr_at

RESUMABLE_OVERRIDES = ("steps", "max_flops", "eval_every", "save_every", "device", "grad_checkpoint", "compile")


# ------------------------------------------------------------------------------------------- flags
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=DEFAULT_MODEL, help="hub id, checkpoint folder, or 'tiny'")
    a("--data", default=None, help="HDF5 file in the coursework layout (default: the built-in simulator)")
    a("--systems", type=int, default=None, help="use only the first N systems of the dataset")
    a("--data-seed", type=int, default=0, help="seed of the simulated data and of the train/val/test split")
    a("--rank", type=int, default=8)
    a("--alpha", type=float, default=16.0)
    a("--targets", default="q_proj,v_proj", help="comma-separated projections, or 'all'")
    a("--dropout", type=float, default=0.0, help="LoRA dropout")
    a("--lr", type=float, default=1e-4)
    a("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay (LoRA matrices only)")
    a("--betas", type=float, nargs=2, default=(0.9, 0.999))
    a("--eps", type=float, default=1e-8)
    a("--warmup", type=int, default=0, help="linear warmup steps")
    a("--schedule", default="constant", choices=["constant", "cosine", "linear"])
    a("--steps", type=int, default=1000, help="total optimizer steps of the run (also when resuming)")
    a("--batch-size", type=int, default=4, help="windows per micro-batch")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--context-length", type=int, default=512, help="tokens per training window")
    a("--stride", type=int, default=None, help="tokens between window starts (default: context-length / 2)")
    a("--decimals", type=int, default=2)
    a("--clip", type=float, default=1.0, help="gradient-norm clipping (0 disables)")
    a("--eval-every", type=int, default=50)
    a("--eval-batches", type=int, default=8)
    a("--save-every", type=int, default=100)
    a("--seed", type=int, default=0)
    a("--out", default="runs/lv")
    a("--resume", default=None, metavar="OUT", help="continue the run in this folder")
    a("--max-flops", type=float, default=1e17, help="FLOP budget (coursework accounting)")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="storage of the frozen weights; auto: float32 on CPU, bfloat16 (+ autocast) on CUDA")
    a("--device", default="auto")
    a("--grad-checkpoint", action="store_true", help="recompute activations in the backward pass")
    a("--compile", action="store_true",
      help="torch.compile each block (fuses the elementwise work; needs a C++ compiler on CPU)")
    a("--loss-chunk", type=int, default=512, help="rows of logits formed at once by the loss")
    return p


def check_args(args) -> None:
    rules = [
        (args.rank >= 1, "--rank must be at least 1"), (args.alpha > 0, "--alpha must be positive"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"), (args.lr > 0, "--lr must be positive"),
        (args.weight_decay >= 0, "--weight-decay must be >= 0"),
        (all(0 <= b < 1 for b in args.betas), "--betas must both be in [0, 1)"), (args.eps > 0, "--eps must be positive"),
        (args.warmup >= 0, "--warmup must be >= 0"), (args.steps >= 1, "--steps must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"), (args.grad_accum >= 1, "--grad-accum must be at least 1"),
        (args.context_length >= 2, "--context-length must be at least 2"),
        (args.stride is None or args.stride >= 1, "--stride must be at least 1"),
        (1 <= args.decimals <= 6, "--decimals must be between 1 and 6 (LLMTIME uses 2 or 3)"),
        (args.clip >= 0, "--clip must be >= 0 (0 disables)"), (args.eval_every >= 1, "--eval-every must be at least 1"),
        (args.eval_batches >= 1, "--eval-batches must be at least 1"), (args.save_every >= 1, "--save-every must be at least 1"),
        (args.max_flops > 0, "--max-flops must be positive"), (args.loss_chunk >= 1, "--loss-chunk must be at least 1"),
        (args.systems is None or args.systems >= 3, "--systems must be at least 3 (train, validation, test)"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def check_compiler(device: torch.device) -> None:
    """torch.compile fails deep inside its first call without a toolchain: say so up front."""
    import importlib.util
    import shutil

    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserError("--compile on CUDA needs triton (pip install triton), or drop --compile")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        raise UserError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop --compile")


def resolve_resume(argv) -> argparse.Namespace:
    """Parse flags; with --resume, the saved configuration wins except for the few flags that may
    change between sessions (total steps, budget, eval/save cadence, device, recompute, compile)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.resume:
        return args
    saved = read_json(Path(args.resume) / "config.json", what="run config (config.json)")
    explicit = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            explicit._add_action(action)
    given = vars(explicit.parse_known_args(argv)[0])
    merged = {**vars(args), **{k: v for k, v in saved["args"].items() if k in vars(args)}}
    merged.update({k: given[k] for k in RESUMABLE_OVERRIDES if k in given})
    merged["resume"], merged["out"] = args.resume, args.resume
    return argparse.Namespace(**merged)


# -------------------------------------------------------------------------------------------- data
class BatchOrder:
    """Shuffled passes over the training windows. Each epoch's order is a pure function of (seed,
    epoch), so the position (epoch, index) is all a checkpoint needs to continue exactly."""

    def __init__(self, n: int, seed: int, epoch: int = 0, index: int = 0):
        self.n, self.seed, self.epoch, self.index = n, seed, epoch, index
        self._order = self._perm(epoch)

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def next(self, k: int) -> torch.Tensor:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            take = min(k - len(out), self.n - self.index)
            out += self._order[self.index : self.index + take].tolist()
            self.index += take
        return torch.tensor(out)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


def prepare_data(args, tok):
    traj = load_trajectories(args.data, n=1000, seed=args.data_seed)
    values = traj.values[: args.systems] if args.systems else traj.values
    split = split_indices(len(values), seed=args.data_seed)
    scaler = Scaler.fit(values[split["train"]])
    stride = args.stride or max(1, args.context_length // 2)
    step_tokens = len(tok.encode(trajectory_texts(values[:1, :1], scaler, args.decimals)[0] + ";"))
    if args.context_length <= step_tokens:
        raise UserError(f"--context-length {args.context_length} is shorter than one timestep "
                        f"({step_tokens} tokens at {args.decimals} decimals); use at least {step_tokens + 1}")
    windows = {}
    for name in ("train", "val"):
        texts = trajectory_texts(values[split[name]], scaler, args.decimals)
        windows[name] = make_windows(tok.encode_batch(texts), args.context_length, stride, tok.pad_id)
    info = {"source": traj.source, "systems": len(values), "timesteps": int(values.shape[1]),
            "split_sizes": {k: int(len(v)) for k, v in split.items()}, "stride": stride,
            "train_windows": len(windows["train"]), "val_windows": len(windows["val"]), "tokens_per_step": step_tokens}
    return windows, scaler, info


# ----------------------------------------------------------------------------------- checkpoints
def save_checkpoint(out: Path, model, opt: AdamW, state: dict) -> None:
    with atomic_dir(out / "checkpoint") as tmp:
        lora.save_adapter(model, tmp)
        torch.save({**state, "optimizer": opt.state_dict()}, tmp / "trainer_state.pt")


def load_checkpoint(out: Path, model, opt: AdamW) -> dict:
    path = out / "checkpoint"
    if not (path / "trainer_state.pt").is_file():
        raise UserError(f"no checkpoint to resume in {out} (expected {path}/trainer_state.pt)")
    lora.load_adapter(model, path)
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    return state


def rng_state(device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def rewrite_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be produced again)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= upto_step]
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in keep))


# ------------------------------------------------------------------------------------------ steps
def accumulated_step(model, windows, micro_batches, autocast, chunk: int):
    """Forward and backward over several micro-batches; the loss is averaged over all their target
    tokens together (so a micro-batch with more padding weighs less, exactly as in one big batch)."""
    keep = [(windows.real[idx][:, 1:] & windows.real[idx][:, :-1]) for idx in micro_batches]
    n_targets = int(sum(k.sum() for k in keep))
    device = next(model.parameters()).device
    total = 0.0
    for idx in micro_batches:
        ids, real = windows.input_ids[idx].to(device), windows.real[idx].to(device)
        with autocast():
            loss_sum, _ = lm_loss_sum(model, ids, real, chunk)
        (loss_sum / n_targets).backward()
        total += float(loss_sum.detach())
    return total / n_targets, n_targets


def optimizer_step(model, opt: AdamW, windows, micro_batches, lr: float, clip: float, autocast, chunk: int):
    """One training step: accumulate, clip, AdamW. A non-finite loss or gradient skips the update (the
    caller stops the run). Returns (loss, target tokens, pre-clip gradient norm). bench/ times this."""
    loss, n_targets = accumulated_step(model, windows, micro_batches, autocast, chunk)
    grad_norm = clip_grad_norm(opt.params.values(), clip)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        opt.step(lr)
    opt.zero_grad()
    return loss, n_targets, grad_norm


@torch.no_grad()
def evaluate(model, windows, batch_size: int, n_batches: int, autocast, chunk: int) -> float:
    """Mean loss per target token over the first n_batches x batch_size validation windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(0, min(len(windows), n_batches * batch_size), batch_size):
        ids = windows.input_ids[s : s + batch_size].to(device)
        real = windows.real[s : s + batch_size].to(device)
        with autocast():
            loss_sum, n = lm_loss_sum(model, ids, real, chunk)
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    return total / max(count, 1)


def eval_windows_count(windows, batch_size: int, n_batches: int) -> int:
    return math.ceil(min(len(windows), n_batches * batch_size) / batch_size)


# ------------------------------------------------------------------------------------------- run
def train(argv=None) -> dict:
    args = resolve_resume(argv)
    check_args(args)
    out = Path(args.out)
    if not args.resume and (out / "checkpoint").exists():
        raise UserError(f"{out} already holds a run; continue it with --resume {out}, or choose another --out")
    device = parse_device(args.device)
    if args.compile:
        check_compiler(device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    use_autocast = device.type == "cuda" and dtype == torch.bfloat16
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_autocast else contextlib.nullcontext

    reuse_freed_memory()
    torch.manual_seed(args.seed)
    model, tok = load_pretrained(args.model, dtype=dtype, device=device)
    lora.apply_lora(model, rank=args.rank, alpha=args.alpha, targets=args.targets, dropout=args.dropout)
    model.grad_checkpoint = args.grad_checkpoint
    if args.compile:
        model.compile_blocks()
    model.train()
    windows, scaler, data_info = prepare_data(args, tok)
    if len(windows["train"]) == 0 or len(windows["val"]) == 0:
        raise UserError("no training or validation windows: the dataset is too small for this context length")

    params = lora.lora_parameters(model)
    opt = AdamW(params, lr=args.lr, betas=args.betas, eps=args.eps, weight_decay=args.weight_decay)
    per_micro = flops.count(model, args.batch_size, args.context_length)
    step_cw = args.grad_accum * (per_micro.forward_coursework + per_micro.loss_coursework + per_micro.backward_coursework) \
        + per_micro.optimizer_coursework
    step_hw = args.grad_accum * per_micro.train_step_hardware
    n_eval = eval_windows_count(windows["val"], args.batch_size, args.eval_batches)
    eval_cw, eval_hw = n_eval * per_micro.eval_coursework, n_eval * per_micro.forward_hardware

    config = {"args": vars(args), "scaler": scaler.to_dict(), "data": data_info, "lora": model.lora_config,
              "model_source": getattr(model, "source", args.model), "tokenizer_vocab": tok.vocab_size,
              "flops": {"train_step": step_cw, "train_step_hardware": step_hw, "eval": eval_cw, "eval_hardware": eval_hw}}
    state = {"step": 0, "flops": 0, "flops_hardware": 0, "tokens": 0, "time": 0.0, "data": {"epoch": 0, "index": 0}}
    if args.resume:
        saved = read_json(out / "config.json", what="run config (config.json)")
        if saved["scaler"] != config["scaler"]:
            raise UserError(f"the data of {out} no longer scales the same way (alpha {saved['scaler']['alpha']:.6g} "
                            f"vs {scaler.alpha:.6g}): resume with the same --data")
        state = load_checkpoint(out, model, opt)
        set_rng_state(state["rng"], device)
        rewrite_metrics(out / "metrics.jsonl", state["step"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config)
    order = BatchOrder(len(windows["train"]), args.seed, **state["data"])
    step, used, used_hw, tokens, time_offset = state["step"], state["flops"], state["flops_hardware"], state["tokens"], state["time"]
    if step >= args.steps:
        print(f"{out} is already at step {step} of {args.steps}; pass a larger --steps to continue", file=sys.stderr)
        return {"step": step, "stopped": "done", "flops": used}

    def snapshot():
        return {"step": step, "flops": used, "flops_hardware": used_hw, "tokens": tokens,
                "time": time_offset + (time.perf_counter() - t0), "data": order.state(), "rng": rng_state(device)}

    print(f"data: {data_info['source']}, {data_info['split_sizes']['train']} train / {data_info['split_sizes']['val']} val systems, "
          f"{data_info['train_windows']} training windows of {args.context_length} tokens; scaling alpha {scaler.alpha:.4g}", file=sys.stderr)
    print(f"FLOPs per step: {step_cw:.3e} (coursework), {step_hw:.3e} (hardware); budget {args.max_flops:.3g} "
          f"fits {int((args.max_flops - used) // step_cw):,} more steps", file=sys.stderr)
    metrics = open(out / "metrics.jsonl", "a")
    stopped, last_val = "done", None
    t0 = time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr)
    try:
        while step < args.steps:
            next_step = step + 1
            will_eval = next_step % args.eval_every == 0 or next_step == args.steps
            cost = step_cw + (eval_cw if will_eval else 0)
            if used + cost > args.max_flops:
                stopped = "budget"
                break
            lr = lr_at(next_step, args.lr, args.steps, args.warmup, args.schedule)
            micro = [order.next(args.batch_size) for _ in range(args.grad_accum)]
            loss, n_targets, grad_norm = optimizer_step(model, opt, windows["train"], micro, lr, args.clip, autocast,
                                                        args.loss_chunk)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                stopped = "nan"
                break
            step, used, used_hw = next_step, used + step_cw, used_hw + step_hw
            tokens += args.grad_accum * args.batch_size * args.context_length
            elapsed = time.perf_counter() - t0
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                   "target_tokens": n_targets, "flops": used, "flops_hardware": used_hw, "time": time_offset + elapsed}
            if will_eval:
                last_val = evaluate(model, windows["val"], args.batch_size, args.eval_batches, autocast, args.loss_chunk)
                used, used_hw = used + eval_cw, used_hw + eval_hw
                rec.update(flops=used, flops_hardware=used_hw)
            metrics.write(json.dumps(rec) + "\n")
            if will_eval:
                metrics.write(json.dumps({"step": step, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 700)),
                                          "flops": used, "flops_hardware": used_hw}) + "\n")
                tqdm.write(f"step {step}: val loss {last_val:.4f}, perplexity {math.exp(min(last_val, 700)):.3f}", file=sys.stderr)
            metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.3f}",
                            tok_s=f"{(tokens - state['tokens']) / elapsed:,.0f}", flops=f"{used:.2e}/{args.max_flops:.0e}")
            if step % args.save_every == 0 or step == args.steps:
                save_checkpoint(out, model, opt, snapshot())
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint(out, model, opt, snapshot())
        print(f"\ninterrupted after step {step}: checkpoint saved in {out}/checkpoint; continue with "
              f"python train.py --resume {out}", file=sys.stderr)
        raise
    finally:
        bar.close()
        metrics.close()
    if stopped == "nan":
        last = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)["step"] if (out / "checkpoint").exists() else None
        raise UserError(f"the loss or gradient became non-finite at step {step + 1} (loss {loss}, grad norm {grad_norm}); "
                        + (f"the last good checkpoint (step {last}) is kept in {out}/checkpoint; " if last is not None else "")
                        + "try a lower --lr or --clip")
    save_checkpoint(out, model, opt, snapshot())
    if stopped == "budget":
        print(f"FLOP budget reached: stopped after step {step} with {used:.4g} of {args.max_flops:.4g} FLOPs used "
              f"(the next step needs {cost:.4g}); checkpoint in {out}/checkpoint", file=sys.stderr)
    else:
        print(f"done: {step} steps, {used:.4g} FLOPs (coursework), {used_hw:.4g} (hardware)"
              + (f", final val loss {last_val:.4f}" if last_val is not None else "")
              + f"; adapter and state in {out}/checkpoint", file=sys.stderr)
    return {"step": step, "stopped": stopped, "flops": used, "flops_hardware": used_hw, "val_loss": last_val,
            "step_flops": step_cw, "eval_flops": eval_cw}


def main(argv=None):
    train(argv)


if __name__ == "__main__":
    run_cli(main)
