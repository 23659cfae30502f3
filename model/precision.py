"""`--dtype auto`: the precision of the frozen weights, chosen for the machine the run is on.

Why it depends on the machine. bf16 frozen weights halve the memory everywhere, but they are only
faster where the matmuls run faster in bf16: on CUDA (tensor cores, with autocast), and on CPUs with
bf16 matrix units (Intel AMX, AVX512-BF16). On an AMD EPYC with AVX512-BF16 and no AMX the plain-loss
step ran 97.5 tokens/s in bf16 against 54.7 in fp32; on an Intel Xeon without AMX, bf16 matmuls ran
at 140 GFLOP/s against 220 in fp32, and on CPUs with neither (AVX2 only) bf16 is many times slower.
No CPU flag tells all of this reliably (oneDNN may or may not use the units, a virtual machine may
hide them), so on the CPU `auto` measures instead: the model's two MLP matmul shapes, (64, hidden) @
(hidden, intermediate) and (64, intermediate) @ (intermediate, hidden), in fp32 and in bf16,
alternating, best of three each, once per process (tens of milliseconds; a bf16 that is clearly slow
is given up after its first call). bf16 is chosen when its matmuls run at least `BF16_MARGIN` times
fp32's rate: the rest of the step (RMSNorm and RoPE in fp32, the casts, LoRA, the loss) does not speed
up with it, so a bf16 only a little faster at the matmuls is no faster per step.

What the choice changes: the frozen weights (embeddings, norms, projections) are stored in it, so
logits and losses differ from fp32 in their last digits (bf16 keeps 8 bits of mantissa). What it never
changes: LoRA weights, AdamW's moments and the loss stay fp32. train.py records the choice in the
run's config.json ("weights_dtype"), so `--resume`, eval.py and sample.py on that run use the same
weights. Pin it with `--dtype float32` / `--dtype bfloat16`, or, for every command at once, with the
environment variable `QWEN_LORA_CPU_DTYPE=float32` (or `bfloat16`), which answers `auto` on the CPU
without measuring (the test suite sets it to float32, so its numbers do not depend on the machine).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from common.cli import UserError
from common.devices import DTYPES, parse_dtype

BF16_MARGIN = 1.25  # bf16 matmuls must be this much faster than fp32 for the step to gain
PIN_ENV = "QWEN_LORA_CPU_DTYPE"
PROBE_ROWS = 64  # rows of the probe matmuls: enough for the matrix units' tiles, little enough to be quick
QWEN_MLP = (896, 4864)  # Qwen2.5-0.5B's (hidden, intermediate): the default model's shapes


@dataclass(frozen=True)
class Choice:
    """What `auto` resolved to, and why (printed once, recorded in a run's config.json)."""

    dtype: torch.dtype
    reason: str
    gflops: dict = field(default_factory=dict)  # measured matmul rate per dtype name, when measured

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def _seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    t = time.perf_counter()
    a @ b  # (rows, k) @ (k, n) -> (rows, n)
    return time.perf_counter() - t


def measure_matmul_gflops(hidden: int, intermediate: int, rows: int = PROBE_ROWS, repeats: int = 3,
                          give_up: float = 4.0) -> dict[str, float]:
    """GFLOP/s of fp32 and bf16 on the model's MLP shapes: one warm-up pass each, then `repeats` passes
    alternating between the two, the best of each. A bf16 warm-up over `give_up` times fp32's ends the
    measurement there (an AVX2-only CPU can take a second for what fp32 does in 10 ms)."""
    g = torch.Generator().manual_seed(0)
    w = torch.rand(intermediate, hidden, generator=g) - 0.5  # one weight serves both shapes (values do not matter)
    x, y = torch.rand(rows, hidden, generator=g) - 0.5, torch.rand(rows, intermediate, generator=g) - 0.5
    flop = 2 * (2 * rows * hidden * intermediate)
    dtypes = (torch.float32, torch.bfloat16)
    # up/gate: (rows, hidden) @ (hidden, intermediate), as F.linear runs it; down: (rows, intermediate) @ (intermediate, hidden)
    pairs = {dt: [(x.to(dt), w.to(dt).t()), (y.to(dt), w.to(dt))] for dt in dtypes}

    def one_pass(dt) -> float:
        return sum(_seconds(a, b) for a, b in pairs[dt])

    best = {dt: one_pass(dt) for dt in dtypes}  # the warm-up
    if best[torch.bfloat16] <= give_up * best[torch.float32]:
        best = {dt: float("inf") for dt in dtypes}
        for _ in range(repeats):
            for dt in dtypes:
                best[dt] = min(best[dt], one_pass(dt))
    return {"float32": flop / best[torch.float32] / 1e9, "bfloat16": flop / best[torch.bfloat16] / 1e9}


def decide(gflops: dict[str, float]) -> Choice:
    """bf16 when its matmul rate is at least BF16_MARGIN times fp32's."""
    ratio = gflops["bfloat16"] / gflops["float32"]
    rates = f"bf16 matmuls {gflops['bfloat16']:.0f} GFLOP/s, fp32 {gflops['float32']:.0f} ({ratio:.2f}x)"
    if ratio >= BF16_MARGIN:
        return Choice(torch.bfloat16, f"{rates} on this CPU: bf16 is faster", gflops)
    return Choice(torch.float32, f"{rates} on this CPU: bf16 is not {BF16_MARGIN}x faster", gflops)


@functools.cache
def cpu_choice(hidden: int, intermediate: int) -> Choice:
    """The CPU's answer to `auto` for a model of this shape: measured once per process and printed.
    Under torchrun (gloo) rank 0 measures and every process takes its answer, so all store the same
    weights (two processes near the margin could otherwise choose differently)."""
    import torch.distributed as dist

    pinned = os.environ.get(PIN_ENV)
    if pinned and pinned not in ("float32", "bfloat16"):
        raise UserError(f"{PIN_ENV}={pinned!r}: use float32 or bfloat16 (or unset it to measure)")
    shared = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if pinned:  # every process reads the same environment: nothing to share
        choice = Choice(getattr(torch, pinned), f"pinned by {PIN_ENV}={pinned}")
    else:
        choice = decide(measure_matmul_gflops(hidden, intermediate)) if not shared or dist.get_rank() == 0 else None
        if shared:
            box = [choice]
            dist.broadcast_object_list(box, src=0)
            choice = box[0]
    if os.environ.get("RANK", "0") == "0":  # under torchrun one process speaks
        how = "" if pinned else "; pin it with --dtype float32 or --dtype bfloat16"
        print(f"--dtype auto: {choice.name} ({choice.reason}{how})", file=sys.stderr)
    return choice


def choose(device: torch.device, config=None) -> Choice:
    """`auto` on `device` for a model with `config` (its ModelConfig; None: Qwen2.5-0.5B's shapes)."""
    if device.type == "cuda":
        return Choice(torch.bfloat16, "CUDA: bf16 weights with bf16 autocast")
    if device.type != "cpu":
        return Choice(torch.float32, f"{device.type}: fp32 (bf16 support varies)")
    shape = (config.hidden_size, config.intermediate_size) if config is not None else QWEN_MLP
    return cpu_choice(*shape)


def model_config_or_none(name_or_path):
    """The ModelConfig of `--model` (tiny, a folder or a hub id); None where it cannot be read (the
    loader will say why soon after), and the chooser falls back on Qwen2.5-0.5B's shapes."""
    from .loading import load_config

    try:
        return load_config(name_or_path)
    except (UserError, OSError, KeyError, TypeError, ValueError):
        return None


def resolve(flag: str, device: torch.device, model=None) -> torch.dtype:
    """--dtype as the weights' dtype: an explicit one as given, auto as `choose` decides for `model`."""
    if flag != "auto":
        if flag not in DTYPES:
            raise UserError(f"unknown dtype {flag!r}; use auto or one of {', '.join(DTYPES)}")
        return DTYPES[flag]
    return choose(device, model_config_or_none(model) if model is not None else None).dtype


def recorded(run_config: dict, device: torch.device) -> torch.dtype:
    """The frozen weights' dtype a training run used, from its config.json: "weights_dtype" where train.py
    recorded it; a run from before the measurement existed and that said auto used bf16 on CUDA and
    fp32 elsewhere."""
    name = run_config.get("weights_dtype") or run_config.get("args", {}).get("dtype", "auto")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"the run config records weights_dtype {name!r}, which this version does not know")
    return DTYPES[name]


