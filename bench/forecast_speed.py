"""Forecasting with samples: eval.py's generation against the code before prefill-once and transformers.

    python bench/forecast_speed.py                        # 16 systems x 20 samples, all three sides
    python bench/forecast_speed.py --model ~/.cache/smollm2-135m-instruct   # real weights, real stops
    python bench/forecast_speed.py --systems 4 --samples 5 --sides ours,reference

The same prompts (LLMTIME text of simulated systems), the same weights and tokenizer (random weights
of Qwen2.5-0.5B's shape with its tokenizer, or --model), temperature-1 sampling constrained to
digits, separators and the end tokens, stopped after --horizon timesteps; one side at a time, in
this process's threads. Random weights do not write timesteps (they favour one token, often ';' or
an end token, and stop at once), so with them ';' and the end tokens are taken out of the allowed set
on every side: each sample then runs to eval.py's length limit, --horizon x 14 tokens at 2 decimals,
about what a real forecast of --horizon steps takes (~11 tokens per step).

- ours:      eval.generate_forecasts today: each prompt prefilled once, its samples decoded from copies
             of its cache, --batch-size rows (prompts x samples) decoded together, lm_head on the
             allowed tokens alone;
- before:    the same function at commit --before (b6ccbed), in a subprocess on the same checkpoint:
             every sample its own request (the prompt prefilled once per sample), 16 per batch;
- reference: transformers' generate(num_return_sequences, do_sample=True) with the same constraint
             (a logits processor) and stop (a stopping criterion), as many prompts per call as ours.

The time is generation alone (loading excluded). Each side reports its decode steps and new tokens,
so a side that stopped earlier by chance shows it. Results go to bench/results.jsonl.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import _util  # noqa: F401
import torch

from _util import QWEN_SHAPE, ROOT, append_result, machine, random_qwen

QWEN_FILES = ROOT.parent / "shared" / "qwen2.5-0.5b-instruct"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    a = p.add_argument
    a("--systems", type=int, default=16)
    a("--samples", type=int, default=20)
    a("--temperature", type=float, default=1.0)
    a("--context-steps", type=int, default=10)
    a("--horizon", type=int, default=5)
    a("--decimals", type=int, default=2)
    a("--batch-size", type=int, default=128, help="our rows per decode batch (eval.py's default)")
    a("--dtype", default="float32", choices=["float32", "bfloat16"])
    a("--sides", default="ours,before,reference")
    a("--before", default="b6ccbed", help="the commit to compare with")
    a("--tokenizer", default=str(QWEN_FILES), help="a folder with Qwen2.5's tokenizer.json (random weights)")
    a("--model", default=None, help="a checkpoint folder with real weights (default: random, Qwen2.5-0.5B's shape)")
    return p.parse_args()


def without_stops(ev, tok) -> None:
    """Random weights: no ';' and no end token may be drawn, so every sample runs to the length limit."""
    ev.FORMAT_CHARS = "0123456789.,"
    tok.eos_ids = []


def prompts_of(args) -> list[str]:
    from data import Scaler, simulate
    from data.windows import forecast_task

    values = simulate(args.systems, seed=0).values
    scaler = Scaler.fit(values)
    return forecast_task(values, scaler, args.decimals, args.context_steps, args.horizon).prompts


def count(texts) -> int:
    return sum(len(t) for system in texts for t in system)


def run_ours(args, model, tok, prompts) -> dict:
    import eval as ev

    dtype = getattr(torch, args.dtype)
    model = model.to(dtype)
    used = {}
    t = time.perf_counter()
    texts = ev.generate_forecasts(model, tok, prompts, args.horizon, args.decimals, args.samples, args.temperature,
                                  batch_size=args.batch_size, seed=0, flops_used=used)
    seconds = time.perf_counter() - t
    steps = sum(p["decode_steps"] for p in used["passes"])
    return {"seconds": seconds, "chars": count(texts), "decode_steps": steps, "calls": len(used["passes"])}


BEFORE_DRIVER = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import eval as ev
from model import load_pretrained
a = json.loads(sys.argv[2])
model, tok = load_pretrained(a["checkpoint"], dtype=getattr(torch, a["dtype"]))
model.eval()
if a["full_length"]:  # without_stops, in the older code
    ev.FORMAT_CHARS, tok.eos_ids = "0123456789.,", []
prompts = json.loads(open(a["prompts"]).read())
t = time.perf_counter()
texts = ev.generate_forecasts(model, tok, prompts, a["horizon"], a["decimals"], a["samples"], a["temperature"], seed=0)
print(json.dumps({"seconds": time.perf_counter() - t, "chars": sum(len(x) for s in texts for x in s)}))
"""


