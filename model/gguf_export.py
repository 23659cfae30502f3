"""A model as one GGUF file: what llama.cpp, Ollama and LM Studio load.

A GGUF file is a header of typed key/value metadata followed by named tensors. Writing one for a
Qwen2 or Llama checkpoint takes four things, each below:

1. The hyper-parameters, under `{arch}.*` keys (`hyperparameters`). Every one is written, because the
   runtime's defaults are silently wrong for these models: `rope.freq_base` defaults to 10,000 where
   Qwen2.5 needs 1,000,000 (positions would rotate 100x too fast past the first few tokens), and
   `attention.head_count_kv` defaults to the head count where Qwen2.5-0.5B shares 2 key/value heads
   among 14 (the k/v tensors would not even have the shape the runtime expects).
2. The tokenizer, under `tokenizer.ggml.*` (model/gguf_tokenizer.py).
3. The tensors under llama.cpp's names (`tensor_name`): `token_embd`, `blk.N.attn_q`, ..., `output`.
   A model with tied embeddings (Qwen2.5, SmolLM2) has no `output` tensor: the runtime multiplies by
   `token_embd` when `output` is absent, as transformers does with `lm_head` tied.
4. The rotary layout. Hugging Face's RoPE rotates the two halves of each head's vector against each
   other (pairs (i, i + d/2)). llama.cpp runs `qwen2` the same way (its "NEOX" mode), so Qwen2's q/k
   are written as they are; but it runs `llama` with adjacent pairs (2i, 2i + 1), the layout of Meta's
   original checkpoints, which transformers' conversion permuted into halves. Writing a Llama model
   therefore permutes the rows of q_proj and k_proj (weights and biases) back (`rope_interleave`);
   without it the model loads and computes garbage.

The tensors are written in f32, f16, bf16 or q8_0 (model/ggml_quant.py); norm weights and biases stay
f32. The `gguf` package writes the file (pure Python, an optional extra: `pip install gguf`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from common.cli import UserError
from common.files import atomic_path

from .config import ModelConfig
from .ggml_quant import TYPES, encode
from .gguf_tokenizer import tokenizer_metadata

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType: the file's main tensor type
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION, which every converter writes
# Hugging Face parameter name (per layer, after `model.layers.N.`) -> llama.cpp's name (after `blk.N.`)
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def require_gguf():
    """The `gguf` package, or one line saying how to get it (it is needed only to write GGUF files)."""
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


def tensor_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`, `lm_head.weight` -> `output.weight`."""
    base, _, suffix = hf_name.rpartition(".")
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
    if layer and layer.group(2) in LAYER_NAMES:
        return f"blk.{layer.group(1)}.{LAYER_NAMES[layer.group(2)]}.{suffix}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    raise UserError(f"tensor {hf_name} has no GGUF name (not a Qwen2/Llama parameter)")


