"""Run our GGUF exports through llama.cpp itself (llama-cpp-python) and compare with our logits.

Two steps, in two environments, because llama-cpp-python is no dependency of this project (it builds
llama.cpp from source; `pip install llama-cpp-python` takes ~20 minutes on 2 cores):

    python bench/gguf_llama_cpp.py write /tmp/gguf-check [--smollm2 ~/.cache/smollm2-135m-instruct]
    /path/to/venv-with-llama-cpp/bin/python bench/gguf_llama_cpp.py check /tmp/gguf-check

`write` (this project's environment) exports tiny random qwen2 and llama models with Qwen2.5's real
tokenizer (f32 and q8_0), a LoRA adapter over the llama one, and, with --smollm2, the real SmolLM2
checkpoint (f16 and q8_0); it stores, per case, the text, our token ids and our logits. `check` (numpy
and llama_cpp only) tokenizes the text with llama.cpp (as it tokenizes a prompt: its own BOS rule,
special tokens parsed) and evaluates our ids, then prints the largest logit difference relative to
the largest logit. docs/export.md gives the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
QWEN_DIR = ROOT.parent / "shared" / "qwen2.5-0.5b-instruct"
TEXT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nContinue: "
        "0.25,1.50;0.27,1.47;0.31,1.42;<|im_end|>\n<|im_start|>assistant\n0.35,1.38;0.40,1.33;")


def tiny(kind: str):
    import torch

    from model import ModelConfig, Transformer
    from model.tiny import init_random_weights

    config = ModelConfig(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rope_theta=1e6 if kind == "qwen2" else 1e5, tie_word_embeddings=kind == "qwen2",
                         attention_bias=kind == "qwen2", model_type=kind, max_position_embeddings=4096)
    model = init_random_weights(Transformer(config), seed=0).eval()
    with torch.no_grad():  # embeddings of std 1 would make every logit row peak at its own token
        model.model.embed_tokens.weight.mul_(0.2)
    return model


def write_case(out: Path, cases: list, name: str, model, tokenizer_dir, gguf_type: str, ids, lora_of=None):
    import torch

    from lora.gguf_export import export_gguf

    export_gguf(model, out / f"{name}.gguf", gguf_type, tokenizer_dir=tokenizer_dir)
    with torch.no_grad():
        np.save(out / f"{name}.npy", model(torch.tensor([ids]))[0].float().numpy())  # (tokens, vocab)
        np.save(out / f"{name}-rounded.npy", rounded(model, gguf_type)(torch.tensor([ids]))[0].float().numpy())
    cases.append({"name": name, "model": f"{name}.gguf", "ids": ids, "text": TEXT, "lora": lora_of})


def rounded(model, gguf_type: str):
    """A copy of our model computing with each 2-D weight as the file stores it (f16, q8_0, ...)."""
    import copy

    import torch

    from model.ggml_quant import decode, encode

    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                data, stored = encode(p, gguf_type)
                p.copy_(decode(data, stored, tuple(p.shape)))
    return model


def write(out: Path, smollm2: str | None) -> None:
    sys.path.insert(0, str(ROOT))
    import lora
    import torch
    from lora.gguf_export import export_adapter_gguf, export_gguf
    from model import load_pretrained, load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    cases: list = []
    ids = load_tokenizer(QWEN_DIR).encode(TEXT)
    for kind in ("qwen2", "llama"):
        for gguf_type in ("f32", "q8_0"):
            write_case(out, cases, f"tiny-{kind}-{gguf_type}", tiny(kind), QWEN_DIR, gguf_type, ids)
    base, adapted = tiny("llama"), tiny("llama")  # the adapter over the base file must equal the merged model
    export_gguf(base, out / "lora-base.gguf", "f32", tokenizer_dir=QWEN_DIR)
    lora.apply_lora(adapted, rank=4, alpha=8, targets="all", verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.lora_parameters(adapted).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora.save_adapter(adapted, out / "adapter")
    export_adapter_gguf(out / "adapter", adapted.config, out / "lora-adapter.gguf")
    write_case(out, cases, "tiny-llama+lora", adapted, QWEN_DIR, "f32", ids)
    cases[-1].update(model="lora-base.gguf", lora="lora-adapter.gguf")  # llama.cpp applies the adapter file
    if smollm2:
        model, tok = load_pretrained(smollm2)
        for gguf_type in ("f16", "q8_0"):
            write_case(out, cases, f"smollm2-{gguf_type}", model, smollm2, gguf_type, tok.encode(TEXT))
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"wrote {len(cases)} cases to {out}")


def check(out: Path) -> None:
    import llama_cpp.llama_cpp as api
    from llama_cpp import Llama, __version__

    default_params = api.llama_model_default_params

    def without_extra_buffers():  # ggml's AMX int8 kernels die with SIGILL on VMs that do not grant AMX state
        params = default_params()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = without_extra_buffers
    print(f"llama-cpp-python {__version__}")
    for case in json.loads((out / "cases.json").read_text()):
        kwargs = {"lora_path": str(out / case["lora"])} if case["lora"] else {}
        llm = Llama(model_path=str(out / case["model"]), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                    type_k=0, type_v=0, **kwargs)  # ggml type 0: an f32 KV cache, so only the weights round
        tokens = llm.tokenize(case["text"].encode(), add_bos=True, special=True)
        llm.eval(case["ids"])
        theirs = np.array(llm.scores[: len(case["ids"])], dtype=np.float32)  # (tokens, vocab)
        ours, same_rounding = (np.load(out / f"{case['name']}{suffix}.npy") for suffix in ("", "-rounded"))
        rel = [float(np.abs(theirs - ref).max() / np.abs(ref).max()) for ref in (same_rounding, ours)]
        same_top = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
        print(f"{case['name']:18s} tokenization {'equal' if tokens == case['ids'] else 'DIFFERENT'}; "
              f"max |logit diff| / max |logit|: {rel[0]:.1e} vs ours with the file's rounding, {rel[1]:.1e} vs "
              f"ours unrounded; same argmax at {same_top:.0%} of {len(tokens)} positions")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("step", choices=["write", "check"])
    p.add_argument("out", type=Path)
    p.add_argument("--smollm2", default=None, help="a SmolLM2 checkpoint folder to export and compare too")
    args = p.parse_args()
    write(args.out, args.smollm2) if args.step == "write" else check(args.out)
