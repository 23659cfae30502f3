"""Continue a prompt with a Qwen2.5 / Llama checkpoint (or `--model tiny`), streaming the text, or chat.

    python sample.py --model Qwen/Qwen2.5-0.5B-Instruct --chat --prompt "Name three prime numbers."
    python sample.py --model tiny --prompt "0.25,1.50;0.27,1.47;"
    python sample.py --model ~/.cache/smollm2-135m-instruct --adapter runs/chat --chat     # interactive

`--chat` writes the prompt as a user turn in the checkpoint's chat format. Without `--prompt` it is a
conversation on standard input: each line is your next message, the model's answer streams back, and
the history is kept as long as it fits `--context-length` together with an answer of
`--max-new-tokens` (the oldest exchanges are dropped first; a system message stays). `/reset` starts
over, `/exit` or end of input ends it.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch loads: Ctrl-C during start-up is one line (common/startup.py)
    from common.startup import quiet_ctrl_c
    quiet_ctrl_c()

import argparse
import sys
import time

import torch

from common.cli import UserError, run_cli
from common.devices import parse_device
from model import DEFAULT_MODEL, generate, load_pretrained
from model.precision import weights_dtype
from training.runs import base_for, training_config

DEFAULT_PROMPT = "0.25,1.50;0.27,1.47;0.31,1.42;"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", default=None, help="hub id, checkpoint folder, or 'tiny' (default: the model the "
                                                 f"--adapter run was trained on, else {DEFAULT_MODEL})")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT format), or a training run folder (its newest checkpoint), to apply first")
    p.add_argument("--prompt", default=None, help=f"text to continue (default: {DEFAULT_PROMPT}); with --chat, "
                   "one user message (default: an interactive conversation on standard input)")
    p.add_argument("--chat", action="store_true", help="talk to the model in its chat format")
    p.add_argument("--system", default=None, help="--chat: a system message (default: the checkpoint's own)")
    p.add_argument("--context-length", type=int, default=2048,
                   help="--chat: tokens of history + answer kept (default: 2048)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per answer (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probabilities reach p (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (the default): what the --adapter run trained on; without one, bfloat16 on CUDA, float32 on MPS, "
                        "on CPU the faster of float32 and bfloat16 as measured here (model/precision.py)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU: the default), cpu, cuda, cuda:N or mps")
    p.add_argument("--quantize", default=None, choices=["nf4"],
                   help="store the projections in 4-bit NF4 (default: as the --adapter run was trained)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise UserError("--temperature must be >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError("--top-k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    if args.chat and args.context_length <= args.max_new_tokens:
        raise UserError(f"--context-length ({args.context_length}) must exceed --max-new-tokens ({args.max_new_tokens})")
    if args.system is not None and not args.chat:
        raise UserError("--system applies to --chat")
    return args


def main(argv=None):
    args = parse_args(argv)
    args.model, args.quantize = base_for([args.adapter] if args.adapter else [], args.model, args.quantize)
    device = parse_device(args.device)
    torch.manual_seed(args.seed)
    run = training_config(args.adapter) if args.adapter else None  # auto: the weights the adapter trained on
    dtype = weights_dtype(args.dtype, device, args.model, [run] if run else [])
    model, tok = load_pretrained(args.model, dtype=dtype, device=device, quantize=args.quantize)
    if args.adapter:
        from lora import load_adapter

        load_adapter(model, args.adapter)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    if not args.chat:
        text = args.prompt if args.prompt is not None else DEFAULT_PROMPT
        print(text, end="", flush=True)
        respond(model, tok, args, tok.encode(text), generator)
    elif args.prompt is not None:
        respond(model, tok, args, tok.encode(tok.chat_prompt(system(args) + [{"role": "user", "content": args.prompt}])), generator)
    else:
        chat_session(model, tok, args, generator)


def system(args) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system is not None else []


def chat_session(model, tok, args, generator) -> None:
    """Multi-turn chat on standard input; the history is cut from the oldest exchange to fit."""
    tok.chat_prompt([])  # a tokenizer without a chat format fails here, before the first question
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    print("chat: one message per line; /reset starts over, /exit ends", file=sys.stderr)
    while True:
        if interactive:
            print("\n> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        prompt, history = fit_history(tok, system(args), history, args.context_length - args.max_new_tokens)
        if prompt is None:
            print(f"(that message alone is longer than --context-length {args.context_length} minus "
                  f"--max-new-tokens {args.max_new_tokens}; send a shorter one; history cleared)", file=sys.stderr)
            continue
        answer = respond(model, tok, args, prompt, generator)
        history.append({"role": "assistant", "content": answer})


def fit_history(tok, sys_messages: list[dict], history: list[dict], budget: int):
    """(prompt ids, kept history): drop the oldest exchanges (a user turn and its answer) until the
    prompt fits `budget` tokens; (None, []) when even the newest message alone does not fit."""
    while True:
        prompt = tok.encode(tok.chat_prompt(sys_messages + history))
        if len(prompt) <= budget:
            return prompt, history
        if len(history) == 1:
            return None, []
        history = history[2:] if history[0]["role"] == "user" and len(history) > 2 else history[1:]


def respond(model, tok, args, prompt: list[int], generator) -> str:
    """Generate after `prompt`, streaming the text; returns it. Speeds go to stderr."""
    if not prompt:
        raise UserError("the prompt is empty after tokenization; pass --prompt with some text")
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
             generator=generator, on_token=stream)
    end = time.perf_counter()
    print(flush=True)
    first_token_at = first_token_at or end
    decode_rate = (len(new) - 1) / (end - first_token_at) if len(new) > 1 and end > first_token_at else float("nan")
    print(f"prompt tokens {len(prompt)} | new tokens {len(new)} | prefill {len(prompt) / (first_token_at - start):.1f} tok/s"
          f" | decode {decode_rate:.1f} tok/s | total {len(new) / (end - start):.1f} tok/s", file=sys.stderr)
    return tok.decode(new, skip_special_tokens=True)


if __name__ == "__main__":
    run_cli(main)
