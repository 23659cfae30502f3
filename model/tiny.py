"""`--model tiny`: a 2-layer Qwen2-shaped model with seeded random weights and a character tokenizer.

It lets every command (sampling, training, evaluation, FLOP checks) run offline in seconds, and the
same seed gives the same weights on every machine. Like Qwen2.5, its embedding has more rows (96)
than the tokenizer has tokens, and it declares two end tokens, so the same pitfalls are exercised.
"""

from __future__ import annotations

import string

import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .config import ModelConfig
from .tokenizer import Tokenizer
from .transformer import Transformer

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = string.digits + ".,;-" + " \n" + string.ascii_letters + ":?!'\"()"


def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                       rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=True,
                       attention_bias=True, model_type="qwen2")


def tiny_tokenizer() -> Tokenizer:
    """One token per character (as Qwen does for digits), <unk> for anything else, ChatML markers."""
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    template = "ChatML: <|im_start|>role\\ncontent<|im_end|>\\n"
    return Tokenizer(tok, eos_ids=eos, chat_template=template, pad_id=tok.token_to_id("<|endoftext|>"))


def init_random_weights(model: Transformer, seed: int = 0) -> Transformer:
    """Seeded weights with enough scale that logits are peaked (so greedy decoding is stable), and
    non-zero biases and norm weights (so a dropped bias or norm weight changes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                value = 1 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                value = 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name:
                value = torch.randn(p.shape, generator=g)
            else:
                value = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
            p.copy_(value)
    return model


def tiny_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0) -> Transformer:
    model = init_random_weights(Transformer(tiny_config()), seed).to(dtype=dtype, device=device)
    model.source = "tiny"
    return model.eval()
