"""Shared by the benchmark scripts: the machine, its measured peaks, memory, and the results log."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results.jsonl"


QWEN_SHAPE = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                  max_position_embeddings=32768, tie_word_embeddings=True)  # Qwen2.5-0.5B's config.json


def qwen_shape(layers: int | None = None) -> dict:
    """QWEN_SHAPE, with `layers` blocks instead of 24 if given (a quick check that a benchmark runs)."""
    return {**QWEN_SHAPE, **({"num_hidden_layers": layers} if layers else {})}


def random_qwen(scale: float = 1.0, layers: int | None = None):
    """Our model with Qwen2.5-0.5B's shape and random weights (times `scale`), fp32 on the CPU: the
    benchmarks need the real shape, not the real weights, which cannot be downloaded everywhere."""
    from model import ModelConfig, Transformer
    from model.tiny import init_random_weights

    with torch.device("meta"):
        model = Transformer(ModelConfig(**qwen_shape(layers), head_dim=64))
    model = model.to_empty(device="cpu")
    model.tie_weights()
    init_random_weights(model)
    if scale != 1.0:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
    return model


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 2048, seconds: float = 2.0) -> float:
    """Measured FLOP/s of a square matmul, the best of repeated runs: the ceiling to compare against."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b
    sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def copy_bandwidth(device: torch.device, nbytes: int = 512 * 2**20, seconds: float = 2.0) -> float:
    """Bytes/s moved by a large copy (read + write), the ceiling for streaming weights in decode."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def reset_peak_memory(device: torch.device) -> None:
    """Start peak-memory accounting afresh (after setup), where the OS allows it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
    except OSError:
        pass


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    try:
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def append_result(record: dict) -> None:
    with open(RESULTS, "a") as f:
        f.write(json.dumps(record) + "\n")