def rope_interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of q_proj/k_proj (weight (out, in) or bias (out,)) from HF's half-split RoPE layout to
    llama.cpp's adjacent pairs: within each head, row i goes to 2i and row d/2 + i to 2i + 1.
    The same permutation as llama.cpp's converter (`LlamaModel.permute`); its inverse is transformers'."""
    head_dim = w.shape[0] // n_heads
    halves = w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:])  # (heads, half, d/2, ...)
    return halves.transpose(1, 2).reshape(w.shape)  # (heads, d/2, half, ...): pairs side by side


def gguf_tensors(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named tensors -> llama.cpp-named ones, q/k rows permuted for Llama; a tied lm_head is dropped."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if config.model_type == "llama" and re.search(r"\.(q_proj|k_proj)\.(weight|bias)$", name):
            t = rope_interleave(t, config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads)
        out[tensor_name(name)] = t
    return out


def hyperparameters(config: ModelConfig, gguf_type: str, name: str) -> list[tuple[str, str, object]]:
    """(key, GGUF value type, value) for the `general.*` and `{arch}.*` keys."""
    arch = config.model_type
    return [
        ("general.type", "string", "model"),
        ("general.name", "string", name),
        ("general.file_type", "uint32", FILE_TYPES[gguf_type]),
        ("general.quantization_version", "uint32", QUANTIZATION_VERSION),
        (f"{arch}.vocab_size", "uint32", config.vocab_size),
        (f"{arch}.context_length", "uint32", config.max_position_embeddings),
        (f"{arch}.embedding_length", "uint32", config.hidden_size),
        (f"{arch}.feed_forward_length", "uint32", config.intermediate_size),
        (f"{arch}.block_count", "uint32", config.num_hidden_layers),
        (f"{arch}.attention.head_count", "uint32", config.num_attention_heads),
        (f"{arch}.attention.head_count_kv", "uint32", config.num_key_value_heads),
        (f"{arch}.attention.key_length", "uint32", config.head_dim),
        (f"{arch}.attention.value_length", "uint32", config.head_dim),
        (f"{arch}.attention.layer_norm_rms_epsilon", "float32", config.rms_norm_eps),
        (f"{arch}.rope.dimension_count", "uint32", config.head_dim),
        (f"{arch}.rope.freq_base", "float32", config.rope_theta),
    ]


def tokenizer_keys(meta: dict) -> list[tuple[str, str, object]]:
    """(key, GGUF value type, value) for the `tokenizer.ggml.*` and `tokenizer.chat_template` keys."""
    ids = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    keys = [("tokenizer.ggml.model", "string", meta["model"]), ("tokenizer.ggml.pre", "string", meta["pre"]),
            ("tokenizer.ggml.tokens", "array", meta["tokens"]),
            ("tokenizer.ggml.token_type", "array", meta["token_type"]),
            ("tokenizer.ggml.merges", "array", meta["merges"])]
    keys += [(f"tokenizer.ggml.{ids[kind]}", "uint32", i) for kind, i in meta["special_ids"].items()]
    keys += [(f"tokenizer.ggml.add_{kind}_token", "bool", on) for kind, on in meta["add_special"].items()]
    if meta["chat_template"]:
        keys.append(("tokenizer.chat_template", "string", meta["chat_template"]))
    return keys


def write_gguf_file(path: str | os.PathLike, arch: str, keys: list[tuple[str, str, object]],
                    tensors: dict[str, torch.Tensor], gguf_type: str) -> dict[str, str]:
    """Write the metadata and the tensors (each in `gguf_type`, see `ggml_quant.encode`) atomically;
    return each tensor's stored type."""
    gguf = require_gguf()
    stored = {}
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for key, kind, value in keys:
            getattr(writer, f"add_{kind}")(key, value)
        for name, t in tensors.items():
            data, stored[name] = encode(t, gguf_type)
            raw = gguf.GGMLQuantizationType[stored[name]]
            writer.add_tensor(name, data, raw_shape=tuple(t.shape) if data.dtype != "uint8" else None, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return stored


def write_gguf(state: dict[str, torch.Tensor], config: ModelConfig, tokenizer_dir: str | os.PathLike,
               path: str | os.PathLike, gguf_type: str = "f16", name: str | None = None) -> dict[str, str]:
    """Write a model (its HF-named tensors `state`, its config, the folder holding its tokenizer files)
    as one GGUF file that llama.cpp runs as is. Returns each GGUF tensor's stored type."""
    if gguf_type not in TYPES:
        raise UserError(f"unknown GGUF type {gguf_type!r}; choose from {', '.join(TYPES)}")
    if config.model_type not in ("qwen2", "llama"):
        raise UserError(f"GGUF export writes qwen2 and llama models, not {config.model_type}")
    keys = hyperparameters(config, gguf_type, name or Path(path).stem)
    keys += tokenizer_keys(tokenizer_metadata(tokenizer_dir, config.vocab_size))
    return write_gguf_file(path, config.model_type, keys, gguf_tensors(state, config), gguf_type)
