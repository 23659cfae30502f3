"""Qwen2.5 (and Llama-family) decoder in pure PyTorch. Read config.py, then transformer.py."""

from .config import ModelConfig
from .generate import generate
from .loading import DEFAULT_MODEL, load_config, load_model, load_pretrained, load_tokenizer, save_pretrained
from .tokenizer import Tokenizer
from .transformer import KVCache, Transformer

__all__ = ["DEFAULT_MODEL", "KVCache", "ModelConfig", "Tokenizer", "Transformer", "generate", "load_config",
           "load_model", "load_pretrained", "load_tokenizer", "save_pretrained"]
