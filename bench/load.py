"""Time loading a Qwen2.5-0.5B-shaped checkpoint against simply reading its file, and its peak memory.

    python bench/load.py                      # writes a random bf16 checkpoint (988 MB) to a temp folder
    python bench/load.py --checkpoint DIR     # or measures a real one

Each measurement runs in a fresh process (the file is in the page cache after the first read, for all
of them alike): reading the file into one buffer, `model.load_model` in the stored dtype, the same with
`quantize="nf4"` (the seven projections quantized tensor by tensor as they are read), and transformers'
`from_pretrained` as the reference. Peak RSS growth is VmHWM minus the RSS before loading; the resident
size is the model's own tensors (parameters and buffers) once loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import _util  # noqa: F401
import torch

from _util import ROOT, append_result, machine

SNIPPETS = {
    "read file": """
        import numpy as np
        files = sorted(Path(CKPT).glob('*.safetensors'))
        base = status('VmRSS'); t = time.perf_counter()
        for f in files:
            buf = np.empty(f.stat().st_size, dtype=np.uint8)
            with open(f, 'rb') as fh: fh.readinto(memoryview(buf))
    """,
    "ours (load_model)": """
        from model import Transformer, load_model
        from model.tiny import tiny_config
        with torch.device('meta'): Transformer(tiny_config())  # import-time costs out of the measurement
        base = status('VmRSS'); t = time.perf_counter()
        m = load_model(CKPT, dtype=torch.bfloat16)
    """,
    "ours, NF4 (QLoRA)": """
        from model import Transformer, load_model
        from model.tiny import tiny_config
        with torch.device('meta'): Transformer(tiny_config())
        base = status('VmRSS'); t = time.perf_counter()
        m = load_model(CKPT, dtype=torch.bfloat16, quantize='nf4')
    """,
    "transformers": """
        import transformers
        base = status('VmRSS'); t = time.perf_counter()
        m = transformers.AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.bfloat16)
    """,
}
PRELUDE = """
import sys, time, json, torch
from pathlib import Path
sys.path.insert(0, ROOT)
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
"""
EPILOGUE = """
seconds = time.perf_counter() - t
tensors = sum(x.numel() * x.element_size() for x in list(m.parameters()) + list(m.buffers())) if 'm' in dir() else 0
print(json.dumps({"seconds": seconds, "rss_growth": status('VmHWM') - base, "model_bytes": tensors}))
"""


def measure(name: str, ckpt: Path) -> dict:
    code = f"ROOT = {str(ROOT)!r}\nCKPT = {str(ckpt)!r}\n" + PRELUDE + textwrap.dedent(SNIPPETS[name]) + EPILOGUE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-reference", action="store_true")
    args = p.parse_args()
    tmp = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        from generate import build_ours
        from model import save_pretrained

        tmp = tempfile.TemporaryDirectory()
        ckpt = Path(tmp.name) / "qwen-shaped"
        save_pretrained(build_ours(torch.bfloat16, torch.device("cpu")), ckpt)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    names = [n for n in SNIPPETS if not (args.no_reference and n == "transformers")]
    measure("read file", ckpt)  # warm the page cache
    runs = {n: [measure(n, ckpt) for _ in range(args.runs)] for n in names}
    info = machine()
    print(f"{info['cpu']} ({info['threads']} threads), torch {info['torch']}; checkpoint {size / 1e6:.0f} MB (bf16)")
    print(f"{'':<20}{'median s':>10}{'vs read':>9}{'peak RSS growth':>17}{'x size':>8}{'model tensors':>15}")
    record = {"bench": "load", "machine": info, "checkpoint_bytes": size, "sides": {}}
    read = statistics.median(r["seconds"] for r in runs["read file"])
    for n in names:
        sec = statistics.median(r["seconds"] for r in runs[n])
        rss = statistics.median(r["rss_growth"] for r in runs[n])
        model_bytes = runs[n][0]["model_bytes"]
        record["sides"][n] = {"seconds": sec, "vs_read": sec / read, "rss_growth": rss, "rss_over_size": rss / size,
                              "model_bytes": model_bytes}
        print(f"{n:<20}{sec:>10.2f}{sec / read:>8.2f}x{rss / 1e9:>15.2f} GB{rss / size:>7.2f}x"
              + (f"{model_bytes / 1e6:>12.0f} MB" if model_bytes else ""))
    append_result(record)
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
