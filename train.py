"""LoRA fine-tuning of Qwen2.5 on Lotka–Volterra trajectories written as LLMTIME text, or on conversations.

    python train.py --rank 8 --lr 1e-4                 # Qwen2.5-0.5B-Instruct, simulated data, runs/lv
    python train.py --model tiny --steps 50 --out runs/tiny      # the whole loop offline, in seconds
    python train.py --resume runs/lv --steps 2000      # continue a run to 2,000 steps in total
    python train.py --data examples/chats.jsonl --targets all --pack --eval-prompts examples/prompts.txt --out runs/chat

`--data` picks the kind: an HDF5 file (or nothing: the simulator) is forecasting text (data/windows.py),
a .jsonl file is chat or instruction data (data/chat.py). Both hand this loop the same thing, token
windows with a loss mask (`data.TrainingData`), so everything below serves both.

Each optimizer step accumulates `--grad-accum` micro-batches of `--batch-size` windows and averages
the loss over every real target token in them (not the mean of micro-batch means). FLOPs are counted
with flops.py in the coursework accounting (hardware count beside it) and the run stops cleanly,
with a checkpoint, before a step would pass `--max-flops`.

Outputs in --out: config.json (every setting, the data scaling), metrics.jsonl (one JSON line per
step and per evaluation), checkpoint-NNNNNN/ (the adapter in PEFT format + trainer_state.pt; see
common/checkpoints.py for why a complete one exists at every instant).

Nothing is lost to an interruption. The weights, the optimizer moments, the step and FLOP counters,
the data position, the RNG states and the number of metrics lines change together, at step
boundaries, with Ctrl-C and SIGTERM held back for those few milliseconds (`RunState`, training/state.py). Ctrl-C or
SIGTERM saves the last boundary; SIGKILL or a power cut loses what came after the newest checkpoint.
Either way `--resume` continues from a state the run really passed through, and ends bit for bit
where the uninterrupted run would have.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: Ctrl-C during start-up is one line (common/startup.py)
    from common.startup import quiet_ctrl_c
    quiet_ctrl_c()

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

import flops
import lora
from common.checkpoints import (PARTIAL, best_checkpoint, checkpoint_dir, latest_checkpoint, remove_partial, rewind_log,
                                write_best, write_checkpoint)
from common.cli import ReportedInterrupt, UserError, deferred_interrupts, format_perplexity, run_cli, sigterm_as_interrupt
from common.devices import parse_device
from common.files import read_json, write_json
from data import TrainingData, forecasting_data, load_trajectories
from data.chat import chat_data
from model import DEFAULT_MODEL, load_pretrained
from model.loss import lm_loss_sum, mean_loss
from model.precision import weights_dtype
from training import distributed, eval_prompts
from training.lock import LOCK_FILE, claim_run_folder, release_run_folder
from training.memory import reuse_freed_memory
from training.optim import AdamW, clip_grad_norm, lr_at
from training.state import BatchOrder, RunState, load_checkpoint, rng_state, save_state, set_rng_state


# ------------------------------------------------------------------------------------------- flags
ON_OFF = {"action": argparse.BooleanOptionalAction}
FLAGS = (  # (flag, default, help, argparse keywords). Every flag parses to None when not given.
    ("--model", DEFAULT_MODEL, "hub id, checkpoint folder, or 'tiny'", {}),
    ("--data", None, "HDF5 file in the coursework layout (default: the built-in simulator), or JSONL conversations", {}),
    ("--val-data", None, "JSONL: conversations to validate on (default: hold out --val-fraction of --data)", {}),
    ("--val-fraction", 0.1, "JSONL: share of the conversations held out for validation (seeded by --data-seed)", {"type": float}),
    ("--train-on", "assistant", "JSONL: tokens the loss learns: every assistant turn, the last one, or all",
     {"choices": ["assistant", "last", "all"]}),
    ("--pack", False, "JSONL: several whole conversations per window, each attending only to itself", ON_OFF),
    ("--eval-prompts", None, "file, one prompt per line: greedy answers before and after training in OUT/samples.md", {}),
    ("--eval-max-tokens", 128, "new tokens per --eval-prompts answer", {"type": int}),
    ("--systems", None, "use only the first N systems of the dataset", {"type": int}),
    ("--data-seed", 0, "seed of the simulated data and of the train/val/test split", {"type": int}),
    ("--rank", 8, "LoRA rank", {"type": int}),
    ("--alpha", 16.0, "LoRA alpha (scaling alpha / rank)", {"type": float}),
    ("--targets", "q_proj,v_proj", "comma-separated projections, or 'all'", {}),
    ("--dropout", 0.0, "LoRA dropout", {"type": float}),
    ("--lr", 1e-4, "peak learning rate", {"type": float}),
    ("--weight-decay", 0.0, "AdamW decoupled weight decay (LoRA matrices only)", {"type": float}),
    ("--betas", [0.9, 0.999], "AdamW betas", {"type": float, "nargs": 2}),
    ("--eps", 1e-8, "AdamW epsilon", {"type": float}),
    ("--warmup", 0, "linear warmup steps", {"type": int}),
    ("--schedule", "constant", "learning-rate schedule after warmup", {"choices": ["constant", "cosine", "linear"]}),
    ("--steps", 1000, "total optimizer steps of the run (also when resuming)", {"type": int}),
    ("--batch-size", 4, "windows per micro-batch", {"type": int}),
    ("--grad-accum", 1, "micro-batches per optimizer step", {"type": int}),
    ("--context-length", 512, "tokens per training window", {"type": int}),
    ("--stride", None, "tokens between window starts (default: context-length / 2)", {"type": int}),
    ("--decimals", 2, "decimals per value in the LLMTIME text", {"type": int}),
    ("--clip", 1.0, "gradient-norm clipping (0 disables)", {"type": float}),
    ("--eval-every", 50, "steps between validation passes", {"type": int}),
    ("--eval-batches", 8, "validation batches per pass", {"type": int}),
    ("--save-every", 100, "steps between checkpoints", {"type": int}),
    ("--seed", 0, "seed of the LoRA initialisation, dropout and batch order", {"type": int}),
    ("--out", "runs/lv", "run folder", {}),
    ("--max-flops", 1e17, "FLOP budget (coursework accounting)", {"type": float}),
    ("--dtype", "auto", "storage of the frozen weights; auto: bfloat16 (+ autocast) on CUDA, on CPU the faster of "
     "float32 and bfloat16 as measured here (model/precision.py), kept on --resume",
     {"choices": ["auto", "float32", "bfloat16"]}),
    ("--device", "auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps", {}),
    ("--grad-checkpoint", False, "recompute activations in the backward pass", ON_OFF),
    ("--compile", False, "torch.compile each block (fuses the elementwise work; needs a C++ compiler on CPU)", ON_OFF),
    ("--loss-chunk", 512, "rows of logits formed at once by the loss", {"type": int}),
    ("--quantize", None, "store the frozen projections in 4-bit NF4 (QLoRA; model/nf4.py)", {"choices": ["nf4"]}),
    ("--dora", False, "DoRA: a trainable magnitude per output row besides B A (lora/dora.py; QDoRA with --quantize)", ON_OFF),
    ("--loraplus-ratio", 1.0, "LoRA+: lora_B and 1-D tensors (DoRA's magnitude) learn at lr x this (PEFT suggests 16)",
     {"type": float}),
    ("--init", "kaiming", "how A, B start: kaiming, gaussian, pissa, pissa_niter_K or olora (lora/init.py)", {}),
    ("--rslora", False, "rsLoRA: scaling alpha / sqrt(rank) instead of alpha / rank", ON_OFF),
    ("--keep", 1, "numbered checkpoints kept, the newest N", {"type": int}),
    ("--keep-best", False, "also keep the state of the lowest validation loss in OUT/best/", ON_OFF),
)
# --help shows the flags in these groups, so the eye finds them; every flag of FLAGS (and --resume) is in
# exactly one (tests/test_first_hour.py): a new flag fails that test until it is given a group here.
FLAG_GROUPS = {
    "model and data": ("--model", "--quantize", "--data", "--val-data", "--val-fraction", "--train-on", "--pack",
                       "--systems", "--data-seed", "--context-length", "--stride", "--decimals"),
    "LoRA": ("--rank", "--alpha", "--targets", "--dropout", "--dora", "--init", "--rslora"),
    "optimizer": ("--lr", "--loraplus-ratio", "--weight-decay", "--betas", "--eps", "--clip", "--seed"),
    "schedule and budget": ("--steps", "--warmup", "--schedule", "--batch-size", "--grad-accum", "--max-flops"),
    "evaluation": ("--eval-every", "--eval-batches", "--eval-prompts", "--eval-max-tokens"),
    "checkpoints": ("--out", "--save-every", "--keep", "--keep-best", "--resume"),
    "performance": ("--dtype", "--device", "--grad-checkpoint", "--compile", "--loss-chunk"),
}
DEFAULTS = {flag[2:].replace("-", "_"): default for flag, default, _, _ in FLAGS}
# What may change between the sessions of one run; everything else would silently change the run.
RESUMABLE = ("steps", "max_flops", "eval_every", "save_every", "device", "grad_checkpoint", "compile", "keep", "keep_best")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # --step is not --steps
    groups = {title: p.add_argument_group(title) for title in FLAG_GROUPS}
    group_of = {flag: groups[title] for title, flags in FLAG_GROUPS.items() for flag in flags}
    for flag, default, help, kw in FLAGS:
        shown = "" if default is None or "default" in help or kw is ON_OFF else f" (default: {default})"
        group_of.get(flag, p).add_argument(flag, default=None, help=help + shown, **kw)
    group_of.get("--resume", p).add_argument("--resume", default=None, metavar="OUT|auto",
                   help=f"continue the run in this folder (auto: the --out folder if it holds this run, else a fresh "
                        f"run); only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} "
                        f"may be given again with new values")
    return p


def resolve_args(argv) -> tuple[argparse.Namespace, dict | None]:
    """The run's settings and, with --resume, its saved config.json.

    A fresh run is the defaults overridden by the flags given. A resumed run is the defaults overridden
    by its saved settings, then by the RESUMABLE flags given; any other flag given with a value that
    differs from the run's is an error rather than silently ignored.
    """
    args = build_parser().parse_args(argv)
    if args.resume == "auto":
        args.resume = auto_resume(args)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "out")}
    if not args.resume:
        return argparse.Namespace(**{**DEFAULTS, **given, "out": args.out or DEFAULTS["out"], "resume": None}), None
    out = Path(args.resume)
    if args.out is not None and Path(args.out) != out:
        raise UserError(f"--out {args.out} and --resume {args.resume} differ; a resumed run stays in its own folder")
    saved = read_run_config(out)
    check_saved_args(saved["args"], out)
    settings = {**DEFAULTS, **{k: v for k, v in saved["args"].items() if k in DEFAULTS}}
    for key, value in given.items():
        if key not in RESUMABLE and json.dumps(value) != json.dumps(settings[key]):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{flag} {value} differs from the run's {settings[key]}: only "
                            f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change on --resume; "
                            f"start a new run (another --out) to change {flag}")
    settings.update({k: given[k] for k in RESUMABLE if k in given})
    settings["out"] = settings["resume"] = str(out)
    return argparse.Namespace(**settings), saved


def read_run_config(out: Path) -> dict:
    if not out.is_dir():
        raise UserError(f"no run to resume: {out} does not exist")
    if not (out / "config.json").is_file() and out.name.startswith("checkpoint-") and (out.parent / "config.json").is_file():
        raise UserError(f"{out} is a checkpoint of the run {out.parent}; resume the run: --resume {out.parent} "
                        f"(it continues from its newest checkpoint)")
    saved = read_json(out / "config.json", what="run config (config.json)")
    if not (isinstance(saved, dict) and isinstance(saved.get("args"), dict)
            and (isinstance(saved.get("scaler"), dict) and "alpha" in saved["scaler"] or isinstance(saved.get("chat"), dict))):
        raise UserError(f"{out / 'config.json'} is not a train.py run config (it needs 'args', and 'scaler' or 'chat'); "
                        f"pass the folder of a training run to --resume")
    return saved


def check_args(args) -> None:
    rules = [
        (args.rank >= 1, "--rank must be at least 1"), (args.alpha > 0, "--alpha must be positive"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"), (args.lr > 0, "--lr must be positive"),
        (args.weight_decay >= 0, "--weight-decay must be >= 0"),
        (all(0 <= b < 1 for b in args.betas), "--betas must both be in [0, 1)"), (args.eps > 0, "--eps must be positive"),
        (args.warmup >= 0, "--warmup must be >= 0"), (args.steps >= 1, "--steps must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"), (args.grad_accum >= 1, "--grad-accum must be at least 1"),
        (args.context_length >= 2, "--context-length must be at least 2"),
        (args.stride is None or 1 <= args.stride <= args.context_length,
         "--stride must be between 1 and --context-length (a longer stride would skip the tokens between windows)"),
        (1 <= args.decimals <= 6, "--decimals must be between 1 and 6 (LLMTIME uses 2 or 3)"),
        (args.clip >= 0, "--clip must be >= 0 (0 disables)"), (args.eval_every >= 1, "--eval-every must be at least 1"),
        (args.eval_batches >= 1, "--eval-batches must be at least 1"), (args.save_every >= 1, "--save-every must be at least 1"),
        (args.max_flops > 0, "--max-flops must be positive"), (args.loss_chunk >= 1, "--loss-chunk must be at least 1"),
        (args.systems is None or args.systems >= 3, "--systems must be at least 3 (train, validation, test)"),
        (0 < args.val_fraction < 1, "--val-fraction must be in (0, 1)"),
        (args.eval_max_tokens >= 1, "--eval-max-tokens must be at least 1"),
        (is_chat(args) or (args.val_data is None and not args.pack and args.train_on == "assistant"),
         "--val-data, --pack and --train-on apply to JSONL chat data (--data FILE.jsonl)"),
        (args.val_data is None or str(args.val_data).endswith(".jsonl"), "--val-data must be a .jsonl file"),
        (args.loraplus_ratio > 0, "--loraplus-ratio must be positive (1: plain LoRA)"),
    ]
    lora.check_variants(args.dora, args.init)
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


def parse_run_argv(argv) -> tuple[argparse.Namespace, dict]:
    """(a fresh run's settings, the flags given) from its command line, checked as setup checks them,
    without loading or training anything; a bad flag or value is a one-line UserError, never argparse's
    usage and exit. study.py checks every run it plans this way before the first one trains."""
    parser = build_parser()

    def refuse(message: str):
        raise UserError(message)

    parser.error = refuse
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    args, _ = resolve_args(argv)
    check_args(args)
    return args, given


# -------------------------------------------------------------------------------------------- data
def is_chat(args) -> bool:
    return args.data is not None and str(args.data).endswith(".jsonl")


def prepare_data(args, tok) -> TrainingData:
    """Training and validation windows of either kind of data, and what identifies them."""
    if is_chat(args):
        return chat_data(tok, args.data, args.val_data, args.val_fraction, args.data_seed, args.context_length,
                         args.train_on, args.pack)
    trajectories = load_trajectories(args.data, n=1000, seed=args.data_seed)
    note_systems(args, trajectories)
    return forecasting_data(tok, trajectories, args.systems, args.data_seed, args.context_length, args.stride, args.decimals)


# ------------------------------------------------------------------------------------------ steps
def accumulated_step(model, windows, micro_batches, autocast, chunk: int, group=distributed.Group()):
    """Forward and backward over several micro-batches; the loss is averaged over all their target
    tokens together (so a micro-batch with more padding weighs less, exactly as in one big batch).

    Under torchrun `micro_batches` are global: this process runs its slice of each, and one all-reduce
    then sums the gradients and loss sums (training/distributed.py says why that is exactly the global mean)."""
    n_targets = int(sum(windows.target_count(idx) for idx in micro_batches))
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for idx in micro_batches:
        with autocast():
            loss_sum, _ = lm_loss_sum(model, chunk=chunk, **windows.batch(group.shard(idx), device))
        (loss_sum / n_targets).backward()
        total += loss_sum.detach()
    if group.active:
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        group.all_reduce_sum([p.grad for p in trainable] + [total])
    return float(total) / n_targets, n_targets


def optimizer_step(model, opt: AdamW, windows, micro_batches, lr: float, clip: float, autocast, chunk: int,
                   commit=None, group=distributed.Group()):
    """One training step: accumulate, clip, AdamW. Returns (loss, target tokens, pre-clip gradient norm).

    The update and `commit(loss, n_targets, grad_norm)`, the bookkeeping that says it happened, run
    with interrupts held back: both happen or neither. A non-finite loss or gradient skips both (the
    caller stops the run). bench/train_step.py times this function.
    """
    loss, n_targets = accumulated_step(model, windows, micro_batches, autocast, chunk, group)
    grad_norm = clip_grad_norm(opt.params.values(), clip)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        opt.zero_grad()
        return loss, n_targets, grad_norm
    with deferred_interrupts():
        opt.step(lr)
        opt.zero_grad()
        if commit is not None:
            commit(loss, n_targets, grad_norm)
    return loss, n_targets, grad_norm


def evaluate(model, windows, batch_size: int, n_batches: int, autocast, chunk: int) -> float:
    """Mean loss per target token over the first n_batches x batch_size validation windows."""
    n = min(len(windows), n_batches * batch_size)
    return mean_loss(model, windows.head(n), batch_size, chunk, autocast)


def eval_due(step: int, args) -> bool:
    """A validation pass follows every --eval-every steps and the last step."""
    return step % args.eval_every == 0 or step == args.steps


def eval_windows_count(windows, batch_size: int, n_batches: int) -> int:
    return math.ceil(min(len(windows), n_batches * batch_size) / batch_size)


# -------------------------------------------------------------------------------------------- run
@dataclass
class Run:
    """What the loop works on: the settings, the model and its data, and the state it moves along."""

    args: argparse.Namespace
    out: Path
    device: torch.device
    autocast: object
    model: torch.nn.Module
    windows: dict
    opt: AdamW
    order: BatchOrder
    costs: dict  # FLOPs of one step and one validation pass, both conventions
    state: RunState
    tok: object = None
    prompts: list | None = None  # --eval-prompts: (texts, token ids)
    group: distributed.Group = field(default_factory=distributed.Group)  # torchrun: this process's place
    metrics: object = None  # metrics.jsonl, open for appending
    t0: float = field(default_factory=time.perf_counter)
    start: RunState | None = None  # the state this session began from
    last: dict = field(default_factory=dict)  # the latest step record and validation loss
    saved: RunState | None = None  # the state of the newest checkpoint this session wrote

    def commit(self, state: RunState, record: dict) -> None:
        """Log one record (rank 0 writes it) and move to `state`. Called with interrupts held back."""
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        self.state = replace(state, metrics_lines=state.metrics_lines + 1)

    def elapsed(self) -> float:
        return self.start.time + time.perf_counter() - self.t0

    def eval_due(self, step: int) -> bool:
        return eval_due(step, self.args)


def read_eval_prompts(args, tok, model, costs: dict) -> tuple | None:
    """--eval-prompts as (texts, token ids), with the bound on their answers' FLOPs put in `costs`
    (the budget keeps room for the answers after the last step)."""
    if not args.eval_prompts:
        return None
    texts = eval_prompts.read_prompts(args.eval_prompts)
    prompts = (texts, eval_prompts.encode_prompts(tok, texts, chat=is_chat(args)))
    costs["samples_bound"] = eval_prompts.cost_bound(model, prompts[1], args.eval_max_tokens)["coursework"]
    return prompts


def setup(args, saved: dict | None) -> Run:
    """Model, LoRA, data, optimizer and FLOP costs; on --resume, the newest checkpoint restored."""
    check_args(args)
    check_unattended_args(args)
    out = Path(args.out)
    if not args.resume and latest_checkpoint(out):
        raise UserError(f"{out} already holds a run; continue it with --resume {out}, or choose another --out")
    group, device = distributed.init(parse_device(args.device))
    claim_run_folder(out, group)
    if args.batch_size % group.world:
        raise UserError(f"--batch-size {args.batch_size} is the global batch and does not split over {group.world} "
                        f"processes; use a multiple of {group.world}")
    if args.compile:
        check_compiler(device)
    # auto: what the run recorded on --resume, else measured (model/precision.py); config.json records it
    dtype = weights_dtype(args.dtype, device, args.model, [saved] if saved else [])
    use_autocast = device.type == "cuda" and dtype == torch.bfloat16
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_autocast else contextlib.nullcontext

    torch.manual_seed(args.seed)
    model, tok = load_pretrained(args.model, dtype=dtype, device=device, quantize=args.quantize)
    check_positions(args, model)
    lora.apply_lora(model, rank=args.rank, alpha=args.alpha, targets=args.targets, dropout=args.dropout,
                    verbose=group.is_main, use_rslora=args.rslora, dora=args.dora, init=args.init)
    model.grad_checkpoint = args.grad_checkpoint
    if args.compile:
        model.compile_blocks()
    model.train()
    data = prepare_data(args, tok)
    params = lora.lora_parameters(model)
    opt = AdamW(params, lr=args.lr, betas=args.betas, eps=args.eps, weight_decay=args.weight_decay,
                lr_scale=lora.loraplus_lr_scales(params, args.loraplus_ratio))
    costs = step_costs(model, args, data.val)
    prompts = read_eval_prompts(args, tok, model, costs)
    for key, value in data.identity.items():
        if saved is not None and saved.get(key) != value:
            raise UserError(f"the data of {out} is not what the run began with (its {key} differs): "
                            f"resume with the same --data files, or start a new run")
    state = (load_checkpoint(out, model, opt) if args.resume else None) or RunState()
    if state.rng:
        set_rng_state(state.rng, device)
    if group.rank:  # dropout masks: each process its own stream (re-seeded every step: train_step); no effect without dropout
        torch.manual_seed(args.seed * 1_000_003 + group.rank * 7_919 + state.step)

    if group.is_main:
        start_run_folder(out, state, {
            "args": vars(args), **data.identity, "data": data.info, "lora": model.lora_config, "processes": group.world,
            "weights_dtype": str(dtype).removeprefix("torch."),  # what --dtype auto chose: --resume and eval.py keep it
            "model_source": getattr(model, "source", args.model), "tokenizer_vocab": tok.vocab_size, "flops": costs})
        print(data.summary, file=sys.stderr)
        print(f"FLOPs per step: {costs['train_step']:.3e} (coursework), {costs['train_step_hardware']:.3e} (hardware); budget "
              f"{args.max_flops:.3g} fits {int((args.max_flops - state.flops) // costs['train_step']):,} more steps"
              + (f"; {group.world} processes x {args.batch_size // group.world} windows" if group.active else ""), file=sys.stderr)
    group.barrier()  # the folder is ready before any process goes on
    return Run(args, out, device, autocast, model, {"train": data.train, "val": data.val}, opt,
               BatchOrder(len(data.train), args.seed, **state.data), costs, state, tok, prompts, group, start=state)


def start_run_folder(out: Path, state: RunState, config: dict) -> None:
    """config.json written, an interrupted checkpoint write cleared, metrics.jsonl rewound to `state`."""
    out.mkdir(parents=True, exist_ok=True)
    remove_partial(out)
    write_json(out / "config.json", config)
    rewind_log(out / "metrics.jsonl", state.metrics_lines)  # a fresh run starts an empty log


def step_costs(model, args, val_windows, lora: dict | None = None) -> dict:
    """FLOPs of one optimizer step and of one validation pass (flops.py), in both conventions.
    `model` may be a bare config with `lora` given (study.py plans runs without loading weights)."""
    per_micro = flops.count(model, args.batch_size, args.context_length, lora=lora,
                            trainable="lora" if lora else None, recompute=args.grad_checkpoint)
    n_eval = eval_windows_count(val_windows, args.batch_size, args.eval_batches)
    return {"train_step": args.grad_accum * (per_micro.forward_coursework + per_micro.train_only_coursework
                                             + per_micro.loss_coursework + per_micro.backward_coursework)
                          + per_micro.optimizer_coursework,
            "train_step_hardware": args.grad_accum * per_micro.train_step_hardware,
            "eval": n_eval * per_micro.eval_coursework, "eval_hardware": n_eval * per_micro.forward_hardware}


def save_checkpoint(run: Run, sync: bool = True) -> Path:
    """Checkpoint the current boundary: adapter, optimizer moments and RunState, together. Rank 0 writes
    (every process holds the same weights and state); with `sync` the others wait until it has."""
    state = run.state
    folder = checkpoint_dir(run.out, state.step)
    if run.group.is_main:
        os.fsync(run.metrics.fileno())  # the log lines this checkpoint counts reach the disk before it does

        def fill(folder: Path) -> None:
            save_state(folder, run.model, run.opt, state)

        folder = write_checkpoint(run.out, state.step, fill, keep=run.args.keep, replace=moved_on(run, state))
        run.saved = state
    if sync:
        run.group.barrier()
    return folder


def train_step(run: Run) -> bool:
    """One optimizer step and its record; False when the loss or gradient was not finite."""
    args, before = run.args, run.state
    step = before.step + 1
    seed_dropout(run, step)
    lr = lr_at(step, args.lr, args.steps, args.warmup, args.schedule)
    micro = [run.order.next(args.batch_size) for _ in range(args.grad_accum)]

    def commit(loss, n_targets, grad_norm):  # runs right after the update, interrupts held back
        state = replace(before, step=step, flops=before.flops + run.costs["train_step"],
                        flops_hardware=before.flops_hardware + run.costs["train_step_hardware"],
                        tokens=before.tokens + args.grad_accum * args.batch_size * args.context_length,
                        time=run.elapsed(), data=run.order.state(), rng=rng_state(run.device),
                        evaluated=not run.eval_due(step))
        run.last = {"loss": loss, "lr": lr, "grad_norm": grad_norm}
        run.commit(state, {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_targets,
                           "tokens_seen": state.tokens, "flops": state.flops, "flops_hardware": state.flops_hardware,
                           "time": state.time})

    loss, _, grad_norm = optimizer_step(run.model, run.opt, run.windows["train"], micro, lr, args.clip, run.autocast,
                                        args.loss_chunk, commit, run.group)
    if run.state.step != step:
        run.last = {"loss": loss, "grad_norm": grad_norm, "failed_step": step}
        return False
    return True


def validate(run: Run) -> None:
    """The validation pass due after the current step, booked and logged."""
    args = run.args
    val = (evaluate(run.model, run.windows["val"], args.batch_size, args.eval_batches, run.autocast, args.loss_chunk)
           if run.group.is_main else float("nan"))  # the others only book its FLOPs
    with deferred_interrupts():
        state = replace(run.state, flops=run.state.flops + run.costs["eval"], evaluated=True,
                        flops_hardware=run.state.flops_hardware + run.costs["eval_hardware"])
        run.commit(state, {"step": state.step, "val_loss": val, "val_ppl": math.exp(min(val, 700)),
                           "flops": state.flops, "flops_hardware": state.flops_hardware})
        keep_if_best(run, val)
    run.last["val_loss"] = val
    if run.group.is_main:
        tqdm.write(f"step {state.step}: val loss {val:.4f}, perplexity {format_perplexity(math.exp(min(val, 700)))}",
                   file=sys.stderr)


def sample_eval_prompts(run: Run, column: str) -> None:
    """Greedy answers to --eval-prompts ("before" or "after" training), booked and written to samples.md."""
    answers, cost = (eval_prompts.answer(run.model, run.tok, run.prompts[1], run.args.eval_max_tokens, run.autocast)
                     if run.group.is_main else (None, None))
    cost = run.group.broadcast(cost)  # every process books what rank 0 generated
    with deferred_interrupts():
        state = replace(run.state, flops=run.state.flops + cost["coursework"],
                        flops_hardware=run.state.flops_hardware + cost["hardware"])
        run.commit(state, {"step": state.step, "samples": column, "flops": state.flops,
                           "flops_hardware": state.flops_hardware})
        if run.group.is_main:  # with the line that books them: a signal cannot fall between the two
            eval_prompts.record(run.out, column, state.step, run.prompts[0], answers)
    if run.group.is_main:
        tqdm.write(f"step {state.step}: answers to --eval-prompts {column} training in {run.out / 'samples.md'}",
                   file=sys.stderr)


def training_loop(run: Run) -> str:
    """Validate, save and step until --steps, the FLOP budget or a non-finite loss: returns which."""
    args = run.args
    bar = tqdm(total=args.steps, initial=run.state.step, desc="train", dynamic_ncols=True, file=sys.stderr,
               disable=not run.group.is_main)
    try:
        while True:
            if not run.state.evaluated:
                validate(run)
            if run.state.step and run.state.step % args.save_every == 0:
                save_checkpoint(run)
            if run.state.step >= args.steps:
                return "done"
            cost = run.costs["train_step"] + (run.costs["eval"] if run.eval_due(run.state.step + 1) else 0)
            if run.state.flops + cost + run.costs.get("samples_bound", 0) > args.max_flops:  # the final answers must fit
                run.last["next_cost"] = cost
                return "budget"
            if not train_step(run):
                return "nan"
            bar.update(1)
            rate = (run.state.tokens - run.start.tokens) / max(time.perf_counter() - run.t0, 1e-9)  # global
            per_process = {"tok_s_proc": f"{rate / run.group.world:,.0f}"} if run.group.active else {}
            bar.set_postfix(loss=f"{run.last['loss']:.4f}", lr=f"{run.last['lr']:.2e}", gnorm=f"{run.last['grad_norm']:.3f}",
                            tok_s=f"{rate:,.0f}", **per_process, flops=f"{run.state.flops:.2e}/{args.max_flops:.0e}")
    finally:
        bar.close()


def finish(run: Run, stopped: str) -> dict:
    """Save the final checkpoint (or keep the last good one after a non-finite loss) and report."""
    out, s = run.out, run.state
    if stopped == "nan":
        last = latest_checkpoint(out)
        raise UserError(f"the loss or gradient became non-finite at step {run.last['failed_step']} (loss {run.last['loss']}, "
                        f"grad norm {run.last['grad_norm']}); "
                        + (f"the last good checkpoint (step {int(last.name.split('-')[1])}) is kept in {last}; " if last
                           else "no checkpoint had been saved yet; ")
                        + "try a lower --lr or --clip")
    if run.prompts and not answered_after(run):
        sample_eval_prompts(run, "after")
        s = run.state
    folder = save_checkpoint(run)
    val = run.last.get("val_loss")
    if run.group.is_main and stopped == "budget":
        print(f"FLOP budget reached: stopped after step {s.step} with {s.flops:.4g} of {run.args.max_flops:.4g} FLOPs used "
              f"(the next step needs {run.last['next_cost']:.4g}); checkpoint in {folder}", file=sys.stderr)
    elif run.group.is_main:
        print(f"done: {s.step} steps, {s.flops:.4g} FLOPs (coursework), {s.flops_hardware:.4g} (hardware)"
              + (f", final val loss {val:.4f}" if val is not None else "")
              + f"; adapter and state in {folder}", file=sys.stderr)
    return {"step": s.step, "stopped": stopped, "flops": s.flops, "flops_hardware": s.flops_hardware, "val_loss": val,
            "step_flops": run.costs["train_step"], "eval_flops": run.costs["eval"]}


def answered_after(run: Run) -> bool:
    """Are the --eval-prompts answers after the current step already written? (rank 0 reads, all agree)"""
    return run.group.broadcast(eval_prompts.has_after(run.out, run.state.step) if run.group.is_main else None)


# ----------------------------------------------------------------------------- unattended runs
def auto_resume(args) -> str | None:
    """--resume auto: the folder to continue, or None for a fresh run. A scheduler's requeue or
    torchrun --max-restarts reruns the same command: it continues the run its --out holds (any setting
    other than the RESUMABLE ones that differs is refused by resolve_args, as for --resume), starts
    afresh in an empty or missing folder, and refuses a folder holding anything else."""
    out = Path(args.out or DEFAULTS["out"])
    if (out / "config.json").is_file():
        return str(out)
    # what a run killed before its first config.json write can leave: its lock, a torn temporary file
    if out.is_dir() and any(p.name != LOCK_FILE and not p.name.endswith((PARTIAL, ".tmp")) for p in out.iterdir()):
        raise UserError(f"--resume auto: {out} holds files but no train.py run (no config.json); "
                        f"choose another --out, or empty it")
    return None


def check_saved_args(saved: dict, out: Path) -> None:
    """config.json is a file people edit: each saved setting must have the type its flag parses to,
    or the checks and the run would meet it as a traceback far from the cause."""
    for flag, default, _, kw in FLAGS:
        key = flag[2:].replace("-", "_")
        if key in saved and not well_typed(saved[key], default, kw):
            want = ("true or false" if kw is ON_OFF else f"one of {kw['choices']}" if "choices" in kw
                    else f"a list of {kw['nargs']} numbers" if "nargs" in kw
                    else {int: "an integer", float: "a number"}.get(kw.get("type"), "a string"))
            raise UserError(f"{out / 'config.json'}: \"{key}\" is {json.dumps(saved[key])}, not {want}"
                            + (" (or null)" if default is None else "") + "; correct it, or start a new run")


def well_typed(value, default, kw: dict) -> bool:
    if value is None:
        return default is None
    if kw is ON_OFF:
        return isinstance(value, bool)
    if "nargs" in kw:
        return (isinstance(value, list) and len(value) == kw["nargs"]
                and all(well_typed(v, 0, {"type": kw.get("type", str)}) for v in value))
    if "choices" in kw:
        return value in kw["choices"]
    kind = kw.get("type", str)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and not isinstance(value, bool)


def check_unattended_args(args) -> None:
    """Settings that would otherwise fail minutes into a run, or deep inside a library, with a traceback."""
    f32_max = torch.finfo(torch.float32).max
    rules = [
        (args.keep >= 1, "--keep must be at least 1 (the newest checkpoint is the one a run resumes from)"),
        (not (args.quantize and args.compile), "--quantize nf4 and --compile do not work together (inductor cannot "
                                              "compile the 4-bit dequantization); drop one of them"),
        # AdamW passes lr / (1 - beta1^t) and lr * weight_decay to float32 arithmetic (training/optim.py)
        (args.lr * max(1.0, args.weight_decay) / (1 - args.betas[0]) < f32_max,
         f"--lr {args.lr:g} is too large for float32 arithmetic in AdamW (lr / (1 - beta1) must stay below "
         f"{f32_max:.3g}); AdamW learning rates are far below 1"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def check_positions(args, model) -> None:
    """A window longer than the model's positions would run for minutes before any step says so."""
    limit = model.config.max_position_embeddings
    if args.context_length > limit:
        raise UserError(f"--context-length {args.context_length} is beyond the {limit} positions of {args.model}; "
                        f"use at most {limit}")


def note_systems(args, trajectories) -> None:
    available = len(trajectories.values)
    if args.systems is not None and args.systems > available and os.environ.get("RANK", "0") == "0":
        print(f"note: --systems {args.systems} is more than the {available} systems of "
              f"{args.data or 'the simulator'}; using all {available}", file=sys.stderr)


def seed_dropout(run: Run, step: int) -> None:
    """Under torchrun, each process but rank 0 draws its dropout masks for `step` from a generator seeded
    by (seed, rank, step). A checkpoint holds rank 0's generator (rank 0 writes it), and the others need
    none: a resume, even one made by Ctrl-C on rank 0 alone, gives every process the stream it had."""
    if run.group.rank:
        torch.manual_seed(((run.args.seed * 1_000_003 + run.group.rank * 7_919) * 1_000_033 + step) % 2**63)


def moved_on(run: Run, state: RunState) -> bool:
    """Has the run's state changed since the checkpoint of this same step was written (by this session,
    or the one it resumed)? Every change of state writes a metrics line, so the line count tells."""
    last = run.saved or run.start
    return last is not None and last.step == state.step and last.metrics_lines != state.metrics_lines


def keep_if_best(run: Run, val: float) -> None:
    """--keep-best: after a validation with a lower loss than any before, OUT/best/ becomes the state
    of this step (adapter, optimizer, RunState, and best.json with the step and loss). Rank 0 writes;
    called with interrupts held back, together with the validation it follows."""
    if not (run.args.keep_best and run.group.is_main and math.isfinite(val)):
        return
    best = best_checkpoint(run.out)
    if best is not None and (best / "best.json").is_file() and val >= read_json(best / "best.json")["val_loss"]:
        return

    def fill(folder: Path) -> None:
        save_state(folder, run.model, run.opt, run.state)
        write_json(folder / "best.json", {"step": run.state.step, "val_loss": val})

    write_best(run.out, fill)


def train(argv=None) -> dict:
    """One run; under torchrun, this process's part of it (see training/distributed.py)."""
    caller_joined = distributed.joined()  # study.py keeps its group across runs
    try:
        return train_process(argv)
    finally:
        release_run_folder()
        if not caller_joined:
            distributed.shutdown()


def train_process(argv) -> dict:
    run = setup(*resolve_args(argv))
    finished = run.state.step >= run.args.steps and run.state.evaluated
    if finished and (not run.prompts or answered_after(run)):
        if run.group.is_main:
            print(f"{run.out} is already at step {run.state.step} of {run.args.steps}; pass a larger --steps to continue",
                  file=sys.stderr)
        return {"step": run.state.step, "stopped": "done", "flops": run.state.flops}
    run.metrics = open(run.out / "metrics.jsonl", "a") if run.group.is_main else None
    try:
        with sigterm_as_interrupt():
            try:
                if run.prompts and run.state.step == 0:
                    sample_eval_prompts(run, "before")
                stopped = training_loop(run)
                return finish(run, stopped)  # the final answers and save: interruptible like a step
            except KeyboardInterrupt:  # no collective here: under torchrun the others may be gone already
                saved = "nothing to save yet"
                if run.state.step and run.group.is_main:
                    with deferred_interrupts():
                        saved = f"checkpoint saved in {save_checkpoint(run, sync=False)}"
                if run.group.is_main:
                    print(f"\ninterrupted after step {run.state.step}: {saved}; continue with "
                          f"python train.py --resume {run.out}", file=sys.stderr)
                    raise ReportedInterrupt from None  # run_cli adds no second "interrupted"
                raise
    finally:
        if run.metrics is not None:
            run.metrics.close()


def main(argv=None):
    # A process-wide choice, made where the process starts: glibc keeps freed activation memory for the
    # next step instead of handing it back to the OS and faulting it in again (training/memory.py says
    # why, and what it costs; a user's own GLIBC_TUNABLES win). study.py's main makes the same choice.
    reuse_freed_memory()
    train(argv)


if __name__ == "__main__":
    run_cli(main)
