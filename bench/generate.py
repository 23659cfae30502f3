"""Time generation against transformers: prefill and decode separately, on Qwen2.5-0.5B's shape.

    python bench/generate.py --reference

Batch 1, a 512-token prompt, 128 new tokens, greedy, KV cache. Prefill is timed as a generation of
one token; decode as (time for 128 tokens - prefill) / 127. Decode is bound by memory bandwidth (every
weight is read once per token), so the script also measures the machine's copy bandwidth and prints
the rate that bound allows: bandwidth / bytes read per token. It also times the decode step's matrix-
vector products alone (every weight once, batch 1, torch's F.linear): the ceiling torch's GEMV sets on
this machine, below the copy bound when GEMV streams weights slower than a copy. Results go to
bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _util  # noqa: F401
import torch

from _util import QWEN_SHAPE, append_result, copy_bandwidth, machine, random_qwen, sync
from common.devices import parse_device


def build_ours(dtype, device):
    return random_qwen().to(dtype=dtype, device=device).eval()


def copy_weights_into_reference(ours, dtype, device):
    """The same weights in transformers, so both sides generate the same tokens."""
    import transformers

    ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN_SHAPE)).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing), (missing, unexpected)
    ref.tie_weights()
    return ref.to(dtype=dtype, device=device)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reference", action="store_true")
    p.add_argument("--device", default="auto")
    return p.parse_args()


def timed_generation(sides: dict, prompt: torch.Tensor, device):
    """run(side, n_new) -> (seconds, new token ids), greedy, the same way on both sides."""
    from model import generate

    def run(side: str, n_new: int):
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            if side == "ours":
                out = generate(sides["ours"], [prompt[0].tolist()], n_new)[0]
            else:
                x = prompt.to(device)
                out = sides["reference"].generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                                  min_new_tokens=n_new, do_sample=False, eos_token_id=None,
                                                  pad_token_id=0)[0, prompt.shape[1]:].tolist()
        sync(device)
        return time.perf_counter() - t, out

    return run


def decode_bound(ours, args, device) -> tuple[float, float]:
    """(copy bandwidth, tokens/s that bandwidth allows when every weight and the cache are read per token)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    kv_bytes = 2 * ours.config.num_hidden_layers * ours.config.kv_size * (args.prompt + args.new // 2) \
        * ours.model.embed_tokens.weight.element_size()
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {(weight_bytes + kv_bytes) / 1e9:.2f} GB read per token "
          f"-> decode bound {bandwidth / (weight_bytes + kv_bytes):.1f} tokens/s")
    return bandwidth, bandwidth / (weight_bytes + kv_bytes)


def matvec_ceiling(ours, device, runs: int = 5) -> float:
    """Tokens/s if a decode step were nothing but its matrix-vector products: every weight matrix of the
    model once, in forward order, on a batch-1 input, through the same F.linear calls the forward makes
    (cycling through all of them, so no matrix is still in cache). What torch's GEMV allows here."""
    import torch.nn.functional as F

    mats = [m.weight for m in ours.modules() if isinstance(m, torch.nn.Linear)]  # 7 per block, then lm_head
    xs = {W.shape[1]: torch.randn(1, W.shape[1], dtype=W.dtype, device=device) for W in mats}
    best = float("inf")
    with torch.no_grad():
        for _ in range(runs):
            sync(device)
            t = time.perf_counter()
            for W in mats:
                F.linear(xs[W.shape[1]], W)
            sync(device)
            best = min(best, time.perf_counter() - t)
    nbytes = sum(W.numel() * W.element_size() for W in mats)
    print(f"the model's matrix-vector products alone: {1 / best:.1f} tokens/s ({nbytes / best / 1e9:.1f} GB/s streamed)")
    return 1 / best


def report(args, record: dict, results: dict, tokens: dict, limit: float, ceiling: float) -> None:
    print(f"\n{'':<11}{'prefill tok/s':>15}{'decode tok/s':>14}{'of bound':>10}{'of matvec ceiling':>19}")
    for side, r in results.items():
        pre, dec = statistics.median(r["prefill"]), statistics.median(r["decode"])
        record["sides"][side] = {"prefill_tokens_per_s": pre, "decode_tokens_per_s": dec, "decode_share_of_bound": dec / limit,
                                 "decode_share_of_matvec_ceiling": dec / ceiling}
        print(f"{side:<11}{pre:>15.1f}{dec:>14.2f}{100 * dec / limit:>9.1f}%{100 * dec / ceiling:>18.1f}%")
    if args.reference:
        o, r = record["sides"]["ours"], record["sides"]["reference"]
        record["ratios"] = {"prefill": o["prefill_tokens_per_s"] / r["prefill_tokens_per_s"],
                            "decode": o["decode_tokens_per_s"] / r["decode_tokens_per_s"]}
        record["same_tokens"] = tokens["ours"] == tokens["reference"]
        print(f"\nours / reference: prefill {record['ratios']['prefill']:.2f}x, decode {record['ratios']['decode']:.2f}x; "
              f"same greedy tokens: {record['same_tokens']}")


def main():
    args = parse_args()
    device = parse_device(args.device)
    dtype = getattr(torch, args.dtype)
    ours = build_ours(dtype, device)
    sides = {"ours": ours}
    if args.reference:
        sides["reference"] = copy_weights_into_reference(ours, dtype, device)
    run = timed_generation(sides, torch.randint(0, 151643, (1, args.prompt), generator=torch.Generator().manual_seed(0)),
                           device)
    info = machine()
    print(f"{info['cpu']} ({info['threads']} threads), torch {info['torch']}, device {device}, {args.dtype}")
    bandwidth, limit = decode_bound(ours, args, device)
    ceiling = matvec_ceiling(ours, device)
    results, tokens = {s: {"prefill": [], "decode": []} for s in sides}, {}
    for i in range(args.warmup + args.runs):
        for side in sides:  # prefill = a generation of one token; decode = the rest of a full generation
            t1, _ = run(side, 1)
            tn, tokens[side] = run(side, args.new)
            if i >= args.warmup:
                results[side]["prefill"].append(args.prompt / t1)
                results[side]["decode"].append((args.new - 1) / (tn - t1))
            print(f"  {side:<9} run {i + 1}{' (warm-up)' if i < args.warmup else ''}: prefill {args.prompt / t1:.1f} "
                  f"tok/s, decode {(args.new - 1) / (tn - t1):.2f} tok/s", flush=True)
    record = {"bench": "generate", "machine": info, "device": str(device), "dtype": args.dtype, "prompt": args.prompt,
              "new_tokens": args.new, "copy_bandwidth": bandwidth, "decode_bound_tokens_per_s": limit, "matvec_ceiling_tokens_per_s": ceiling, "sides": {}}
    report(args, record, results, tokens, limit, ceiling)
    append_result(record)


if __name__ == "__main__":
    main()
