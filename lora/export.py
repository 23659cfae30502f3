"""Fold an adapter into its base model and write a plain checkpoint any HF tool can load, or GGUF.

    python -m lora.export --adapter runs/lv --out merged/
    python -m lora.export --model Qwen/Qwen2.5-0.5B-Instruct --adapter path/to/peft-adapter --out merged/
    python -m lora.export --adapter runs/lv --gguf lv.gguf --gguf-type q8_0      # llama.cpp, Ollama (docs/export.md)
    python -m lora.export --adapter runs/lv --gguf-adapter lv-lora.gguf         # llama-cli -m base.gguf --lora ...

For a training run's folder the base is the model the run was trained on (and its --quantize), read
from the run's config.json; the weights are written in the base checkpoint's own dtype (bf16 for
Qwen2.5 and SmolLM2), so the merged checkpoint is the size of the base.
"""

from __future__ import annotations

import argparse

from common.cli import run_cli
from common.devices import parse_dtype
from model import DEFAULT_MODEL, load_config, load_pretrained
from model.ggml_quant import TYPES as GGUF_TYPES
from training.runs import base_for

from .gguf_export import export_adapter_gguf, export_gguf
from .inject import merge_and_export
from .peft_format import load_adapter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", default=None, help="the base model the adapter was trained on (default: the run's, "
                                                 f"from its config.json; for a bare adapter folder {DEFAULT_MODEL})")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format) or a training run folder (its newest checkpoint)")
    p.add_argument("--out", default=None, help="folder for the merged checkpoint")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: the base checkpoint's; the merge itself is computed in fp32)")
    p.add_argument("--quantize", default=None, choices=["nf4"],
                   help="the adapter was trained on an NF4 base (QLoRA): merge into its dequantized weights, write bf16 "
                        "(default: as the run was trained)")
    p.add_argument("--gguf", default=None, help="also (or only) write the merged model as one GGUF file (needs: pip install gguf)")
    p.add_argument("--gguf-type", default="f16", choices=GGUF_TYPES,
                   help="tensor type of --gguf (default: f16; norms and biases stay f32)")
    p.add_argument("--gguf-adapter", default=None, help="write the adapter alone as a llama.cpp LoRA GGUF file")
    args = p.parse_args(argv)
    if not (args.out or args.gguf or args.gguf_adapter):
        p.error("nothing to write: give --out, --gguf and/or --gguf-adapter")
    args.model, args.quantize = base_for([args.adapter], args.model, args.quantize)
    return args


def checkpoint_dtype(name: str) -> str:
    """The dtype the base checkpoint stores its weights in (its first floating tensor's): what the merged
    checkpoint is written in unless --dtype says otherwise. The offline 'tiny' model is float32."""
    import torch

    from model.loading import SAFETENSORS_DTYPES, read_safetensors_header, resolve, weight_files

    if name == "tiny":
        return "float32"
    for file in weight_files(resolve(name)):
        header, _ = read_safetensors_header(file)
        for info in header.values():
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is not None and dtype.is_floating_point:
                return str(dtype).removeprefix("torch.")
    return str(torch.float32).removeprefix("torch.")


def main(argv=None):
    args = parse_args(argv)
    if args.gguf_adapter:
        export_adapter_gguf(args.adapter, load_config(args.model), args.gguf_adapter)
        print(f"wrote {args.gguf_adapter}: {args.adapter} as a llama.cpp LoRA adapter for {args.model}")
    if not (args.out or args.gguf):
        return
    dtype = args.dtype or checkpoint_dtype(args.model)
    model, tok = load_pretrained(args.model, dtype=parse_dtype(dtype), quantize=args.quantize)
    load_adapter(model, args.adapter)
    if args.out:
        merge_and_export(model, args.out, tok)
        print(f"wrote {args.out}: {args.model} with {args.adapter} merged in"
              + (" (bfloat16: dequantized NF4)" if args.quantize else f" ({dtype})"))
    if args.gguf:
        export_gguf(model, args.gguf, args.gguf_type)
        print(f"wrote {args.gguf}: {args.model} with {args.adapter} merged in, {args.gguf_type}")


if __name__ == "__main__":
    run_cli(main)
