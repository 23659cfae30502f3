"""A fine-tuned run in GGUF, for llama.cpp, Ollama and LM Studio: the merged model, or the adapter alone.

Merged (`export_gguf`): W + scaling * B A for every adapted projection, added in fp32 (into the
dequantized weights for a QLoRA base), then written by model/gguf_export.py like any checkpoint. One
file, nothing else needed at run time; it is as large as the base model.

Adapter (`export_adapter_gguf`): llama.cpp's LoRA format, a few MB, applied over the base model's GGUF
at load time (`llama-cli -m base.gguf --lora adapter.gguf`). The file holds

- `general.type` "adapter", `adapter.type` "lora", `adapter.lora.alpha`, and `general.architecture`
  (llama.cpp refuses an adapter made for another architecture);
- per adapted weight `W` (GGUF name, e.g. `blk.0.attn_q.weight`), two tensors `W.lora_a` = A (r x in)
  and `W.lora_b` = B (out x r), exactly PEFT's shapes. llama.cpp computes y += (alpha / r) * B (A x)
  with r read from the tensors' shapes.

Two conversions keep that equal to this codebase's adapter:

- rsLoRA scales by alpha / sqrt(r), which the format cannot say; the file stores alpha * sqrt(r), so
  that llama.cpp's alpha / r comes out as alpha / sqrt(r).
- For `llama`, the base GGUF's q/k rows are permuted into llama.cpp's rotary layout
  (model/gguf_export.py, `rope_interleave`). B's rows are the output rows, so B gets the same
  permutation; A (the input side) does not. Then B' A = P (B A): the adapter moves the permuted
  weights exactly as it moved the original ones.

The tensors are written in f32 whatever the merged model's type: the adapter is small, and llama.cpp
adds its product to the weights in f32 anyway.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from common.cli import UserError
from model.config import ModelConfig
from model.gguf_export import rope_interleave, tensor_name, write_gguf, write_gguf_file
from model.nf4 import NF4Weight
from model.transformer import Transformer

from .layer import lora_modules
from .peft_format import read_adapter


@torch.no_grad()
def merged_tensors(model) -> dict[str, torch.Tensor]:
    """The model's HF-named tensors in fp32, each adapted weight as W + scaling * B A (added in fp32,
    once: into the dequantized W for an NF4 base). The model itself is not changed."""
    merged = {}
    for name, m in lora_modules(model).items():
        base = m.weight.dequantize(torch.float32) if m.quantized else m.weight.float()  # (out, in)
        merged[f"{name}.weight"] = base if m.merged else base + m.delta_weight()
    state = {n: p for n, p in model.named_parameters() if ".lora_" not in n}  # tied lm_head appears once
    state.update((n, m.dequantize(torch.float32)) for n, m in model.named_modules() if isinstance(m, NF4Weight))
    state.update(merged)
    return {n: t.detach().float().cpu() for n, t in state.items()}


def export_gguf(model, path: str | os.PathLike, gguf_type: str = "f16",
                tokenizer_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Write the model, adapters merged in, as one GGUF file; the tokenizer comes from `tokenizer_dir`
    (default: the checkpoint folder the model was loaded from). Returns each tensor's stored type."""
    source = tokenizer_dir or getattr(model, "source", None)
    if source is None or str(source) == "tiny":
        raise UserError("GGUF export needs the checkpoint folder's byte-level BPE tokenizer files: load the model "
                        "from a checkpoint folder or hub id (the 'tiny' preset has no GGUF-compatible tokenizer)")
    return write_gguf(merged_tensors(model), model.config, source, path, gguf_type)


def adapter_tensors(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """PEFT-named A/B matrices -> `blk.N.attn_q.weight.lora_a` / `.lora_b`, B permuted for Llama's q/k.
    Each is checked against the base weight's shape (llama.cpp would refuse a mismatch only at load time)."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Transformer(config).named_parameters()}  # no memory
    out = {}
    for name, t in sorted(tensors.items()):
        base, _, kind = name.partition(".lora_")  # "model.layers.0.self_attn.q_proj", "A.weight"
        weight = shapes.get(base + ".weight")
        if kind not in ("A.weight", "B.weight") or weight is None:
            raise UserError(f"the adapter tensor {name} has no place in a {config.model_type} model")
        if (kind == "A.weight" and t.shape[1] != weight[1]) or (kind == "B.weight" and t.shape[0] != weight[0]):
            raise UserError(f"the adapter does not fit the base model: {name} has shape {tuple(t.shape)}, "
                            f"the weight it adapts {weight} (made for another model?)")
        t = t.float()
        if kind == "B.weight" and config.model_type == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if base.endswith("q_proj") else config.num_key_value_heads
            t = rope_interleave(t, heads)  # (out, r): the output rows, as the base weight's
        out[f"{tensor_name(base + '.weight')}.lora_{kind[0].lower()}"] = t
    return out


def export_adapter_gguf(adapter: str | os.PathLike, config: ModelConfig, path: str | os.PathLike) -> dict[str, str]:
    """Write the adapter at `adapter` (PEFT folder or run folder) in llama.cpp's LoRA format, for the
    base model `config` describes. Returns each tensor's stored type."""
    cfg, tensors = read_adapter(adapter)
    if config.model_type not in ("qwen2", "llama"):
        raise UserError(f"GGUF export writes qwen2 and llama models, not {config.model_type}")
    rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    if cfg.get("use_rslora"):
        alpha *= math.sqrt(rank)  # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)
    keys = [("general.type", "string", "adapter"), ("general.name", "string", Path(path).stem),
            ("adapter.type", "string", "lora"), ("adapter.lora.alpha", "float32", alpha)]
    return write_gguf_file(path, config.model_type, keys, adapter_tensors(tensors, config), "f32")
