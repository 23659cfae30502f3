"""One command for the first GPU: every CUDA path of this code, checked against the CPU and timed, in one table.

    python bench/accelerator_check.py                     # on a GPU: a few minutes, no downloads, no files
    python bench/accelerator_check.py --json check.json   # the table as JSON too
    python bench/accelerator_check.py --device cpu        # on the CPU: the GPU-only rows say "skipped"
    python bench/accelerator_check.py --device cpu --all-on-cpu --model tiny   # every row on the CPU: checks the script

The model is built in place with random weights (Qwen2.5-0.5B's shape, `--model qwen`, the default on
a GPU; `--model tiny`, model/tiny.py's, the default on the CPU), and the tokenizer is the built-in
character tokenizer of `--model tiny`: nothing is downloaded and no file outside the repository is
read. The rows, each "ok", "FAILED" (with the reason; the traceback goes to stderr) or "skipped":

- parity fp32: the device's logits and one LoRA step's gradients (every LoRA matrix, random A and B)
  against the CPU's in fp32, as the largest difference relative to the largest value (GPU only);
- parity bf16: the same with train.py's bf16 path on the device (bf16 weights, plus bf16 autocast on
  CUDA) against the CPU in fp32: bf16 rounding is expected, a wrong kernel is not;
- SDPA flash: the attention forced onto the flash kernel against the math kernel, bf16 (GPU only);
- NF4 parity: one projection quantized on the device and on the CPU, bit for bit (GPU only);
- train step bf16, bf16 --compile (GPU only: triton), NF4 + bf16: train.py's `optimizer_step` (LoRA
  r=8 on q_proj and v_proj, --batch x --seq random tokens), warm-up then timed steps: tokens/s, peak
  memory (`max_memory_allocated` on CUDA, the process's peak RSS on the CPU), and the share of the
  device's bf16 peak, measured here as a square matmul's rate (flops.py's hardware count of the step
  over the median step time);
- torchrun: `torchrun --nproc_per_node 1 train.py` for two steps on a saved copy of the model, with
  NCCL on CUDA (GPU only; gloo with --all-on-cpu);
- sampled forecasting: eval.generate_forecasts, 8 samples at temperature 1 per prompt, 8 prompts of
  the simulator's LLMTIME text: new tokens per second (one character a token with this tokenizer).

The exit code is 1 if any row failed. Nothing here is a figure for the README on the CPU: the tiny
model's rates say nothing; `--model qwen --device cpu` works but takes minutes per row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _util  # noqa: F401  (puts the repository on sys.path)
import torch

from _util import ROOT, machine, matmul_peak, peak_memory, qwen_shape, random_qwen, reset_peak_memory, sync
from common.devices import parse_device

TARGETS = ("q_proj", "v_proj")  # LoRA of the timed steps, as bench/train_step.py
PARITY_LIMITS = {"float32": 1e-3, "bfloat16": 0.1}  # largest difference / largest value


@dataclass
class Row:
    check: str
    status: str = "ok"  # ok, FAILED, skipped
    result: str = ""
    tokens_per_s: float | None = None
    memory_bytes: int | None = None
    peak_share: float | None = None  # of the device's measured bf16 matmul rate
    seconds: float = 0.0


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    gpu: bool
    peak: float = float("nan")  # bf16 FLOP/s of a square matmul on the device
    tok: object = None
    extra: dict = field(default_factory=dict)

    def config(self):
        from model import ModelConfig
        from model.tiny import tiny_config

        return tiny_config() if self.args.model == "tiny" else ModelConfig(**qwen_shape(self.args.layers), head_dim=64)

    def build(self, dtype: torch.dtype, device: torch.device | None = None):
        """A fresh model of --model's shape, the same random weights every time, in `dtype` on `device`
        (a copy of one fp32 CPU model, built once: Qwen2.5-0.5B's random weights take seconds to draw)."""
        from model.tiny import tiny_model

        if "base" not in self.extra:
            self.extra["base"] = tiny_model() if self.args.model == "tiny" else random_qwen(scale=0.05, layers=self.args.layers)
        return copy.deepcopy(self.extra["base"]).to(dtype=dtype, device=device or self.device)

    def ids(self, batch: int, seq: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, min(self.config().vocab_size, 151643), (batch, seq), generator=g)


def autocast_of(device: torch.device, dtype: torch.dtype):
    """train.py's rule: bf16 autocast on CUDA with bf16 weights, nothing otherwise."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


# ------------------------------------------------------------------------------------------ parity
def with_random_lora(model):
    """LoRA on every projection with random A and B (B = 0 at init would leave A without a gradient)."""
    import lora

    lora.apply_lora(model, rank=4, alpha=8, targets="all", verbose=False)
    with torch.no_grad():
        for name, p in sorted(lora.lora_parameters(model).items()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model


def logits_and_grads(model, ids: torch.Tensor, autocast) -> tuple[torch.Tensor, dict]:
    """Logits of `ids` (fp32, on the CPU) and the LoRA gradients of the mean next-token loss."""
    import lora
    from model.loss import lm_loss_sum

    device = next(model.parameters()).device
    x = ids.to(device)
    with torch.no_grad(), autocast():
        logits = model(x).float().cpu()
    with autocast():
        loss, n = lm_loss_sum(model, x, torch.ones_like(x, dtype=torch.bool))
    (loss / n).backward()
    return logits, {k: p.grad.float().cpu() for k, p in lora.lora_parameters(model).items()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def reference_fp32(ctx: Context) -> tuple[torch.Tensor, dict]:
    """The CPU's fp32 logits and gradients, computed once."""
    if "reference" not in ctx.extra:
        model = with_random_lora(ctx.build(torch.float32, torch.device("cpu")))
        ctx.extra["reference"] = logits_and_grads(model, ctx.ids(2, ctx.args.parity_seq), contextlib.nullcontext)
    return ctx.extra["reference"]


def parity(ctx: Context, dtype: torch.dtype) -> Row:
    want_logits, want_grads = reference_fp32(ctx)
    model = with_random_lora(ctx.build(dtype))  # frozen weights in dtype on the device, LoRA fp32 (as train.py)
    logits, grads = logits_and_grads(model, ctx.ids(2, ctx.args.parity_seq), autocast_of(ctx.device, dtype))
    err_logits = relative(logits, want_logits)
    err_grads = max(relative(grads[k], want_grads[k]) for k in want_grads)
    name = str(dtype).removeprefix("torch.")
    limit = PARITY_LIMITS[name]
    ok = err_logits <= limit and err_grads <= limit
    return Row(f"parity {name}", "ok" if ok else "FAILED",
               f"logits {err_logits:.1e}, grads {err_grads:.1e} of the largest (limit {limit:g}) vs CPU fp32")


def sdpa_flash(ctx: Context) -> Row:
    """The model's attention on the flash kernel only, against the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = ctx.build(torch.bfloat16)
    x = ctx.ids(2, ctx.args.parity_seq).to(ctx.device)
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = model(x).float()
        with sdpa_kernel([SDPBackend.MATH]):
            math_ = model(x).float()
    err = relative(flash, math_)
    return Row("SDPA flash", "ok" if err <= PARITY_LIMITS["bfloat16"] else "FAILED",
               f"flash kernel ran; logits {err:.1e} of the largest vs the math kernel (bf16)")


def nf4_parity(ctx: Context) -> Row:
    from model.nf4 import quantize_nf4

    cfg = ctx.config()
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(cfg.intermediate_size, cfg.hidden_size, generator=g) * 0.02).to(torch.bfloat16)
    cpu, dev = quantize_nf4(w), quantize_nf4(w.to(ctx.device))
    same = all(torch.equal(getattr(cpu, k), getattr(dev, k).cpu()) for k in ("packed", "absmax", "absmax_scale", "absmax_offset"))
    deq = torch.equal(cpu.dequantize(torch.bfloat16), dev.dequantize(torch.bfloat16).cpu())
    return Row("NF4 parity", "ok" if same and deq else "FAILED",
               f"{tuple(w.shape)} weight: codes and scales {'equal' if same else 'DIFFER'}, "
               f"dequantized {'equal' if deq else 'DIFFER'} (device vs CPU)")


# ---------------------------------------------------------------------------------------- training
def train_step(ctx: Context, quantize: bool = False, compile_blocks: bool = False) -> Row:
    """train.py's optimizer step on bf16 weights (NF4 projections with `quantize`): warm-up, then timed."""
    import flops
    import lora
    import train
    from data.windows import TokenWindows
    from model.nf4 import quantize_projections
    from training.optim import AdamW

    args = ctx.args
    model = ctx.build(torch.bfloat16)
    if quantize:
        quantize_projections(model)  # on the device, as load_model(quantize="nf4") does
    torch.manual_seed(0)
    lora.apply_lora(model, rank=8, alpha=16, targets=TARGETS, verbose=False)
    model.train()
    if compile_blocks:
        model.compile_blocks()
    opt = AdamW(lora.lora_parameters(model), lr=1e-4)
    ids = ctx.ids(args.batch, args.seq)
    windows = TokenWindows(ids, torch.ones_like(ids, dtype=torch.bool))
    autocast = autocast_of(ctx.device, torch.bfloat16)

    def step() -> tuple[float, float]:
        sync(ctx.device)
        t = time.perf_counter()
        loss, _, _ = train.optimizer_step(model, opt, windows, [torch.arange(args.batch)], 1e-4, 1.0, autocast, 512)
        sync(ctx.device)
        return time.perf_counter() - t, loss

    warm = [step() for _ in range(args.warmup + (2 if compile_blocks else 0))]  # compiling takes the first
    reset_peak_memory(ctx.device)
    timed = [step() for _ in range(args.steps)]
    seconds = statistics.median(t for t, _ in timed)
    losses = [loss for _, loss in warm + timed]
    work = flops.count(ctx.config(), args.batch, args.seq, lora={"r": 8, "target_modules": list(TARGETS)}).train_step_hardware
    ok = all(math.isfinite(v) for v in losses)
    return Row("train step " + ("NF4 + bf16" if quantize else "bf16") + (" --compile" if compile_blocks else ""),
               "ok" if ok else "FAILED",
               f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, {seconds:.3f} s/step"
               + (f" (first step {warm[0][0]:.1f} s: compiling)" if compile_blocks else ""),
               tokens_per_s=args.batch * args.seq / seconds, memory_bytes=peak_memory(ctx.device),
               peak_share=work / seconds / ctx.peak)


def torchrun_step(ctx: Context) -> Row:
    """Two steps of train.py under torchrun with one process: NCCL on CUDA (gloo on the CPU)."""
    from model import save_pretrained
    from model.tiny import tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, out = Path(tmp) / "model", Path(tmp) / "run"
        save_pretrained(ctx.build(torch.bfloat16, torch.device("cpu")), ckpt, tiny_tokenizer())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(ROOT / "train.py"), "--model", str(ckpt), "--device", ctx.device.type, "--dtype", "bfloat16",
               "--steps", "2", "--systems", "12", "--context-length", "64", "--batch-size", "2",
               "--eval-every", "2", "--eval-batches", "1", "--out", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=ctx.args.torchrun_timeout)
        if done.returncode:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return Row("torchrun 1 process", "FAILED", f"exit code {done.returncode}: {tail[:160]}")
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    backend = "NCCL" if ctx.device.type == "cuda" else "gloo"
    ok = len(losses) == 2 and all(math.isfinite(v) for v in losses)
    return Row("torchrun 1 process", "ok" if ok else "FAILED", f"{backend}: 2 steps, losses "
               + ", ".join(f"{v:.4f}" for v in losses))


