"""Continue a prompt with a Qwen2.5 / Llama checkpoint (or `--model tiny`), streaming the text.

    python sample.py --model Qwen/Qwen2.5-0.5B-Instruct --chat --prompt "Name three prime numbers."
    python sample.py --model tiny --prompt "0.25,1.50;0.27,1.47;"
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import UserError, parse_device, parse_dtype, run_cli
from model import DEFAULT_MODEL, generate, load_pretrained


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, checkpoint folder, or 'tiny'")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format), or a training run folder (its newest checkpoint), to apply first")
    p.add_argument("--prompt", default="0.25,1.50;0.27,1.47;0.31,1.42;")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's ChatML format")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.add_argument("--quantize", default=None, choices=["nf4"], help="store the projections in 4-bit NF4")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise UserError("--temperature must be >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError("--top-k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = parse_device(args.device)
    torch.manual_seed(args.seed)
    model, tok = load_pretrained(args.model, dtype=parse_dtype(args.dtype), device=device, quantize=args.quantize)
    if args.adapter:
        from lora import load_adapter

        load_adapter(model, args.adapter)
    text = tok.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    prompt = tok.encode(text)
    if not prompt:
        raise UserError("the prompt is empty after tokenization; pass --prompt with some text")
    if not args.chat:
        print(args.prompt, end="", flush=True)

    new: list[int] = []
    shown = ""
    first_token_at = None

    def stream(row: int, token: int):
        nonlocal shown, first_token_at
        first_token_at = first_token_at or time.perf_counter()
        new.append(token)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text[len(shown):], end="", flush=True)
            shown = text

    start = time.perf_counter()
    generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, eos_ids=tok.eos_ids, vocab_limit=tok.vocab_size, pad_id=tok.pad_id,
             generator=torch.Generator(device=device).manual_seed(args.seed), on_token=stream)
    end = time.perf_counter()
    print(flush=True)
    first_token_at = first_token_at or end
    decode_rate = (len(new) - 1) / (end - first_token_at) if len(new) > 1 and end > first_token_at else float("nan")
    print(f"prompt tokens {len(prompt)} | new tokens {len(new)} | prefill {len(prompt) / (first_token_at - start):.1f} tok/s"
          f" | decode {decode_rate:.1f} tok/s | total {len(new) / (end - start):.1f} tok/s", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