def for_runs(flag: str, device: torch.device, model, run_configs: list[dict]) -> torch.dtype:
    """--dtype for a base model that runs' adapters go on (eval.py, sample.py): auto takes what the first
    run trained on, so an adapter meets the weights it was trained with; other runs that differ get a
    note. Without runs, or with an explicit --dtype, as `resolve`."""
    if flag != "auto" or not run_configs:
        return resolve(flag, device, model)
    dtypes = [recorded(cfg, device) for cfg in run_configs]
    name = str(dtypes[0]).removeprefix("torch.")
    if os.environ.get("RANK", "0") == "0":
        print(f"--dtype auto: {name}, the frozen weights' dtype the run was trained with (its config.json)", file=sys.stderr)
        if any(d != dtypes[0] for d in dtypes[1:]):
            print(f"note: the runs were trained on frozen weights of different dtypes; using the first's, {name} "
                  f"(pass --dtype to choose)", file=sys.stderr)
    return dtypes[0]


def weights_dtype(name: str, device: torch.device, model=None, runs: list[dict] = ()) -> torch.dtype:
    """--dtype as the frozen weights' dtype. auto: bf16 on CUDA (train.py adds autocast), fp32 on MPS, and
    on the CPU whichever of the two runs `model`'s matmuls faster here, measured once per process (the
    module's docstring says how and why; a CPU without bf16 matmul units runs bf16 slower than fp32).
    With `runs` (training runs' config.json whose adapters go on this model), auto is what they trained on."""
    if name != "auto":
        return parse_dtype(name)
    return for_runs(name, device, model, list(runs))
