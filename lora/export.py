"""Fold an adapter into its base model and write a plain checkpoint any HF tool can load.

    python -m lora.export --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/lv --out merged/
"""

from __future__ import annotations

import argparse

from common import parse_dtype, run_cli
from model import DEFAULT_MODEL, load_pretrained

from .inject import merge_and_export
from .peft_format import load_adapter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format) or a training run folder (its newest checkpoint)")
    p.add_argument("--out", required=True, help="folder for the merged checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (the merge itself is computed in fp32)")
    p.add_argument("--quantize", default=None, choices=["nf4"],
                   help="the adapter was trained on an NF4 base (QLoRA): merge into its dequantized weights, write bf16")
    args = p.parse_args(argv)
    model, tok = load_pretrained(args.model, dtype=parse_dtype(args.dtype), quantize=args.quantize)
    load_adapter(model, args.adapter)
    merge_and_export(model, args.out, tok)
    print(f"wrote {args.out}: {args.model} with {args.adapter} merged in")


if __name__ == "__main__":
    run_cli(main)
