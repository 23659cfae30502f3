"""The tokenizer: `tokenizers.Tokenizer` plus what a checkpoint says about chat format and end tokens.

Two facts worth knowing about Qwen2.5: every digit is its own token (which is why LLMTIME works with
it), and the embedding has 151,936 rows while the tokenizer has 151,665 tokens, so the last rows are
padding that must never be sampled (`vocab_size` below is the tokenizer's, not the embedding's).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from common import UserError, write_json


class Tokenizer:
    def __init__(self, tok: HFTokenizer, eos_ids: list[int], chat_template: str | None = None,
                 pad_id: int | None = None):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_ids = list(dict.fromkeys(eos_ids))  # every end token, in order, without repeats
        self.chat_template = chat_template
        self.pad_id = pad_id if pad_id is not None else (self.eos_ids[-1] if self.eos_ids else 0)
        # Qwen's template injects a default system prompt when the chat has none; copy that behaviour.
        marker = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        self.default_system = marker if chat_template and marker in chat_template else None

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"no tokenizer.json in {path}: a checkpoint folder needs its tokenizer files")
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises bare Exceptions on bad files
            raise UserError(f"{path / 'tokenizer.json'} could not be read ({e})") from None
        cfg = _read_optional_json(path / "tokenizer_config.json")
        gen = _read_optional_json(path / "generation_config.json")
        model_cfg = _read_optional_json(path / "config.json")
        eos: list[int] = []
        for source in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            eos += source if isinstance(source, list) else [source] if source is not None else []
        for name in (cfg.get("eos_token"),):
            name = name.get("content") if isinstance(name, dict) else name
            if name and tok.token_to_id(name) is not None:
                eos.append(tok.token_to_id(name))
        pad = cfg.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = gen.get("pad_token_id", tok.token_to_id(pad) if pad else None)
        return cls(tok, eos, cfg.get("chat_template"), pad_id)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    @property
    def has_chat_format(self) -> bool:
        return self.token_to_id("<|im_start|>") is not None and self.token_to_id("<|im_end|>") is not None

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """ChatML, as Qwen's chat template writes it for plain (tool-free) conversations."""
        if not self.has_chat_format:
            raise UserError("this tokenizer has no ChatML markers (<|im_start|>, <|im_end|>); drop --chat")
        if self.default_system and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}] + list(messages)
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, plus minimal tokenizer_config.json and generation_config.json where the
        folder has none, so the end tokens and pad token survive the trip."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path / "tokenizer.json"))
        if not (path / "tokenizer_config.json").exists():
            eos = self.tok.id_to_token(self.eos_ids[0]) if self.eos_ids else None
            cfg = {"eos_token": eos, "pad_token": self.tok.id_to_token(self.pad_id)}
            if self.chat_template:
                cfg["chat_template"] = self.chat_template
            write_json(path / "tokenizer_config.json", cfg)
        if not (path / "generation_config.json").exists():
            write_json(path / "generation_config.json", {"eos_token_id": self.eos_ids, "pad_token_id": self.pad_id})


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
