"""Build the same tiny random model in transformers and in this codebase (test-only helper)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from model import load_model
from model.tiny import tiny_tokenizer


def hf_config(kind: str = "qwen2", *, hidden=64, heads=4, kv=2, head_dim=None, layers=2, inter=96, vocab=96,
              tie=None, theta=10000.0, bias=None, max_positions=512):
    common = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, rms_norm_eps=1e-6, max_position_embeddings=max_positions,
                  rope_theta=theta)
    if head_dim is not None:
        common["head_dim"] = head_dim
    if kind == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True if tie is None else tie)
    return transformers.LlamaConfig(**common, tie_word_embeddings=False if tie is None else tie,
                                    attention_bias=bool(bias))


def hf_model(config, seed: int = 0, embed_std: float | None = None) -> transformers.PreTrainedModel:
    """A random HF model with every parameter non-trivial: biases and norm weights too (HF zeroes/ones
    them, which would hide a dropped bias or an ignored norm weight). Tied embeddings get a smaller scale
    by default, or every token's own row dominates its logits and greedy decoding just repeats it."""
    embed_std = embed_std if embed_std is not None else (0.2 if config.tie_word_embeddings else 1.0)
    torch.manual_seed(seed)
    cls = transformers.Qwen2ForCausalLM if config.model_type == "qwen2" else transformers.LlamaForCausalLM
    model = cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (embed_std if "embed" in name else p.shape[-1] ** -0.5))
    return model


def twin(tmp_path: Path, kind: str = "qwen2", dtype=torch.float32, shard: str | None = None, seed: int = 0, **cfg):
    """(hf_model, our_model, checkpoint_dir): HF model saved with save_pretrained, loaded by us."""
    hf = hf_model(hf_config(kind, **cfg), seed)
    path = tmp_path / f"{kind}-ckpt"
    hf.to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save(path)
    ours = load_model(path, dtype=torch.float32)
    return hf.float(), ours, path
