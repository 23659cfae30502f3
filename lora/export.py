"""Fold an adapter into its base model and write a plain checkpoint any HF tool can load.

    python -m lora.export --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/lv --out merged/
    python -m lora.export --adapter runs/lv --gguf lv.gguf --gguf-type q8_0      # llama.cpp, Ollama (docs/export.md)
    python -m lora.export --adapter runs/lv --gguf-adapter lv-lora.gguf         # llama-cli -m base.gguf --lora ...
"""

from __future__ import annotations

import argparse

from common import parse_dtype, run_cli
from model import DEFAULT_MODEL, load_config, load_pretrained
from model.ggml_quant import TYPES as GGUF_TYPES

from .gguf_export import export_adapter_gguf, export_gguf
from .inject import merge_and_export
from .peft_format import load_adapter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format) or a training run folder (its newest checkpoint)")
    p.add_argument("--out", default=None, help="folder for the merged checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (the merge itself is computed in fp32)")
    p.add_argument("--quantize", default=None, choices=["nf4"],
                   help="the adapter was trained on an NF4 base (QLoRA): merge into its dequantized weights, write bf16")
    p.add_argument("--gguf", default=None, help="also (or only) write the merged model as one GGUF file (needs: pip install gguf)")
    p.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES, help="tensor type of --gguf (norms and biases stay f32)")
    p.add_argument("--gguf-adapter", default=None, help="write the adapter alone as a llama.cpp LoRA GGUF file")
    args = p.parse_args(argv)
    if not (args.out or args.gguf or args.gguf_adapter):
        p.error("nothing to write: give --out, --gguf and/or --gguf-adapter")
    if args.gguf_adapter:
        export_adapter_gguf(args.adapter, load_config(args.model), args.gguf_adapter)
        print(f"wrote {args.gguf_adapter}: {args.adapter} as a llama.cpp LoRA adapter for {args.model}")
    if not (args.out or args.gguf):
        return
    model, tok = load_pretrained(args.model, dtype=parse_dtype(args.dtype), quantize=args.quantize)
    load_adapter(model, args.adapter)
    if args.out:
        merge_and_export(model, args.out, tok)
        print(f"wrote {args.out}: {args.model} with {args.adapter} merged in")
    if args.gguf:
        export_gguf(model, args.gguf, args.gguf_type)
        print(f"wrote {args.gguf}: {args.model} with {args.adapter} merged in, {args.gguf_type}")


if __name__ == "__main__":
    run_cli(main)