def forecasting(ctx: Context) -> Row:
    """eval.py's sampled forecasts (8 samples per prompt at temperature 1) on the device."""
    from data import Scaler, forecast_task, load_trajectories
    from eval import generate_forecasts
    from model.tiny import tiny_tokenizer

    values = load_trajectories(None, n=16, seed=0).values[:8]
    task = forecast_task(values, Scaler.fit(values), 2, 10, 5)
    model = ctx.build(torch.bfloat16 if ctx.device.type == "cuda" else torch.float32).eval()
    sync(ctx.device)
    t = time.perf_counter()
    texts = generate_forecasts(model, tiny_tokenizer(), task.prompts, horizon=5, decimals=2, samples=8,
                               temperature=1.0, batch_size=64, seed=0)
    sync(ctx.device)
    seconds = time.perf_counter() - t
    tokens = sum(len(text) for row in texts for text in row)
    ok = len(texts) == 8 and all(len(row) == 8 for row in texts)
    return Row("sampled forecasting", "ok" if ok else "FAILED",
               f"8 prompts x 8 samples, {tokens} new tokens in {seconds:.2f} s", tokens_per_s=tokens / seconds)


# -------------------------------------------------------------------------------------------- table
CHECKS = (  # (name, function, GPU only)
    ("parity fp32", lambda ctx: parity(ctx, torch.float32), True),
    ("parity bfloat16", lambda ctx: parity(ctx, torch.bfloat16), False),
    ("SDPA flash", sdpa_flash, True),
    ("NF4 parity", nf4_parity, True),
    ("train step bf16", train_step, False),
    ("train step bf16 --compile", lambda ctx: train_step(ctx, compile_blocks=True), True),
    ("train step NF4 + bf16", lambda ctx: train_step(ctx, quantize=True), False),
    ("torchrun 1 process", torchrun_step, True),
    ("sampled forecasting", forecasting, False),
)