def run_before(args, checkpoint: Path, prompts, work: Path) -> dict:
    """The older eval.generate_forecasts (its own default batch of 16 requests), in a subprocess."""
    tree = work / "before"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, capture_output=True, check=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(tree, filter="data")
    (work / "prompts.json").write_text(json.dumps(prompts))
    spec = {"checkpoint": str(checkpoint), "prompts": str(work / "prompts.json"), "dtype": args.dtype,
            "horizon": args.horizon, "decimals": args.decimals, "samples": args.samples, "temperature": args.temperature,
            "full_length": args.model is None}
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", BEFORE_DRIVER, str(tree), json.dumps(spec)], cwd=tree, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the code at {args.before} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_reference(args, model, tok, prompts) -> dict:
    """transformers generate with num_return_sequences, constrained and stopped as eval.py does."""
    import transformers

    import eval as ev

    if args.model:
        ref = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    else:
        ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN_SHAPE)).eval()
        ref.load_state_dict(model.state_dict(), strict=False)
        ref.tie_weights()
    ref = ref.to(getattr(torch, args.dtype))
    allowed = torch.tensor(ev.allowed_token_ids(tok))
    sep = tok.token_to_id(";")

    class Allowed(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            keep = torch.full_like(scores, float("-inf"))
            keep[:, allowed] = 0
            return scores + keep

    class AfterHorizon(transformers.StoppingCriteria):
        def __init__(self, prompt_len):
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores, **kw):
            return (input_ids[:, self.prompt_len:] == sep).sum(-1) >= args.horizon

    per_call = max(1, args.batch_size // args.samples)
    max_new = args.horizon * (2 * (4 + args.decimals) + 2)
    chars = steps = 0
    t = time.perf_counter()
    for s in range(0, len(prompts), per_call):
        enc = [tok.encode(p) for p in prompts[s : s + per_call]]
        T = max(map(len, enc))
        ids = torch.tensor([[tok.pad_id] * (T - len(e)) + e for e in enc])
        mask = torch.tensor([[0] * (T - len(e)) + [1] * len(e) for e in enc])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=mask, do_sample=True, temperature=args.temperature, top_k=0,
                               top_p=1.0, num_return_sequences=args.samples, max_new_tokens=max_new,
                               logits_processor=transformers.LogitsProcessorList([Allowed()]),
                               stopping_criteria=transformers.StoppingCriteriaList([AfterHorizon(T)]),
                               eos_token_id=list(tok.eos_ids) or None, pad_token_id=tok.pad_id)
        steps += out.shape[1] - T
        chars += sum(len(tok.decode(row[T:].tolist(), skip_special_tokens=True)) for row in out)
    return {"seconds": time.perf_counter() - t, "chars": chars, "decode_steps": steps}


def main():
    args = parse_args()
    import eval as ev
    from model import load_pretrained, load_tokenizer, save_pretrained

    torch.manual_seed(0)
    work = tempfile.TemporaryDirectory()
    if args.model:
        model, tok = load_pretrained(args.model)
        checkpoint = Path(args.model)
    else:
        model, tok = random_qwen(), load_tokenizer(args.tokenizer)
        checkpoint = Path(work.name) / "ckpt"
        if "before" in args.sides:  # for the older code to load, with the tokenizer's own end tokens
            save_pretrained(model, checkpoint, tok)
        without_stops(ev, tok)
    model.eval()
    prompts = prompts_of(args)
    sides = args.sides.split(",")
    info = machine()
    print(f"machine: {info['cpu']}, {info['threads']} threads, torch {info['torch']}; {args.dtype}; "
          f"{args.model or 'random weights, Qwen2.5-0.5B shape, samples run to the length limit'}")
    print(f"{args.systems} systems x {args.samples} samples, prompts of {min(map(len, tok.encode_batch(prompts)))}-"
          f"{max(map(len, tok.encode_batch(prompts)))} tokens, horizon {args.horizon} steps, T={args.temperature}")
    results = {}
    with work:
        if "before" in sides:
            results["before"] = run_before(args, checkpoint, prompts, Path(work.name))
            print(f"before ({args.before}): {results['before']}", flush=True)
    if "reference" in sides:
        results["reference"] = run_reference(args, model, tok, prompts)
        print(f"reference (transformers {__import__('transformers').__version__}): {results['reference']}", flush=True)
    if "ours" in sides:
        results["ours"] = run_ours(args, model, tok, prompts)
        print(f"ours: {results['ours']}", flush=True)
    if "ours" in results:
        for other in ("before", "reference"):
            if other in results:
                print(f"ours vs {other}: {results[other]['seconds'] / results['ours']['seconds']:.2f}x faster")
    append_result({"bench": "forecast", "machine": info, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