def run_checks(ctx: Context, only: list[str] | None = None) -> list[Row]:
    rows = []
    for name, check, gpu_only in CHECKS:
        if only and name not in only:
            continue
        if gpu_only and not ctx.gpu and not ctx.args.all_on_cpu:
            rows.append(Row(name, "skipped", f"no GPU ({ctx.device}); --all-on-cpu runs it on the CPU"))
            continue
        t = time.perf_counter()
        try:
            row = check(ctx)
        except Exception as e:  # a failing path is a row of the table, not the end of the check
            traceback.print_exc(file=sys.stderr)
            row = Row(name, "FAILED", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
        row.check, row.seconds = name, time.perf_counter() - t
        rows.append(row)
        print(f"  {name}: {row.status} ({row.seconds:.1f} s)", file=sys.stderr, flush=True)
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(ctx: Context, rows: list[Row]) -> None:
    info = machine()
    where = info.get("gpu") if ctx.gpu else f"{info['cpu']} ({info['threads']} threads)"
    print(f"\n{where}, torch {info['torch']}, --model {ctx.args.model}, batch {ctx.args.batch} x {ctx.args.seq}; "
          f"bf16 matmul peak measured here: {ctx.peak / 1e12:.2f} TFLOP/s")
    print(f"{'check':<28}{'status':<9}{'tokens/s':>11}{'memory GB':>11}{'of bf16 peak':>14}  result")
    for r in rows:
        tps = f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else ""
        mem = f"{r.memory_bytes / 1e9:.2f}" if r.memory_bytes else ""
        share = f"{100 * r.peak_share:.1f}%" if r.peak_share else ""
        print(f"{r.check:<28}{r.status:<9}{tps:>11}{mem:>11}{share:>14}  {r.result}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--device", default="auto", help="auto (CUDA if there is one), cuda, cuda:N or cpu")
    p.add_argument("--model", default=None, choices=["qwen", "tiny"],
                   help="random weights of Qwen2.5-0.5B's shape or model/tiny.py's (default: qwen on a GPU, tiny on the CPU)")
    p.add_argument("--layers", type=int, default=None, help="--model qwen with fewer blocks than 24")
    p.add_argument("--batch", type=int, default=None, help="windows per timed step (default: 4 on a GPU, 2 on the CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per window (default: 512 on a GPU, 32 on the CPU)")
    p.add_argument("--parity-seq", type=int, default=64, help="tokens per window of the parity checks (2 windows)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per train-step row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (--compile: 2 more)")
    p.add_argument("--all-on-cpu", action="store_true", help="run the GPU-only rows on the CPU too (checks the script)")
    p.add_argument("--only", nargs="+", default=None, help="run only these rows (names as in the table)")
    p.add_argument("--torchrun-timeout", type=int, default=300)
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    gpu = parse_device(args.device).type == "cuda"
    args.model = args.model or ("qwen" if gpu else "tiny")
    args.batch, args.seq = args.batch or (4 if gpu else 2), args.seq or (512 if gpu else 32)
    return args


def main(argv=None) -> list[Row]:
    args = parse_args(argv)
    device = parse_device(args.device)
    ctx = Context(args, device, gpu=device.type == "cuda")
    ctx.peak = matmul_peak(torch.bfloat16, device, size=8192 if ctx.gpu else 512, seconds=1.0 if ctx.gpu else 0.2)
    rows = run_checks(ctx, args.only)
    print_table(ctx, rows)
    if args.json:
        from common.files import write_json

        write_json(args.json, {"machine": machine(), "device": str(device), "args": vars(args),
                               "bf16_peak_flops": ctx.peak, "rows": [asdict(r) for r in rows]})
    return rows


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.status == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(exit_code(main()))
